"""Hub models for real: a huggingface_hub cache built by the test, read with HF_HUB_OFFLINE=1."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import cli_command, run_process

from examples.tiny_models import build_hub_cache, build_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = build_model("llama", root / "base", seed=0)
    ft = build_model("llama", root / "ft", seed=1, base_dir=base, noise=0.05, max_shard_size="40KB")
    local = build_model("llama", root / "local-ft", seed=2, base_dir=base, noise=0.5, noise_rank=1, layers=[0])
    hf_home = root / "hf"
    commits = {
        "testorg/tiny-base": build_hub_cache(hf_home, "testorg/tiny-base", base),
        "testorg/tiny-ft": build_hub_cache(hf_home, "testorg/tiny-ft", ft, revision="v1"),
    }
    return {"root": root, "hf_home": hf_home, "commits": commits, "local": local, "base": base, "ft": ft}


def offline_env(hub, tmp_path: Path, **overrides) -> dict[str, str]:
    """This process's environment without Hugging Face settings, with the tests' hub cache offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_HOME=str(hub["hf_home"]),
        HF_HUB_OFFLINE="1",
        MASTERMERGE_CACHE=str(tmp_path / "c.sqlite"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def run_cli(hub, config: dict, tmp_path: Path, **env_overrides) -> subprocess.CompletedProcess:
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config))
    command = cli_command("--config", path, "--quiet", "--json")
    return run_process(command, env=offline_env(hub, tmp_path, **env_overrides))


def test_merge_from_offline_hub_cache(hub, tmp_path):
    out = tmp_path / "out"
    config = {
        "models": ["testorg/tiny-base", "testorg/tiny-ft@v1", str(hub["local"])],
        "base_model": "testorg/tiny-base",
        "output_dir": str(out),
    }
    run = run_cli(hub, config, tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)["results"][0]
    assert summary["written"] and summary["candidates"][0] == "testorg/tiny-base"

    report = json.loads((out / "merge_report.json").read_text())
    commits = hub["commits"]
    assert report["inputs"] == [  # hub models by their ids at the commit used, the local one by name and path
        {
            "model": "testorg/tiny-base",
            "hub": "testorg/tiny-base",
            "revision": commits["testorg/tiny-base"],
            "base": True,
        },
        {
            "model": "testorg/tiny-ft@v1",
            "hub": "testorg/tiny-ft",
            "revision": commits["testorg/tiny-ft"],
            "base": False,
        },
        {"model": "local-ft", "local": str(hub["local"]), "revision": None, "base": False},
    ]
    assert report["plan"]["candidates"] == ["testorg/tiny-base", "testorg/tiny-ft@v1", "local-ft"]
    card = (out / "README.md").read_text()
    assert "base_model:\n- testorg/tiny-base\n- testorg/tiny-ft\n" in card  # not local
    assert "- `testorg/tiny-base` (base)\n- `testorg/tiny-ft@v1`\n- `local-ft` (local)\n" in card
    published = card + json.dumps({k: v for k, v in report.items() if k != "inputs"})
    assert str(hub["hf_home"]) not in published and str(hub["root"]) not in published  # no cache or local path

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_missing_hub_model_is_named(hub, tmp_path):
    config = {
        "models": ["testorg/tiny-base", "testorg/not-there@main"],
        "base_model": "testorg/tiny-base",
        "output_dir": str(tmp_path / "out"),
    }
    run = run_cli(hub, config, tmp_path)
    assert run.returncode == 3
    assert run.stderr.strip().splitlines() == [
        "mastermerge: error: model 'testorg/not-there@main': cannot download: HF_HUB_OFFLINE is set "
        "and it is not in the local cache"
    ]
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_falls_back_to_the_cache(hub, tmp_path):
    # no HF_HUB_OFFLINE, and an endpoint that refuses connections: the cached snapshot is used
    config = {
        "models": ["testorg/tiny-base", "testorg/tiny-ft@v1"],
        "base_model": "testorg/tiny-base",
        "output_dir": str(tmp_path / "out"),
    }
    run = run_cli(
        hub,
        config,
        tmp_path,
        HF_HUB_OFFLINE=None,
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    assert run.returncode == 0, run.stderr
    config["models"][1] = "testorg/never-cached"
    config["output_dir"] = str(tmp_path / "out2")
    run = run_cli(hub, config, tmp_path, HF_HUB_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9")
    assert run.returncode == 3
    assert "model 'testorg/never-cached': cannot download: the hub cannot be reached" in run.stderr


def test_two_revisions_of_one_repo_are_two_candidates(hub, tmp_path):
    later = build_model("llama", hub["root"] / "step2", seed=7, base_dir=hub["base"], noise=0.1)
    step1 = build_hub_cache(hub["hf_home"], "testorg/run", hub["ft"], revision="step1")
    step2 = build_hub_cache(hub["hf_home"], "testorg/run", later, revision="step2")
    assert step1 != step2
    config = {
        "models": ["testorg/run@step1", {"model": "testorg/run", "revision": "step2"}],
        "base_model": "testorg/run@step1",
        "output_dir": str(tmp_path / "out"),
    }
    run = run_cli(hub, config, tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)["results"][0]
    assert summary["candidates"] == ["testorg/run@step1", "testorg/run@step2"]
    assert all(len(c["scores"]) == 2 for c in summary["choices"])
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [i["revision"] for i in report["inputs"]] == [step1, step2]


def test_analyze_from_offline_hub_cache(hub, tmp_path):
    out = tmp_path / "analysis"
    run = run_process(
        cli_command(
            "analyze", "testorg/tiny-base", "testorg/tiny-ft@v1", "--out", out, "--json", "--quiet", "--no-plots"
        ),
        env=offline_env(hub, tmp_path),
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert list(result["summary"]) == ["testorg/tiny-base", "testorg/tiny-ft@v1"]
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"testorg/tiny-base", "testorg/tiny-ft@v1"}
    assert result["spectra_computed"] + result["spectra_reused"] == len(rows) > 0
    assert result["spectra_computed"] > len(rows) / 2  # identical tensors of the two are computed once


def test_expand_a_sharded_model_from_offline_hub_cache(hub, tmp_path):
    out = tmp_path / "grown"
    run = run_process(
        cli_command(
            "expand", "testorg/tiny-ft@v1", "--out", out, "--add-layers", "1", "--init", "identity", "--json", "--quiet"
        ),
        env=offline_env(hub, tmp_path),
    )
    assert run.returncode == 0, run.stderr
    expansion = json.loads(run.stdout)["results"][0]["expansion"]
    assert expansion["importance"] == "block_influence" and "built-in calibration text" in expansion["basis"]
    ids = torch.tensor([[1, 30, 60, 90]])
    with torch.no_grad():
        before = transformers.AutoModelForCausalLM.from_pretrained(hub["ft"]).eval()(ids).logits
        after = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert "base_model:\n- testorg/tiny-ft\nbase_model_relation: merge\n" in (out / "README.md").read_text()
