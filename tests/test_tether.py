"""Tethers end to end: two fine-tunes of one tiny base and an independently initialised model of the
same shapes; the compatibility gate, the blend, what is written, and what transformers loads."""

import json
import math
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import api_merge, config_of, merge, reference_ner, tensors_of
from safetensors.torch import save_file

from examples.tiny_models import build_model
from nerd import MetricCache, plan_merge
from nerd.layout import layout_of
from nerd.spectra import spectrum_of

LAYERS = 3


@pytest.fixture(scope="module")
def family(llama_family, tmp_path_factory) -> dict[str, Path]:
    """base and ft-a, a fine-tune of it, from the shared family; ft-b, a fine-tune with a rank-2
    update; alien, its own random init with orthogonal matrices (NER exactly 1, so it would win
    every group if nothing kept it out)."""
    root = tmp_path_factory.mktemp("family")
    base = llama_family(LAYERS)["base"]
    models = {
        "base": base,
        "ft-a": llama_family(LAYERS)["ft-a"],
        "ft-b": build_model("llama", root / "ft-b", seed=2, base_dir=base, noise=0.3, noise_rank=2),
        "alien": build_model("llama", root / "alien", seed=7, num_layers=LAYERS),
    }
    state = tensors_of(models["alien"])
    g = torch.Generator().manual_seed(11)
    for name, w in state.items():
        if w.dim() == 2:
            q = torch.nn.init.orthogonal_(torch.empty_like(w), generator=g)
            state[name] = (q * (w.norm() / q.norm())).contiguous()
    save_file(state, str(models["alien"] / "model.safetensors"), metadata={"format": "pt"})
    return models


def dry_run(tmp_path, models, **options) -> dict:
    """The --json summary of a dry run of the command line."""
    return merge(models, tmp_path, "--dry-run", **options).ok()


def block_matrices(model: Path, depth: int) -> list[np.ndarray]:
    state = tensors_of(model)
    return [state[t].double().numpy() for t in layout_of(list(state)).block(depth) if state[t].dim() == 2]


def test_alien_is_gated_out_at_every_depth_and_fine_tunes_stay_eligible(tmp_path, family):
    models = [family[m] for m in ("base", "ft-a", "ft-b", "alien")]
    result = dry_run(tmp_path, models)
    tethers, alien = result["tethers"], str(family["alien"])
    assert list(tethers["scores"]) == [str(d) for d in range(LAYERS)]
    for depth in range(LAYERS):
        scores = tethers["scores"][str(depth)]
        assert scores[str(family["ft-a"])] > 0.99 and scores[str(family["ft-b"])] > 0.9
        assert abs(scores[alien]) < 0.1
    blocks = [c for c in result["choices"] if c["depth"] is not None]
    assert len(blocks) == LAYERS
    for choice in blocks:
        assert choice["scores"][alien] == max(choice["scores"].values())  # the best NER ...
        assert choice["winner"] != alien  # ... and still not chosen
        assert f"drifts (cosine below 0.5): {Path(alien).name} " in choice["note"]
    assert tethers["warnings"] == [
        f"'{alien}' is compatible with the base at no depth (best cosine "
        f"{max(tethers['scores'][str(d)][alien] for d in range(LAYERS)):.4g} < 0.5): it does not look like a "
        f"fine-tune of '{family['base']}'"
    ]

    # the gate is what keeps it out: with the gate open, the alien wins every depth
    open_gate = dry_run(tmp_path, models, tether={"min_compatibility": -1})
    assert all(c["winner"] == alien for c in open_gate["choices"] if c["depth"] is not None)
    assert open_gate["tethers"]["warnings"] == []


def test_compatibility_measures_match_numpy(tmp_path, family):
    models = [family["base"], family["ft-b"], family["alien"]]
    for measure in ("cosine", "min_cosine", "l2"):
        scores = dry_run(tmp_path, models, tether={"measure": measure})["tethers"]["scores"]
        for depth in range(LAYERS):
            base = block_matrices(family["base"], depth)
            for name in ("ft-b", "alien"):
                other = block_matrices(family[name], depth)
                c, b = np.concatenate([m.ravel() for m in other]), np.concatenate([m.ravel() for m in base])
                expected = {
                    "cosine": c @ b / (np.linalg.norm(c) * np.linalg.norm(b)),
                    "min_cosine": min(
                        float(x.ravel() @ y.ravel() / (np.linalg.norm(x) * np.linalg.norm(y)))
                        for x, y in zip(other, base)
                    ),
                    "l2": 1 - np.linalg.norm(c - b) / np.linalg.norm(b),
                }[measure]
                assert scores[str(depth)][str(family[name])] == pytest.approx(expected, abs=1e-12)


