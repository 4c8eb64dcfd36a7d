"""End to end: tiny models built offline, merged by the CLI (or the Python API where the CLI is not
what is tested), loaded back with transformers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import (
    RANK_ONE,
    api_merge,
    assert_bytes_follow_plan,
    build_family,
    config_of,
    merge,
    reference_ner,
    tensors_of,
    write_config,
)

from examples.tiny_models import FAMILIES, build_model
from nerd import MetricCache, plan_merge
from nerd.cli import main
from nerd.layout import layout_of


def make_family(root: Path, family: str) -> list[Path]:
    """A base and two fine-tunes of it: full-rank noise everywhere, and a rank-1 update on layer 1."""
    return build_family(root, family, recipe=RANK_ONE, prefix=f"{family}-")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_merge_end_to_end(tmp_path, family):
    models = make_family(tmp_path, family)
    out = tmp_path / "out"
    api_merge(models, out)

    report = assert_bytes_follow_plan(out)
    # the winner at every depth is the best mean NER, recomputed here with a float64 SVD
    inputs = {m.name: tensors_of(m) for m in models}  # by name, as the report names them
    layout = layout_of(list(inputs[models[0].name]))
    assert layout.num_layers == 2
    for choice in report["plan"]["choices"]:
        if choice["depth"] is None:
            assert choice["winner"] == models[0].name  # non-layer tensors come from the base
            continue
        matrices = [t for t in layout.block(choice["depth"]) if inputs[models[0].name][t].dim() == 2]
        means = {m: np.mean([reference_ner(inputs[m][t]) for t in matrices]) for m in inputs}
        for m, score in means.items():
            assert choice["scores"][m] == pytest.approx(score, abs=1e-9)
        assert choice["winner"] == max(means, key=means.get)
    # the rank-1 update lowers NER at depth 1, so ft-b cannot win there
    assert report["plan"]["choices"][2]["winner"] != models[2].name

    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out)
    with torch.no_grad():
        output = model(torch.tensor([[1, 5, 9, 2]]))
    assert torch.isfinite(output[0]).all()
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    assert transformers.AutoTokenizer.from_pretrained(out)("a b").input_ids


def test_sharded_inputs_sharded_output_in_depth_order(tmp_path):
    base = build_model("llama", tmp_path / "base", seed=0, num_layers=12, max_shard_size="60KB")
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.1, max_shard_size="60KB")
    assert (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    api_merge([base, ft], out, shard_size="100KB", dtype="bfloat16")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors_of(out).values())
    depths = []
    for shard in shards:  # tensors in file order, from the raw safetensors header
        raw = shard.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__")
        names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        depths += [d for d in map(layout_of(names).depths.get, names) if d is not None]
        assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    assert depths == sorted(depths) and depths[-1] == 11  # layers.2 before layers.10
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 12
    # cast tensors equal the source converted to bfloat16
    report = json.loads((out / "merge_report.json").read_text())
    sources = {base.name: tensors_of(base), ft.name: tensors_of(ft)}  # the report names them so
    written = tensors_of(out)
    for e in report["plan"]["entries"]:
        assert torch.equal(written[e["name"]], sources[e["source"]][e["tensor"]].to(torch.bfloat16))


def test_tensor_granularity_biases_follow_their_matrix(tmp_path):
    models = make_family(tmp_path, "qwen2")  # qwen2 has q/k/v biases
    out = tmp_path / "out"
    api_merge(models, out, selection={"granularity": "tensor"})
    report = assert_bytes_follow_plan(out)
    source = {e["name"]: e["source"] for e in report["plan"]["entries"]}
    biases = [n for n in source if n.endswith("q_proj.bias")]
    assert biases
    for bias in biases:
        assert source[bias] == source[bias.replace(".bias", ".weight")]
    per_tensor = [c for c in report["plan"]["choices"] if c["group"].endswith(".weight")]
    assert per_tensor
    for choice in per_tensor:
        ner = {m: report["metrics"][m][choice["group"]]["ner"] for m in report["plan"]["candidates"]}
        assert choice["winner"] == max(ner, key=ner.get)
    winners = {c["winner"] for c in per_tensor}
    assert len(winners) > 1  # a real mix, not one model per block
    block_winner = {c["depth"]: c["winner"] for c in report["plan"]["choices"] if c["group"] == str(c["depth"])}
    norms = [n for n in source if "layernorm" in n]
    assert norms and all(source[n] == block_winner[int(n.split(".")[2])] for n in norms)
    transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("tied", [True, False])
def test_non_layer_compete_keeps_embeddings_together(tmp_path, tied):
    base = build_model("llama", tmp_path / "base", seed=0, tie_word_embeddings=tied)
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.05)
    # a fine-tune whose embeddings (and head) were trained too: spread their spectrum
    state = tensors_of(ft)
    g = torch.Generator().manual_seed(4)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = state[name] + state[name].std() * torch.randn(state[name].shape, generator=g)
    from safetensors.torch import save_file

    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    api_merge([base, ft], out, selection={"non_layer": "compete"})
    report = assert_bytes_follow_plan(out)
    source = {e["name"]: e["source"] for e in report["plan"]["entries"]}
    assert ("lm_head.weight" in source) != tied
    assert source["model.embed_tokens.weight"] == source["model.norm.weight"] == ft.name
    if not tied:
        assert source["lm_head.weight"] == ft.name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_cache_second_run_recomputes_nothing_and_changed_file_invalidates(tmp_path):
    models = make_family(tmp_path, "llama")

    def dry_run():
        return merge(models, tmp_path, "--dry-run").ok()

    first = dry_run()
    n_matrices = 7 * 2 + 2  # 7 per block, 2 blocks, embeddings + lm_head
    assert first["spectra_computed"] + first["spectra_reused"] == 3 * n_matrices
    # identical tensors are computed once: ft-a shares the base's embeddings and head, ft-b also layer 0
    assert first["spectra_computed"] == n_matrices + 2 * 7 + 7
    second = dry_run()
    assert second["spectra_computed"] == 0 and second["spectra_reused"] == 3 * n_matrices
    assert second["choices"] == first["choices"]
    assert not (tmp_path / "out").exists()

    # rewrite ft-b with one tensor changed: only that tensor's spectrum is computed again
    build_model("llama", models[2], seed=3, base_dir=models[0], noise=0.5, noise_rank=1, layers=[0])
    third = dry_run()
    changed = sum(not torch.equal(a, b) for a, b in zip(tensors_of(models[2]).values(), tensors_of(models[0]).values()))
    assert third["spectra_computed"] == 7 and changed == 7  # layer 0's seven matrices


def test_dry_run_prints_table_and_writes_nothing(tmp_path):
    models = make_family(tmp_path, "llama")
    merged = merge(models, tmp_path, "--dry-run", cache=None, as_json=False, quiet=False)
    assert merged.code == 0
    lines = merged.stdout.splitlines()
    assert lines[1] == "scores: mean ner of each group's matrices, highest wins"
    assert lines[2].split() == ["depth", "llama-base", "llama-ft-a", "llama-ft-b", "margin", "winner"]
    assert [line.split()[0] for line in lines[3:6]] == ["non-layer", "0", "1"]
    assert " over llama-" in lines[4] and " - " in lines[3]  # depth 0 has a runner-up, the base group none
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_several_configs_share_one_cache(tmp_path, capsys):
    models = make_family(tmp_path, "llama")
    one = write_config(tmp_path / "one.yaml", models[:2], tmp_path / "out1")
    two = write_config(tmp_path / "two.yaml", models, tmp_path / "out2")
    assert main(["--config", str(one), str(two), "--cache", str(tmp_path / "c.sqlite"), "--quiet", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["written"] for r in results] == [True, True]
    assert results[1]["spectra_reused"] >= 2 * 16  # base and ft-a were scored by the first config
    assert (tmp_path / "out1" / "model.safetensors").is_file() and (tmp_path / "out2" / "model.safetensors").is_file()


def test_python_api_matches_cli(tmp_path):
    models = make_family(tmp_path, "llama")
    plan = plan_merge(config_of(models, tmp_path / "out"), cache=MetricCache(), quiet=True)
    assert [c.depth for c in plan.choices] == [None, 0, 1]
    assert {e.source for e in plan.entries} <= set(plan.candidates)
    assert not (tmp_path / "out").exists()


def test_force_replaces_and_without_it_nothing_is_touched(tmp_path):
    models = make_family(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert merge(models, tmp_path, as_json=False).code == 2
    assert merge(models, tmp_path, "--force", as_json=False).code == 2  # not a mastermerge output
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    assert merge(models, tmp_path, as_json=False).code == 0  # an empty directory is fine
    (out / "old.txt").write_text("old")
    assert merge(models, tmp_path, "--force", as_json=False).code == 0  # a previous output is replaced
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_output(tmp_path, monkeypatch, fault):
    import nerd.write

    models = make_family(tmp_path, "llama")
    out = tmp_path / "out"
    calls = []

    def failing(real):
        def write(*args):
            calls.append(args)
            if len(calls) == 12:
                raise fault
            return real(*args)

        return write

    # every tensor goes through one of these: a copy inside the kernel, or through memory
    monkeypatch.setattr(nerd.write, "copied_in_kernel", failing(nerd.write.copied_in_kernel))
    monkeypatch.setattr(nerd.write, "entry_data", failing(nerd.write.entry_data))
    merged = merge(models, tmp_path, as_json=False, shard_size="20KB")
    assert merged.code == (4 if isinstance(fault, OSError) else 130)
    assert "mastermerge:" in merged.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_architecture_mismatch_lists_tensors_with_both_shapes(tmp_path):
    a = build_model("llama", tmp_path / "a", seed=0)
    b = build_model("llama", tmp_path / "b", seed=0, intermediate_size=96)
    merged = merge([a, b], tmp_path, as_json=False)
    assert merged.code == 3
    err = merged.stderr.splitlines()[-1]
    assert err.startswith("mastermerge: error: models '") and "differ in 6 tensor(s)" in err
    assert "model.layers.0.mlp.down_proj.weight [32, 128] vs [32, 96]" in err


def test_pickled_bin_inputs_load_with_weights_only(tmp_path):
    models = make_family(tmp_path, "llama")
    for m in models[1:]:
        torch.save(tensors_of(m), m / "pytorch_model.bin")
        (m / "model.safetensors").unlink()
    out = tmp_path / "out"
    api_merge(models, out)
    written = tensors_of(out)
    report = json.loads((out / "merge_report.json").read_text())
    for e in report["plan"]["entries"]:
        src = models[[m.name for m in models].index(e["source"])]
        reference = (
            tensors_of(src)
            if (src / "model.safetensors").exists()
            else torch.load(src / "pytorch_model.bin", weights_only=True)
        )
        assert torch.equal(written[e["name"]], reference[e["tensor"]])


def test_nan_candidate_block_is_not_selectable(tmp_path):
    models = make_family(tmp_path, "llama")
    state = tensors_of(models[1])
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(models[1] / "model.safetensors"), metadata={"format": "pt"})
    depth0 = merge(models, tmp_path, "--dry-run").ok()["choices"][1]
    assert depth0["scores"][str(models[1])] is None and depth0["winner"] != str(models[1])
    assert depth0["note"] == (
        f"not selectable: {models[1].name} (model.layers.0.mlp.up_proj.weight: contains NaN or Inf)"
    )


def test_dtype_conversion_leaves_integer_tensors_alone(tmp_path):
    from safetensors.torch import save_file

    models = make_family(tmp_path, "llama")[:2]
    for m in models:
        state = tensors_of(m)
        state["model.position_ids"] = torch.arange(4097, dtype=torch.int64)
        save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_merge(config_of(models, tmp_path / "out", dtype="float16"), cache=MetricCache(), quiet=True)
    dtypes = {e.name: e.dtype for e in plan.entries}
    assert dtypes.pop("model.position_ids") == "I64" and set(dtypes.values()) == {"F16"}


def test_json_summary_survives_a_failing_config(tmp_path, capsys):
    models = make_family(tmp_path, "llama")
    good = write_config(tmp_path / "good.yaml", models, tmp_path / "out1")
    broken = build_model("llama", tmp_path / "other", seed=5, hidden_size=64)
    bad = write_config(tmp_path / "bad.yaml", [models[0], broken], tmp_path / "out2")
    code = main(["--config", str(good), str(bad), "--cache", str(tmp_path / "c.sqlite"), "--quiet", "--json"])
    assert code == 3
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["written"] and (tmp_path / "out1" / "model.safetensors").is_file()
    assert results[1]["exit_code"] == 3 and "differ in" in results[1]["error"]
    assert not (tmp_path / "out2").exists()


def test_ties_go_to_the_base_even_when_listed_later(tmp_path):
    import shutil

    base = build_model("llama", tmp_path / "base", seed=0)
    twin = tmp_path / "twin"
    shutil.copytree(base, twin)  # identical weights: every score ties
    other = build_model("llama", tmp_path / "other", seed=1, base_dir=base, noise=0.5, noise_rank=1)
    config = config_of([twin, other, base], tmp_path / "out", base_model=str(base), selection={"granularity": "tensor"})
    plan = plan_merge(config, cache=MetricCache(), quiet=True)
    assert plan.candidates == [str(base), str(twin), str(other)]
    assert {c.winner for c in plan.choices} == {str(base)}


def test_file_replaced_with_its_old_mtime_is_read_again(tmp_path):
    import os
    import shutil

    models = make_family(tmp_path, "llama")
    before = merge(models, tmp_path, "--dry-run").ok()
    target = models[1] / "model.safetensors"
    stat = target.stat()
    shutil.copyfile(models[2] / "model.safetensors", target)  # same size, other weights
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as tar or rsync -t would leave it
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    after = merge(models, tmp_path, "--dry-run").ok()
    depth1 = str(models[1]), str(models[2])
    assert after["choices"][2]["scores"][depth1[0]] == after["choices"][2]["scores"][depth1[1]]
    assert after["choices"][2]["scores"][depth1[0]] != before["choices"][2]["scores"][depth1[0]]


def independent_metric(w: np.ndarray, metric: str) -> float:
    """alpha from the powerlaw package, stable rank from numpy, on a float64 SVD of our own."""
    lam = np.linalg.svd(w, compute_uv=False) ** 2
    if metric == "stable_rank":
        return float(lam.sum() / lam.max())
    import contextlib
    import io

    import powerlaw

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return float(powerlaw.Fit(lam, verbose=False).alpha)


@pytest.mark.parametrize(
    "selection",
    [
        {"metric": "alpha", "goal": "target", "target": 2.0},
        {"metric": "stable_rank", "goal": "min"},
        {"metric": "stable_rank", "goal": "max", "granularity": "tensor"},
    ],
)
def test_selection_by_any_metric(tmp_path, selection):
    models = make_family(tmp_path, "llama")
    out = tmp_path / "out"
    api_merge(models, out, selection=selection)
    report = assert_bytes_follow_plan(out)
    assert report["selection"]["metric"] == selection["metric"]
    inputs = {m.name: {k: v.double().numpy() for k, v in tensors_of(m).items() if v.dim() == 2} for m in models}
    metric, goal, target = selection["metric"], selection["goal"], selection.get("target")
    checked = 0
    for choice in report["plan"]["choices"]:
        if choice["depth"] is None:
            continue
        group = (
            [t for t in choice["tensors"] if t in inputs[models[0].name]]
            if choice["group"] != str(choice["depth"])
            else [t for t in inputs[models[0].name] if t.startswith(f"model.layers.{choice['depth']}.")]
        )
        expected = {}
        for m in (m.name for m in models):
            values = [independent_metric(inputs[m][t], metric) for t in group]
            expected[m] = float(np.mean([abs(v - target) if goal == "target" else v for v in values]))
            assert choice["scores"][m] == pytest.approx(expected[m], rel=1e-6)
        best = (min if goal != "max" else max)(expected.values())
        assert choice["winner"] == next(m.name for m in models if expected[m.name] == best)
        checked += 1
    assert checked >= 2
    card = (out / "README.md").read_text()
    assert f"heatmap_{metric}.png" in card and (out / f"heatmap_{metric}.png").stat().st_size > 10_000
    assert ("lowest wins" if goal != "max" else "highest wins") in card


def test_a_config_named_like_a_command_is_merged(tmp_path, monkeypatch, capsys):
    """Only the first argument names a command: a config file called `verify` is a config."""
    models = make_family(tmp_path, "llama")
    write_config(tmp_path / "verify", models, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "verify", "--dry-run", "--no-cache", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert result["config"].endswith("verify") and result["written"] is False
    assert main(["merge", "--config", "verify", "--no-cache", "--quiet"]) == 0  # the command named
    assert (tmp_path / "out" / "merge_report.json").is_file()
