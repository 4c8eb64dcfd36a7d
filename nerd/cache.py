"""The metric cache: an SQLite file that remembers every spectrum and metric, keyed by content.

Four tables for the weights. `tensors` maps (file, its size, mtime, ctime and inode, tensor name) to a digest of
the tensor's bytes, so an unchanged file is not even read again; a changed or replaced file no
longer matches (ctime cannot be set back by tools that restore mtimes) and is read again.
`spectra` maps that digest to the float64 singular values, so identical
tensors (frozen layers shared by fine-tunes, a copied model) are computed once, and every
metric can be derived again without a new decomposition. `metrics` maps (digest, version of the
metric definitions) to every metric of metrics.py as JSON, so a warm run recomputes nothing.
Both carry a version (spectra.SPECTRUM_VERSION, metrics.METRICS_VERSION, the latter a digest of
metrics.py): rows of another version are deleted when the cache is opened and recomputed on use.

`tether_sums` maps a pair of digests (candidate tensor, base tensor) to the three sums its
compatibility is computed from (tether.py), <c, b>, |c|^2 and |b|^2 (all NULL when either tensor
has a NaN or Inf), so a warm run compares nothing again.

Two more tables hold what DLEC's calibration run measured (importance.py), so a second run with the
same model and text runs nothing: `activation_runs` (model digest, text digest, version -> who and
what, token and window counts, layers, the dtype and device it ran in, seconds) and `layer_stats`
(the same key and a layer -> the sums its importance scores are made of). The model digest covers
config.json and the content digest of every tensor; the text digest covers the token ids and the
window length.

`evaluations` holds what an evaluation measured (evaluate.py), so an unchanged model is never run
on the same text again: (model digest, digest of the scored token windows with the dtype and
device they ran in, version) -> the summed negative log-likelihood, the number of scored tokens,
the windows, who and what, and the seconds it took.

Default location: $MASTERMERGE_CACHE, else $XDG_CACHE_HOME/mastermerge/metrics.sqlite, else
~/.cache/mastermerge/metrics.sqlite. Delete the file to clear it.

Several processes may share one file at once (WAL). The connection is in autocommit mode: every
write is its own short transaction (several rows that belong together: one BEGIN IMMEDIATE
transaction), reads are fully stepped, so no read snapshot is ever upgraded to a write (which
would fail with SQLITE_BUSY_SNAPSHOT) and no write lock is held while something is computed. A
statement that finds the write lock taken is retried for up to BUSY_SECONDS; schema setup runs
in one BEGIN IMMEDIATE transaction, so processes opening a new file together do not interleave.
Only the thread that opened the connection uses it (sqlite3's check_same_thread stays on): the
read-ahead and metrics threads of metrics_of_all never touch it.

A corrupt file (not a database, or PRAGMA quick_check failing when it is opened, or an SQLite
"malformed" error on a later query) is moved aside to NAME.corrupt-<time> with its -wal and -shm
files, a fresh one is created and the run goes on, with one warning line on stderr. A cache that
cannot be used for any other reason (a read-only folder, a full disk, a lock held for over
BUSY_SECONDS) is replaced by an in-memory one for the rest of the run, also with one warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from .checkpoint import Checkpoint, TensorInfo, as_tensor, numel
from .errors import first_line
from .importance import ACTIVATION_VERSION, LayerStats
from .metrics import METRICS, METRICS_VERSION, every_metric
from .spectra import BATCH_BYTES, PATHS, SPECTRUM_VERSION, Spectrum, numpy_matrix, pick_device, spectra_of

T = TypeVar("T")

SCHEMA_VERSION = "5"
TETHER_VERSION = "1"  # bump when tether.sums_of changes: cached sums are then recomputed
EVALUATION_VERSION = "1"  # bump when evaluate.py scores tokens differently: evaluations are then rerun
META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
SCHEMA = """
CREATE TABLE IF NOT EXISTS tensors (
    file TEXT NOT NULL, stat TEXT NOT NULL, tensor TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (file, tensor));
