"""Numerical bad input: NaN, Inf and all-zero weights are named, their groups cannot be chosen
from that candidate (the base included), and a group nobody can supply stops the run with
nothing written."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import merge, reference_ner, tensors_of
from safetensors.torch import save_file

UP = "model.layers.{}.mlp.up_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"
DOWN = "model.layers.{}.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def family(llama_family):
    """base, ft-a, ft-b (fine-tunes of it) and alien (its own init), 3 layers."""
    return llama_family(3)


def spoiled(family, tmp_path, name: str, changes: dict) -> str:
    """A copy of a family member with some tensors' values changed: tensor -> function(tensor)."""
    copy = shutil.copytree(family[name], tmp_path / f"{name}-spoiled")
    state = tensors_of(copy)
    for tensor, change in changes.items():
        state[tensor] = change(state[tensor].clone())
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return str(copy)


def nan_at(t):
    t.view(-1)[3] = float("nan")
    return t


def inf_at(t):
    t.view(-1)[0] = float("-inf")
    return t


@pytest.mark.parametrize(
    "tensor, change, problem",
    [
        (UP.format(1), inf_at, "contains NaN or Inf"),
        (NORM.format(1), nan_at, "contains NaN or Inf"),
        (DOWN.format(1), torch.zeros_like, "all zero"),
    ],
)
def test_a_candidate_with_bad_weights_cannot_supply_that_block(tmp_path, family, tensor, change, problem):
    bad = spoiled(family, tmp_path, "ft-b", {tensor: change})
    merged = merge([str(family["base"]), str(family["ft-a"]), bad], tmp_path)
    assert merged.code == 0
    depth1 = merged.result["choices"][2]
    assert depth1["scores"][bad] is None and depth1["winner"] != bad
    assert depth1["note"].startswith(f"not selectable: {Path(bad).name} ({tensor}: {problem})")
    assert f"'{bad}': {tensor} {problem}: it cannot supply depth 1" in merged.stderr
    assert any(c["winner"] == bad for c in merged.result["choices"][1:] if c["depth"] != 1)  # elsewhere it competes
    assert all(torch.isfinite(t).all() for t in tensors_of(tmp_path / "out").values())


def test_all_zero_matrices_can_be_allowed(tmp_path, family):
    """With zero_matrices: allow (an identity-initialised copy has zero residual projections) the
    block is scored on its other matrices."""
    bad = spoiled(family, tmp_path, "ft-b", {DOWN.format(1): torch.zeros_like})
    models = [str(family["base"]), str(family["ft-a"]), bad]
    merged = merge(models, tmp_path, "--dry-run", selection={"zero_matrices": "allow"})
    assert merged.code == 0 and "cannot supply" not in merged.stderr
    state = tensors_of(Path(bad))
    others = [t for t in state if t.startswith("model.layers.1.") and state[t].ndim == 2 and t != DOWN.format(1)]
    expected = sum(reference_ner(state[t]) for t in others) / len(others)
    assert merged.result["choices"][2]["scores"][bad] == pytest.approx(expected, abs=1e-9)


def test_a_base_block_with_nan_is_replaced_by_a_compatible_candidate(tmp_path, family):
    base = spoiled(family, tmp_path, "base", {NORM.format(2): nan_at})
    models = [base, str(family["ft-a"]), str(family["alien"])]
    merged = merge(models, tmp_path, selection={"granularity": "block"})
    assert merged.code == 0, merged.stderr
    depth2 = merged.result["choices"][3]
    assert depth2["winner"] == str(family["ft-a"])  # the alien is compatible nowhere, so not here either
    assert "the base's block has a NaN or Inf, so no cosine was measured here" in depth2["note"]
    assert f"'{base}': {NORM.format(2)} contains NaN or Inf: it cannot supply depth 2" in merged.stderr
    assert 2 in [int(d) for d in map(str, merged.result["tethers"]["unmeasured"])]
    written = tensors_of(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in written.values())
    assert torch.equal(written[NORM.format(2)], tensors_of(family["ft-a"])[NORM.format(2)])


def test_compatibility_weights_where_the_base_is_broken_fall_back_to_equal(tmp_path, family):
    base = spoiled(family, tmp_path, "base", {UP.format(0): nan_at})
    models = [base, str(family["ft-a"]), str(family["ft-b"])]
    merged = merge(models, tmp_path, "--dry-run", tether={"mode": "blend", "weights": "compatibility"})
    assert merged.code == 0, merged.stderr
    depth0 = merged.result["choices"][1]
    assert depth0["blend"] == {models[1]: 0.5, models[2]: 0.5}
    assert base not in depth0["blend"]


def test_a_block_nobody_can_supply_stops_the_run(tmp_path, family):
    base = spoiled(family, tmp_path, "base", {UP.format(1): nan_at})
    bad = spoiled(family, tmp_path, "ft-a", {NORM.format(1): inf_at})
    merged = merge([base, bad], tmp_path)
    assert merged.code == 3 and "Traceback" not in merged.stderr
    (line,) = [e for e in merged.messages if e.startswith("mastermerge: error:")]
    assert (
        f"depth 1: no candidate can supply it: '{base}' {UP.format(1)}: contains NaN or Inf; '{bad}' "
        f"{NORM.format(1)}: contains NaN or Inf; nothing written" in line
    )
    assert not (tmp_path / "out").exists()


def test_a_broken_base_embedding_needs_non_layer_compete(tmp_path, family):
    embed = "model.embed_tokens.weight"
    base = spoiled(family, tmp_path, "base", {embed: nan_at})
    models = [base, str(family["ft-a"])]
    merged = merge(models, tmp_path)
    assert merged.code == 3
    assert "set selection.non_layer: compete to take it from another candidate" in merged.stderr
    assert f"the non-layer group: the base '{base}' cannot supply it ({embed}: contains NaN or Inf)" in merged.stderr
    assert not (tmp_path / "out").exists()

    merged = merge(models, tmp_path, selection={"non_layer": "compete"})
    assert merged.code == 0, merged.stderr
    assert merged.result["choices"][0]["winner"] == models[1]
    assert torch.isfinite(tensors_of(tmp_path / "out")[embed]).all()


def test_tensor_granularity_takes_each_matrix_from_whoever_has_it_intact(tmp_path, family):
    """The base's q_proj and the fine-tune's k_proj are broken at depth 0: each matrix still has an
    intact supplier, and the norms, whose block-level scores are both undefined, come from the base."""
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    base = spoiled(family, tmp_path, "base", {q: nan_at})
    fine = spoiled(family, tmp_path, "ft-a", {k: nan_at})
    merged = merge([base, fine], tmp_path, selection={"granularity": "tensor"})
    assert merged.code == 0, merged.stderr
    winners = {c["group"]: c["winner"] for c in merged.result["choices"]}
    assert winners[q] == fine and winners[k] == base and winners["0"] == base
    written = tensors_of(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in written.values())
    assert torch.equal(written[NORM.format(0)], tensors_of(Path(base))[NORM.format(0)])
