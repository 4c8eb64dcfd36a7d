"""What a day of real use turned up (issue 19), each fixed and held here: --json when a config is
refused before anything runs, --quiet hiding a dry run's tables, a --cache FILE in a directory
that does not exist."""

import json

from helpers import merge, run_cli, write_config

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
