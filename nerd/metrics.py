"""Every metric of one weight matrix, derived from its exact singular values.

One spectrum (float64 singular values s_1 >= ... >= s_k >= 0, k = min(m, n), zeros included)
serves them all:

- ner, erank, entropy: p_i = s_i / sum s, H = -sum p_i ln p_i (nats), NER = H / ln k, ERank = exp(H).
- ESD eigenvalues lambda_i = s_i^2 (weightwatcher's convention, no 1/N factor):
  stable_rank = sum lambda / lambda_max, log_norm = log10 sum lambda,
  log_spectral_norm = log10 lambda_max.
- alpha: the continuous power-law MLE alpha = 1 + n / sum ln(lambda / xmin) over the n eigenvalues
  >= xmin, with xmin chosen among the distinct positive eigenvalues (all but the largest) by the
  smallest Kolmogorov-Smirnov distance, as Clauset et al. and the `powerlaw` package (1.x) do;
  alpha_xmin, alpha_ks, alpha_tail (n) and alpha_std_err = (alpha - 1) / sqrt(n) come with it.
  alpha_hat = alpha * log10 lambda_max; log_alpha_norm = log10 sum lambda^alpha over every
  eigenvalue (weightwatcher's column of that name, with our alpha), summed in the log domain.
- Marchenko-Pastur bulk (marchenko.py, weightwatcher's `mp_fit`): mp_softrank = lambda_+ /
  lambda_max with the bulk edge lambda_+ of the fitted MP law, num_spikes the eigenvalues above
  lambda_+ plus weightwatcher's Tracy-Widom allowance.
- detX (SETOL): eigenvalues rescaled to mean 1; the tail is the largest set of top eigenvalues
  whose product is >= 1, found as a sum of logarithms (a plain product overflows on large layers).
  detx_tail is its size, detx_lambda its smallest eigenvalue in the original units.
- rank collapse: s_min, s_min_ratio = s_min / s_max, rank_numpy (s_i > s_max * max(m, n) * eps),
  rank_nr (s_i > 0.5 * sqrt(m + n + 1) * s_max * eps) and rank_loss = k - rank_numpy, with eps the
  float64 machine epsilon: the spectrum is computed in float64 from the stored values, which
  float64 holds exactly, so float64 rounding is what separates a zero singular value from a tiny
  one (the storage dtype's epsilon would call every large bf16 matrix rank-deficient).

A metric that is undefined for a matrix is None: every metric when the matrix has NaN/Inf, all
but the ranks and s_min when it is all zero, alpha and its companions when it has fewer than 10
positive eigenvalues or a flat spectrum, the MP fit's two when the matrix has fewer than 10
eigenvalues (zeros included). Every other value is a finite number.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import marchenko
from .spectra import PATHS, Spectrum

# Cached metrics are keyed by the content of the files that define them: any change to a
# definition recomputes them (from the cached spectra, which is cheap).
DEFINITIONS = (Path(__file__), Path(marchenko.__file__))
METRICS_VERSION = hashlib.sha256(b"".join(p.read_bytes() for p in DEFINITIONS)).hexdigest()[:16]
EPS = float(np.finfo(np.float64).eps)
MIN_EIGENVALUES = 10  # fewer positive eigenvalues: no power-law fit (weightwatcher's min_evals)
KS_BLOCK = 2**20  # elements of the candidate-xmin x eigenvalue grid evaluated at a time

# name -> what it is; the order of the CSV columns and of `mastermerge analyze`'s summary
METRICS = {
    "ner": "Normalized Effective Rank H / ln k, in [0, 1]",
    "erank": "effective rank exp(H)",
    "entropy": "entropy H of the normalized singular values (nats)",
    "stable_rank": "sum of eigenvalues / largest eigenvalue",
    "log_norm": "log10 of the sum of eigenvalues (squared Frobenius norm)",
    "log_spectral_norm": "log10 of the largest eigenvalue",
    "alpha": "power-law exponent of the ESD tail (continuous MLE)",
    "alpha_xmin": "smallest eigenvalue of the power-law tail",
    "alpha_ks": "Kolmogorov-Smirnov distance of the power-law fit",
    "alpha_tail": "number of eigenvalues in the power-law tail",
    "alpha_std_err": "standard error of alpha, (alpha - 1) / sqrt(tail)",
    "alpha_hat": "alpha * log10 of the largest eigenvalue",
    "log_alpha_norm": "log10 of the sum of eigenvalues to the power alpha",
    "mp_softrank": "Marchenko-Pastur bulk edge of the fitted MP law / largest eigenvalue",
    "num_spikes": "number of eigenvalues above the fitted Marchenko-Pastur bulk edge",
    "detx_tail": "number of top eigenvalues (mean 1) whose product is >= 1",
    "detx_lambda": "smallest eigenvalue of the detX tail",
    "s_min": "smallest singular value",
    "s_min_ratio": "smallest / largest singular value",
    "rank_numpy": "numerical rank, tolerance s_max * max(m, n) * eps",
    "rank_nr": "numerical rank, tolerance 0.5 * sqrt(m + n + 1) * s_max * eps (Numerical Recipes)",
    "rank_loss": "k - rank_numpy",
}


@dataclass(frozen=True)
class PowerLawFit:
    """The Clauset power-law fit of an ESD tail."""

    alpha: float
    xmin: float
    ks: float
    tail: int

    @property
    def std_err(self) -> float:
        return (self.alpha - 1) / math.sqrt(self.tail)


def metrics_of(spectrum: Spectrum) -> dict[str, float | int | None]:
    """Every metric of a matrix from its spectrum. A matrix with NaN/Inf has none; an all-zero one
    has only its ranks (0), rank loss (k) and s_min (0). Every value is finite or None."""
    result = dict.fromkeys(METRICS)
    if spectrum.values is None or len(spectrum.values) == 0 or not np.isfinite(spectrum.values).all():
        return result
    values, shape = spectrum.values.astype(np.float64), spectrum.shape
    k = len(values)
    rank = numerical_rank(values, numpy_tolerance(values[0], shape))
    result.update(
        s_min=float(values[-1]),
        rank_numpy=rank,
        rank_loss=k - rank,
        rank_nr=numerical_rank(values, nr_tolerance(values[0], shape)),
    )
    if values[0] <= 0:
        return result
    eigenvalues = values**2
    h = entropy(values)
    total, top = float(eigenvalues.sum()), float(eigenvalues[0])
    tail, threshold = detx(eigenvalues)
    result.update(
        ner=ner(values),
        erank=math.exp(h),
        entropy=h,
        stable_rank=total / top,
        log_norm=math.log10(total),
        log_spectral_norm=math.log10(top),
        detx_tail=tail,
        detx_lambda=threshold,
        s_min_ratio=float(values[-1] / values[0]),
    )
    fit = power_law_fit(eigenvalues)
    if fit is not None:
        result.update(
            alpha=fit.alpha,
            alpha_xmin=fit.xmin,
            alpha_ks=fit.ks,
            alpha_tail=fit.tail,
            alpha_std_err=fit.std_err,
            alpha_hat=fit.alpha * math.log10(top),
            log_alpha_norm=log_alpha_norm(eigenvalues, fit.alpha),
        )
    bulk = marchenko.bulk_fit(eigenvalues, shape) if k >= MIN_EIGENVALUES else None
    if bulk is not None:
        result.update(mp_softrank=bulk.mp_softrank, num_spikes=bulk.num_spikes)
    return {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in result.items()}


def every_metric(spectrum: Spectrum) -> dict:
    """Every metric, the spectrum's `problem` and the `path` it was computed by (spectra.PATHS):
    what the metric cache stores for a matrix."""
    return metrics_of(spectrum) | {"problem": spectrum.problem, "path": spectrum.path}


def path_counts(rows) -> dict[str, int]:
    """How many of these metric rows' spectra took each path (spectra.PATHS)."""
    paths = [row.get("path") for row in rows]
    return {path: paths.count(path) for path in PATHS}


