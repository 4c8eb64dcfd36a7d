"""The thread count of every computation, set explicitly so that results do not depend on where
they run.

BLAS reductions (the Gram matrix's syrk, LAPACK's eigensolvers, torch's float64 dot products) split
their sums over threads, and the split changes the rounding: a 512 x 512 eigvalsh on one thread
differs from two threads by about 1e-10 relative. Ray sets OMP_NUM_THREADS to a task's CPUs, a
workstation uses all its cores, so one explicit count (`compute.threads`, default every core of
the machine that plans the run) is applied in this process and on every Ray worker alike: through
threadpoolctl for the BLAS and OpenMP libraries (numpy's OpenBLAS, scipy's own, torch's OpenMP),
and torch.set_num_threads for torch, which may be imported later and is set where it is used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_threads: int | None = None  # the count in force in this process, for torch imported later
_torch_before: int | None = None  # torch's own count before the first change, restored at the end


def every_core() -> int:
    """The cores this process may use (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Every BLAS, OpenMP and torch computation inside runs on `threads` threads (None: as the
    libraries would by themselves); each library's own count is restored after."""
    global _threads, _torch_before
    if threads is None:
        yield
        return
    import scipy.linalg  # noqa: F401  (its own OpenBLAS, used by the refined path: loaded now, so it is limited too)
    from threadpoolctl import threadpool_limits

    previous, _threads = _threads, threads
    try:
        with threadpool_limits(limits=threads):
            if "torch" in sys.modules:
                torch_threads()
            yield
    finally:
        _threads = previous
        if previous is None and _torch_before is not None:
            import torch

            torch.set_num_threads(_torch_before)
            _torch_before = None


def torch_threads() -> None:
    """Apply the count in force to torch (called where torch is used: it may be imported after
    `limited_threads` was entered)."""
    global _torch_before
    if _threads is None:
        return
    import torch

    if torch.get_num_threads() != _threads:
        if _torch_before is None:
            _torch_before = torch.get_num_threads()
        torch.set_num_threads(_threads)
