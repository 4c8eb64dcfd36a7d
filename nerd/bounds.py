"""Rigorous error bounds of computed singular values, and of the NER and s_min derived from them.

spectra.py computes singular values by fast routes whose accuracy depends on the matrix; this
module decides, per matrix, whether a route's values are exact enough (`proven`), from a bound
on each value's absolute error:

- from the Gram matrix G = W^T W (`gram_errors`): every eigenvalue of the computed G is taken
  to be within delta = GRAM_FACTOR * eps * lambda_max of the true one. LAPACK documents the
  symmetric eigensolver's error as p(k) * eps * ||G||, p a modestly growing function, and its
  users' guide computes the bound with p = 1; GRAM_FACTOR = 4 covers that and the rounding of
  the float64 sums that form G. This is a model, so it is checked: on every kind of matrix in the
  tests (power-law spectra with condition numbers 1e2 to 1e4, Gaussian, a model trained on real
  text) the eigenvalue errors in the half of the spectrum that decides the bound stay below a
  tenth of delta (we measured at most 0.02 eps lambda_max), and tests/test_spectra.py asserts it.
  Then |s_i - sqrt(lambda_i)| <= delta / (s_i + sqrt(lambda_i - delta)).
- from a Rayleigh-Ritz refinement (spectra.refined_tail): the residual bound it computes.

`ner_error_bound` turns those into a bound on the NER error by the mean value theorem: with
p_i = s_i / S and H = -sum p_i ln p_i, dH/ds_i = -(ln p_i + H) / S exactly, and over the box of
possible true values the derivative moves by at most the terms bounded below, so the bound holds
for any true spectrum within the errors, not only to first order.
"""

from __future__ import annotations

import math

import numpy as np

NER_TOLERANCE = 1e-9  # the largest NER error a route may cause before the next one is tried
SMIN_TOLERANCE = 1e-3  # the largest relative error of s_min a route may cause
MAX_RELATIVE = 0.01  # values known only to worse than this (relative) are not used from the route
GRAM_FACTOR = 4.0  # the Gram route's eigenvalue error bound, in units of eps * lambda_max
REFINE_SHARE = 0.5  # refine at most this share of the spectrum (more costs as much as an SVD)
EPS = float(np.finfo(np.float64).eps)
TINY = float(np.finfo(np.float64).tiny)


def gram_errors(eigenvalues: np.ndarray) -> np.ndarray:
    """The bound on each singular value's absolute error when it is the square root of this
    eigenvalue of the float64 Gram matrix (eigenvalues descending, clipped at 0)."""
    delta = GRAM_FACTOR * EPS * float(eigenvalues[0])
    s = np.sqrt(eigenvalues)
    lower = np.sqrt(np.clip(eigenvalues - delta, 0, None))  # the true eigenvalue is at least this
    return np.minimum(delta / np.maximum(s + lower, TINY), math.sqrt(delta))


def ner_error_bound(values: np.ndarray, errors: np.ndarray) -> float:
    """A bound on |NER(true) - NER(values)| for any true singular values within `errors` of
    `values` (descending); infinite unless every value is positive and known to MAX_RELATIVE.

    With c = 1.01 (rho + A) bounding how far any ln p_i moves over the box (rho the largest
    relative error, A = sum errors / S), |dH/ds_i| <= (|ln p_i + H| + c + B) / (S (1 - A)) where B
    bounds |H(true) - H(values)|; so B <= (X + c A) / (1 - 2 A) with X = sum |ln p_i + H| e_i / S.
    """
    k = len(values)
    if k == 1:
        return 0.0
    if values[-1] <= 0 or not np.all(errors < MAX_RELATIVE * values):
        return math.inf
    total, gradient = float(values.sum()), entropy_gradient(values)
    rho, a = float((errors / values).max()), float(errors.sum()) / total
    x = float((gradient * errors).sum())
    c = 1.01 * (rho + a)
    return (x + c * a) / (1 - 2 * a) / math.log(k)


