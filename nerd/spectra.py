"""Exact singular-value spectra of weight matrices and the Normalized Effective Rank (NER).

The fastest exact path on a CPU is the k x k Gram matrix (k = the shorter side) in float64
followed by LAPACK's symmetric eigensolver; its eigenvalues are the squared singular values.
On the CPU the Gram matrix is built with numpy in row slices of W converted to float64
(CHUNK_ELEMENTS, or k rows if more, at a time, so a large embedding is never held whole in
float64), each slice's C^T C a symmetric rank-k update (BLAS syrk: half the work of a general
product); the eigenvalues come from numpy's LAPACK, or torch's for k >= LARGE_K, whichever we
measured faster at the size. (The earlier all-torch path interleaved torch's thread pool with
its own LAPACK calls and ran three times slower on two cores.) On CUDA (`device` cuda) the
same work runs on the GPU in float64 with torch, and `spectra_of` batches matrices of equal
shape (one batched product and one batched solver call per group), keeping the data on the device.

The Gram route loses relative accuracy on singular values far below the largest one (its
eigenvalues carry an absolute error of about k * eps * lambda_max), so every Gram spectrum gets
a worst-case bound on the NER error that error can cause, and a bound on the relative error of
its smallest singular value; a matrix whose NER bound exceeds NER_TOLERANCE, or whose s_min is
not known to SMIN_TOLERANCE (rank-deficient or very ill-conditioned ones), is redone with a
float64 SVD. So every NER is exact to 1e-9, s_min to 0.1%, and a Gram spectrum is only kept
when the matrix is certainly of full numerical rank (ranks are then exact too). A NaN or Inf in
W shows in the Gram matrix's diagonal (each entry is the sum of squares of one column), so it
is found without a separate pass over W. The metrics derived from a spectrum are in metrics.py.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

NER_TOLERANCE = 1e-9  # the largest NER error the Gram route may cause before we use an SVD instead
SPECTRUM_VERSION = "2"  # bump when the computation changes: cached spectra are then recomputed
SMIN_TOLERANCE = 1e-3  # the largest relative error of s_min the Gram route may cause
EPS = float(np.finfo(np.float64).eps)
CHUNK_ELEMENTS = 2**23  # elements of W converted to float64 at a time (64 MB), but at least k rows
LARGE_K = 2048  # from this size on, torch's LAPACK (MKL) solves the eigenproblem faster than numpy's
BATCH_BYTES = 2**30  # float64 bytes of equal-shape matrices stacked into one CUDA batch


@dataclass(frozen=True)
class Spectrum:
    """Singular values of one matrix (of `shape`) in float64, descending, or why there are none."""

    values: np.ndarray | None
    shape: tuple[int, ...]
    problem: str | None = None


GPU_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL


def cuda_available() -> bool:
    """Whether torch sees a CUDA device. On Linux without any GPU driver's device files the answer
    is no without importing torch (over a second); otherwise torch is asked."""
    if sys.platform == "linux" and not any(os.path.exists(p) for p in GPU_DEVICE_FILES):
        return False
    import torch
    return torch.cuda.is_available()


def pick_device(requested: str = "auto") -> str:
    """'cuda' when asked for or available (auto), else 'cpu'."""
    return "cuda" if requested == "cuda" or (requested == "auto" and cuda_available()) else "cpu"


def spectrum_of(matrix: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> Spectrum:
    """The exact singular values of a 2-D matrix (float64), or the reason there are none. The
    matrix is a torch tensor or a numpy array (a uint16 array holding bfloat16 bits, as
    `numpy_matrix` makes it); on the CPU the work is numpy's, so torch need not even be imported."""
    if str(device) != "cpu":
        return spectra_of([matrix], device)[0]
    matrix = as_numpy(matrix)
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    gram = gram_matrix(tall)
    return spectrum_from_gram(eigenvalues_of(gram) if gram is not None else None, tuple(matrix.shape),
                              lambda: np.linalg.svd(float64_rows(tall, 0, tall.shape[0]), compute_uv=False))


def spectra_of(matrices: list[torch.Tensor | np.ndarray], device: torch.device | str = "cpu") -> list[Spectrum]:
    """The spectra of several matrices: one at a time on the CPU; on CUDA, equal shapes in batches
    of up to BATCH_BYTES (in float64), each batch's Gram matrices and eigenvalues computed at once."""
    if str(device) == "cpu":
        return [spectrum_of(m) for m in matrices]
    return batched_spectra([as_torch(m) for m in matrices], device)


