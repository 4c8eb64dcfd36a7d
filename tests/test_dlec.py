"""DLEC layer expansion end to end: tiny models expanded, loaded back with transformers, checked
against the original's logits, the source blocks' bytes and independently computed importances."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import REPO, RANK_ONE, build_family, merge, reference_ner, run_process, tensors_of

from examples.tiny_models import build_model, build_tokenizer
from nerd.architecture import inferred
from nerd.cli import main
from nerd.config import DlecOptions
from nerd.dlec import expanded_config, layers_to_copy
from nerd.errors import ConfigError, ModelError
from nerd.layout import layout_of

TEXT = (
    "Rivers carry sand to the sea. The tide returns some of it, and the rest builds the delta, "
    "one thin layer each year, until the town that stood on the shore stands inland."
)


def expand(model: Path, out: Path, *options, cache: Path | None = None) -> int:
    cache_flags = ["--cache", str(cache)] if cache else ["--no-cache"]
    return main(["expand", str(model), "--out", str(out), "--quiet", *cache_flags, *map(str, options)])


def expand_json(capsys, model: Path, out: Path, *options, cache: Path | None = None) -> dict:
    capsys.readouterr()
    assert expand(model, out, "--json", *options, cache=cache) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)["results"][0]


def logits(directory: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


def renamed(name: str, stack: str, depth: int) -> str:
    """The tensor's name in the block at `depth`."""
    rest = name[len(stack) + 1 :].split(".", 1)[1]
    return f"{stack}.{depth}.{rest}"


def check_blocks_follow_map(original: Path, expanded_dir: Path, layer_map: list[int], zeroed=()) -> None:
    """Every output block's tensors are its source block's bytes (or zeros where listed)."""
    source, written = tensors_of(original), tensors_of(expanded_dir)
    layout = layout_of(list(source))
    expected_names = {n for n, d in layout.depths.items() if d is None}
    for depth, src in enumerate(layer_map):
        for name in layout.block(src):
            out = renamed(name, layout.stack, depth)
            expected_names.add(out)
            is_copy = depth > 0 and layer_map[depth - 1] == src
            if is_copy and any(z in name for z in zeroed):
                assert torch.count_nonzero(written[out]) == 0, out
                assert written[out].shape == source[name].shape and written[out].dtype == source[name].dtype
            else:
                assert same_bytes(written[out], source[name]), out
    assert set(written) == expected_names
    for name in expected_names & set(source):
        if layout.depths[name] is None:
            assert same_bytes(written[name], source[name])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("llama") / "m", seed=3, num_layers=4)


def test_identity_expansion_of_llama_keeps_the_logits(llama, tmp_path, capsys):
    out = tmp_path / "out"
    result = expand_json(capsys, llama, out, "--add-layers", 2, "--init", "identity", cache=tmp_path / "c.sqlite")
    expansion = result["expansion"]
    assert len(expansion["layer_map"]) == 6 and len(expansion["added"]) == 2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    # the two copies are of the two highest scores, each right after its source
    scores = expansion["scores"]
    top = sorted(sorted(range(4), key=lambda d: -scores[d])[:2])
    assert [a["source"] for a in expansion["added"]] == top
    assert expansion["layer_map"] == [d for d in range(4) for _ in range(1 + (d in top))]

    ids = [1, 17, 42, 99, 5, 63, 2]
    assert torch.allclose(logits(out, ids), logits(llama, ids), atol=1e-5, rtol=0)
    check_blocks_follow_map(llama, out, expansion["layer_map"], zeroed=("o_proj", "down_proj"))
    # the copies are not trivial: a plain copy changes the function
    copied = tmp_path / "copied"
    assert expand(llama, copied, "--layers", ",".join(map(str, top)), cache=tmp_path / "c.sqlite") == 0
    assert not torch.allclose(logits(copied, ids), logits(llama, ids), atol=1e-3)