CREATE TABLE IF NOT EXISTS spectra (
    digest TEXT NOT NULL, version TEXT NOT NULL, shape TEXT NOT NULL, problem TEXT, singular_values BLOB,
    path TEXT, created REAL NOT NULL, PRIMARY KEY (digest, version));
CREATE TABLE IF NOT EXISTS metrics (
    digest TEXT NOT NULL, version TEXT NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (digest, version));
CREATE TABLE IF NOT EXISTS tether_sums (
    candidate TEXT NOT NULL, base TEXT NOT NULL, version TEXT NOT NULL, dot REAL, candidate_sq REAL, base_sq REAL,
    PRIMARY KEY (candidate, base, version));
CREATE TABLE IF NOT EXISTS activation_runs (
    model TEXT NOT NULL, text TEXT NOT NULL, version TEXT NOT NULL, model_ref TEXT NOT NULL, text_name TEXT NOT NULL,
    tokens INTEGER NOT NULL, windows INTEGER NOT NULL, layers INTEGER NOT NULL, dtype TEXT NOT NULL,
    device TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (model, text, version));
CREATE TABLE IF NOT EXISTS layer_stats (
    model TEXT NOT NULL, text TEXT NOT NULL, version TEXT NOT NULL, layer INTEGER NOT NULL,
    tokens INTEGER NOT NULL, cos_sum REAL NOT NULL, tail_count INTEGER NOT NULL, entries INTEGER NOT NULL,
    update_sum REAL NOT NULL, PRIMARY KEY (model, text, version, layer));
CREATE TABLE IF NOT EXISTS evaluations (
    model TEXT NOT NULL, text TEXT NOT NULL, version TEXT NOT NULL, model_ref TEXT NOT NULL, text_name TEXT NOT NULL,
    kind TEXT NOT NULL, nll REAL NOT NULL, tokens INTEGER NOT NULL, windows INTEGER NOT NULL, dtype TEXT NOT NULL,
    device TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (model, text, version));
