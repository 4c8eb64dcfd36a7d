"""Every metric against an independent reference: the `powerlaw` package, a slow log-domain detX,
numpy.linalg.matrix_rank, and Marchenko-Pastur theory for Gaussian matrices."""

import contextlib
import io
import math

import numpy as np
import powerlaw
import pytest
import torch

from nerd.metrics import METRICS, detx, metrics_of, power_law_fit
from nerd.spectra import Spectrum, spectrum_of


def reference_fit(eigenvalues: np.ndarray):
    """powerlaw's continuous fit (it prints progress; keep the test output clean)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return powerlaw.Fit(eigenvalues, verbose=False)


def esd(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(w, compute_uv=False) ** 2


def heavy_tailed(rng, m: int, n: int, tail: float) -> np.ndarray:
    """A Gaussian matrix whose columns are scaled by Pareto draws: a power-law ESD tail."""
    return rng.standard_normal((m, n)) * (rng.pareto(tail, n) + 0.1)


@pytest.mark.parametrize("case", range(8))
def test_alpha_equals_the_powerlaw_package(case):
    rng = np.random.default_rng(case)
    shapes = [(300, 120), (120, 300), (500, 200), (64, 64), (1000, 50), (256, 256), (400, 100), (90, 60)]
    m, n = shapes[case]
    w = heavy_tailed(rng, m, n, 1.0 + 0.5 * case) if case % 4 != 3 else rng.standard_normal((m, n))
    eigenvalues = esd(w)
    fit, ref = power_law_fit(eigenvalues), reference_fit(eigenvalues)
    assert fit.xmin == ref.xmin
    assert fit.tail == ref.power_law.n
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert fit.ks == pytest.approx(ref.D, abs=1e-12)
    assert fit.std_err == pytest.approx(ref.sigma, rel=1e-10)


def test_alpha_with_repeated_eigenvalues_equals_the_powerlaw_package():
    rng = np.random.default_rng(7)
    values = np.round((rng.pareto(2.0, 400) + 1) * 3, 1)  # many ties
    fit, ref = power_law_fit(values), reference_fit(values)
    assert (fit.xmin, fit.tail) == (ref.xmin, ref.power_law.n)
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert fit.ks == pytest.approx(ref.D, abs=1e-12)


def test_alpha_of_a_real_model_matrix_equals_the_powerlaw_package():
    from helpers import EXAMPLES

    from nerd.checkpoint import Checkpoint

    with Checkpoint.open(EXAMPLES / "tiny-docs") as ckpt:
        for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
            eigenvalues = spectrum_of(ckpt.read(name)).values ** 2
            fit, ref = power_law_fit(eigenvalues), reference_fit(eigenvalues)
            assert fit.xmin == ref.xmin and fit.alpha == pytest.approx(ref.alpha, rel=1e-10)


def test_alpha_is_undefined_without_two_distinct_eigenvalues():
    assert power_law_fit(np.array([2.0, 2.0, 2.0])) is None
    assert power_law_fit(np.array([5.0, 0.0])) is None
    m = metrics_of(spectrum_of(torch.eye(16)))
    assert m["alpha"] is None and m["alpha_hat"] is None and m["ner"] == pytest.approx(1.0)


def slow_detx(eigenvalues: np.ndarray) -> tuple[int, float]:
    """The definition, one candidate tail at a time, with exactly rounded log sums."""
    lam = sorted(eigenvalues.tolist(), reverse=True)
    mean = math.fsum(lam) / len(lam)
    best = 0
    for t in range(1, len(lam) + 1):
        if lam[t - 1] > 0 and math.fsum(math.log(v / mean) for v in lam[:t]) >= 0:
            best = t
    return best, lam[best - 1]


@pytest.mark.parametrize("seed", range(5))
def test_detx_equals_the_slow_log_domain_reference(seed):
    rng = np.random.default_rng(seed)
    w = heavy_tailed(rng, 200, 80, 1.5 + seed) if seed % 2 else rng.standard_normal((200, 80))
    eigenvalues = esd(w)
    assert detx(eigenvalues) == slow_detx(eigenvalues)


def test_detx_does_not_overflow_on_a_large_layer():
    rng = np.random.default_rng(1)
    eigenvalues = np.sort(rng.exponential(1.0, 6000))[::-1]  # a side of 6000: thousands of values > mean
    tail, threshold = detx(eigenvalues)
    with np.errstate(over="ignore"):  # the plain running product of the tail overflows
        assert np.isinf(np.cumprod(eigenvalues[:tail] / eigenvalues.mean())).any()
    assert (tail, threshold) == slow_detx(eigenvalues)
    assert 1 < tail < len(eigenvalues)


def test_detx_with_zero_eigenvalues_stops_before_them():
    tail, threshold = detx(np.array([4.0, 1.0, 0.0, 0.0]))
    assert (tail, threshold) == slow_detx(np.array([4.0, 1.0, 0.0, 0.0])) and threshold > 0


def low_rank(rng, m: int, n: int, r: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((m, r)) @ rng.standard_normal((r, n)))


@pytest.mark.parametrize(
    "m,n,r", [(80, 60, 60), (80, 60, 20), (60, 80, 7), (200, 200, 199), (50, 300, 1), (300, 40, 40)]
)
def test_numerical_ranks_equal_numpy_matrix_rank(m, n, r):
    rng = np.random.default_rng(m + n + r)
    w = low_rank(rng, m, n, r)
    metrics = metrics_of(spectrum_of(w))
    a = w.numpy()
    s_max = np.linalg.svd(a, compute_uv=False)[0]
    assert metrics["rank_numpy"] == np.linalg.matrix_rank(a)  # numpy's default tolerance
    assert metrics["rank_numpy"] == np.linalg.matrix_rank(a, tol=s_max * max(m, n) * np.finfo(float).eps)
    assert metrics["rank_nr"] == np.linalg.matrix_rank(a, tol=0.5 * math.sqrt(m + n + 1) * s_max * np.finfo(float).eps)
    assert metrics["rank_loss"] == min(m, n) - np.linalg.matrix_rank(a)
    assert metrics["rank_numpy"] == r


def test_bf16_matrix_ranks_and_smin_equal_numpy():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 96, generator=g).to(torch.bfloat16)
    metrics = metrics_of(spectrum_of(w))
    a = w.double().numpy()
    s = np.linalg.svd(a, compute_uv=False)
    assert metrics["rank_numpy"] == np.linalg.matrix_rank(a) == 96
    assert metrics["s_min"] == pytest.approx(s[-1], rel=1e-3)
    assert metrics["s_min_ratio"] == pytest.approx(s[-1] / s[0], rel=1e-3)


def test_norms_and_alpha_hat_follow_their_definitions():
    rng = np.random.default_rng(3)
    w = heavy_tailed(rng, 150, 70, 2.0)
    m = metrics_of(spectrum_of(torch.from_numpy(w)))
    lam = esd(w)
    assert m["stable_rank"] == pytest.approx(lam.sum() / lam.max(), rel=1e-10)
    assert m["log_norm"] == pytest.approx(math.log10(np.linalg.norm(w) ** 2), rel=1e-10)
    assert m["log_spectral_norm"] == pytest.approx(math.log10(np.linalg.norm(w, 2) ** 2), rel=1e-10)
    assert m["alpha_hat"] == pytest.approx(m["alpha"] * math.log10(lam.max()), rel=1e-12)
    assert m["alpha_std_err"] == pytest.approx((m["alpha"] - 1) / math.sqrt(m["alpha_tail"]), rel=1e-12)
    assert set(m) == set(METRICS)


def test_a_matrix_wider_than_50k_is_analyzed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(60000, 24, generator=g).to(torch.bfloat16)  # an embedding-shaped matrix
    m = metrics_of(spectrum_of(w))
    assert all(v is not None for v in m.values())
    assert m["rank_numpy"] == 24


def test_nan_matrix_has_no_metrics_and_zero_matrix_only_its_ranks():
    assert set(metrics_of(Spectrum(None, (4, 4), "contains NaN or Inf")).values()) == {None}
    zero = metrics_of(spectrum_of(torch.zeros(6, 4)))
    assert (zero["rank_numpy"], zero["rank_nr"], zero["rank_loss"], zero["s_min"]) == (0, 0, 4, 0.0)
    assert {v for key, v in zero.items() if key not in ("rank_numpy", "rank_nr", "rank_loss", "s_min")} == {None}


def test_near_ties_at_the_top_equal_the_powerlaw_package():
    # two top eigenvalues one ulp apart: a difference of logs would make alpha infinite
    rng = np.random.default_rng(0)
    values = np.concatenate([(rng.pareto(1.5, 50) + 1) * 10, [1e10, np.nextafter(1e10, 0)]])
    fit, ref = power_law_fit(values), reference_fit(values)
    assert math.isfinite(fit.alpha) and math.isfinite(fit.ks)
    assert fit.xmin == ref.xmin and fit.alpha == pytest.approx(ref.alpha, rel=1e-9)


@pytest.mark.parametrize("seed", [5, 11, 17])
def test_repeated_singular_values_equal_the_powerlaw_package(seed):
    # block-diagonal [[A, 0], [0, A]] in float32: every singular value twice, up to rounding
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
    w = torch.block_diag(a, a)
    m = metrics_of(spectrum_of(w))
    ref = reference_fit(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)
    assert m["alpha"] == pytest.approx(ref.alpha, rel=1e-6) and m["alpha_tail"] == ref.power_law.n


def test_flat_or_tiny_spectra_get_no_power_law():
    q, _ = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    m = metrics_of(spectrum_of(q))  # every singular value is 1 up to rounding
    assert m["alpha"] is None and m["ner"] == 1.0 and m["entropy"] >= 0
    assert power_law_fit(np.arange(1.0, 10.0)) is None  # 9 eigenvalues: too few to fit
    assert power_law_fit(np.arange(1.0, 11.0)) is not None


def test_rank_one_has_zero_entropy_not_negative_zero():
    m = metrics_of(spectrum_of(torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 4.0)).double()))
    assert math.copysign(1, m["entropy"]) == 1 and m["ner"] == pytest.approx(0, abs=1e-9)


# Marchenko-Pastur: for W (m x n, m >= n) with iid N(0, 1) entries, the eigenvalues of W^T W / m
# follow the MP law with ratio y = n / m on [(1 - sqrt y)^2, (1 + sqrt y)^2] as n grows.


def mp_expectation(y: float, f, points: int = 200_001) -> float:
    """E[f(x)] under the Marchenko-Pastur density with ratio y <= 1 and unit variance, integrated on
    x = a + (b - a)(1 - cos t) / 2, which removes the square-root edges."""
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    t = np.linspace(0, math.pi, points)
    x = a + (b - a) * (1 - np.cos(t)) / 2
    dx = (b - a) * np.sin(t) / 2
    density = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * math.pi * y * x)
    return float(np.trapezoid(f(x) * density * dx, t))


MP_TOLERANCE = 0.01  # relative, for bulk quantities at n = 1000
EDGE_TOLERANCE = 0.05  # the extreme eigenvalues fluctuate on the Tracy-Widom scale, ~2.5% at the lower edge here


def test_gaussian_matrix_matches_marchenko_pastur():
    m, n = 4000, 1000
    y = n / m
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    metrics = metrics_of(spectrum_of(w))
    assert mp_expectation(y, np.ones_like) == pytest.approx(1.0, abs=1e-6)  # the density integrates to 1

    # NER: p_i = s_i / sum s with s = sqrt(x), so H = ln n + ln E[s] - E[s ln s] / E[s]
    es = mp_expectation(y, np.sqrt)
    eslns = mp_expectation(y, lambda x: np.sqrt(x) * np.log(x) / 2)
    expected_ner = (math.log(n) + math.log(es) - eslns / es) / math.log(n)
    assert metrics["ner"] == pytest.approx(expected_ner, abs=1e-3)

    # spectral edges and norms: lambda = m x
    lam_max, lam_min = m * (1 + math.sqrt(y)) ** 2, m * (1 - math.sqrt(y)) ** 2
    assert 10 ** metrics["log_spectral_norm"] == pytest.approx(lam_max, rel=EDGE_TOLERANCE)
    assert metrics["s_min"] ** 2 == pytest.approx(lam_min, rel=EDGE_TOLERANCE)
    assert 10 ** metrics["log_norm"] == pytest.approx(m * n, rel=MP_TOLERANCE)
    assert metrics["stable_rank"] == pytest.approx(n / (1 + math.sqrt(y)) ** 2, rel=EDGE_TOLERANCE)
    assert metrics["rank_loss"] == 0

    # detX: the tail is the x >= x* (mean 1 under MP) with E[ln x; x >= x*] = 0, x* < 1; bisection
    lo, hi = (1 - math.sqrt(y)) ** 2, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        above = mp_expectation(y, lambda x, c=mid: np.where(x >= c, np.log(x), 0.0))
        lo, hi = (lo, mid) if above > 0 else (mid, hi)
    x_star = (lo + hi) / 2
    expected_share = mp_expectation(y, lambda x: (x >= x_star).astype(float))
    assert metrics["detx_tail"] / n == pytest.approx(expected_share, abs=MP_TOLERANCE)
    assert metrics["detx_lambda"] / m == pytest.approx(x_star, rel=MP_TOLERANCE)
