"""What a day of real use turned up (issue 19), each fixed and held here: --json when a config is
refused before anything runs, --quiet hiding a dry run's tables, a --cache FILE in a directory
that does not exist."""

import json
from pathlib import Path

import pytest
import torch
from helpers import merge, run_cli, write_config

from safetensors import safe_open

from examples.tiny_models import build_model


def test_json_reports_a_config_refused_before_anything_runs(tmp_path, llama_family):
    family = llama_family(2)
    models = [family["base"], family["ft"]]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    config = write_config(tmp_path / "m.yaml", models, tmp_path / "out")
    code, stdout, stderr = run_cli("--config", config, "--json", "--quiet", "--no-cache")
    assert code != 0 and (tmp_path / "out" / "mine.txt").read_text() == "the user's"
    (result,) = json.loads(stdout)["results"]
    assert result == {
        "config": str(config),
        "status": "refused",
        "error": stderr.strip().removeprefix("mastermerge: error: "),
        "exit_code": code,
    }

    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [")
    code, stdout, stderr = run_cli("--config", broken, "--json", "--no-cache")
    (result,) = json.loads(stdout)["results"]
    assert code == 2 and result["config"] == str(broken) and result["exit_code"] == 2 and result["error"] in stderr


def test_quiet_hides_the_tables_of_a_dry_run(tmp_path, llama_family):
    family = llama_family(2)
    for command in ("merge", "expand"):
        where = tmp_path / command
        where.mkdir()
        if command == "merge":
            run = merge([family["base"], family["ft"]], where, "--dry-run", as_json=False)
            code, stdout = run.code, run.stdout
            loud = merge([family["base"], family["ft"]], where, "--dry-run", as_json=False, quiet=False).stdout
        else:
            flags = ("expand", family["base"], "--out", where / "o", "--add-layers", "1", "--importance", "ner")
            code, stdout, _ = run_cli(*flags, "--dry-run", "--no-cache", "--quiet")
            loud = run_cli(*flags, "--dry-run", "--no-cache")[1]
        assert code == 0 and stdout == "" and "depth" in loud, command


def test_a_cache_in_a_directory_that_does_not_exist_is_refused_not_created(tmp_path, llama_family):
    family = llama_family(2)
    config = write_config(tmp_path / "m.yaml", [family["base"], family["ft"]], tmp_path / "out")
    cache = tmp_path / "no" / "such" / "c.sqlite"
    code, _, stderr = run_cli("--config", config, "--cache", cache, "--quiet")
    assert code == 2 and not (tmp_path / "no").exists() and not (tmp_path / "out").exists()
    assert stderr.splitlines() == [
        f"mastermerge: error: --cache {cache}: no directory {cache.parent} (create it, or give another FILE)"
    ]
    code, _, _ = run_cli("analyze", family["base"], "--out", tmp_path / "a", "--cache", cache, "--quiet")
    assert code == 2 and not (tmp_path / "no").exists()


def test_out_on_the_command_line_replaces_the_configs_output_dir(tmp_path, llama_family, monkeypatch):
    family = llama_family(2)
    config = write_config(tmp_path / "m.yaml", [family["base"], family["ft"]], tmp_path / "configured")
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli("--config", config, "--out", "given", "--json", "--quiet", "--no-cache")
    assert code == 0, stderr
    (result,) = json.loads(stdout)["results"]
    assert result["output_dir"] == str(tmp_path / "given") and not (tmp_path / "configured").exists()
    report = json.loads((tmp_path / "given" / "merge_report.json").read_text())
    assert report["config"]["output_dir"] == "given"  # by its name: no path of this machine

    other = write_config(tmp_path / "n.yaml", [family["base"], family["ft"]], tmp_path / "other")
    code, _, stderr = run_cli("--config", config, other, "--out", "both", "--quiet", "--no-cache")
    assert code == 2 and not (tmp_path / "both").exists()
    assert stderr.splitlines() == [
        "mastermerge: error: --out both: one output directory, for one config; found 2 configs"
    ]


def test_analyze_tensors_takes_only_the_matrices_asked_for(tmp_path, llama_family):
    base = llama_family(2)["base"]
    code, stdout, stderr = run_cli(
        "analyze",
        base,
        "--out",
        tmp_path / "a",
        "--tensors",
        r"self_attn\.q_proj",
        "--esd",
        "mlp",
        "--json",
        "--quiet",
        "--no-cache",
    )
    assert code == 0, stderr
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    assert len(rows) == 2 and all("self_attn.q_proj" in r["tensor"] for r in rows)
    assert json.loads(stdout)["spectra_computed"] == 2
    assert stderr.splitlines() == [
        "mastermerge: warning: analyze: --esd: 'mlp' matches no matrix analyzed: no ESD figure"
    ]

    code, _, stderr = run_cli("analyze", base, "--out", tmp_path / "b", "--tensors", "no_such", "--no-cache", "--quiet")
    assert code == 2 and not (tmp_path / "b").exists()
    assert stderr.splitlines() == [
        "mastermerge: error: analyze: --tensors: 'no_such' matches no weight matrix of the models"
    ]


def test_a_blend_in_the_report_names_its_members_only(tmp_path, llama_family):
    family = llama_family(2)
    run = merge([family["base"], family["ft-a"], family["ft-b"]], tmp_path, tether={"mode": "blend"})
    run.ok()
    entries = json.loads((run.output / "merge_report.json").read_text())["plan"]["entries"]
    blends = [e for e in entries if e["transform"] == "blend"]
    assert blends and all("source" not in e and len(e["blend"]) >= 2 for e in blends)
    assert all("source" in e for e in entries if e["transform"] != "blend")


def expansion_of(*flags) -> dict:
    code, stdout, stderr = run_cli("expand", *flags, "--dry-run", "--json", "--quiet", "--no-cache")
    assert code == 0, stderr
    return json.loads(stdout)["results"][0]["expansion"]


def test_growth_beyond_every_block_copied_once_says_what_it_gives(tmp_path, llama_family):
    base = llama_family(2)["base"]
    expansion = expansion_of(base, "--out", tmp_path / "o", "--growth", "1", "--importance", "ner")
    added = expansion["params_after"] / expansion["params_before"] - 1
    assert len(expansion["added"]) == 2 and added < 0.9
    assert f"--growth: 1 asks for more than every block copied once, which adds {added:+.0%}" in expansion["note"]
    modest = expansion_of(base, "--out", tmp_path / "o", "--growth", "0.2", "--importance", "ner")
    assert "asks for more" not in (modest["note"] or "")


def test_a_short_calibration_text_is_flagged_with_its_scores(tmp_path, llama_family):
    base = llama_family(2)["base"]
    short = tmp_path / "short.txt"
    short.write_text("Hi there.")
    expansion = expansion_of(base, "--out", tmp_path / "o", "--add-layers", "1", "--calibration", short)
    assert "(fewer than 64 tokens: scores from so few are mostly noise; give a longer text)" in expansion["basis"]
    default = expansion_of(base, "--out", tmp_path / "o", "--add-layers", "1")
    assert "fewer than" not in default["basis"]


def test_a_dtype_mismatch_gives_its_hint_once(tmp_path):
    base = build_model("llama", tmp_path / "base", seed=0)
    half = build_model("llama", tmp_path / "half", seed=1, base_dir=base, noise=0.1, dtype="bfloat16")
    run = merge([base, half], tmp_path, as_json=False)
    (line,) = run.stderr.strip().splitlines()
    assert run.code == 3 and line.count("set dtype: in the config to cast both") == 1
    assert line.endswith("more (set dtype: in the config to cast both)") and "F32 vs BF16" in line


def test_different_architectures_are_named_before_their_tensors(tmp_path):
    llama = build_model("llama", tmp_path / "llama", seed=0)
    bert = build_model("bert", tmp_path / "bert", seed=0)
    run = merge([llama, bert], tmp_path, as_json=False)
    (line,) = run.stderr.strip().splitlines()
    assert run.code == 3
    assert line.startswith(
        f"mastermerge: error: models '{llama}' and '{bert}' are different architectures "
        "(LlamaForCausalLM vs BertModel): "
    )
    assert line.count(" missing from ") + line.count(" vs [") <= 3 and "more" in line


def test_a_base_model_not_among_the_models_joins_them_first(tmp_path, llama_family):
    """As in mergekit's configs, base_model need not be listed among models (item 12): it is the first
    candidate, the merge is the one of the config that lists it, and the table says it joined."""
    family = llama_family(2)
    base, rest = family["base"], [family["ft-a"], family["ft-b"]]
    for where in ("listed", "joined", "table", "one"):
        (tmp_path / where).mkdir()
    listed = merge([base, *rest], tmp_path / "listed")
    joined = merge(rest, tmp_path / "joined", base_model=str(base))
    assert joined.ok()["candidates"] == [str(base), *map(str, rest)] == listed.ok()["candidates"]
    assert [c["winner"] for c in joined.result["choices"]] == [c["winner"] for c in listed.result["choices"]]
    shards = [(run.output / "model.safetensors").read_bytes() for run in (listed, joined)]
    assert shards[0] == shards[1]
    report = json.loads((joined.output / "merge_report.json").read_text())
    assert report["plan"]["base_joined"] is True
    table = merge(rest, tmp_path / "table", "--dry-run", base_model=str(base), as_json=False, quiet=False).stdout
    assert f"base_model '{base.name}' is not among models: it joins them, first" in table.splitlines()[2]

    one = merge([family["ft"]], tmp_path / "one", base_model=str(base))  # a fine-tune and its base: two candidates
    assert one.ok()["candidates"] == [str(base), str(family["ft"])]


def pinned_run(tmp_path, family, name, pin, *flags, quiet=True, as_json=True, **selection):
    """A merge of the family's base, ft-a and ft-b with selection.pin `pin` and the other `selection` keys."""
    where = tmp_path / name
    where.mkdir()
    models = [family["base"], family["ft-a"], family["ft-b"]]
    selection = {"pin": pin, **selection}
    return merge(models, where, *flags, cache=None, quiet=quiet, as_json=as_json, selection=selection)


def test_pinned_depths_take_their_candidate_and_the_rest_is_chosen_as_usual(tmp_path, llama_family):
    """selection.pin (item 13): the pinned groups come from the candidate named (as models write it, by the
    tables' short name, or base), the others as without pins; the table and the report mark them."""
    family = llama_family(3)
    free = pinned_run(tmp_path, family, "free", {}, "--dry-run").ok()["choices"]
    winners = {c["group"]: c["winner"] for c in free}
    loser = {
        g: next(m for m in map(str, (family["ft-b"], family["ft-a"], family["base"])) if m != w)
        for g, w in winners.items()
    }
    pin = {
        1: Path(loser["1"]).name,
        "non_layer": loser["non-layer"],
        0: "base" if loser["0"] == str(family["base"]) else loser["0"],
    }
    run = pinned_run(tmp_path, family, "pinned", pin)
    choices = {c["group"]: c for c in run.ok()["choices"]}
    assert {g: c["winner"] for g, c in choices.items()} == {
        "non-layer": loser["non-layer"],
        "0": loser["0"],
        "1": loser["1"],
        "2": winners["2"],
    }
    assert [c["pinned"] for c in json.loads((run.output / "merge_report.json").read_text())["plan"]["choices"]] == [
        True,
        True,
        True,
        False,
    ]
    assert f"by score {Path(winners['1']).name} would win" in choices["1"]["note"]
    with (
        safe_open(run.output / "model.safetensors", "pt") as out,
        safe_open(Path(loser["1"]) / "model.safetensors", "pt") as source,
    ):
        name = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(out.get_tensor(name), source.get_tensor(name))
    table = pinned_run(tmp_path, family, "table", pin, "--dry-run", as_json=False, quiet=False).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[3:7]}
    assert "pinned " + Path(loser["1"]).name in rows["1"] and "pinned" not in rows["2"]


