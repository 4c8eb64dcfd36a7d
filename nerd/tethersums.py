"""The tether sums of one tensor of two models (tether.py scores blocks with them): <c, b>, |c|^2
and |b|^2, accumulated in float64 a slice of SLICE_ELEMENTS at a time, so that a matrix is never
held whole in float64. The engine's executors call it, in this process or on a Ray worker.
"""

from __future__ import annotations

import math

from .checkpoint import Checkpoint, numel
from .spectra import SLICE_ELEMENTS
from .threads import torch_threads

Sums = tuple[float, float, float]  # of a pair: <c, b>, |c|^2, |b|^2


def sums_of(candidate: Checkpoint, base: Checkpoint, tensor: str) -> Sums | None:
    """<c, b>, |c|^2 and |b|^2 of one tensor of two models, in float64, read a slice at a time;
    None if either has a NaN or Inf."""
    import torch

    torch_threads()
    dot = c_sq = b_sq = 0.0
    for start, stop in slices(numel(base.tensors[tensor].shape)):
        x = candidate.read_flat(tensor, start, stop).to(torch.float64)
        y = base.read_flat(tensor, start, stop).to(torch.float64)
        dot += float(torch.dot(x, y))
        c_sq += float(torch.dot(x, x))
        b_sq += float(torch.dot(y, y))
    return (dot, c_sq, b_sq) if all(map(math.isfinite, (dot, c_sq, b_sq))) else None


def slices(n: int) -> list[tuple[int, int]]:
    """start, stop of each slice of SLICE_ELEMENTS elements (the last one shorter)."""
    return [(start, min(start + SLICE_ELEMENTS, n)) for start in range(0, n, SLICE_ELEMENTS)]
