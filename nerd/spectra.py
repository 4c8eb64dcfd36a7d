"""Exact singular-value spectra of weight matrices, and which path each one took.

The fastest exact path on a CPU is the k x k Gram matrix (k = the shorter side) in float64
followed by LAPACK's symmetric eigensolver; its eigenvalues are the squared singular values.
On the CPU the Gram matrix is built with numpy in row slices of W converted to float64
(SLICE_ELEMENTS, or k rows if more, at a time, so a large embedding is never held whole in
float64), each slice's C^T C a symmetric rank-k update (BLAS syrk: half the work of a general
product); the eigenvalues come from numpy's LAPACK, or torch's for k >= LARGE_K, whichever we
measured faster at the size. On CUDA (`device` cuda) the same work runs on the GPU in float64
with torch, and `spectra_of` batches matrices of equal shape (one batched product and one
batched solver call per group), keeping the data on the device.

Exactness is proven per matrix, not assumed (bounds.py): every eigenvalue of the computed Gram
matrix is taken to be off by at most delta = bounds.GRAM_FACTOR * eps * lambda_max (LAPACK's
documented eigensolver bound with a margin for the sums that form G; the tests check the model),
which bounds each singular value's error, and `bounds.ner_error_bound` turns those into a
rigorous bound on the NER error. Each matrix takes the first of three paths that proves it:

- `gram`: the bound is within NER_TOLERANCE, s_min is known to SMIN_TOLERANCE and the matrix is
  certainly of full numerical rank. Trained matrices with condition numbers up to about 1e4
  (power-law spectra) stay here.
- `refined`: the bound is not met, but only because of the smallest singular values (at most
  REFINE_SHARE of them): the Gram matrix's eigenvectors of its smallest eigenvalues span V, and
  the singular values of W V (Rayleigh-Ritz) replace them, bounded by the quadratic residual
  bound from W^T Y - V Y^T Y (bounds.ritz_errors); the NER bound is checked again.
- `svd`: a float64 SVD (LAPACK gesdd), the last resort: rank-deficient or extremely
  ill-conditioned matrices.

A NaN or Inf in W shows in the Gram matrix's diagonal (each entry is the sum of squares of one
column), so it is found without a separate pass over W. The metrics derived from a spectrum are
in metrics.py.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .bounds import gram_errors, proven, ritz_errors, tail_to_refine
from .threads import torch_threads

if TYPE_CHECKING:
    import torch

SPECTRUM_VERSION = "3"  # bump when the computation changes: cached spectra are then recomputed
SLICE_ELEMENTS = 2**22  # elements of a tensor widened to float64 at a time (32 MB): spectra, finite checks, tethers
LARGE_K = 2048  # from this size on, torch's LAPACK (MKL) solves the eigenproblem faster than numpy's
BATCH_BYTES = 2**30  # float64 bytes of equal-shape matrices stacked into one CUDA batch
GRAM, REFINED, SVD = "gram", "refined", "svd"  # a Spectrum's paths
PATHS = (GRAM, REFINED, SVD)


@dataclass(frozen=True)
class Spectrum:
    """Singular values of one matrix (of `shape`) in float64, descending, or why there are none;
    `path` says how they were computed (GRAM, REFINED or SVD; None without values)."""

    values: np.ndarray | None
    shape: tuple[int, ...]
    problem: str | None = None
    path: str | None = None


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
    return spectrum_from_gram(
        eigenvalues_of(gram) if gram is not None else None,
        tuple(matrix.shape),
        lambda: np.linalg.svd(float64_rows(tall, 0, tall.shape[0]), compute_uv=False),
        lambda count, s_max: refined_tail(tall, gram, count, s_max),
    )


def spectra_of(matrices: list[torch.Tensor | np.ndarray], device: torch.device | str = "cpu") -> list[Spectrum]:
    """The spectra of several matrices: one at a time on the CPU; on CUDA, equal shapes in batches
    of up to BATCH_BYTES (in float64), each batch's Gram matrices and eigenvalues computed at once."""
    if str(device) == "cpu":
        return [spectrum_of(m) for m in matrices]
    return batched_spectra([as_torch(m) for m in matrices], device)


