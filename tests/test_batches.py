"""A batch of configs (issue 19, item 15): without --keep-going it stops at the first config refused or
failed, with it the rest still run; either way --json lists every config given, and why one never ran."""

import json

from helpers import run_cli, write_config

from examples.tiny_models import build_model


def batch(tmp_path, llama_family):
    """Four configs: a good one, one that is not YAML (refused when read), one whose candidates differ
    in shape (fails while it runs), another good one."""
    family = llama_family(2)
    models = [family["base"], family["ft"]]
    good = write_config(tmp_path / "good.yaml", models, tmp_path / "out-good")
    unreadable = tmp_path / "unreadable.yaml"
    unreadable.write_text("models: [")
    wider = build_model("llama", tmp_path / "wider", seed=5, hidden_size=64)
    mismatched = write_config(tmp_path / "mismatched.yaml", [family["base"], wider], tmp_path / "out-mismatched")
    later = write_config(tmp_path / "later.yaml", models, tmp_path / "out-later")
    return [good, unreadable, mismatched, later]


def test_without_keep_going_a_refused_config_stops_the_batch_and_json_lists_every_config(tmp_path, llama_family):
    configs = batch(tmp_path, llama_family)
    code, stdout, stderr = run_cli("--config", *configs, "--json", "--quiet", "--no-cache")
    results = json.loads(stdout)["results"]
    assert code == 2 and [r["config"] for r in results] == [str(c) for c in configs]
    assert [r["status"] for r in results] == ["skipped", "refused", "skipped", "skipped"]
    assert results[1]["exit_code"] == 2 and results[1]["error"] in stderr and "not valid YAML" in results[1]["error"]
    assert results[0]["reason"] == f"not run: {configs[1]} was refused first (--keep-going runs the rest)"
    assert not any((tmp_path / f"out-{n}").exists() for n in ("good", "mismatched", "later"))


def test_without_keep_going_a_failed_config_leaves_the_rest_skipped(tmp_path, llama_family):
    good, _, mismatched, later = batch(tmp_path, llama_family)
    code, stdout, stderr = run_cli("--config", good, mismatched, later, "--json", "--quiet", "--no-cache")
    results = json.loads(stdout)["results"]
    assert code == 3 and [r["status"] for r in results] == ["written", "failed", "skipped"]
    assert "differ" in results[1]["error"] and results[2]["reason"] == (
        f"not run: {mismatched} failed first (--keep-going runs the rest)"
    )
    assert (tmp_path / "out-good" / "model.safetensors").is_file() and not (tmp_path / "out-later").exists()


def test_keep_going_runs_every_config_it_can_and_exits_with_the_first_failure(tmp_path, llama_family):
    configs = batch(tmp_path, llama_family)
    code, stdout, stderr = run_cli("--config", *configs, "--keep-going", "--json", "--quiet", "--no-cache")
    results = json.loads(stdout)["results"]
    assert [r["status"] for r in results] == ["written", "refused", "failed", "written"]
    assert code == 2 == results[1]["exit_code"] and results[2]["exit_code"] == 3
    assert (tmp_path / "out-good" / "model.safetensors").is_file()
    assert (tmp_path / "out-later" / "model.safetensors").is_file() and not (tmp_path / "out-mismatched").exists()
    errors = [line for line in stderr.splitlines() if line.startswith("mastermerge: error: ")]
    assert errors == [f"mastermerge: error: {results[1]['error']}", f"mastermerge: error: {results[2]['error']}"]
    assert stderr.splitlines()[-1] == (
        f"mastermerge: 2 of 4 configs did not finish: {configs[1]} (refused, exit 2), {configs[2]} (failed, exit 3)"
    )


def test_keep_going_past_an_output_that_is_not_ours(tmp_path, llama_family):
    """A config refused when its output is claimed (a non-empty directory) is left out, the others run."""
    good, _, _, later = batch(tmp_path, llama_family)
    (tmp_path / "out-good").mkdir()
    (tmp_path / "out-good" / "mine.txt").write_text("the user's")
    code, stdout, _ = run_cli("--config", good, later, "--keep-going", "--json", "--quiet", "--no-cache")
    results = json.loads(stdout)["results"]
    assert code == 2 and [r["status"] for r in results] == ["refused", "written"]
    assert sorted(p.name for p in (tmp_path / "out-good").iterdir()) == ["mine.txt"]


def test_a_batch_refused_as_a_whole_lists_every_config_as_skipped(tmp_path, llama_family):
    good, _, _, later = batch(tmp_path, llama_family)
    missing = tmp_path / "nowhere" / "c.sqlite"
    code, stdout, stderr = run_cli("--config", good, later, "--keep-going", "--json", "--quiet", "--cache", missing)
    listing = json.loads(stdout)
    assert code == 2 and listing["exit_code"] == 2 and listing["error"] in stderr
    assert [r["status"] for r in listing["results"]] == ["skipped", "skipped"]
    assert listing["results"][0]["reason"] == "not run: the batch was refused"
