"""The mergekit recipe of every plan (nerd/recipe.py), run through real mergekit (`mergekit-yaml`):
its tensors against ours, for a selection (passthrough), tensor granularity and blends (linear),
DLEC copies with zeroed projections (repeated slices, scale 0), a bfloat16 family and hub models
from an offline cache; and `--emit-mergekit FILE` from a dry run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_family, merge, run_cli, write_config
from safetensors.torch import load_file

from examples.tiny_models import build_hub_cache, build_model

MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found |= load_file(shard)
    return found


def rebuilt(recipe: Path, out: Path, env: dict | None = None, *flags: str) -> dict[str, torch.Tensor]:
    """The tensors mergekit writes from a recipe."""
    command = [str(MERGEKIT), str(recipe), str(out), "--copy-tokenizer", *flags]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return tensors_of(out)


def within_float32_rounding(ours: torch.Tensor, theirs: torch.Tensor, members: list[torch.Tensor]) -> bool:
    """Whether two blends of the same members differ by no more than float32 rounding of the sum
    can: a few units of float32's epsilon times the sum of the terms' magnitudes, element by element
    (where the terms cancel, that is many units in the last place of the small result)."""
    scale = sum(m.double().abs() for m in members) / len(members)
    return bool(((ours.double() - theirs.double()).abs() <= 4 * torch.finfo(torch.float32).eps * scale).all())


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-family")
    return build_family(root, num_layers=4)


@pytest.mark.parametrize(
    "name, options, method",
    [
        ("selection", {}, "passthrough"),
        ("tensor granularity", {"selection": {"granularity": "tensor"}}, "linear"),
        ("dlec identity copies", {"dlec": {"add_layers": 2, "importance": "ner", "init": "identity"}}, "passthrough"),
    ],
)
def test_mergekit_rebuilds_every_tensor_where_nothing_is_blended(tmp_path, family, name, options, method):
    run = merge(family, tmp_path, **options)
    run.ok()
    recipe = run.output / "mergekit_config.yml"
    loaded = yaml.safe_load(recipe.read_text())
    assert loaded["merge_method"] == method
    ours, theirs = tensors_of(run.output), rebuilt(recipe, tmp_path / "mergekit")
    assert sorted(theirs) == sorted(ours)
    different = [n for n in ours if not torch.equal(ours[n], theirs[n])]  # equal values (a zero may be -0.0)
    assert different == [], name
    if "dlec" in options:
        zeroed = [n for n, t in ours.items() if not t.any()]
        assert zeroed and all(not theirs[n].any() for n in zeroed)
        assert len(loaded["slices"]) > 3  # the copies are slices of their own, their sources repeated
    sources = {s["model"] for piece in loaded["slices"] for s in piece["sources"]}
    assert sources <= {str(p) for p in family} and len(sources) >= 2


def test_a_blend_is_rebuilt_to_float32_rounding(tmp_path, family):
    run = merge(family, tmp_path, tether={"mode": "blend"})
    plan = json.loads((run.output / "merge_report.json").read_text())["plan"]["entries"]
    assert any(e["transform"] == "blend" for e in plan)
    ours, theirs = tensors_of(run.output), rebuilt(run.output / "mergekit_config.yml", tmp_path / "mergekit")
    assert sorted(theirs) == sorted(ours)
    blended = {e["name"] for e in plan if e["transform"] == "blend"}
    members = [tensors_of(model) for model in family]
    assert all(within_float32_rounding(ours[n], theirs[n], [m[n] for m in members]) for n in blended)
    assert any(not torch.equal(ours[n], theirs[n]) for n in blended)  # ours sums in float64, mergekit in float32
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if n not in blended)


def test_a_bfloat16_family_is_rebuilt_in_bfloat16(tmp_path):
    base = build_model("llama", tmp_path / "base", num_layers=3, dtype="bfloat16")
    fine_tunes = [
        build_model("llama", tmp_path / f"ft-{seed}", seed=seed, base_dir=base, noise=0.3, dtype="bfloat16")
        for seed in (1, 2)
    ]
    run = merge([base, *fine_tunes], tmp_path, selection={"granularity": "tensor"})
    run.ok()
    ours, theirs = tensors_of(run.output), rebuilt(run.output / "mergekit_config.yml", tmp_path / "mergekit")
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16}
    assert all(torch.equal(ours[n], theirs[n]) for n in ours) and sorted(theirs) == sorted(ours)


def test_hub_models_are_named_at_the_commit_the_plan_used(tmp_path):
    base = build_model("llama", tmp_path / "base", seed=0, num_layers=3)
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.3)
    hf_home = tmp_path / "hf"
    commits = {repo: build_hub_cache(hf_home, repo, path) for repo, path in (("org/base", base), ("org/ft", ft))}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    config = write_config(tmp_path / "m.yaml", ["org/base", "org/ft"], tmp_path / "out")
    run = subprocess.run(
        [sys.executable, "-m", "nerd.cli", "--config", str(config), "--quiet", "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 0, run.stderr
    recipe = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    models = {s["model"] for piece in recipe["slices"] for s in piece["sources"]}
    assert (
        models <= {f"{repo}@{commit}" for repo, commit in commits.items()} and "org/ft@" + commits["org/ft"] in models
    )
    # mergekit asks the hub for a repo's file list even offline: it is given the snapshot of each
    # commit instead, which huggingface_hub finds in the cache by that commit alone
    local = tmp_path / "local-recipe.yml"
    text = (tmp_path / "out" / "mergekit_config.yml").read_text()
    for repo, commit in commits.items():
        snapshot = hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        assert snapshot.is_dir()
        text = text.replace(f"{repo}@{commit}", str(snapshot))
    local.write_text(text)
    theirs = rebuilt(local, tmp_path / "mergekit", env=env)
    ours = tensors_of(tmp_path / "out")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_emit_mergekit_from_a_dry_run_writes_the_recipe_alone(tmp_path, family):
    target = tmp_path / "recipe.yml"
    config = write_config(tmp_path / "m.yaml", family, tmp_path / "out")
    code, stdout, stderr = run_cli("--config", config, "--dry-run", "--no-cache", "--emit-mergekit", target)
    assert code == 0, stderr
    assert not (tmp_path / "out").exists() and f"wrote {target}" in stdout
    written = target.read_text()
    (tmp_path / "full").mkdir()
    merged = merge(family, tmp_path / "full")
    merged.ok()
    assert written == (merged.output / "mergekit_config.yml").read_text()

    code, _, stderr = run_cli("--config", config, "--dry-run", "--no-cache", "--emit-mergekit", target)
    assert code == 2 and stderr.splitlines() == [
        f"mastermerge: error: --emit-mergekit {target}: a file that exists (give --force to replace it)"
    ]
    target.write_text("mine")
    code, _, stderr = run_cli("--config", config, "--dry-run", "--no-cache", "--force", "--emit-mergekit", target)
    assert code == 0 and target.read_text() == written, stderr

    other = write_config(tmp_path / "n.yaml", family, tmp_path / "out2")
    code, _, stderr = run_cli(
        "--config", config, other, "--dry-run", "--no-cache", "--emit-mergekit", tmp_path / "x.yml"
    )
    assert code == 2 and not (tmp_path / "x.yml").exists()
    assert stderr.splitlines() == [
        f"mastermerge: error: --emit-mergekit {tmp_path / 'x.yml'}: one recipe is written, of one config; "
        "found 2 configs"
    ]


def test_expand_holds_the_recipe_of_its_copies(tmp_path, family):
    code, _, stderr = run_cli(
        "expand",
        family[0],
        "--out",
        tmp_path / "out",
        "--add-layers",
        "2",
        "--importance",
        "ner",
        "--no-cache",
        "--quiet",
    )
    assert code == 0, stderr
    recipe = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    ranges = [s["layer_range"] for piece in recipe["slices"] for s in piece["sources"]]
    covered = [d for start, stop in ranges for d in range(start, stop)]
    assert len(covered) == 6 and sorted(set(covered)) == [0, 1, 2, 3]  # two blocks twice
    ours, theirs = tensors_of(tmp_path / "out"), rebuilt(tmp_path / "out" / "mergekit_config.yml", tmp_path / "mk")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_a_lora_adapter_is_named_base_plus_adapter_and_rebuilt_by_mergekit(tmp_path):
    """mergekit merges the adapter into the base with peft (merge_and_unload) and takes its blocks
    from that: the same tensors as the adapter's view here (which equals peft's merge)."""
    from test_adapters import LLAMA_ALL, make_adapter

    base = build_model("llama", tmp_path / "base", seed=0, num_layers=4)
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.1)
    lora = make_adapter(base, tmp_path / "lora", seed=3, b_scale=0.02, r=8, lora_alpha=16, target_modules=LLAMA_ALL)
    run = merge([base, ft, lora], tmp_path)
    run.ok()
    text = (run.output / "mergekit_config.yml").read_text()
    recipe = yaml.safe_load(text)
    models = {s["model"] for piece in recipe["slices"] for s in piece["sources"]}
    assert f"{base}+{lora}" in models and "--lora-merge-cache" in text
    ours = tensors_of(run.output)
    theirs = rebuilt(
        run.output / "mergekit_config.yml", tmp_path / "mk", None, "--lora-merge-cache", str(tmp_path / "lc")
    )
    assert sorted(theirs) == sorted(ours) and all(torch.equal(ours[n], theirs[n]) for n in ours)