def batched_spectra(matrices: list[torch.Tensor], device: torch.device) -> list[Spectrum]:
    """The device path of spectra_of, with torch (it runs on the CPU too, which the tests use).
    A matrix the Gram route cannot resolve goes to torch's float64 SVD on the device (no refined
    path there: the SVD of one matrix on a GPU costs little next to moving it)."""
    import torch

    torch_threads()
    results: list[Spectrum | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for shape, members in by_shape.items():
        per_batch = max(1, BATCH_BYTES // (8 * math.prod(shape)))
        for start in range(0, len(members), per_batch):
            batch = members[start : start + per_batch]
            stacked = torch.stack([matrices[i].to(device) for i in batch]).to(torch.float64)
            tall = stacked if shape[0] >= shape[1] else stacked.transpose(1, 2)
            grams = tall.transpose(1, 2) @ tall
            finite = torch.isfinite(grams.diagonal(dim1=1, dim2=2)).all(dim=1).tolist()
            eigenvalues = torch.linalg.eigvalsh(torch.where(torch.isfinite(grams), grams, 0)).cpu().numpy()
            for j, i in enumerate(batch):
                results[i] = spectrum_from_gram(
                    eigenvalues[j] if finite[j] else None,
                    shape,
                    lambda j=j: torch.linalg.svdvals(tall[j]).cpu().numpy(),
                )
    return results


def spectrum_from_gram(eigenvalues: np.ndarray | None, shape: tuple[int, ...], svd, refine=None) -> Spectrum:
    """The spectrum from the Gram matrix's eigenvalues (ascending, as LAPACK gives them; None when W
    had a NaN or Inf) when they are proven exact enough; else from `refine(count, s_max)` (the
    `count` smallest singular values again, with their error bounds) when that proves them; else `svd()`."""
    if eigenvalues is None:
        return Spectrum(None, shape, NOT_FINITE)
    eigenvalues = np.clip(np.asarray(eigenvalues, dtype=np.float64)[::-1], 0, None)
    if eigenvalues[0] == 0:
        return Spectrum(np.zeros(len(eigenvalues)), shape, ALL_ZERO, GRAM)
    values, errors = np.sqrt(eigenvalues), gram_errors(eigenvalues)
    if proven(values, errors, shape):
        return Spectrum(values, shape, path=GRAM)
    count = tail_to_refine(values, errors) if refine is not None else None
    if count is not None:
        tail, tail_errors = refine(count, values[0] + errors[0])
        if tail_errors is not None:
            values, errors = np.concatenate([values[:-count], tail]), np.concatenate([errors[:-count], tail_errors])
            if proven(values, errors, shape):
                return Spectrum(values, shape, path=REFINED)
    return Spectrum(np.asarray(svd(), dtype=np.float64), shape, path=SVD)


def refined_tail(tall: np.ndarray, gram: np.ndarray, count: int, s_max: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The `count` smallest singular values of a tall W again (descending) with their error bounds
    (bounds.ritz_errors; None when they cannot be proven), by Rayleigh-Ritz: V = the Gram matrix's
    eigenvectors of its `count` smallest eigenvalues (LAPACK syevr on that subset), the singular
    values of Y = W V, whose condition number is only that of the tail, and the residual
    W^T Y - V Y^T Y of the subspace (`s_max` bounds the largest singular value)."""
    from scipy.linalg import eigh

    eigenvalues, basis = eigh(gram, subset_by_index=[0, count], driver="evr", check_finite=False)
    basis = np.ascontiguousarray(basis[:, :count])  # the last one only gives the next eigenvalue
    projected = np.empty((tall.shape[0], count))
    residual = np.zeros((tall.shape[1], count))
    for start, stop in row_slices(tall):  # W read once: Y = W V and W^T Y together
        rows = float64_rows(tall, start, stop)
        projected[start:stop] = rows @ basis
        residual += rows.T @ projected[start:stop]
    residual -= basis @ (projected.T @ projected)
    values = np.linalg.svd(projected, compute_uv=False)
    return values, ritz_errors(values, float(np.linalg.norm(residual)), float(eigenvalues[count]), s_max, tall.shape)


def row_slices(tall: np.ndarray) -> list[tuple[int, int]]:
    """The (start, stop) row ranges W is widened to float64 in: about SLICE_ELEMENTS each, but at
    least k rows (a slice of fewer would waste the rank-k update)."""
    m, k = tall.shape
    step = max(k, SLICE_ELEMENTS // k)
    return [(start, min(start + step, m)) for start in range(0, m, step)]


def gram_matrix(tall: np.ndarray) -> np.ndarray | None:
    """The k x k Gram matrix W^T W of a tall (or square) W in float64, built from row slices of
    about SLICE_ELEMENTS (at least k rows each); None if W has a NaN or Inf."""
    k = tall.shape[1]
    gram = np.zeros((k, k))
    for start, stop in row_slices(tall):
        chunk = float64_rows(tall, start, stop)
        gram += chunk.T @ chunk  # numpy sees the shared buffer and calls syrk
    return gram if np.isfinite(np.diagonal(gram)).all() else None


def eigenvalues_of(gram: np.ndarray) -> np.ndarray:
    """The eigenvalues of a symmetric float64 matrix, ascending, from whichever LAPACK we measured
    faster at its size on a 2-core CPU: numpy's (OpenBLAS) below LARGE_K (0.065 s against 0.13 s at
    1024), torch's (MKL) from it on (2.3 s against 3.6 s at 4096)."""
    if len(gram) < LARGE_K:
        return np.linalg.eigvalsh(gram)
    import torch

    torch_threads()

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
    column = numpy_matrix(data, dtype, (n, 1))  # widened a slice at a time
    finite = all(
        np.isfinite(float64_rows(column, start, start + SLICE_ELEMENTS)).all() for start in range(0, n, SLICE_ELEMENTS)
    )
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
