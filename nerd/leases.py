"""Leases: which run is computing what right now, so that runs sharing one cache file compute each
result once.

Before a run computes a spectrum or a tether pair's sums, it claims it in the cache file's
`leases` table: one row per key (a spectrum's content digest, the tensor it is read from, a pair
of content digests) naming the holder (host, pid, and when that process started) and when the
claim expires. A run that finds a key claimed by another live run does its other work first and
then waits for that result (Claims.wait), looking for it every POLL_SECONDS; it computes the
result itself once the claim is lost. A claim is lost when it expires (the holder renews all of
its claims every RENEW_SECONDS from a heartbeat thread, so only a holder that stopped running
lets them expire: killed with SIGKILL, or stopped) or at once when its holder ran on this host
and that process is gone (the pid does not exist, has ended, or belongs to a process started
since: Linux's /proc gives a process's start time, with the boot id). Claims are released as soon
as the result is stored, and all of a process's claims when it closes the cache (a finished or
failed run, Ctrl-C, SIGTERM); only SIGKILL leaves them behind, for the next run to take over.

A run waits only while it holds no claim of its own (it releases each as the result is stored,
before it waits), so two runs never wait for each other. A claim costs one short write
transaction. A cache in memory has nobody to share with and claims nothing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

from .database import Database, immediate

Item = TypeVar("Item", bound=Hashable)

LEASE_SECONDS = 30.0  # a claim not renewed for this long is lost (its holder was killed, or stopped)
RENEW_SECONDS = 5.0  # how often a holder's heartbeat renews its claims
POLL_SECONDS = 0.5  # how often a run waiting for another's result looks for it
TABLE = """CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started TEXT NOT NULL, expires REAL NOT NULL)"""


@dataclass(frozen=True)
class Holder:
    """The process that holds a claim: its host, pid and start time ('' where the system does not
    say), and when its claim expires (time.time())."""

    host: str
    pid: int
    started: str
    expires: float = 0.0

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.started) == (other.host, other.pid, other.started)

    def lost(self, me: Holder, now: float) -> bool:
        """Whether this holder's claim is lost: expired, or held by a process of this host that is gone."""
        if self.expires < now:
            return True
        if self.host != me.host:
            return False  # another host's process is known alive by its heartbeat alone
        started = started_of(self.pid)
        return started is None or bool(started and self.started and started != self.started)

    def described(self, me: Holder) -> str:
        return f"pid {self.pid}" + ("" if self.host == me.host else f" on {self.host}")


def spectrum_key(digest: str) -> str:
    """The lease key of a spectrum: its content digest."""
    return f"spectrum:{digest}"


def tensor_key(file: str, stat: str, tensor: str) -> str:
    """The lease key of the spectrum of a tensor of an unchanged file, before its content digest is
    known (the Ray driver never reads the tensor): a digest of the file's identity and the name."""
    return "tensor:" + hashlib.sha256("\0".join((file, stat, tensor)).encode()).hexdigest()


def pair_key(candidate: str, base: str) -> str:
    """The lease key of a tether pair: the content digests of its two tensors."""
    return f"tether:{candidate}:{base}"