def entropy(values: np.ndarray) -> float:
    """Shannon entropy (nats) of the singular values normalised to sum to one (never -0.0)."""
    p = values[values > 0] / values.sum()
    return max(0.0, float(-(p * np.log(p)).sum()))


def ner(values: np.ndarray) -> float:
    """Normalized Effective Rank H / ln k, clamped to [0, 1] against rounding; 1.0 for k = 1."""
    k = len(values)
    return 1.0 if k == 1 else min(1.0, entropy(values) / math.log(k))


def power_law_fit(eigenvalues: np.ndarray) -> PowerLawFit | None:
    """Clauset et al.'s continuous power-law fit: for every candidate xmin (each distinct positive
    eigenvalue but the largest), alpha = 1 + n / sum ln(x / xmin) over the n values >= xmin and the
    KS distance max |F_fit - F_data| at the distinct tail values, where F_data(u) is the share of
    the tail below u (the `powerlaw` package's convention); the xmin with the smallest distance
    wins (the first on ties). None with fewer than MIN_EIGENVALUES positive eigenvalues (as
    weightwatcher's min_evals) or a flat spectrum (all within rounding of the largest, which
    would fit a power law to rounding noise)."""
    x = np.sort(eigenvalues[eigenvalues > 0])
    if len(x) < MIN_EIGENVALUES or x[-1] - x[0] <= len(eigenvalues) * EPS * x[-1]:
        return None
    unique, first = np.unique(x, return_index=True)
    n, candidates = len(x), len(unique) - 1
    # sum ln(x / u_j) over the tail of u_j, as a sum of positive steps ln(u_(l+1) / u_l), each
    # weighted by the number of values above it: no cancellation, even for nearly equal values
    steps = np.log1p(np.diff(unique) / unique[:-1]) * (n - first[1:])
    spread = np.cumsum(steps[::-1])[::-1]
    tail_sizes = n - first[:candidates]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        alphas = 1 + tail_sizes / spread
        log_u = np.concatenate([[0.0], np.cumsum(np.log1p(np.diff(unique) / unique[:-1]))])
        distances = ks_distances(log_u, first, n, alphas)
    valid = np.isfinite(alphas) & np.isfinite(distances)
    if not valid.any():
        return None
    best = int(np.argmin(np.where(valid, distances, np.inf)))
    return PowerLawFit(
        alpha=float(alphas[best]), xmin=float(unique[best]), ks=float(distances[best]), tail=int(tail_sizes[best])
    )