def test_copy_expansion_of_qwen3_rewrites_layer_types(tmp_path, capsys):
    model = build_model("qwen3", tmp_path / "qwen3", seed=4, num_layers=3)
    config = json.loads((model / "config.json").read_text())
    config.update(
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=3,
    )
    (model / "config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "out"
    result = expand_json(capsys, model, out, "--layers", "1,2,1", "--init", "copy", cache=tmp_path / "c.sqlite")
    layer_map = result["expansion"]["layer_map"]
    assert layer_map == [0, 1, 1, 1, 2, 2]  # a single layer twice and a scattered one
    assert [(a["source"], a["depth"]) for a in result["expansion"]["added"]] == [(1, 2), (1, 3), (2, 5)]
    check_blocks_follow_map(model, out, layer_map)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 6
    assert loaded.config.layer_types == ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"] * 2
    assert json.loads((out / "config.json").read_text())["max_window_layers"] == 6
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 9, 33, 70]])).logits).all()


@pytest.mark.parametrize("family, writers", [("gpt2", ("c_proj",)), ("gpt_neox", ("attention.dense", "dense_4h_to_h"))])
def test_identity_expansion_of_other_families(tmp_path, family, writers):
    model = build_model(family, tmp_path / family, seed=5, num_layers=3)
    out = tmp_path / "out"
    assert expand(model, out, "--layers", "0,2", "--init", "identity", "--importance", "ner") == 0
    report = json.loads((out / "merge_report.json").read_text())
    check_blocks_follow_map(model, out, report["plan"]["expansion"]["layer_map"], zeroed=writers)
    ids = [1, 8, 27, 64, 3]
    assert torch.allclose(logits(out, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_bf16_model_expanded_into_shards(tmp_path):
    model = build_model("llama", tmp_path / "bf16", seed=6, num_layers=3, dtype="bfloat16", max_shard_size="40KB")
    out = tmp_path / "out"
    assert expand(model, out, "--layers", "2,0", "--init", "identity", "--shard-size", "60KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.4.self_attn.o_proj.weight" in index["weight_map"]
    report = json.loads((out / "merge_report.json").read_text())
    check_blocks_follow_map(model, out, report["plan"]["expansion"]["layer_map"], zeroed=("o_proj", "down_proj"))
    assert {t.dtype for t in tensors_of(out).values()} == {torch.bfloat16}
    ids = [1, 50, 51, 52]
    assert torch.equal(logits(out, ids), logits(model, ids))


def reference_block_stats(model_dir: Path, windows: list[list[int]]) -> tuple[list[float], list[float]]:
    """Block influence and heavy-tail share of every block, from transformers' own hidden states
    (with the final norm removed, so the last entry is the last block's output)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.model.norm = torch.nn.Identity()
    n = model.config.num_hidden_layers
    cos, tails, tokens, entries = [0.0] * n, [0] * n, 0, 0
    with torch.no_grad():
        for window in windows:
            states = model(torch.tensor([window]), output_hidden_states=True).hidden_states
            tokens += len(window)
            entries += states[0][0].numel()
            for layer in range(n):
                x, y = states[layer][0].double().numpy(), states[layer + 1][0].double().numpy()
                cos[layer] += float(np.sum((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))))
                z = (y - y.mean(1, keepdims=True)) / y.std(1, keepdims=True)
                tails[layer] += int((np.abs(z) > 3).sum())
    return [1 - c / tokens for c in cos], [t / entries for t in tails]


def test_importance_matches_hidden_states_over_every_position(llama, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    ids = transformers.AutoTokenizer.from_pretrained(llama)(TEXT)["input_ids"]
    assert len(ids) > 128  # several 64-token windows (the tiny model's context)
    windows = [ids[i : i + 64] for i in range(0, len(ids), 64)]
    influence, tail = reference_block_stats(llama, windows)
    cache = tmp_path / "c.sqlite"
    got = expand_json(
        capsys, llama, tmp_path / "o", "--add-layers", 1, "--calibration", text, "--dry-run", cache=cache
    )["expansion"]
    assert got["importance"] == "block_influence" and got["stats_reused"] is False
    assert got["basis"].endswith(f"{len(ids)} tokens in {len(windows)} windows of up to 64")
    assert got["scores"] == pytest.approx(influence, rel=1e-9, abs=1e-12)
    calibrated = ("--add-layers", 1, "--calibration", text, "--dry-run")
    heavy = expand_json(capsys, llama, tmp_path / "o", *calibrated, "--importance", "heavy_tail", cache=cache)[
        "expansion"
    ]
    assert heavy["stats_reused"] is True  # one run serves both scores
    assert heavy["scores"] == pytest.approx(tail, rel=1e-9, abs=1e-12) and max(tail) > 0
    # max_tokens cuts the text: a new run
    short = expand_json(
        capsys,
        llama,
        tmp_path / "o",
        *calibrated,
        "--max-tokens",
        64,
        cache=cache,
    )["expansion"]
    assert short["stats_reused"] is False
    assert short["scores"] == pytest.approx(reference_block_stats(llama, windows[:1])[0], rel=1e-9, abs=1e-12)

    with sqlite3.connect(cache) as db:  # the documented tables, one run per (model, text)
        runs = db.execute(
            "SELECT tokens, windows, layers, text_name, dtype, device FROM activation_runs ORDER BY tokens"
        ).fetchall()
        name = str(text.resolve())
        assert runs == [(64, 1, 4, name, "float32", "cpu"), (len(ids), len(windows), 4, name, "float32", "cpu")]
        rows = db.execute(
            "SELECT layer, tokens, cos_sum, tail_count, entries FROM layer_stats WHERE tokens=? ORDER BY layer",
            (len(ids),),
        ).fetchall()
        assert [r[0] for r in rows] == [0, 1, 2, 3] and all(r[1] == len(ids) for r in rows)
        assert [1 - r[2] / r[1] for r in rows] == pytest.approx(influence, rel=1e-12)


def test_weight_importance_is_the_mean_ner_of_the_block(llama, tmp_path, capsys):
    got = expand_json(capsys, llama, tmp_path / "o", "--add-layers", 1, "--importance", "ner", "--dry-run")
    tensors = tensors_of(llama)
    layout = layout_of(list(tensors))
    expected = [
        np.mean([reference_ner(tensors[t]) for t in layout.block(d) if tensors[t].dim() == 2]) for d in range(4)
    ]
    assert got["expansion"]["scores"] == pytest.approx(expected, abs=1e-9)
    assert got["expansion"]["basis"] == "weights" and not (tmp_path / "o").exists()


def run_without_transformers(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter where `import transformers` fails, as when it is not installed."""
    code = (
        "import sys; sys.modules['transformers'] = None; sys.path.insert(0, sys.argv[1]); "
        "from nerd.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return run_process([sys.executable, "-c", code, REPO, *args], cwd=cwd, env=env)


def test_weight_importance_without_transformers(llama, tmp_path):
    out = tmp_path / "out"
    run = run_without_transformers(
        "expand", llama, "--out", out, "--add-layers", 1, "--no-cache", "--json", "--quiet", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    expansion = json.loads(run.stdout)["results"][0]["expansion"]
    assert expansion["importance"] == "ner" and "transformers is not installed" in expansion["note"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    assert "config.json not checked against transformers (not installed)" in expansion["note"]
    assert (
        "(transformers is not installed, so importance is measured on the weights (NER); config.json not "
        "checked" in (out / "README.md").read_text()
    )
    refused = run_without_transformers(
        "expand",
        llama,
        "--out",
        tmp_path / "o2",
        "--add-layers",
        1,
        "--importance",
        "heavy_tail",
        "--no-cache",
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "transformers, which is not installed" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()


def test_growth_target_and_parameter_report(llama, tmp_path, capsys):
    out = tmp_path / "out"
    result = expand_json(capsys, llama, out, "--growth", 0.16, "--importance", "ner")
    source = tensors_of(llama)
    layout = layout_of(list(source))
    total = sum(t.numel() for t in source.values())
    block = sum(source[t].numel() for t in layout.block(0))
    expansion = result["expansion"]
    best = min(range(1, 5), key=lambda n: abs(n * block - 0.16 * total))
    assert len(expansion["added"]) == best
    assert expansion["params_before"] == total
    assert expansion["params_after"] == sum(t.numel() for t in tensors_of(out).values()) == total + best * block
    card = (out / "README.md").read_text()
    growth = (total + best * block) / total - 1
    assert f"({growth:+.1%})" in card and "## Layer expansion (DLEC)" in card
    image = __import__("matplotlib.pyplot").pyplot.imread(out / "expansion_curve.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_copies_are_stored_as_their_own_data(llama, tmp_path):
    out = tmp_path / "out"
    assert expand(llama, out, "--layers", "1,1", "--importance", "ner") == 0
    raw = (out / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__")
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two tensors share bytes
    assert spans[-1][1] == len(raw) - 8 - length == sum(t.numel() * t.element_size() for t in tensors_of(out).values())
    assert "model.layers.2.mlp.up_proj.weight" in header and "model.layers.3.mlp.up_proj.weight" in header


def test_merge_with_dlec_section_expands_the_composite(tmp_path, capsys):
    models = build_family(tmp_path, recipe=RANK_ONE, num_layers=4)
    cache = tmp_path / "c.sqlite"
    grown_options = {"output": tmp_path / "grown", "config": "dlec.yaml", "dlec": {"add_layers": 2, "init": "identity"}}
    plain = merge(models, tmp_path, output=tmp_path / "plain", config="plain.yaml").ok()
    grown = merge(models, tmp_path, **grown_options).ok()
    assert {c["winner"] for c in plain["choices"]} != {str(models[0])}  # a real composite, not the base
    assert grown["choices"] == plain["choices"]
    ids = [1, 40, 2, 77, 13]
    assert torch.allclose(logits(tmp_path / "grown", ids), logits(tmp_path / "plain", ids), atol=1e-5, rtol=0)
    check_blocks_follow_map(
        tmp_path / "plain", tmp_path / "grown", grown["expansion"]["layer_map"], zeroed=("o_proj", "down_proj")
    )

    # the importance is the composite's: the same as expanding the written composite, not the base
    of_composite = expand_json(capsys, tmp_path / "plain", tmp_path / "x", "--add-layers", 2, "--dry-run", cache=cache)[
        "expansion"
    ]["scores"]
    of_base = expand_json(capsys, models[0], tmp_path / "x", "--add-layers", 2, "--dry-run", cache=cache)["expansion"][
        "scores"
    ]
    assert grown["expansion"]["scores"] == pytest.approx(of_composite, rel=1e-9)
    assert grown["expansion"]["scores"] != pytest.approx(of_base, rel=1e-6)

    report = json.loads((tmp_path / "grown" / "merge_report.json").read_text())
    assert report["plan"]["expansion"]["params_after"] > report["plan"]["expansion"]["params_before"]
    assert "## Layer expansion (DLEC)" in (tmp_path / "grown" / "README.md").read_text()
    assert (tmp_path / "grown" / "expansion_curve.png").is_file()
    again = merge(models, tmp_path, "--force", **grown_options).ok()  # a second run measures nothing
    assert again["expansion"]["stats_reused"] is True and again["spectra_computed"] == 0


def test_dry_run_prints_the_expansion(llama, tmp_path, capsys):
    assert (
        main(
            [
                "expand",
                str(llama),
                "--out",
                str(tmp_path / "o"),
                "--growth",
                "0.2",
                "--importance",
                "ner",
                "--dry-run",
                "--no-cache",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "expansion: parameters" in text and "config.json: num_hidden_layers: 4 -> " in text
    assert "mean NER of the block's matrices, from weights" in text and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "dlec, message",
    [
        (
            {"add_layers": 1, "growth": 0.1},
            "give exactly one of dlec.add_layers, dlec.growth or dlec.layers, found dlec.add_layers and dlec.growth",
        ),
        ({}, "give exactly one of dlec.add_layers, dlec.growth or dlec.layers, found none"),
        ({"add_layers": 0}, "dlec.add_layers: expected a whole number of layers >= 1, found 0"),
        ({"growth": 1.5}, "dlec.growth: expected a fraction of the parameters in (0, 1]"),
        ({"layers": [1, -2]}, "dlec.layers: expected a list of layer indices"),
        ({"add_layers": 1, "init": "zeros"}, "dlec.init: expected one of copy, identity, found 'zeros'"),
        ({"add_layers": 1, "importance": "bi"}, "dlec.importance: expected one of block_influence, heavy_tail, ner"),
        ({"add_layers": 1, "calibration": "missing.txt"}, "dlec.calibration: calibration text 'missing.txt' not found"),
        ({"add_layers": 1, "trust_remote_code": "yes"}, "dlec.trust_remote_code: expected true or false"),
        ({"add_layer": 1}, "dlec.add_layer: unknown key; did you mean 'add_layers'?"),
        ({"add_layers": 5}, "dlec.add_layers: 5 is more than the 4 layers of the model"),
        ({"layers": [4]}, "dlec.layers: layer 4 does not exist; the model has 4 layers (0 to 3)"),
    ],
)
def test_bad_dlec_options_are_one_clear_line(llama, tmp_path, dlec, message):
    other = llama.parent / "other"
    if not other.exists():
        build_model("llama", other, seed=9, base_dir=llama, noise=0.1)
    merged = merge([llama, other], tmp_path, cache=None, as_json=False, dlec=dlec)
    assert merged.code == 2
    err = merged.stderr
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_top_level_dlec_key_is_pointed_to_its_section(llama, tmp_path):
    merged = merge([llama, llama / "."], tmp_path, cache=None, quiet=False, as_json=False, add_layers=2)
    assert merged.code == 2
    assert "did you mean 'dlec.add_layers'?" in merged.stderr


def test_identity_is_refused_for_post_norm_models(tmp_path, capsys):
    bert = build_model("bert", tmp_path / "bert", seed=1, num_layers=2)
    assert expand(bert, tmp_path / "out", "--add-layers", 1, "--init", "identity") == 2
    err = capsys.readouterr().err
    assert "--init: identity needs pre-norm blocks, but bert normalises after" in err
    assert not (tmp_path / "out").exists()
    assert expand(bert, tmp_path / "out", "--add-layers", 1, "--init", "copy") == 0  # copies are fine
    assert transformers.AutoModel.from_pretrained(tmp_path / "out").config.num_hidden_layers == 3


def test_remote_code_is_not_run_unless_allowed(llama, tmp_path, capsys):
    custom = tmp_path / "custom"
    custom.mkdir()
    for path in llama.iterdir():
        (custom / path.name).write_bytes(path.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    assert expand(custom, tmp_path / "out", "--add-layers", 1) == 2
    assert "--trust-remote-code: " in capsys.readouterr().err


def test_expanded_config_rewrites_every_per_layer_key():
    config = {
        "model_type": "x",
        "num_hidden_layers": 3,
        "layer_types": ["a", "b", "c"],
        "eos_token_id": [1, 2, 3],
        "mlp_only_layers": [0, 2],
        "max_window_layers": 2,
        "architectures": ["X"],
        "sizes": [8, 16, 32],
    }
    new, changes = expanded_config(config, 3, [0, 0, 1, 2, 2], "config.json")
    assert new["num_hidden_layers"] == 5 and new["layer_types"] == ["a", "a", "b", "c", "c"]
    assert new["sizes"] == [8, 8, 16, 32, 32] and new["eos_token_id"] == [1, 2, 3]
    assert new["mlp_only_layers"] == [0, 1, 3, 4] and new["max_window_layers"] == 3
    assert config["layer_types"] == ["a", "b", "c"]  # the input is not changed
    assert "num_hidden_layers: 3 -> 5" in changes
    nested, _ = expanded_config({"text_config": {"num_hidden_layers": 3}}, 3, [0, 1, 1, 2], "config.json")
    assert nested["text_config"]["num_hidden_layers"] == 4
    with pytest.raises(ModelError, match="num_hidden_layers is 4, but the weights have 3 blocks"):
        expanded_config({"num_hidden_layers": 4}, 3, [0, 1, 2, 2], "config.json")


def test_growth_picks_the_count_closest_to_the_target():
    options = DlecOptions(growth=0.25)
    scores = [0.1, 0.4, 0.3, None]
    assert layers_to_copy(scores, [10, 10, 10, 10], 100, options) == [1, 2]  # 20 is as close as 30: fewer wins
    assert layers_to_copy(scores, [10, 10, 10, 10], 100, DlecOptions(growth=0.3)) == [0, 1, 2]
    assert layers_to_copy(scores, [10, 10, 10, 10], 100, DlecOptions(add_layers=4)) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="less than half of one block"):
        layers_to_copy(scores, [10, 10, 10, 10], 100, DlecOptions(growth=0.04))


def save_with_tokenizer(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    build_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory


TINY_DECODER = dict(  # the sizes of the small decoders built from a transformers config below
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_sparse_step_moe_expansion_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        **TINY_DECODER,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[],
    )
    model = save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "moe")
    assert expand(model, tmp_path / "out", "--layers", 0) == 3  # block 1 is sparse by the step rule
    err = capsys.readouterr().err
    assert "transformers would build block 1 unlike its source block 0" in err and "decoder_sparse_step" in err
    assert not (tmp_path / "out").exists()
    assert expand(model, tmp_path / "last", "--layers", 3, "--init", "identity") == 3  # new block 4 would be dense
    assert "block 4 unlike its source block 3" in capsys.readouterr().err


def test_layer_types_derived_from_a_pattern_are_written_out(tmp_path):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **TINY_DECODER,
        head_dim=8,
        sliding_window=3,
        sliding_window_pattern=2,
    )
    model = save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "gemma")
    saved = json.loads((model / "config.json").read_text())
    saved.pop("layer_types", None)  # an older config: the sliding layers follow from the pattern alone
    saved["sliding_window_pattern"] = 2
    (model / "config.json").write_text(json.dumps(saved))
    out = tmp_path / "out"
    assert expand(model, out, "--layers", 0, "--init", "identity") == 0
    original = transformers.AutoConfig.from_pretrained(model).layer_types
    assert json.loads((out / "config.json").read_text())["layer_types"] == [original[0]] + original
    ids = [1, 5, 9, 20, 33, 40, 2, 50, 60, 70, 80, 90]  # longer than the sliding window
    assert torch.allclose(logits(out, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_merge_with_dlec_on_checkpoints_without_the_base_prefix(tmp_path):
    from safetensors.torch import load_file, save_file

    base = build_model("gpt2", tmp_path / "base", seed=1, num_layers=3)
    tuned = build_model("gpt2", tmp_path / "tuned", seed=5, base_dir=base, noise=0.5)
    for directory in (base, tuned):  # saved as openai-community/gpt2 is: h.0... instead of transformer.h.0...
        weights = load_file(directory / "model.safetensors")
        save_file(
            {k.removeprefix("transformer."): v for k, v in weights.items()},
            str(directory / "model.safetensors"),
            metadata={"format": "pt"},
        )
    result = merge([base, tuned], tmp_path, dlec={"add_layers": 1}).ok()
    assert {c["winner"] for c in result["choices"]} == {str(base), str(tuned)}  # the tuned blocks were copied in
    assert result["expansion"]["importance"] == "block_influence" and None not in result["expansion"]["scores"]
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.n_layer == 4


def test_named_layers_need_no_calibration(llama, tmp_path, capsys):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((llama / name).read_bytes())
    result = expand_json(capsys, bare, tmp_path / "out", "--layers", "1,3")
    assert result["expansion"]["importance"] == "none" and result["expansion"]["scores"] == [None] * 4
    assert not (tmp_path / "out" / "expansion_curve.png").exists()
    assert "not measured (the blocks to copy were named)" in (tmp_path / "out" / "README.md").read_text()
    assert expand(bare, tmp_path / "o2", "--add-layers", 1) == 3  # ranking needs the tokenizer
    assert "no tokenizer that transformers can load" in capsys.readouterr().err
    assert expand(bare, tmp_path / "o3", "--add-layers", 1, "--calibration", tmp_path) == 2
    assert "--calibration: '" + str(tmp_path) + "' is a directory, not a text file" in capsys.readouterr().err


def test_windows_start_like_documents_when_the_tokenizer_adds_bos(llama, tmp_path, capsys):
    from tokenizers import processors

    model = tmp_path / "bos"
    model.mkdir()
    for path in llama.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(model)
    ids = transformers.AutoTokenizer.from_pretrained(model)(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    windows = [[ids[0]] + ids[1:][i : i + 63] for i in range(0, len(ids) - 1, 63)]
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    got = expand_json(capsys, model, tmp_path / "o", "--add-layers", 1, "--calibration", text, "--dry-run")
    assert got["expansion"]["basis"].endswith(f"{sum(map(len, windows))} tokens in {len(windows)} windows of up to 64")
    assert got["expansion"]["scores"] == pytest.approx(reference_block_stats(model, windows)[0], rel=1e-9)


@pytest.mark.parametrize(
    "name, writes",
    [
        ("model.layers.0.self_attn.o_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", True),
        ("model.layers.0.mlp.experts.down_proj", True),
        ("model.layers.0.mlp.experts.down_proj_bias", True),
        ("transformer.h.0.attn.c_proj.bias", True),
        ("gpt_neox.layers.0.attention.dense.weight", True),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", True),
        ("model.layers.0.mlp.up_proj.weight", False),
        ("model.layers.0.self_attn.q_proj.weight", False),
        ("model.layers.0.mlp.experts.gate_up_proj", False),
    ],
)
def test_residual_writers_by_name(name, writes):
    assert (inferred().residual_writer(name) is not None) is writes
