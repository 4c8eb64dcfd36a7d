"""The metric cache's SQLite connection, and what keeps it usable: busy waits, damaged files, read-only folders.

A Database is one connection to one file (or to memory), set up with the tables a Schema lists;
it knows nothing of what they hold (store.py does). Several processes may share one file at
once (WAL). The connection is in autocommit mode: every write is its own short transaction
(several rows that belong together: one BEGIN IMMEDIATE transaction), reads are fully stepped, so
no read snapshot is ever upgraded to a write (which would fail with SQLITE_BUSY_SNAPSHOT) and no
write lock is held while something is computed. A statement that finds the write lock taken is
retried for up to BUSY_SECONDS; schema setup runs in one BEGIN IMMEDIATE transaction, so
processes opening a new file together do not interleave. Only the thread that opened the
connection uses it (sqlite3's check_same_thread stays on): the engine's threads never touch it
(the heartbeat that renews a run's leases, leases.py, opens a connection of its own).

Opening a file sets up the tables (all of them dropped first when the file's schema version is
another, and not one the schema still reads) and deletes the rows of other versions, table by table, so they are recomputed on use.

A corrupt file (not a database, or PRAGMA quick_check failing when it is opened, or an SQLite
"malformed" error on a later query) is moved aside to NAME.corrupt-<time> with its -wal and -shm
files, a fresh one is created and the run goes on, with one warning line on stderr. A cache that
cannot be used for any other reason (a read-only folder, a full disk, a lock held for over
BUSY_SECONDS) is replaced by an in-memory one for the rest of the run, also with one warning.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from .errors import first_line

T = TypeVar("T")

META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
BUSY_SECONDS = 60.0  # how long a statement waits, in all, for another process's write lock
LOCK_POLL = 0.25  # SQLite's own busy wait per try; between tries Ctrl-C and SIGTERM are handled
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CORRUPT, SQLITE_NOTADB = 5, 6, 11, 26  # primary result codes


@dataclass(frozen=True)
class Schema:
    """The tables of a database: `tables` creates them (CREATE TABLE IF NOT EXISTS statements, `;`
    between them), `dropped` are dropped first when the file's schema `version` is another, except
    one of the `compatible` earlier versions (whose tables are all still the same: opening it only
    adds the new ones), and `versions` gives the version of each table's rows (rows of any other are
    deleted on opening)."""

    version: str
    tables: str
    dropped: tuple[str, ...]
    versions: tuple[tuple[str, str], ...]
    compatible: tuple[str, ...] = ()


class CorruptCache(Exception):
    """PRAGMA quick_check found the cache file damaged; the message says how."""


class Database:
    """The connection to the cache file, or to memory when `path` is None (asked for, or since the
    file could not be used)."""

    def __init__(self, path: str | Path | None, schema: Schema):
        self.path = Path(path) if path is not None else None
        self.schema = schema
        self.inode: int | None = None  # of the file the connection opened, None in memory
        self.failed_inode: int | None = None  # of the file that failed its check on opening
        self.connection = self.open() if self.path is not None else self.connect_memory()

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
            set_up(db, self.schema)
            return db
        except BaseException:
            self.failed_inode, self.inode = self.inode, None  # set_aside moves only the file found bad
            db.close()
            raise

    def connect_memory(self) -> sqlite3.Connection:
        """An in-memory cache, set up."""
        db = sqlite3.connect(":memory:", isolation_level=None)
        set_up(db, self.schema)
        return db

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
            warn(
                f"metric cache {self.path} is corrupt ({first_line(reason)}); another run already moved it "
                f"aside; going on with the new file"
            )
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
        return self.connect_memory()

    def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)`, one statement or transaction: retried while another process holds the
        write lock (up to BUSY_SECONDS); if the file turns out corrupt, retried on a fresh one;
        after any other SQLite error, retried on an in-memory cache. Errors of the calls themselves
        (ProgrammingError, IntegrityError) are bugs and raised."""
        for attempt in range(3):
            try:
                return retry_busy(lambda: work(self.connection))
            except sqlite3.Error as exc:
                if (
                    attempt == 2
                    or self.in_memory
                    or isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.IntegrityError))
                ):
                    raise
                close_quietly(self.connection)
                if is_corrupt(exc) and attempt == 0:
                    try:
                        self.set_aside(exc)
                        self.connection = self.open()
                    except OSError as failed:
                        self.connection = self.fall_back(failed)
                else:
                    self.connection = self.fall_back(exc)
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

    def close(self) -> None:
        self.connection.close()


def check_integrity(db: sqlite3.Connection) -> None:
    """Raise CorruptCache with the first problem PRAGMA quick_check finds (it reads every page: about
    30 ms for a 100 MB cache of 3000 spectra), or the sqlite3 error that reading the file gives."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        problems = [line for row in rows for line in str(row[0]).splitlines() if line and not line.startswith("***")]
        raise CorruptCache(f"quick_check: {problems[0] if problems else 'failed'}")


def set_up(db: sqlite3.Connection, schema: Schema) -> None:
    """Create the tables (those of another schema version dropped first) and delete the rows of
    other versions, in one BEGIN IMMEDIATE transaction: a process opening the same file at the same
    time waits for it to finish, then finds the tables and the schema version in place."""
    with immediate(db):
        db.execute(META)
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchall()
        if row not in ([(version,)] for version in (schema.version, *schema.compatible)):
            for table in schema.dropped:
                db.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in schema.tables.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (schema.version,))
        for table, version in schema.versions:
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
