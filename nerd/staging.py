"""Output directories that appear whole or not at all.

Everything is built in a hidden sibling (`.NAME.mastermerge-PID.tmp`) and renamed into place at
the end, so an error or Ctrl-C leaves nothing half-written at the destination; an existing
directory (replaced with --force) is removed only once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to fill; on success it becomes `out`, on any
    failure it is removed (an OSError becomes an OutputError naming the file)."""
    tmp = out.parent / f".{out.name}.mastermerge-{os.getpid()}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{exc.filename or out}: cannot write the output ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
