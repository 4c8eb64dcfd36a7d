"""The Marchenko-Pastur bulk fit of one ESD, as weightwatcher 0.7.7's `analyze(mp_fit=True)` fits it.

A random N x M matrix (N >= M, Q = N / M) with entries of variance sigma^2 / N has its ESD inside
the Marchenko-Pastur bulk [sigma^2 (1 - 1/sqrt Q)^2, sigma^2 (1 + 1/sqrt Q)^2]; eigenvalues far
above the upper edge lambda_+ are the "spikes" training put there. weightwatcher estimates sigma
from the ESD itself, and its two columns follow from that fit:

- The eigenvalues are rescaled to mean 1 (weightwatcher's `rescale`, by M / sum lambda).
- Their density is estimated with a linear (triangular) kernel of bandwidth 0.1 on 1000 evenly
  spaced points from 0 to the largest value + 0.5; points where it is below 0.01 are dropped.
  For a square matrix (Q = 1) the singular values of the rescaled ESD are used instead, and
  compared with the quarter-circle law (1 / (pi sigma^2)) sqrt(4 - x^2) on [0, 2].
- sigma minimises the squared difference between that density and the MP density, by a grid
  search from 0.05 to 2 times sigma_0 = sqrt(lambda_max) / (1 + 1/sqrt Q) in steps of 0.01
  sigma_0, polished by Nelder-Mead (scipy's `optimize.brute` with its default `fmin` finish). A
  sigma whose bulk does not reach the density's peak or reaches past the last point kept (Q > 1)
  is penalised as weightwatcher does, by a residual of 1000 at every point.
- lambda_+ = (sigma (1 + 1/sqrt Q))^2; mp_softrank = lambda_+ / lambda_max (scale-free), and
  num_spikes counts the rescaled eigenvalues above lambda_+ + sqrt(TW), with weightwatcher's
  Tracy-Widom allowance TW = lambda_+^(2/3) M^(-2/3) / sqrt Q.

The density does not depend on sigma, so it is computed once per matrix (weightwatcher refits the
kernel estimate for every sigma tried); the result is the same to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BANDWIDTH = 0.1  # of the kernel density estimate (weightwatcher's bw)
DENSITY_POINTS = 1000  # where the density is estimated
DENSITY_FLOOR = 0.01  # points with a lower estimated density are left out of the fit
PENALTY = 1000.0  # residual at every point for a sigma whose bulk misses the density's peak
SIGMA_GRID = (0.05, 2.0, 0.01)  # start, stop, step of the sigma grid, in units of sigma_0
DENSITY_BLOCK = 2**20  # elements of the point x eigenvalue grid evaluated at a time


@dataclass(frozen=True)
class BulkFit:
    """The fitted MP bulk of a mean-1 ESD: its sigma, upper edge and what they give."""

    q: float
    sigma: float
    bulk_max: float
    num_spikes: int
    mp_softrank: float


def bulk_fit(eigenvalues: np.ndarray, shape: tuple[int, ...]) -> BulkFit | None:
    """The MP fit of the ESD of a matrix of `shape` from all its k = min(m, n) eigenvalues (zeros
    included); None when the density or the fit is not finite."""
    from scipy import optimize  # on first use, as spectra.py imports scipy.linalg

    lam = np.asarray(eigenvalues, dtype=np.float64)
    m = len(lam)
    q = max(shape) / m
    scaled = lam * (m / lam.sum())
    top = float(scaled.max())
    sample = np.sqrt(scaled) if q == 1 else scaled
    points, density = kernel_density(sample)
    keep = density > DENSITY_FLOOR
    if not keep.any():
        return None
    points, density = points[keep], density[keep]
    sigma_0 = math.sqrt(top / (1 + 1 / math.sqrt(q)) ** 2)
    start, stop, step = (sigma_0 * f for f in SIGMA_GRID)
    result = optimize.brute(misfit, (slice(start, stop, step),), args=(points, density, q), finish=optimize.fmin)
    sigma = float(np.ravel(result)[0])
    bulk_max = (sigma * (1 + 1 / math.sqrt(q))) ** 2
    tracy_widom = bulk_max ** (2 / 3) * m ** (-2 / 3) / math.sqrt(q)
    if not (math.isfinite(sigma) and math.isfinite(bulk_max)):
        return None
    spikes = int(np.count_nonzero(scaled > bulk_max + math.sqrt(tracy_widom)))
    return BulkFit(q=q, sigma=sigma, bulk_max=bulk_max, num_spikes=spikes, mp_softrank=bulk_max / top)


def kernel_density(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The linear-kernel density estimate of `sample` (bandwidth BANDWIDTH) at DENSITY_POINTS even
    points from 0 to max + 0.5: mean over the sample of max(0, 1 - |x - x_j| / h) / h."""
    points = np.linspace(0, float(sample.max()) + 0.5, DENSITY_POINTS)
    density = np.empty(DENSITY_POINTS)
    rows = max(1, DENSITY_BLOCK // len(sample))
    for lo in range(0, DENSITY_POINTS, rows):
        distance = np.abs(points[lo : lo + rows, None] - sample[None, :])
        weights = np.maximum(0.0, 1 - distance / BANDWIDTH)
        density[lo : lo + rows] = weights.sum(axis=1) / (len(sample) * BANDWIDTH)
    return points, density


def misfit(x: np.ndarray, points: np.ndarray, density: np.ndarray, q: float) -> float:
    """Sum of squared differences between the estimated density and the MP density of sigma = x[0]
    (the quarter-circle law when Q = 1); a bulk that misses the density's peak is penalised."""
    sigma = float(np.ravel(x)[0])
    if q == 1:
        return float(np.sum((quarter_circle(points, sigma) - density) ** 2))
    lower, upper = mp_edges(q, sigma)
    peak = points[int(np.argmax(density))]
    if upper < peak or upper > points[-1] or lower > peak:
        return PENALTY**2 * len(points)
    return float(np.sum((mp_density(points, q, sigma) - density) ** 2))


def mp_edges(q: float, sigma: float) -> tuple[float, float]:
    """The MP bulk's lower and upper edges for aspect ratio Q and scale sigma."""
    root = math.sqrt(1 / q)
    return (sigma * (1 - root)) ** 2, (sigma * (1 + root)) ** 2


def mp_density(x: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """The MP density sqrt((b - x)(x - a)) / (2 pi sigma^2 x / Q) inside the bulk (a, b), else 0."""
    lower, upper = mp_edges(q, sigma)
    inside = (x > lower) & (x < upper)
    x = np.where(inside, x, upper)  # outside the bulk: a point where the root is 0, never taken
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma = 0 has no bulk: nothing is inside
        value = q / (2 * np.pi * sigma * sigma * x) * np.sqrt((upper - x) * (x - lower))
    return np.where(inside, value, 0.0)


def quarter_circle(x: np.ndarray, sigma: float) -> np.ndarray:
    """weightwatcher's quarter-circle density sqrt(4 - x^2) / (pi sigma^2) on [0, 2], else 0."""
    inside = np.abs(x) <= 2
    return np.where(inside, np.sqrt(np.where(inside, 4 - x**2, 0.0)) / (np.pi * sigma * sigma), 0.0)