def entropy_gradient(values: np.ndarray) -> np.ndarray:
    """|dH/ds_i| = |ln p_i + H| / S for positive singular values, p_i = s_i / S."""
    total = float(values.sum())
    p = values / total
    return np.abs(np.log(p) - float((p * np.log(p)).sum())) / total


def tail_to_refine(values: np.ndarray, errors: np.ndarray) -> int | None:
    """How many of the smallest values to compute again so that the rest keep the NER error within
    a quarter of NER_TOLERANCE; None if that is more than REFINE_SHARE of them (or none). The cut is
    moved down, up to four times as many values, to the widest relative gap: the Ritz vectors are
    only as good as the subspace they come from, and a subspace ending in a gap is well defined."""
    k = len(values)
    if k < 2 or values[0] <= 0:
        return None
    positive = np.maximum(values, TINY)
    share = entropy_gradient(positive) * errors / math.log(k)
    within = (np.cumsum(share) <= NER_TOLERANCE / 4) & (errors < MAX_RELATIVE * positive)
    kept = int(np.argmin(within)) if not within.all() else k  # the leading run of values that may stay
    needed, most = k - kept, int(REFINE_SHARE * k)
    if not 0 < needed <= most:
        return None
    counts = np.arange(needed, min(4 * needed + 8, most) + 1)
    gaps = positive[k - counts - 1] / positive[k - counts]  # the value above the cut over the one below it
    return int(counts[np.argmax(gaps)])


def proven(values: np.ndarray, errors: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether singular values known to within `errors` give the NER to NER_TOLERANCE and s_min to
    SMIN_TOLERANCE, and every one of them is certainly above both rank tolerances of metrics.py (so
    the ranks are exact: k)."""
    s_min, e_min = values[-1], errors[-1]
    rank_tolerance = (values[0] + errors[0]) * EPS * max(max(shape), 0.5 * math.sqrt(sum(shape) + 1))
    return bool(
        s_min - e_min > rank_tolerance
        and e_min <= SMIN_TOLERANCE * (s_min - e_min)
        and ner_error_bound(values, errors) <= NER_TOLERANCE
    )


def ritz_errors(
    values: np.ndarray, residual: float, above: float, s_max: float, shape: tuple[int, ...]
) -> np.ndarray | None:
    """The error bound of each singular value of Y = W V (`values`, descending), V the computed
    eigenvectors of the Gram matrix's smallest eigenvalues, as a singular value of W; None if the
    subspace is not separated from the rest of the spectrum.

    In a basis [V, V'] the true Gram matrix is [[Y^T Y, R^T], [R, N]] with ||R|| <= `residual`, the
    norm of W^T Y - V Y^T Y. When every eigenvalue of N, at least `above` (the next computed
    eigenvalue) - delta, exceeds those of Y^T Y by a gap g, the ordered eigenvalues move by at most
    ||R||^2 / g from those of the two blocks (the quadratic residual bound of Li and Li, 2005): the
    smallest ones of W^T W are within that of Y^T Y's. ||R|| is about delta, so this is of order
    delta^2 / g. Forming Y rounds each column by about (sqrt(k) + sqrt(m)) eps s_max, which bounds the
    error of its singular values (Weyl) over all columns together; residual rounding likewise.
    """
    k, m, count = min(shape), max(shape), len(values)
    rounding = (math.sqrt(k) + math.sqrt(m)) * EPS * s_max
    gap = above - GRAM_FACTOR * EPS * s_max**2 - float(values[0] + math.sqrt(count) * rounding) ** 2
    if gap <= 0:
        return None
    shift = (residual + rounding * float(values[0]) * math.sqrt(count)) ** 2 / gap  # of the squared values
    lower = np.sqrt(np.clip(values**2 - shift, 0, None))
    return np.minimum(shift / np.maximum(values + lower, TINY), math.sqrt(shift)) + math.sqrt(count) * rounding