def test_unrelated_models_are_said_plainly_and_the_output_is_the_base(tmp_path, family):
    merged = merge([family["base"], family["alien"]], tmp_path, as_json=False)
    assert merged.code == 0
    out, err = merged.output, merged.stderr
    assert (
        f"no candidate is compatible with the base '{family['base']}' at any depth (best cosine" in err
        and "the models do not look like fine-tunes of one base, so every block comes from the base" in err
    )
    written, base = tensors_of(out), tensors_of(family["base"])
    assert sorted(written) == sorted(base) and all(torch.equal(written[t], base[t]) for t in base)
    card = (out / "README.md").read_text()
    assert "**Warning:** no candidate is compatible with the base" in card
    assert "![heatmap compatibility](heatmap_compatibility.png)" in card
    assert (out / "heatmap_compatibility.png").stat().st_size > 10_000


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_blend_is_the_exact_elementwise_mean_and_loads_in_transformers(tmp_path, family, dtype):
    out = tmp_path / "out"
    api_merge([family["base"], family["ft-a"], family["alien"]], out, tether={"mode": "blend"}, dtype=dtype)
    written, base, ft = tensors_of(out), tensors_of(family["base"]), tensors_of(family["ft-a"])
    torch_dtype = torch.float32 if dtype == "keep" else torch.bfloat16
    for name, tensor in written.items():
        # the mean in float64, rounded once to the output dtype; the non-layer tensors are the base's
        expected = (base[name].double() + ft[name].double()) / 2 if ".layers." in name else base[name]
        assert tensor.dtype == torch_dtype and torch.equal(tensor, expected.to(torch_dtype)), name

    report = json.loads((out / "merge_report.json").read_text())
    blocks = [c for c in report["plan"]["choices"] if c["depth"] is not None]
    assert all(c["blend"] == {"base": 0.5, "ft-a": 0.5} for c in blocks)
    entry = next(e for e in report["plan"]["entries"] if e["name"] == "model.layers.2.self_attn.q_proj.weight")
    assert entry["transform"] == "blend" and entry["blend"] == blocks[2]["blend"]

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    loaded = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor.float()), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]])).logits).all()


@pytest.mark.parametrize("weights", ["score", "compatibility"])
def test_blend_weights_are_proportional_to_scores_or_compatibility(tmp_path, family, weights):
    models = [family["base"], family["ft-a"], family["ft-b"]]
    result = dry_run(tmp_path, models, tether={"mode": "blend", "weights": weights})
    for choice in (c for c in result["choices"] if c["depth"] is not None):
        depth = str(choice["depth"])
        raw = {
            str(m): (
                np.mean([reference_ner(torch.from_numpy(w)) for w in block_matrices(m, int(depth))])
                if weights == "score"
                else result["tethers"]["scores"][depth].get(str(m), 1.0)
            )
            for m in models
        }
        assert choice["blend"] == pytest.approx({m: v / sum(raw.values()) for m, v in raw.items()}, abs=1e-9)


def test_weighted_blend_is_written_as_weighted_sum(tmp_path, family):
    out = tmp_path / "out"
    models = [family["base"], family["ft-a"], family["ft-b"]]
    api_merge(models, out, tether={"mode": "blend", "weights": "compatibility"})
    choices = json.loads((out / "merge_report.json").read_text())["plan"]["choices"]
    written, inputs = tensors_of(out), {m.name: tensors_of(m) for m in models}
    for name, tensor in written.items():
        if ".layers." not in name:
            continue
        blend = choices[1 + int(name.split(".")[2])]["blend"]
        expected = sum(inputs[m][name].double() * w for m, w in blend.items())
        assert torch.allclose(tensor.double(), expected, rtol=0, atol=1e-7), name


def test_tensor_granularity_and_competing_embeddings_are_gated_too(tmp_path, family):
    models = [family["base"], family["ft-a"], family["alien"]]
    alien = str(family["alien"])
    result = dry_run(tmp_path, models, selection={"granularity": "tensor", "non_layer": "compete"})
    assert "non-layer" in result["tethers"]["scores"] and result["tethers"]["scores"]["non-layer"][alien] < 0.5
    assert len(result["choices"]) > LAYERS + 1
    assert all(c["winner"] != alien for c in result["choices"])
    open_gate = dry_run(
        tmp_path, models, selection={"granularity": "tensor", "non_layer": "compete"}, tether={"min_compatibility": -1}
    )
    assert all(c["winner"] == alien for c in open_gate["choices"])
    blended = dry_run(
        tmp_path, models, selection={"granularity": "tensor", "non_layer": "compete"}, tether={"mode": "blend"}
    )
    assert all(c["blend"] == {str(family["base"]): 0.5, str(family["ft-a"]): 0.5} for c in blended["choices"])


