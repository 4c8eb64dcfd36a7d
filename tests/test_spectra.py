"""NER and spectra against a float64 SVD reference, and the edge cases."""

import math

import numpy as np
import pytest
import torch

from nerd.metrics import metrics_of, ner
from nerd.spectra import NER_TOLERANCE, gram_ner_error, spectrum_of


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
    # s_min / s_max = 1e-7: the Gram route cannot resolve it, the SVD fallback must
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    s = torch.logspace(0, -7, 40, dtype=torch.float64)
    w = u[:, :40] @ torch.diag(s) @ v.T
    assert gram_ner_error(torch.linalg.eigvalsh(w.T @ w).flip(0).clamp_min(0)) > NER_TOLERANCE
    values = spectrum_of(w).values
    np.testing.assert_allclose(values, s.numpy(), rtol=1e-6)
    assert ner(values) == pytest.approx(reference_ner(w.numpy()), abs=1e-9)


def test_square_gaussian_matrix_stays_on_the_gram_route():
    w = torch.randn(512, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bound = gram_ner_error(torch.linalg.eigvalsh(w.T @ w).flip(0).clamp_min(0))
    assert bound < NER_TOLERANCE
    assert metrics_of(spectrum_of(w))["ner"] == pytest.approx(reference_ner(w.numpy()), abs=bound)


def test_rank_deficient_matrix_counts_every_singular_value():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 64, dtype=torch.float64, generator=g)
    # the Gram route alone would be off by far more than the tolerance here
    assert gram_ner_error(torch.linalg.eigvalsh(w.T @ w).flip(0).clamp_min(0)) > NER_TOLERANCE
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

    monkeypatch.setattr(nerd.spectra, "CHUNK_ELEMENTS", 7 * 40)  # 7 rows (or columns) per slice
    w = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert metrics_of(spectrum_of(w))["ner"] == pytest.approx(reference_ner(w.double().numpy()), abs=1e-9)
    w[-1, -1] = float("nan")  # in the last slice
    assert spectrum_of(w).problem == "contains NaN or Inf"