"""
SCHEMA_TABLES = ("tensors", "spectra", "metrics")  # dropped when the schema version changes
BUSY_SECONDS = 60.0  # how long a statement waits, in all, for another process's write lock
LOCK_POLL = 0.25  # SQLite's own busy wait per try; between tries Ctrl-C and SIGTERM are handled
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CORRUPT, SQLITE_NOTADB = 5, 6, 11, 26  # primary result codes


class CorruptCache(Exception):
    """PRAGMA quick_check found the cache file damaged; the message says how."""


def default_cache_path() -> Path:
    if os.environ.get("MASTERMERGE_CACHE"):
        return Path(os.environ["MASTERMERGE_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mastermerge" / "metrics.sqlite"


class MetricCache:
    """Spectra by content, in SQLite. `path=None` keeps them in memory for this process only."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.computed = 0
        self.reused = 0
        self.pairs_computed = 0
        self.inode: int | None = None  # of the file the connection opened, None in memory
        self.failed_inode: int | None = None  # of the file that failed its check on opening
        self.db = self.open() if self.path is not None else connect_memory()

    @property
    def in_memory(self) -> bool:
        """Whether this cache lives in memory only (asked for, or since the file could not be used)."""
        return self.inode is None

    def open(self) -> sqlite3.Connection:
        """A connection to the cache file, checked and set up: a corrupt file is moved aside and
        replaced by a fresh one; a file that cannot be used otherwise gives an in-memory cache.
        Either prints one warning line."""
        try:
            return retry_busy(self.open_file)
        except (CorruptCache, sqlite3.Error) as exc:
            if not is_corrupt(exc):
                return self.fall_back(exc)
            try:
                self.set_aside(exc)
                return retry_busy(self.open_file)
            except (CorruptCache, sqlite3.Error, OSError) as again:
                return self.fall_back(again)
        except OSError as exc:  # the folder cannot be created
            return self.fall_back(exc)

    def open_file(self) -> sqlite3.Connection:
        """Connect to the file (its folder created), check it with PRAGMA quick_check, switch it to
        WAL and set up the tables; raises CorruptCache or sqlite3.Error on any problem."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # what mkdir says of a file where the folder should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.path.parent)) from None
        db = sqlite3.connect(str(self.path), timeout=LOCK_POLL, isolation_level=None)
        try:
            self.inode = os.stat(self.path).st_ino
            check_integrity(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; only the last commits may be lost
            set_up(db)
            return db
        except BaseException:
            self.failed_inode, self.inode = self.inode, None  # set_aside moves only the file found bad
            db.close()
            raise

    def set_aside(self, reason: BaseException) -> None:
        """Move the corrupt cache file and its -wal and -shm files to NAME.corrupt-<time>, unless
        another process already did (the file at the path is then not the one found corrupt), and
        say so in one warning line."""
        found = self.inode if self.inode is not None else self.failed_inode
        self.inode = None
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current is None or (found is not None and current != found):
            warn(f"metric cache {self.path} is corrupt ({first_line(reason)}); another run already moved it "
                 f"aside; going on with the new file")
            return
        aside = unused_name(self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"))
        for suffix in ("-wal", "-shm", ""):  # the main file last: a new file never meets the old -wal
            if os.path.exists(f"{self.path}{suffix}"):
                os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
        warn(f"metric cache {self.path} is corrupt ({first_line(reason)}); moved to {aside}; rebuilding")

    def fall_back(self, reason: BaseException) -> sqlite3.Connection:
        """An in-memory cache for the rest of the run, with one warning line saying why."""
        self.inode = None
        why = describe(reason)
        folder = self.path.parent
        if folder.is_dir() and not os.access(folder, os.W_OK):
            why += f"; {folder} is not writable"
        warn(f"metric cache {self.path} cannot be used ({why}); keeping spectra in memory for this run")
        return connect_memory()

    def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)`, one statement or transaction: retried while another process holds the
        write lock (up to BUSY_SECONDS); if the file turns out corrupt, retried on a fresh one;
        after any other SQLite error, retried on an in-memory cache. Errors of the calls themselves
        (ProgrammingError, IntegrityError) are bugs and raised."""
        for attempt in range(3):
            try:
                return retry_busy(lambda: work(self.db))
            except sqlite3.Error as exc:
                if attempt == 2 or self.in_memory or isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError,
                                                                       sqlite3.IntegrityError)):
                    raise
                close_quietly(self.db)
                if is_corrupt(exc) and attempt == 0:
                    try:
                        self.set_aside(exc)
                        self.db = self.open()
                    except OSError as failed:
                        self.db = self.fall_back(failed)
                else:
                    self.db = self.fall_back(exc)
        raise AssertionError("unreachable")

    def read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Every row of a query, stepped to the end (no read transaction is left open)."""
        return self.run(lambda db: db.execute(sql, params).fetchall())

    def read_one(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = self.read(sql, params)
        return rows[0] if rows else None

    def write(self, sql: str, params: tuple = ()) -> None:
        """One statement, committed on its own."""
        self.run(lambda db: db.execute(sql, params))

    def write_together(self, statements: list[tuple[str, list[tuple]]]) -> None:
        """Several statements, each with its rows, committed at once (BEGIN IMMEDIATE: the write lock
        is taken first, so no read snapshot has to be upgraded)."""
        def work(db: sqlite3.Connection) -> None:
            with immediate(db):
                for sql, rows in statements:
                    db.executemany(sql, rows)
        self.run(work)

    def metrics(self, checkpoint: Checkpoint, name: str, compute) -> dict:
        """Every metric of one tensor (metrics.py) and its `problem`, cached; the spectrum comes
        from `spectrum` (so from the cache, or `compute(tensor)`)."""
        key, data = self.digest(checkpoint, name)
        cached = self.cached_metrics(key)
        if cached is not None:
            self.reused += 1
            if data is not None:
                self.remember(checkpoint, name, key)
            return cached
        return self.store_metrics(key, self.spectrum_by_digest(checkpoint, name, key, data, compute))

    def metrics_of_all(self, checkpoint: Checkpoint, names: list[str], device: str, bar=None) -> dict:
        """Every metric of each named matrix, as `metrics` gives them, streaming: the cached ones
        are looked up without reading; the others are read and hashed by a background thread one
        or two tensors ahead while the spectra are computed (reading overlaps computing, and
        memory holds a few tensors at most); on CUDA equal shapes are computed in batches (of up
        to BATCH_BYTES in float64). `device` is the config's (auto, cpu or cuda), resolved only if
        something is computed, so a warm run does not even import torch."""
        with ExitStack() as stack:
            return self.metrics_streaming(checkpoint, names, device, bar, stack)

    def metrics_streaming(self, checkpoint: Checkpoint, names: list[str], requested: str, bar,
                          stack: ExitStack) -> dict:
        """metrics_of_all's work; `stack` closes the metrics thread on the way out."""
        results: dict[str, dict] = {}

        def done(name: str, metrics: dict) -> None:
            results[name] = metrics
            if bar is not None:
                bar.update()

        unread = []
        for name in names:
            key = self.remembered_digest(checkpoint, name)
            cached = None if key is None else self.known_metrics(key, checkpoint.tensors[name].shape)
            if cached is None:
                unread.append(name)
            else:
                self.reused += 1
                done(name, cached)
        device = pick_device(requested) if unread else None
        if unread and device != "cpu":  # equal shapes next to each other, so they share a batch
            unread.sort(key=lambda n: checkpoint.tensors[n].shape)
        batch: list[tuple[str, str, np.ndarray]] = []
        pending: list[tuple[str, str, Future]] = []  # metrics being derived while the next spectrum is computed
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="mastermerge-metrics"))

        def settle(keep: int) -> None:
            while len(pending) > keep:
                name, key, future = pending.pop(0)
                done(name, self.save_metrics(key, future.result()))

        def flush():
            if not batch:
                return
            for (name, key, _), spectrum in zip(batch, spectra_of([m for _, _, m in batch], device)):
                self.computed += 1
                self.store_spectrum(key, checkpoint.tensors[name], spectrum)
                pending.append((name, key, pool.submit(every_metric, spectrum)))
            batch.clear()
            settle(keep=1)

        for name, key, data in read_ahead(checkpoint, unread):
            self.remember(checkpoint, name, key)
            cached = self.known_metrics(key, checkpoint.tensors[name].shape)  # the same content met before
            if cached is not None:
                self.reused += 1
                done(name, cached)
                continue
            info = checkpoint.tensors[name]
            if batch and (device == "cpu" or info.shape != checkpoint.tensors[batch[0][0]].shape
                          or (len(batch) + 1) * numel(info.shape) * 8 > BATCH_BYTES):
                flush()
            batch.append((name, key, numpy_matrix(data, info.dtype, info.shape)))
            if device == "cpu":
                flush()
        flush()
        settle(keep=0)
        return {name: results[name] for name in names}

    def cached_metrics(self, key: str) -> dict | None:
        """Every metric stored for this content digest, if they are all there."""
        row = self.read_one("SELECT metrics FROM metrics WHERE digest=? AND version=?", (key, METRICS_VERSION))
        cached = None if row is None else parsed(row[0])
        return cached if cached is not None and set(cached) == set(METRICS) | {"problem", "path"} else None

    def known_metrics(self, key: str, shape: tuple[int, ...]) -> dict | None:
        """The metrics of this content digest, stored or derived from its stored spectrum; None if
        the spectrum was never computed."""
        cached = self.cached_metrics(key)
        if cached is None:
            spectrum = self.stored_spectrum(key, shape)
            cached = None if spectrum is None else self.store_metrics(key, spectrum)
        return cached

    def stored_spectrum(self, key: str, shape: tuple[int, ...]) -> Spectrum | None:
        row = self.read_one("SELECT problem, singular_values, path FROM spectra WHERE digest=? AND version=?",
                            (key, SPECTRUM_VERSION))
        return None if row is None else spectrum_from_row(*row, shape)

    def store_metrics(self, key: str, spectrum: Spectrum) -> dict:
        """Derive every metric from a spectrum, store them under the digest (committed), return them."""
        return self.save_metrics(key, every_metric(spectrum))

    def save_metrics(self, key: str, values: dict) -> dict:
        """Store every metric of a content digest (committed) and return them."""
        self.write("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",
                   (key, METRICS_VERSION, json.dumps(values, allow_nan=False)))
        return values

    def store_spectrum(self, key: str, info: TensorInfo, spectrum: Spectrum) -> None:
        """Store the spectrum of a content digest (committed)."""
        blob = None if spectrum.values is None else spectrum.values.astype("<f8").tobytes()
        self.write("INSERT OR REPLACE INTO spectra VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (key, SPECTRUM_VERSION, str(list(info.shape)), spectrum.problem, blob, spectrum.path, time.time()))

    def derived_metrics(self, key: str, compute) -> dict:
        """Every metric of a matrix that no input file holds (a blend), cached under `key`, a digest
        of what it is made from; `compute()` gives them (with `problem`) when they are not cached."""
        row = self.read_one("SELECT metrics FROM metrics WHERE digest=? AND version=?", (key, METRICS_VERSION))
        cached = None if row is None else parsed(row[0])
        if cached is not None:
            self.reused += 1
            return cached
        self.computed += 1
        return self.save_metrics(key, compute())

    def spectrum(self, checkpoint: Checkpoint, name: str, compute) -> Spectrum:
        """The cached spectrum of one tensor, or `compute(tensor)` stored for next time."""
        key, data = self.digest(checkpoint, name)
        return self.spectrum_by_digest(checkpoint, name, key, data, compute)

    def digest(self, checkpoint: Checkpoint, name: str) -> tuple[str, bytearray | None]:
        """The content digest of a tensor: remembered for an unchanged file, else read and computed
        (then the bytes read come with it, so nothing is read twice)."""
        key = self.remembered_digest(checkpoint, name)
        if key is not None:
            return key, None
        data = checkpoint.read_bytes(name)
        return content_key(checkpoint.tensors[name], data), data

    def spectrum_by_digest(self, checkpoint: Checkpoint, name: str, key: str, data: bytearray | None,
                           compute) -> Spectrum:
        info, read = checkpoint.tensors[name], data is not None
        result = self.stored_spectrum(key, info.shape)
        if result is not None:
            self.reused += 1
        else:
            self.computed += 1
            data = checkpoint.read_bytes(name) if data is None else data
            result = compute(as_tensor(data, info))
            self.store_spectrum(key, info, result)
        if read:
            self.remember(checkpoint, name, key)
        return result

    def pair_sums(self, candidate: Checkpoint, base: Checkpoint, name: str, compute):
        """The tether sums of one tensor of a candidate against the base's (tether.py): cached by the
        two content digests, else `compute(candidate, base, name)` stored for next time."""
        keys = (self.tensor_digest(candidate, name), self.tensor_digest(base, name))
        row = self.read_one("SELECT dot, candidate_sq, base_sq FROM tether_sums WHERE candidate=? AND base=? "
                            "AND version=?", (*keys, TETHER_VERSION))
        if row is not None:
            return None if row[0] is None else tuple(row)
        self.pairs_computed += 1
        sums = compute(candidate, base, name)
        self.write("INSERT OR REPLACE INTO tether_sums VALUES (?, ?, ?, ?, ?, ?)",
                   (*keys, TETHER_VERSION, *(sums or (None, None, None))))
        return sums

    def remembered_digest(self, checkpoint: Checkpoint, name: str) -> str | None:
        """The digest recorded for this tensor of this file, if the file is unchanged since."""
        file, stat = file_identity(checkpoint.tensors[name])
        row = self.read_one("SELECT digest FROM tensors WHERE file=? AND tensor=? AND stat=?", (file, name, stat))
        return None if row is None else row[0]

    def tensor_digest(self, checkpoint: Checkpoint, name: str) -> str:
        """The content digest of a tensor, remembered for next time."""
        key, data = self.digest(checkpoint, name)
        if data is not None:
            self.remember(checkpoint, name, key)
        return key

    def layer_stats(self, model: str, text: str) -> list[LayerStats] | None:
        """The statistics of an earlier calibration run of this model on this text, layer by layer."""
        run = self.read_one("SELECT layers FROM activation_runs WHERE model=? AND text=? AND version=?",
                            (model, text, ACTIVATION_VERSION))
        if run is None:
            return None
        rows = self.read("SELECT tokens, cos_sum, tail_count, entries, update_sum FROM layer_stats "
                         "WHERE model=? AND text=? AND version=? ORDER BY layer", (model, text, ACTIVATION_VERSION))
        return [LayerStats(*row) for row in rows] if len(rows) == run[0] else None

    def store_layer_stats(self, model: str, text: str, stats: list[LayerStats], run: dict) -> None:
        """Record one calibration run: `run` has model_ref, text_name, tokens, windows, dtype, device
        and seconds."""
        self.write_together([
            ("INSERT OR REPLACE INTO activation_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             [(model, text, ACTIVATION_VERSION, run["model_ref"], run["text_name"], run["tokens"], run["windows"],
               len(stats), run["dtype"], run["device"], run["seconds"], time.time())]),
            ("INSERT OR REPLACE INTO layer_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
             [(model, text, ACTIVATION_VERSION, layer, s.tokens, s.cos_sum, s.tail_count, s.entries, s.update_sum)
              for layer, s in enumerate(stats)])])

    def evaluation(self, model: str, text: str) -> dict | None:
        """An earlier evaluation of this model on these token windows: nll, tokens, windows, seconds."""
        row = self.read_one("SELECT nll, tokens, windows, seconds FROM evaluations WHERE model=? AND text=? "
                            "AND version=?", (model, text, EVALUATION_VERSION))
        return None if row is None else dict(zip(("nll", "tokens", "windows", "seconds"), row))

    def store_evaluation(self, model: str, text: str, run: dict) -> None:
        """Record one evaluation: `run` has model_ref, text_name, kind, nll, tokens, windows, dtype,
        device and seconds."""
        self.write("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (model, text, EVALUATION_VERSION, run["model_ref"], run["text_name"], run["kind"], run["nll"],
                    run["tokens"], run["windows"], run["dtype"], run["device"], run["seconds"], time.time()))

    def remember(self, checkpoint: Checkpoint, name: str, key: str) -> None:
        """Record which digest this tensor of this (unchanged) file has (committed)."""
        file, stat = file_identity(checkpoint.tensors[name])
        self.write("INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?)", (file, stat, name, key))

    def close(self) -> None:
        self.db.close()