def test_pins_with_tensor_granularity_fix_every_choice_at_the_depth(tmp_path, llama_family):
    family = llama_family(2)
    run = pinned_run(tmp_path, family, "tensor", {1: "ft-b"}, "--dry-run", granularity="tensor")
    at_one = [c for c in run.ok()["choices"] if c["depth"] == 1]
    assert len(at_one) > 1 and {c["winner"] for c in at_one} == {str(family["ft-b"])}
    assert all(c["pinned"] for c in at_one)


@pytest.mark.parametrize(
    "pin, options, message",
    [
        ({5: "ft-a"}, {}, "selection.pin[5]: no such depth: the base has 3 blocks (depths 0 to 2)"),
        ({1: "ft-c"}, {}, "selection.pin[1]: 'ft-c' is not one of them: the candidates are"),
        ({"non-layer": "ft-a"}, {}, "selection.pin.non-layer: unknown group 'non-layer'; did you mean 'non_layer'?"),
        ({"non_layer": "ft-a"}, {"non_layer": "base"}, "selection.non_layer: base takes the non-layer tensors"),
        ([1, 2], {}, "selection.pin: expected a mapping of depths or non_layer to candidates"),
        ({"x": "ft-a"}, {}, "selection.pin.x: expected a depth (0, 1, ...) or non_layer, found 'x'"),
    ],
)
def test_a_bad_pin_is_one_line(tmp_path, llama_family, pin, options, message):
    run = pinned_run(tmp_path, llama_family(3), "bad", pin, "--dry-run", **options)
    assert run.code == 2 and len(run.messages) == 1 and message in run.messages[0], run.stderr


def test_notes_name_candidates_as_the_tables_do(tmp_path, llama_family):
    """Item 6: a drift note (and every note of a choice) names candidates by the tables' short names,
    not by the absolute paths the config gives."""
    family = llama_family(2)
    run = merge([family["base"], family["ft"], family["alien"]], tmp_path, "--dry-run", cache=None)
    notes = [c["note"] for c in run.ok()["choices"] if c["depth"] is not None]
    assert notes and all(note.startswith("drifts (cosine below 0.5): alien ") for note in notes)
    assert not any(str(family["alien"].parent) in note for note in notes)