@cache
def boot_id() -> str:
    """This boot of this machine (Linux), so that a process start time is not met again after a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def started_of(pid: int) -> str | None:
    """When a process started (the boot id and its start time in clock ticks, from /proc); None if no
    such process runs (none, ended, or a zombie); '' where the system does not say (no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if os.path.exists("/proc/self/stat") else existing(pid)
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return None if fields[0] in ("Z", "X") else f"{boot_id()}:{fields[19]}"


def existing(pid: int) -> str | None:
    """'' if a process of this pid exists (where /proc does not say when it started), else None."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # another user's process
    return ""


def this_process() -> Holder:
    """This process, as its claims name it."""
    return Holder(socket.gethostname(), os.getpid(), started_of(os.getpid()) or "")


class Leases:
    """This process's claims in one cache file (see the module docstring): `claim`, `holder`,
    `release`, and `close`, which releases every one left. In memory, every claim is granted."""

    def __init__(self, database: Database):
        self.database = database
        self.heartbeat: Heartbeat | None = None

    @property
    def active(self) -> bool:
        """Whether claims are made: the cache is a file (another run may share it)."""
        return not self.database.in_memory

    def claim(self, groups: list[list[str]]) -> list[Holder | None]:
        """Claim the keys of each group together, in one transaction: None for a group this process
        holds now, else the live run that holds one of its keys (the group is then not claimed)."""
        if self.database.in_memory or not groups:
            return [None] * len(groups)
        me = this_process()

        def work(db: sqlite3.Connection) -> list[Holder | None]:
            now = time.time()
            with immediate(db):
                found = [live_holder(db, keys, me, now) for keys in groups]
                rows = [
                    (k, me.host, me.pid, me.started, now + LEASE_SECONDS)
                    for keys, h in zip(groups, found)
                    if h is None
                    for k in keys
                ]
                db.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)", rows)
            return found

        found = self.database.run(work)
        if any(h is None for h in found) and self.heartbeat is None and not self.database.in_memory:
            self.heartbeat = Heartbeat(self.database.path, me)
            self.heartbeat.start()
        return found

    def holder(self, keys: list[str]) -> Holder | None:
        """The live run other than this process that holds one of the keys, if any."""
        if self.database.in_memory:
            return None
        return self.database.run(lambda db: live_holder(db, keys, this_process(), time.time()))

    def release(self, keys: list[str]) -> None:
        """Give up this process's claims of the keys (committed)."""
        if self.database.in_memory or not keys:
            return
        me = this_process()
        self.database.run(
            lambda db: db.executemany(
                "DELETE FROM leases WHERE key=? AND host=? AND pid=? AND started=?",
                [(k, me.host, me.pid, me.started) for k in keys],
            )
        )

    def close(self) -> None:
        """Release every claim of this process, and every lost claim of any other (nobody took it
        over: nobody needed it), and stop the heartbeat."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.database.in_memory:
            return
        me = this_process()

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            with immediate(db):
                rows = db.execute("SELECT key, host, pid, started, expires FROM leases").fetchall()
                gone = [
                    (key,) for key, *holder in rows if Holder(*holder).same_process(me) or Holder(*holder).lost(me, now)
                ]
                db.executemany("DELETE FROM leases WHERE key=?", gone)

        try:
            self.database.run(work)
        except sqlite3.Error:  # closed already, or unusable: the claims expire instead
            pass


def live_holder(db: sqlite3.Connection, keys: list[str], me: Holder, now: float) -> Holder | None:
    """The holder of one of the keys that is neither this process nor has lost its claim."""
    for key in keys:
        row = db.execute("SELECT host, pid, started, expires FROM leases WHERE key=?", (key,)).fetchone()
        if row is not None:
            holder = Holder(*row)
            if not holder.same_process(me) and not holder.lost(me, now):
                return holder
    return None


class Heartbeat:
    """A thread that renews this process's claims every RENEW_SECONDS on a connection of its own (a
    connection serves only the thread that opened it), while the run computes. A renewal that fails
    (the file busy, moved aside) is tried again at the next beat."""

    def __init__(self, path: Path, me: Holder):
        self.uri = Path(path).resolve().as_uri() + "?mode=rw"  # never creates a file that is gone
        self.me = me
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="mastermerge-leases", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def beat(self) -> None:
        db = None
        while not self.stopped.wait(RENEW_SECONDS):
            try:
                if db is None:
                    db = sqlite3.connect(self.uri, uri=True, timeout=RENEW_SECONDS, isolation_level=None)
                db.execute(
                    "UPDATE leases SET expires=? WHERE host=? AND pid=? AND started=?",
                    (time.time() + LEASE_SECONDS, self.me.host, self.me.pid, self.me.started),
                )
            except sqlite3.Error:
                if db is not None:
                    db.close()
                db = None
        if db is not None:
            db.close()


class Claims:
    """One engine call's claims on its items (works, tether pairs), each item's lease keys given by
    `keys_of`: the keys held per item, and the items another live run is computing, with it."""

    def __init__(
        self, leases: Leases, keys_of: Callable[[Item], list[str]], done: Callable[[Item], bool], what: tuple[str, str]
    ):
        self.leases = leases
        self.keys_of = keys_of
        self.done = done  # whether an item's result is in the store now (taken from it if so)
        self.what = what  # what an item is, and many: ("spectrum", "spectra")
        self.held: dict[Item, list[str]] = {}
        self.waiting: dict[Item, Holder] = {}

    def taken(self, items: list[Item]) -> list[Item]:
        """The items this run claims now, to compute; the others (another live run claimed them) wait,
        and one whose result was stored meanwhile (just before its holder released it) is done."""
        if not self.leases.active:
            return items
        groups = [self.keys_of(item) for item in items]
        taken = []
        for item, keys, holder in zip(items, groups, self.leases.claim(groups)):
            if holder is not None:
                self.waiting[item] = holder
            elif self.done(item):
                self.leases.release(keys)
            else:
                self.held[item] = keys
                taken.append(item)
        return taken

    def deferred(self, item: Item) -> bool:
        """Whether another live run holds a claim of the item, which then waits for its result."""
        holder = self.leases.holder(self.keys_of(item)) if self.leases.active else None
        if holder is not None:
            self.waiting[item] = holder
        return holder is not None

    def release(self, item: Item) -> None:
        keys = self.held.pop(item, None)
        if keys:
            self.leases.release(keys)

    def release_all(self) -> None:
        keys = [k for keys in self.held.values() for k in keys]
        self.held.clear()
        self.leases.release(keys)

    def lost(self, bar=None) -> list[Item]:
        """Wait until every waiting item is done (its result stored by the run that held it), or its
        claim is lost; the items whose claims were lost (for this run to compute), [] when every one
        is done. The progress bar says what it waits for (and one line, unless it is disabled)."""
        said, free = None, []
        while self.waiting and not free:
            for item in [item for item in self.waiting if self.done(item)]:
                del self.waiting[item]
            for item in list(self.waiting):
                holder = self.leases.holder(self.keys_of(item))
                if holder is None:  # released (after its result was stored, if it was) or lost
                    del self.waiting[item]
                    if not self.done(item):
                        free.append(item)
                else:
                    self.waiting[item] = holder
            if self.waiting and not free:
                said = self.say(bar, said)
                time.sleep(POLL_SECONDS)
        if said is not None and bar is not None and not bar.disable:
            bar.set_postfix_str("")
        return free

    def say(self, bar, said: str | None) -> str:
        """Show on the progress bar what is waited for; print it as a line when it changes."""
        me = this_process()
        holders = sorted({h.described(me) for h in self.waiting.values()})
        whom = f"another run ({holders[0]})" if len(holders) == 1 else f"other runs ({', '.join(holders)})"
        count = len(self.waiting)
        message = f"waiting for {count} {self.what[count != 1]} {whom} is computing"
        if bar is not None and not bar.disable and message != said:
            bar.set_postfix_str(message)
            bar.write(f"mastermerge: {message}", file=sys.stderr)
        return message