def connect_memory() -> sqlite3.Connection:
    """An in-memory cache, set up."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    set_up(db)
    return db


def check_integrity(db: sqlite3.Connection) -> None:
    """Raise CorruptCache with the first problem PRAGMA quick_check finds (it reads every page: about
    30 ms for a 100 MB cache of 3000 spectra), or the sqlite3 error that reading the file gives."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        problems = [line for row in rows for line in str(row[0]).splitlines() if line and not line.startswith("***")]
        raise CorruptCache(f"quick_check: {problems[0] if problems else 'failed'}")


def set_up(db: sqlite3.Connection) -> None:
    """Create the tables (those of another schema version dropped first) and delete the rows of
    other versions, in one BEGIN IMMEDIATE transaction: a process opening the same file at the same
    time waits for it to finish, then finds the tables and the schema version in place."""
    with immediate(db):
        db.execute(META)
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchall()
        if row != [(SCHEMA_VERSION,)]:
            for table in SCHEMA_TABLES:
                db.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        for table, version in (("spectra", SPECTRUM_VERSION), ("metrics", METRICS_VERSION),
                               ("tether_sums", TETHER_VERSION), ("activation_runs", ACTIVATION_VERSION),
                               ("layer_stats", ACTIVATION_VERSION), ("evaluations", EVALUATION_VERSION)):
            db.execute(f"DELETE FROM {table} WHERE version != ?", (version,))


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction taken with BEGIN IMMEDIATE (the write lock first, so no read snapshot has
    to be upgraded): committed at the end, rolled back on an error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error being raised says more
        raise