def test_tether_sums_are_cached_by_content(tmp_path, family):
    cache_path = tmp_path / "c.sqlite"
    base = tensors_of(family["base"])

    def content(tensor):
        return tensor.dtype, tuple(tensor.shape), tensor.numpy().tobytes()

    # every tensor of every block, compared once per distinct pair of contents (all norms start at 1)
    compared = len(
        {
            (content(tensors_of(family[m])[t]), content(base[t]))
            for m in ("ft-a", "alien")
            for t in base
            if ".layers." in t
        }
    )
    assert compared > 2 * LAYERS * 7

    def plan_with(models):
        config = config_of(models, tmp_path / "out")
        with closing(MetricCache(cache_path)) as cache:
            return plan_merge(config, cache=cache, quiet=True), cache.pairs_computed

    first, computed = plan_with([family["base"], family["ft-a"], family["alien"]])
    assert computed == compared
    with closing(sqlite3.connect(cache_path)) as db:
        assert db.execute("SELECT COUNT(*) FROM tether_sums").fetchone()[0] == compared
    again, computed = plan_with([family["base"], family["ft-a"], family["alien"]])
    assert computed == 0 and again.tethers == first.tethers
    # the same weights under another name are the same content: nothing is compared again
    copy = shutil.copytree(family["ft-a"], tmp_path / "ft-a-copy")
    renamed, computed = plan_with([family["base"], copy, family["alien"]])
    assert computed == 0
    assert renamed.tethers.scores["1"][str(copy)] == first.tethers.scores["1"][str(family["ft-a"])]


def test_blend_then_expand_copies_the_blended_block(tmp_path, family, monkeypatch):
    out, models = tmp_path / "out", [family["base"], family["ft-a"]]
    options = {"tether": {"mode": "blend"}, "dlec": {"layers": [1], "importance": "ner"}}
    api_merge(models, out, cache=tmp_path / "c.sqlite", **options)
    written, base, ft = tensors_of(out), tensors_of(family["base"]), tensors_of(family["ft-a"])
    for name in (n for n in base if ".layers.1." in n):
        mean = ((base[name].double() + ft[name].double()) / 2).float()
        assert torch.equal(written[name], mean) and torch.equal(written[name.replace(".1.", ".2.")], mean)
    report = json.loads((out / "merge_report.json").read_text())
    expansion = report["plan"]["expansion"]
    # the importance of the blended block is the NER of the blend, not of either input
    blended = [
        ((base[t].double() + ft[t].double()) / 2).float() for t in base if ".layers.1." in t and base[t].dim() == 2
    ]
    assert expansion["scores"][1] == pytest.approx(np.mean([reference_ner(w) for w in blended]), abs=1e-9)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == LAYERS + 1
    # a second run computes no spectrum, the blends' included
    import nerd.importance

    calls = []
    monkeypatch.setattr(nerd.importance, "spectrum_of", lambda *a: calls.append(a) or spectrum_of(*a))
    with closing(MetricCache(tmp_path / "c.sqlite")) as cache:
        again = plan_merge(config_of(models, out, **options), cache=cache, quiet=True)
    assert again.spectra_computed == 0 and not calls and again.expansion.scores == expansion["scores"]


@pytest.mark.parametrize(
    "tether, message",
    [
        ([], "tether: expected a mapping (min_compatibility, mode, ...), found a list"),
        ({"mod": "blend"}, "tether.mod: unknown key; did you mean 'mode'?"),
        ({"mode": "average"}, "tether.mode: expected one of select, blend, found 'average'"),
        ({"measure": "dot"}, "tether.measure: expected one of cosine, min_cosine, l2, found 'dot'"),
        (
            {"min_compatibility": 2},
            "tether.min_compatibility: expected a number between -1 and 1 (cosine; -1 lets "
            "every candidate through), found 2",
        ),
        ({"min_compatibility": "high"}, "tether.min_compatibility: expected a number between -1 and 1"),
        ({"min_compatibility": float("nan")}, "tether.min_compatibility: expected a number between -1 and 1"),
        (
            {"measure": "l2", "min_compatibility": 1.5},
            "tether.min_compatibility: expected a number at most 1 (l2; "
            "a large negative number lets every candidate through)",
        ),
        ({"weights": "score"}, "tether.weights: only used with tether.mode: blend (mode is select)"),
        ({"mode": "blend", "weights": "mean"}, "tether.weights: expected one of equal, score, compatibility"),
        (
            {"mode": "blend", "weights": "compatibility", "min_compatibility": 0},
            "tether.weights: compatibility needs tether.min_compatibility > 0",
        ),
    ],
)
def test_bad_tether_options_are_one_line_and_write_nothing(tmp_path, family, tether, message):
    merged = merge([family["base"], family["ft-a"]], tmp_path, cache="c", as_json=False, tether=tether)
    assert merged.code == 2
    err = merged.stderr
    assert message in err and len(err.strip().splitlines()) == 1 and not merged.output.exists()


