"""NER and spectra against a float64 SVD reference, and the edge cases."""

import math

import numpy as np
import pytest
import torch
from helpers import TRAINED
from safetensors import safe_open

from nerd.bounds import GRAM_FACTOR, NER_TOLERANCE, gram_errors, ner_error_bound
from nerd.metrics import metrics_of, ner
from nerd.spectra import spectrum_of


def gram_bound(w: torch.Tensor) -> float:
    """The NER error bound of the Gram route alone for this matrix."""
    eigenvalues = torch.linalg.eigvalsh(w.T @ w).flip(0).clamp_min(0).numpy()
    return ner_error_bound(np.sqrt(eigenvalues), gram_errors(eigenvalues))


def reference_ner(w: np.ndarray) -> float:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(s)))


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (256, 48), (7, 300), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ner_matches_float64_svd(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g).to(dtype)
    got = metrics_of(spectrum_of(w))["ner"]
    assert got == pytest.approx(reference_ner(w.double().numpy()), abs=1e-9)


def test_spectrum_matches_svd_values():
    w = torch.randn(80, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    values = spectrum_of(w).values
    assert len(values) == 50
    np.testing.assert_allclose(values, np.linalg.svd(w.numpy(), compute_uv=False), rtol=1e-10)


def test_ill_conditioned_matrix_is_still_exact():
    # s_min / s_max = 1e-7: the Gram route cannot resolve the smaller half, Rayleigh-Ritz on it can
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    s = torch.logspace(0, -7, 40, dtype=torch.float64)
    w = u[:, :40] @ torch.diag(s) @ v.T
    assert gram_bound(w) > NER_TOLERANCE
    spectrum = spectrum_of(w)
    assert spectrum.path == "refined"
    values = spectrum.values
    np.testing.assert_allclose(values, s.numpy(), rtol=1e-6)
    assert ner(values) == pytest.approx(reference_ner(w.numpy()), abs=1e-9)


def test_square_gaussian_matrix_stays_on_the_gram_route():
    w = torch.randn(512, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bound = gram_bound(w)
    assert bound < NER_TOLERANCE and spectrum_of(w).path == "gram"
    assert metrics_of(spectrum_of(w))["ner"] == pytest.approx(reference_ner(w.numpy()), abs=bound)


def test_rank_deficient_matrix_counts_every_singular_value():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 64, dtype=torch.float64, generator=g)
    # the Gram route alone would be off by far more than the tolerance here
    assert gram_bound(w) > NER_TOLERANCE
    assert spectrum_of(w).path == "svd"
    values = spectrum_of(w).values
    assert len(values) == 64
    got = ner(values)
    assert got == pytest.approx(reference_ner(w.numpy()), abs=1e-9)
    assert got < math.log(8) / math.log(64) + 1e-9  # at most 8 dimensions used out of 64


def test_zero_matrix_has_no_ner():
    spectrum = spectrum_of(torch.zeros(16, 8))
    assert spectrum.problem == "all zero"
    assert metrics_of(spectrum)["ner"] is None and metrics_of(spectrum)["rank_loss"] == 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrix_has_no_ner(bad):
    w = torch.randn(8, 8)
    w[3, 5] = bad
    spectrum = spectrum_of(w)
    assert spectrum.values is None and "NaN" in spectrum.problem
    assert metrics_of(spectrum)["ner"] is None


def test_one_by_n_matrix():
    w = torch.randn(1, 50)
    m = metrics_of(spectrum_of(w))
    assert m["ner"] == 1.0 and m["erank"] == pytest.approx(1.0)
    np.testing.assert_allclose(spectrum_of(w).values, [torch.linalg.norm(w.double()).item()])


def test_very_rectangular_matrix():
    w = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1))
    assert metrics_of(spectrum_of(w))["ner"] == pytest.approx(reference_ner(w.numpy()), abs=1e-9)


def test_identity_has_ner_one_and_erank_k():
    m = metrics_of(spectrum_of(torch.eye(32)))
    assert m["ner"] == pytest.approx(1.0, abs=1e-12)
    assert m["erank"] == pytest.approx(32.0, rel=1e-12)