def retry_busy(work: Callable[[], T]) -> T:
    """`work()`, tried again while SQLite reports the database busy or locked (another process
    writing), for up to BUSY_SECONDS in all. SQLite waits up to LOCK_POLL itself on each try; the
    short pause between tries lets Python handle Ctrl-C and SIGTERM."""
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            return work()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def primary_code(exc: BaseException) -> int | None:
    """The SQLite primary result code of an sqlite3 error (Python 3.11+), else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_busy(exc: BaseException) -> bool:
    code = primary_code(exc)
    return code in (SQLITE_BUSY, SQLITE_LOCKED) if code is not None else "locked" in str(exc)


def is_corrupt(exc: BaseException) -> bool:
    """Whether an error means the file is damaged (not a database, or malformed)."""
    if isinstance(exc, CorruptCache):
        return True
    code = primary_code(exc)
    if code is not None:
        return code in (SQLITE_CORRUPT, SQLITE_NOTADB)
    return isinstance(exc, sqlite3.DatabaseError) and ("malformed" in str(exc) or "not a database" in str(exc))


def describe(exc: BaseException) -> str:
    """An error in a few words, for a warning line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return first_line(exc)


def unused_name(path: Path) -> Path:
    """`path`, or with -2, -3 ... appended when a file of that name (or its -wal) exists."""
    candidate, n = path, 1
    while candidate.exists() or Path(f"{candidate}-wal").exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def close_quietly(db: sqlite3.Connection) -> None:
    try:
        db.close()
    except sqlite3.Error:
        pass


