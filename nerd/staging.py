"""Output directories that appear whole or not at all.

Everything is built in a hidden sibling (`.NAME.mastermerge-PID.tmp`) and renamed into place at
the end, so an error, Ctrl-C or SIGTERM leaves nothing half-written at the destination; an
existing directory (replaced with --force) is moved aside to `.NAME.mastermerge-PID.old` and
removed only once the new one is in place, and signals are held back while the two renames run.
Before anything is written, the free space is compared with what will be written.

A run killed outright (SIGKILL, power loss) cannot clean up. The next run that writes the same
output removes what it left, and if it died between the two renames, puts the old output back.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .interrupts import deferred

LEFT_BY_A_RUN = re.compile(r"\.(?P<name>.+)\.mastermerge-(?P<pid>\d+)\.(?P<kind>tmp|old)")
MARGIN = 16 * 2**20  # bytes of free space kept for the report, the card and the figures


@contextmanager
def staged_dir(out: Path, needed: int = 0) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to fill; on success it becomes `out`, on any
    failure it is removed (an OSError becomes an OutputError naming the file). `needed` is the
    number of bytes about to be written, refused up front if the file system has less free."""
    tmp = out.parent / f".{out.name}.mastermerge-{os.getpid()}.tmp"
    existed, filled = out.exists(), out.is_dir() and any(out.iterdir())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        check_free_space(out, needed)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"{exc.filename or out}: cannot write the output ({exc.strerror or exc}); {untouched(out, existed)}"
        ) from None
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(f"the partial output was removed; {untouched(out, existed)}")
        raise
    try:
        with deferred():
            if not filled and out.is_dir() and any(out.iterdir()):
                raise OutputError(
                    f"{out}: something else filled it while this run was writing; not replaced "
                    f"without --force (the new output was discarded; a rerun reuses the metric cache)"
                )
            replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"{exc.filename or out}: cannot move the output into place ({exc.strerror or exc}); "
            f"{untouched(out, existed)}"
        ) from None
    except BaseException as exc:
        moved = not tmp.exists()  # a signal may land just before the renames: then nothing was moved
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(
                f"{out} had been written completely"
                if moved
                else f"the partial output was removed; {untouched(out, existed)}"
            )
        raise


def untouched(out: Path, existed: bool) -> str:
    return f"{out} is as it was" if existed else f"{out} was not created"


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an existing one (--force) is removed only after."""
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.mastermerge-{os.getpid()}.old"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    elif out.exists():  # empty, perhaps a mount point that cannot be replaced: fill it
        for path in sorted(tmp.iterdir()):
            os.rename(path, out / path.name)
        tmp.rmdir()
    else:
        os.rename(tmp, out)


def check_free_space(out: Path, needed: int) -> None:
    """OutputError if the file system that will hold `out` has less free space than `needed`."""
    if needed <= 0:
        return
    free = shutil.disk_usage(out.parent).free
    if needed + MARGIN > free:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)}: the output needs {gigabytes(needed + MARGIN)}, {gigabytes(free)} is free",
            str(out.parent),
        )


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def clean_leftovers(out: Path) -> None:
    """Remove what runs that died (SIGKILL) left beside `out`, first putting back an old output
    that one of them had moved aside and not replaced; each step is reported on stderr."""
    for path in sorted(out.parent.glob(f".{glob_escape(out.name)}.mastermerge-*")):
        match = LEFT_BY_A_RUN.fullmatch(path.name)
        if match is None or match["name"] != out.name or process_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and (not out.exists() or empty_dir(out)):
            try:
                if out.exists():
                    out.rmdir()  # an empty directory made since (mkdir -p): the earlier output goes first
                os.rename(path, out)
            except OSError as exc:
                print(
                    f"mastermerge: warning: {out}: the earlier output is in {path} (a killed run moved it "
                    f"there) and could not be put back: {exc.strerror}",
                    file=sys.stderr,
                )
                continue
            print(
                f"mastermerge: warning: {out}: put back the earlier output that a killed run had moved to {path.name}",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"mastermerge: warning: {out}: removed {path.name}, left by a run that was killed", file=sys.stderr)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (ours included; another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's, or no pid at all: left alone
        return True
    return True


def empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