def test_rank_one_has_ner_zero():
    w = torch.outer(torch.arange(1.0, 9.0), torch.arange(1.0, 5.0))
    assert metrics_of(spectrum_of(w))["ner"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_gram_built_in_slices_is_exact(monkeypatch, shape):
    import nerd.spectra

    monkeypatch.setattr(nerd.spectra, "SLICE_ELEMENTS", 7 * 40)  # 7 rows (or columns) per slice
    w = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert metrics_of(spectrum_of(w))["ner"] == pytest.approx(reference_ner(w.double().numpy()), abs=1e-9)
    w[-1, -1] = float("nan")  # in the last slice
    assert spectrum_of(w).problem == "contains NaN or Inf"


def power_law_matrix(m: int, n: int, exponent: float, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values proportional to i^-exponent and random singular vectors: the
    shape of a trained layer's spectrum (condition number about min(m, n)^exponent)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -exponent
    return ((u * s) @ v.T * 0.05).to(dtype)


def assert_exact(w: torch.Tensor, spectrum) -> None:
    """NER within 1e-9 of a float64 SVD, s_min to 0.1%, both ranks equal numpy's."""
    x = w.double().numpy()
    s = np.linalg.svd(x, compute_uv=False)
    got = metrics_of(spectrum)
    assert got["ner"] == pytest.approx(reference_ner(x), abs=1e-9)
    assert got["s_min"] == pytest.approx(s[-1], rel=1e-3)
    assert got["rank_numpy"] == np.linalg.matrix_rank(x)
    assert got["rank_nr"] == np.linalg.matrix_rank(
        x, tol=0.5 * math.sqrt(sum(x.shape) + 1) * s[0] * np.finfo(float).eps
    )


@pytest.mark.parametrize(
    "shape,exponent",
    [
        ((512, 512), 0.75),
        ((1024, 256), 0.85),
        ((256, 1024), 1.0),
        ((768, 768), 1.0),
        ((512, 512), 1.4),
        ((1024, 1024), 1.33),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trained_spectra_stay_on_the_gram_route(shape, exponent, dtype):
    # power-law spectra with condition numbers 1e2 to 1e4, as trained layers have: exact without an SVD
    w = power_law_matrix(*shape, exponent, dtype, seed=shape[0] + shape[1])
    cond = np.linalg.cond(w.double().numpy())
    assert 50 < cond < 2e4
    spectrum = spectrum_of(w)
    assert spectrum.path == "gram"
    assert_exact(w, spectrum)


@pytest.mark.parametrize(
    "w",
    [
        power_law_matrix(1024, 1024, 1.33),
        power_law_matrix(2048, 512, 0.6),
        power_law_matrix(768, 768, 1.0, torch.float32),
        torch.randn(1000, 1000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16),
    ],
    ids=["power-law-1e4", "power-law-tall", "power-law-f32", "gaussian-square-bf16"],
)
def test_gram_eigenvalue_errors_stay_well_inside_the_bound(w):
    # the bound's error model (bounds.GRAM_FACTOR * eps * lambda_max) checked against a float64 SVD
    # where the SVD's own error on s^2 (about 2 s_i * eps * s_1) is small next to it: s_i < s_1 / 30,
    # the small singular values that decide the NER bound
    a = spectrum_of(w).values ** 2
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    small = s < s[0] / 30
    assert small.sum() >= 10
    delta = GRAM_FACTOR * np.finfo(float).eps * a[0]
    assert np.abs(a[small] - s[small] ** 2).max() < delta / 4


def test_a_few_tiny_singular_values_are_refined_not_svd():
    # a full-rank matrix whose smallest four singular values are 1e-6..1e-7 of the largest: only they are
    # recomputed (Rayleigh-Ritz on the Gram matrix's eigenvectors), the rest stays from the Gram matrix
    g = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(300, 96, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64, generator=g))
    s = torch.cat([torch.linspace(1, 0.5, 92, dtype=torch.float64), torch.logspace(-6, -7, 4, dtype=torch.float64)])
    w = (u * s) @ v.T
    assert gram_bound(w) > NER_TOLERANCE
    spectrum = spectrum_of(w)
    assert spectrum.path == "refined"
    np.testing.assert_allclose(spectrum.values, s.numpy(), rtol=1e-7)
    assert_exact(w, spectrum)


def test_a_cluster_of_equal_tiny_singular_values_is_refined_too():
    # four equal singular values of 1e-7: the quadratic residual bound holds for clusters
    g = torch.Generator().manual_seed(12)
    u, _ = torch.linalg.qr(torch.randn(200, 64, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    s = torch.cat([torch.linspace(1, 0.5, 60, dtype=torch.float64), torch.full((4,), 1e-7, dtype=torch.float64)])
    w = (u * s) @ v.T
    spectrum = spectrum_of(w)
    assert spectrum.path == "refined"
    np.testing.assert_allclose(spectrum.values, s.numpy(), rtol=1e-6)
    assert_exact(w, spectrum)


def test_ner_bound_is_rigorous_on_a_perturbed_spectrum():
    # any spectrum within the per-value errors has an NER within the bound of the computed one
    rng = np.random.default_rng(0)
    values = np.sort(rng.pareto(1.5, 300) + 1e-3)[::-1]
    errors = values * 1e-4
    bound = ner_error_bound(values, errors)
    for _ in range(20):
        moved = values + errors * rng.choice([-1.0, 1.0], len(values))
        assert abs(ner(moved) - ner(values)) <= bound
    assert bound < 1e-3


def trained_matrices() -> dict[str, torch.Tensor]:
    with safe_open(str(TRAINED / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if len(handle.get_slice(name).get_shape()) == 2}


def test_every_matrix_of_a_model_trained_on_real_text_is_exact_without_an_svd():
    matrices = trained_matrices()
    assert len(matrices) == 30
    paths = []
    for name, w in matrices.items():
        spectrum = spectrum_of(w)
        paths.append(spectrum.path)
        assert_exact(w, spectrum)
        s = np.linalg.svd(w.double().numpy(), compute_uv=False)
        np.testing.assert_allclose(spectrum.values, s, rtol=1e-6, atol=1e-12 * s[0], err_msg=name)
    assert paths == ["gram"] * len(matrices)