def warn(message: str) -> None:
    print(f"mastermerge: warning: {message}", file=sys.stderr)


def parsed(text: str) -> dict | None:
    """The metrics stored as JSON, or None if the text is not a JSON object (a damaged row)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_ahead(checkpoint: Checkpoint, names: list[str], depth: int = 2):
    """Yield (name, content digest, bytes) of each tensor, read and hashed by a background thread
    up to `depth` tensors ahead (file reads and hashing release the GIL, so they overlap the
    caller's computing). An error in the thread is raised here, at the tensor it happened on."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader():
        for name in names:
            if stop.is_set():
                return
            try:
                data = checkpoint.read_bytes(name)
                item = (name, content_key(checkpoint.tensors[name], data), data)
            except BaseException as exc:  # handed to the caller, which raises it
                item = (name, exc, None)
            ahead.put(item)
            if item[2] is None:
                return

    thread = threading.Thread(target=reader, name="mastermerge-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in names:
            name, key, data = ahead.get()
            if data is None:
                raise key
            yield name, key, data
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue, then let it end
            try:
                ahead.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def spectrum_from_row(problem: str | None, blob: bytes | None, path: str | None,
                      shape: tuple[int, ...]) -> Spectrum | None:
    """The stored spectrum; None if the row is damaged (not a whole number of float64 values, or an
    unknown path)."""
    if blob is not None and (not isinstance(blob, bytes) or len(blob) % 8) or path not in (*PATHS, None):
        return None
    return Spectrum(None if blob is None else np.frombuffer(blob, dtype="<f8").copy(), tuple(shape), problem, path)


def file_identity(info: TensorInfo) -> tuple[str, str]:
    """The file's resolved path and its size, mtime, ctime and inode: any rewrite changes them."""
    file = str(info.file.resolve())
    st = os.stat(file)
    return file, f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def content_key(info: TensorInfo, data: bytearray) -> str:
    """A digest of a tensor's dtype, shape and bytes."""
    digest = hashlib.blake2b(f"{info.dtype}{list(info.shape)}\0".encode(), digest_size=20)
    digest.update(data)
    return digest.hexdigest()
