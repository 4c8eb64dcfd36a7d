"""The tiny Llama shipped in tests/data/trained-llama (built by examples/train_tiny.py) is a real
trained model: it loads in transformers, predicts unseen standard-library source far better than a
freshly initialised model of its config, and its weight matrices are not Gaussian-like.

Why the spectral checks look as they do: a Gaussian matrix's singular values follow the
Marchenko-Pastur law, so a rectangular one has a small, stable condition number (about 4 at
352 x 128, 2 at 1024 x 128), while a square one's s_min is near zero and its s_max / s_min varies
over orders of magnitude from one draw to the next. So rectangular matrices are held to s_max /
s_min; square ones to the share of the squared Frobenius norm held by their top tenth of singular
values (0.29 to 0.30 over 30 Gaussian 128 x 128 draws: training concentrates it), each against a
Gaussian matrix of the same shape. A freshly initialised model (Gaussian weights) must fail the
same thresholds, which the tests check too (it gives 0.90x to 1.01x). Measured on the shipped
model: s_max / s_min is 1.87x to 19x the Gaussian's on the rectangular matrices (median 2.2x);
the top-tenth share is 1.07x to 2.5x on the square ones (median 2.0x; the least trained are
layer 0's v_proj and o_proj, at 1.07x and 1.10x). On textwrap.py the shipped model's loss is 4.22
nats per token against 6.95 for a fresh model (ln 1024 = 6.93).
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TRAINED
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# Not in the training text (the first 2 MB of sorted stdlib sources end in the c's), in every Python 3.10+
HELD_OUT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
CONTEXT, SEQUENCES = 128, 16
RECTANGULAR_FACTOR = 1.5  # s_max / s_min at least this multiple of a same-shape Gaussian's
SQUARE_FACTOR = 1.05  # top-tenth energy share at least this multiple of a same-shape Gaussian's
SQUARE_MEDIAN_FACTOR = 1.5  # ... and this multiple in the median over the square matrices


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def gaussian(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape)


def condition(s: np.ndarray) -> float:
    return float(s[0] / s[-1])


def top_tenth_share(s: np.ndarray) -> float:
    """The share of sum s_i^2 (the squared Frobenius norm) in the largest tenth of the s_i."""
    return float((s[: len(s) // 10] ** 2).sum() / (s**2).sum())


def excess(matrices: dict[str, np.ndarray], statistic) -> dict[str, float]:
    """Each matrix's statistic divided by that of a Gaussian matrix of its shape."""
    return {
        name: statistic(singular_values(w)) / statistic(singular_values(gaussian(w.shape)))
        for name, w in matrices.items()
    }


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TRAINED)


@pytest.fixture(scope="module")
def trained():
    return AutoModelForCausalLM.from_pretrained(TRAINED).float().eval()


@pytest.fixture(scope="module")
def fresh(trained):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(trained.config).float().eval()


@pytest.fixture(scope="module")
def weights():
    return {
        name: w.double().numpy() for name, w in load_file(str(TRAINED / "model.safetensors")).items() if w.dim() == 2
    }


def fresh_weights(model) -> dict[str, np.ndarray]:
    return {name: w.detach().double().numpy() for name, w in model.state_dict().items() if w.dim() == 2}


def loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_the_shipped_directory_is_a_complete_bf16_model(trained, tokenizer):
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (TRAINED / name).is_file(), name
    assert trained.config.model_type == "llama" and trained.config.num_hidden_layers == 4
    assert {w.dtype for w in load_file(str(TRAINED / "model.safetensors")).values()} == {torch.bfloat16}
    assert len(tokenizer) == trained.config.vocab_size == 1024
    assert sum(f.stat().st_size for f in TRAINED.iterdir()) < 4_000_000


def test_it_predicts_unseen_stdlib_source_far_better_than_a_fresh_model(trained, fresh, tokenizer):
    text = HELD_OUT.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: nothing lost
    assert len(ids) >= CONTEXT * SEQUENCES
    batch = torch.tensor(ids[: CONTEXT * SEQUENCES]).view(SEQUENCES, CONTEXT)
    trained_loss, fresh_loss = loss(trained, batch), loss(fresh, batch)
    assert math.isfinite(trained_loss) and math.isfinite(fresh_loss)
    assert abs(fresh_loss - math.log(1024)) < 0.2  # an untrained model guesses uniformly
    assert trained_loss < fresh_loss - 2.0  # measured: 4.22 against 6.95 nats per token


def test_rectangular_matrices_are_far_worse_conditioned_than_gaussian_ones(weights, fresh):
    rectangular = {n: w for n, w in weights.items() if w.shape[0] != w.shape[1]}
    assert len(rectangular) == 4 * 3 + 2  # the MLP matrices, the embeddings and the head
    ratios = excess(rectangular, condition)
    assert min(ratios.values()) > RECTANGULAR_FACTOR, ratios
    control = excess({n: w for n, w in fresh_weights(fresh).items() if n in rectangular}, condition)
    assert max(control.values()) < RECTANGULAR_FACTOR, control


def test_square_matrices_concentrate_their_energy_in_a_few_directions(weights, fresh):
    square = {n: w for n, w in weights.items() if w.shape[0] == w.shape[1]}
    assert len(square) == 4 * 4  # q, k, v, o of each layer
    ratios = excess(square, top_tenth_share)
    assert min(ratios.values()) > SQUARE_FACTOR, ratios
    assert float(np.median(list(ratios.values()))) > SQUARE_MEDIAN_FACTOR, ratios
    control = excess({n: w for n, w in fresh_weights(fresh).items() if n in square}, top_tenth_share)
    assert max(control.values()) < SQUARE_FACTOR, control