def batched_spectra(matrices: list[torch.Tensor], device: torch.device) -> list[Spectrum]:
    """The device path of spectra_of, with torch (it runs on the CPU too, which the tests use)."""
    import torch
    results: list[Spectrum | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for shape, members in by_shape.items():
        per_batch = max(1, BATCH_BYTES // (8 * math.prod(shape)))
        for start in range(0, len(members), per_batch):
            batch = members[start:start + per_batch]
            stacked = torch.stack([matrices[i].to(device) for i in batch]).to(torch.float64)
            tall = stacked if shape[0] >= shape[1] else stacked.transpose(1, 2)
            grams = tall.transpose(1, 2) @ tall
            finite = torch.isfinite(grams.diagonal(dim1=1, dim2=2)).all(dim=1).tolist()
            eigenvalues = torch.linalg.eigvalsh(torch.where(torch.isfinite(grams), grams, 0)).cpu().numpy()
            for j, i in enumerate(batch):
                results[i] = spectrum_from_gram(
                    eigenvalues[j] if finite[j] else None, shape,
                    lambda j=j: torch.linalg.svdvals(tall[j]).cpu().numpy())
    return results


def spectrum_from_gram(eigenvalues: np.ndarray | None, shape: tuple[int, ...], svd) -> Spectrum:
    """The spectrum from the Gram matrix's eigenvalues (ascending, as LAPACK gives them; None when W
    had a NaN or Inf), or from `svd()` when the Gram route cannot be trusted for this matrix."""
    if eigenvalues is None:
        return Spectrum(None, shape, NOT_FINITE)
    eigenvalues = np.clip(eigenvalues[::-1], 0, None)
    if eigenvalues[0] == 0:
        return Spectrum(np.zeros(len(eigenvalues)), shape, ALL_ZERO)
    if gram_ner_error(eigenvalues) > NER_TOLERANCE or gram_smin_error(eigenvalues) > SMIN_TOLERANCE:
        return Spectrum(np.asarray(svd(), dtype=np.float64), shape)
    return Spectrum(np.sqrt(eigenvalues), shape)


def gram_matrix(tall: np.ndarray) -> np.ndarray | None:
    """The k x k Gram matrix W^T W of a tall (or square) W in float64, built from row slices of
    about CHUNK_ELEMENTS (at least k rows each); None if W has a NaN or Inf."""
    k = tall.shape[1]
    gram = np.zeros((k, k))
    step = max(k, CHUNK_ELEMENTS // k)  # a slice of fewer than k rows would waste the rank-k update
    for start in range(0, tall.shape[0], step):
        chunk = float64_rows(tall, start, start + step)
        gram += chunk.T @ chunk  # numpy sees the shared buffer and calls syrk
    return gram if np.isfinite(np.diagonal(gram)).all() else None


def eigenvalues_of(gram: np.ndarray) -> np.ndarray:
    """The eigenvalues of a symmetric float64 matrix, ascending, from whichever LAPACK we measured
    faster at its size on a 2-core CPU: numpy's (OpenBLAS) below LARGE_K (0.065 s against 0.13 s at
    1024), torch's (MKL) from it on (2.3 s against 3.6 s at 4096)."""
    if len(gram) < LARGE_K:
        return np.linalg.eigvalsh(gram)
    import torch
    return torch.linalg.eigvalsh(torch.from_numpy(gram)).numpy()


def float64_rows(matrix: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of a matrix (possibly a transposed view) as a C-ordered float64 array.
    A uint16 matrix holds bfloat16 bits (numpy has no bfloat16): a bf16 is the top half of a
    float32, so it is widened by shifting its bits."""
    rows = matrix[start:stop]
    if rows.dtype == np.uint16:
        with np.errstate(invalid="ignore"):  # a NaN stays a NaN; it is reported from the Gram matrix
            return np.ascontiguousarray((rows.astype(np.uint32) << 16).view(np.float32), dtype=np.float64)
    return np.ascontiguousarray(rows, dtype=np.float64)


NUMPY_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
NOT_FINITE, ALL_ZERO = "contains NaN or Inf", "all zero"  # a Spectrum's problems


def finite_problem(data: bytearray, dtype: str) -> str | None:
    """NOT_FINITE if a floating-point tensor's raw bytes (any shape) hold a NaN or an Inf."""
    n = len(data) // np.dtype(NUMPY_DTYPES[dtype]).itemsize
    column = numpy_matrix(data, dtype, (n, 1))  # widened a slice of 4M elements at a time
    finite = all(np.isfinite(float64_rows(column, start, start + 2**22)).all() for start in range(0, n, 2**22))
    return None if finite else NOT_FINITE


def numpy_matrix(data: bytearray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A matrix over a tensor's raw safetensors bytes (no copy): bf16 as its uint16 bits."""
    return np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape)


def as_numpy(matrix) -> np.ndarray:
    """A numpy view of a CPU tensor (bf16 as uint16 bits), or the numpy array itself."""
    if isinstance(matrix, np.ndarray):
        return matrix
    import torch
    matrix = matrix.detach().cpu()
    if matrix.dtype == torch.bfloat16:
        return matrix.contiguous().view(torch.int16).numpy().view(np.uint16)
    return matrix.numpy()


def as_torch(matrix) -> torch.Tensor:
    """A tensor of a numpy matrix (uint16: bfloat16 bits), or the tensor itself."""
    import torch
    if not isinstance(matrix, np.ndarray):
        return matrix
    if matrix.dtype == np.uint16:
        return torch.from_numpy(matrix.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(matrix)


def gram_smin_error(eigenvalues: np.ndarray) -> float:
    """Worst-case relative error of the smallest singular value taken from these Gram eigenvalues
    (descending): an eigenvalue error d = k * eps * lambda_max moves s_min by d / (2 s_min^2)
    relatively; infinite when s_min may be zero."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    d = len(eigenvalues) * EPS * float(eigenvalues[0])
    smallest = float(eigenvalues[-1])
    return math.inf if smallest <= d else d / (2 * smallest)


def gram_ner_error(eigenvalues: np.ndarray) -> float:
    """Worst-case NER error of singular values taken from these Gram eigenvalues (descending).

    Each eigenvalue may be off by d = k * eps * lambda_max, so s_i = sqrt(lambda_i) by
    d / (2 s_i), or by sqrt(d) where s_i is that small; the bound sums the first-order change
    of H = -sum p_i ln p_i over those perturbations and divides by ln k.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    k = len(eigenvalues)
    if k == 1:
        return 0.0
    d = k * EPS * eigenvalues[0]
    s = np.sqrt(eigenvalues)
    ds = np.where(s > math.sqrt(d), d / (2 * np.maximum(s, np.finfo(np.float64).tiny)), math.sqrt(d))
    total = s.sum()
    p = s / total
    dp = ds / total + p * ds.sum() / total
    return float(((np.abs(np.log(np.maximum(p, ds / total))) + 1) * dp).sum() / math.log(k))