def test_score_weights_need_goal_max_and_top_level_keys_are_pointed_to_tether(tmp_path, family):
    models = [family["base"], family["ft-a"]]
    merged = merge(
        models,
        tmp_path,
        cache="c",
        as_json=False,
        selection={"metric": "alpha", "goal": "min"},
        tether={"mode": "blend", "weights": "score"},
    )
    assert merged.code == 2
    assert (
        "tether.weights: score weighs candidates by their selection score, which needs selection.goal: max "
        "(goal is min" in merged.stderr
    )
    merged = merge(models, tmp_path, cache="c", as_json=False, min_compatibility=0.9)
    assert merged.code == 2
    assert "min_compatibility: unknown key; did you mean 'tether.min_compatibility'?" in merged.stderr


def test_dry_run_prints_the_tether_table(tmp_path, family):
    merged = merge(
        [family["base"], family["ft-a"], family["alien"]], tmp_path, "--dry-run", cache="c", quiet=False, as_json=False
    )
    assert merged.code == 0
    out = merged.stdout
    assert (
        "tethers: cosine similarity of each block's weight matrices with the base's; below 0.5 a candidate "
        "drifts (not eligible there); mode select: compatible candidates compete"
    ) in out
    rows = out[out.index("tethers: cosine") :].splitlines()[1 : 2 + LAYERS]
    assert rows[0].split() == ["depth", "ft-a", "alien"]
    for depth, row in enumerate(rows[1:]):
        cells = row.split()
        assert cells[0] == str(depth) and float(cells[1]) > 0.99 and cells[3] == "drifts"
    assert math.isfinite(float(rows[1].split()[2]))


def test_nan_in_a_norm_takes_the_candidate_out_of_the_blend(tmp_path, family):
    broken = shutil.copytree(family["ft-a"], tmp_path / "broken")
    state = tensors_of(broken)
    state["model.layers.1.input_layernorm.weight"][3] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    merged = merge([family["base"], broken, family["ft-b"]], tmp_path, as_json=False, tether={"mode": "blend"})
    out = merged.output
    assert merged.code == 0
    choices = json.loads((out / "merge_report.json").read_text())["plan"]["choices"]
    assert broken.name in choices[1]["blend"] and broken.name not in choices[2]["blend"]
    assert choices[2]["note"] == (
        f"not selectable: {broken.name} (model.layers.1.input_layernorm.weight: contains NaN or Inf)"
    )
    assert "model.layers.1.input_layernorm.weight contains NaN or Inf: it cannot supply depth 1" in merged.stderr
    assert all(torch.isfinite(t).all() for t in tensors_of(out).values())


def test_blends_and_sums_are_exact_across_slices_of_sharded_and_pickled_inputs(tmp_path, monkeypatch):
    base = build_model("llama", tmp_path / "base", seed=0, max_shard_size="60KB")
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.1, max_shard_size="60KB")
    state = tensors_of(ft)
    for file in [*ft.glob("*.safetensors"), *ft.glob("*.index.json")]:
        file.unlink()
    torch.save(state, ft / "pytorch_model.bin")
    config = config_of([base, ft], tmp_path / "out", tether={"mode": "blend"})
    whole = plan_merge(config, cache=MetricCache(), quiet=True)
    monkeypatch.setattr("nerd.tethersums.SLICE_ELEMENTS", 7)  # slices that cross rows and tensor ends
    sliced = plan_merge(config, cache=MetricCache(), quiet=True)
    for group, scores in whole.tethers.scores.items():
        assert sliced.tethers.scores[group][str(ft)] == pytest.approx(scores[str(ft)], abs=1e-12)
    from nerd import write_merge

    write_merge(sliced, config, quiet=True)
    written, inputs = tensors_of(tmp_path / "out"), tensors_of(base)
    for name, tensor in written.items():
        expected = (inputs[name].double() + state[name].double()) / 2 if ".layers." in name else inputs[name]
        assert torch.equal(tensor, expected.float()), name
