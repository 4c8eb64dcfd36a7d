"""Signals as exceptions: Ctrl-C (SIGINT), SIGTERM and SIGHUP raise Interrupted in the main thread.

Python's default for SIGTERM and SIGHUP ends the process on the spot, so no `finally` runs and a
half-written temporary directory would stay behind. Under `interrupts_raised()` every one of them
raises Interrupted (a KeyboardInterrupt) instead, so the same cleanup runs as for Ctrl-C, and
the command line exits with 128 + the signal number (130, 143, 129), as a shell reports it.
`deferred()` holds a signal back over a step that must not be cut in two (moving the finished
output into place) and raises it right after, installing its own handlers for the while when
none are (the Python API). A handler is installed only in the main thread,
and a signal the process was started ignoring (nohup's SIGHUP) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A signal that asked the run to stop; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] | None = None  # signals that arrived during deferred(); None outside it


def _raise(signum: int, frame) -> None:
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def interrupts_raised() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into Interrupted while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:  # nohup's SIGHUP, a background job's SIGINT: still ignored
            signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back the signals that arrive during the block; the first one is raised when it ends."""
    global _held
    outer = _held
    _held = [] if outer is None else outer
    own = {}  # outside interrupts_raised() (the Python API), the block holds the signals itself
    if outer is None and threading.current_thread() is threading.main_thread():
        own = {s: signal.getsignal(s) for s in SIGNALS if signal.getsignal(s) not in (_raise, signal.SIG_IGN, None)}
        for s in own:
            signal.signal(s, _raise)
    try:
        yield
    finally:
        held, _held = _held, outer
        for s, handler in own.items():
            signal.signal(s, handler)
    if outer is None and held:  # only when the block finished: an error inside it goes first
        raise Interrupted(held[0])


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", signal.SIGINT)
