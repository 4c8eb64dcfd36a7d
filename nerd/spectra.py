"""Exact singular-value spectra of weight matrices and the Normalized Effective Rank (NER).

The fastest exact path on a CPU is the k x k Gram matrix (k = the shorter side) in float64
followed by LAPACK's symmetric eigensolver; its eigenvalues are the squared singular values.
The Gram route loses relative accuracy on singular values far below the largest one (its
eigenvalues carry an absolute error of about k * eps * lambda_max), so every Gram spectrum gets
a worst-case bound on the NER error that error can cause, and a bound on the relative error of
its smallest singular value; a matrix whose NER bound exceeds NER_TOLERANCE, or whose s_min is
not known to SMIN_TOLERANCE (rank-deficient or very ill-conditioned ones), is redone with a
float64 SVD. So every NER is exact to 1e-9, s_min to 0.1%, and a Gram spectrum is only kept
when the matrix is certainly of full numerical rank (ranks are then exact too).
On CUDA the same work runs on the GPU in float64. The metrics derived from a spectrum are in
metrics.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NER_TOLERANCE = 1e-9  # the largest NER error the Gram route may cause before we use an SVD instead
SPECTRUM_VERSION = "2"  # bump when the computation changes: cached spectra are then recomputed
SMIN_TOLERANCE = 1e-3  # the largest relative error of s_min the Gram route may cause
EPS = float(torch.finfo(torch.float64).eps)
CHUNK_ELEMENTS = 2**23  # rows of W converted to float64 at a time (64 MB)


@dataclass(frozen=True)
class Spectrum:
    """Singular values of one matrix (of `shape`) in float64, descending, or why there are none."""

    values: np.ndarray | None
    shape: tuple[int, ...]
    problem: str | None = None


def pick_device(requested: str = "auto") -> torch.device:
    """cuda when asked for or available (auto), else cpu."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def spectrum_of(matrix: torch.Tensor, device: torch.device | str = "cpu") -> Spectrum:
    """The exact singular values of a 2-D matrix (float64), or the reason there are none."""
    shape = tuple(matrix.shape)
    gram = gram_matrix(matrix, device)
    if gram is None:
        return Spectrum(None, shape, "contains NaN or Inf")
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    if eigenvalues[0] == 0:
        return Spectrum(np.zeros(len(eigenvalues)), shape, "all zero")
    if gram_ner_error(eigenvalues) > NER_TOLERANCE or gram_smin_error(eigenvalues) > SMIN_TOLERANCE:
        values = torch.linalg.svdvals(matrix.to(device=device, dtype=torch.float64))
    else:
        values = eigenvalues.sqrt()
    return Spectrum(values.cpu().numpy(), shape)


def gram_matrix(matrix: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """The k x k Gram matrix in float64 (W^T W for a tall W, W W^T for a wide one), or None if W
    has a NaN or Inf. Built from slices of about CHUNK_ELEMENTS, so a large embedding is never
    held whole in float64."""
    w = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    k = w.shape[1]
    gram = torch.zeros((k, k), dtype=torch.float64, device=device)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, w.shape[0], step):
        chunk = w[start:start + step].to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(chunk).all()):
            return None
        gram.addmm_(chunk.T, chunk)
    return gram


def gram_smin_error(eigenvalues: torch.Tensor) -> float:
    """Worst-case relative error of the smallest singular value taken from these Gram eigenvalues
    (descending): an eigenvalue error d = k * eps * lambda_max moves s_min by d / (2 s_min^2)
    relatively; infinite when s_min may be zero."""
    d = len(eigenvalues) * EPS * float(eigenvalues[0])
    smallest = float(eigenvalues[-1])
    return math.inf if smallest <= d else d / (2 * smallest)


def gram_ner_error(eigenvalues: torch.Tensor) -> float:
    """Worst-case NER error of singular values taken from these Gram eigenvalues (descending).

    Each eigenvalue may be off by d = k * eps * lambda_max, so s_i = sqrt(lambda_i) by
    d / (2 s_i), or by sqrt(d) where s_i is that small; the bound sums the first-order change
    of H = -sum p_i ln p_i over those perturbations and divides by ln k.
    """
    k = len(eigenvalues)
    if k == 1:
        return 0.0
    d = k * EPS * eigenvalues[0]
    s = eigenvalues.sqrt()
    ds = torch.where(s > d.sqrt(), d / (2 * s.clamp_min(torch.finfo(s.dtype).tiny)), d.sqrt())
    total = s.sum()
    p = s / total
    dp = ds / total + p * ds.sum() / total
    return float(((torch.maximum(p, ds / total).log().abs() + 1) * dp).sum() / math.log(k))