def log_alpha_norm(eigenvalues: np.ndarray, alpha: float) -> float:
    """log10 sum lambda^alpha over the positive eigenvalues, as a log-sum-exp (the plain sum
    overflows for large eigenvalues and alphas)."""
    logs = alpha * np.log(eigenvalues[eigenvalues > 0])
    top = float(logs.max())
    return (top + math.log(float(np.exp(logs - top).sum()))) / math.log(10)


def ks_distances(log_u: np.ndarray, first: np.ndarray, n: int, alphas: np.ndarray) -> np.ndarray:
    """KS distance of each candidate fit j (xmin = u_j) over the distinct values u_l, l >= j:
    |(1 - (u_l / u_j)^(1 - alpha_j)) - (first_l - first_j) / (n - first_j)|, in row blocks."""
    candidates, size = len(alphas), len(log_u)
    distances = np.empty(candidates)
    rows = max(1, KS_BLOCK // size)
    columns = np.arange(size)
    for start in range(0, candidates, rows):
        j = np.arange(start, min(start + rows, candidates))
        lo = start  # columns before the block's first xmin are never in its tails
        gap = np.maximum(log_u[None, lo:] - log_u[j, None], 0)  # 0 below xmin: masked below
        fitted = -np.expm1((1 - alphas[j, None]) * gap)
        observed = (first[None, lo:] - first[j, None]) / (n - first[j, None])
        diff = np.abs(fitted - observed)
        diff[columns[None, lo:] < j[:, None]] = 0  # values below xmin are not in the tail
        distances[j] = diff.max(axis=1)
    return distances


def detx(eigenvalues: np.ndarray) -> tuple[int, float]:
    """Size and smallest eigenvalue of the detX tail: the largest t such that the top t eigenvalues,
    rescaled to mean 1, have a product >= 1 (log domain: their log-sum is >= 0)."""
    lam = np.sort(eigenvalues)[::-1]
    with np.errstate(divide="ignore"):
        logs = np.log(lam) - math.log(lam.mean())
    partial = np.cumsum(logs)
    tail = int(np.count_nonzero(partial >= 0))  # the partial sums rise, then fall: a prefix
    tail = max(tail, 1)  # the largest eigenvalue is >= the mean, so its log is >= 0
    return tail, float(lam[tail - 1])


def numpy_tolerance(s_max: float, shape: tuple[int, ...]) -> float:
    """numpy.linalg.matrix_rank's default: s_max * max(m, n) * eps."""
    return float(s_max) * max(shape) * EPS


def nr_tolerance(s_max: float, shape: tuple[int, ...]) -> float:
    """The Numerical Recipes tolerance: 0.5 * sqrt(m + n + 1) * s_max * eps."""
    return 0.5 * math.sqrt(sum(shape) + 1) * float(s_max) * EPS


def numerical_rank(values: np.ndarray, tolerance: float) -> int:
    """The number of singular values above the tolerance."""
    return int(np.count_nonzero(values > tolerance))
