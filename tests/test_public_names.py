"""An output names what it was made from without the paths of the machine that merged.

The model card, merge_report.json and every other text file a merge or an expansion writes name a
local model by its directory's name (more of its path where two share one), a text file by its
name, a hub model by its id; the report's inputs section alone holds each local model's directory,
marked `local`. The mergekit recipe keeps the paths mergekit needs to find the models.
"""

import json
import shutil
from pathlib import Path

import yaml
from helpers import REPO, merge, run_cli

from nerd.plan import short_names
from nerd.public import Names

NEEDS_PATHS = {"mergekit_config.yml"}  # the recipe: mergekit reads the models from their paths


def published_texts(out: Path) -> dict[str, str]:
    """Every text file of an output but the recipe, by name, the report without its inputs section."""
    texts = {
        p.name: p.read_text(encoding="utf-8")
        for p in out.iterdir()
        if p.is_file() and p.suffix != ".png" and p.suffix != ".safetensors" and p.name not in NEEDS_PATHS
    }
    report = json.loads(texts["merge_report.json"])
    texts["merge_report.json"] = json.dumps({k: v for k, v in report.items() if k != "inputs"})
    return texts


def test_local_models_are_named_by_their_directory(llama_family, tmp_path):
    family = llama_family(2)
    models = tmp_path / "models"
    for name, source in [("base", family["base"]), ("a/ft", family["ft-a"]), ("b/ft", family["ft-b"])]:
        shutil.copytree(source, models / name)
    text = tmp_path / "texts" / "code.txt"
    text.parent.mkdir()
    text.write_text((REPO / "examples" / "texts" / "code.txt").read_text())
    paths = [models / "base", models / "a" / "ft", models / "b" / "ft"]
    run = merge(paths, tmp_path, evaluate={"texts": [str(text)], "max_tokens": 256})
    run.ok()
    texts = published_texts(run.output)
    assert {"README.md", "merge_report.json", "config.json"} <= set(texts)
    for name, content in texts.items():
        assert str(tmp_path) not in content, name
    report = json.loads((run.output / "merge_report.json").read_text())
    assert report["inputs"] == [
        {"model": "base", "local": str(paths[0]), "revision": None, "base": True},
        {"model": "a/ft", "local": str(paths[1]), "revision": None, "base": False},
        {"model": "b/ft", "local": str(paths[2]), "revision": None, "base": False},
    ]
    assert report["plan"]["candidates"] == ["base", "a/ft", "b/ft"] and report["plan"]["base"] == "base"
    assert report["config"]["models"] == ["base", "a/ft", "b/ft"] and report["config"]["output_dir"] == "out"
    assert report["config_file"] == "m.yaml" and report["plan"]["evaluation"]["texts"] == ["code.txt"]
    assert set(report["metrics"]) == {"base", "a/ft", "b/ft"}
    assert {e["source"] for e in report["plan"]["entries"]} <= {"base", "a/ft", "b/ft"}
    card = texts["README.md"]
    assert "- `base` (base, local)\n- `a/ft` (local)\n- `b/ft` (local)\n" in card
    assert "| depth | base | a/ft | b/ft | margin | winner |" in card
    recipe = yaml.safe_load((run.output / "mergekit_config.yml").read_text())
    assert {s["model"] for piece in recipe["slices"] for s in piece["sources"]} <= {str(p) for p in paths}


def test_an_expansion_names_its_model_and_calibration_text(llama_family, tmp_path):
    calibration = tmp_path / "calib.txt"
    calibration.write_text((REPO / "examples" / "texts" / "docs.txt").read_text())
    out = tmp_path / "grown"
    code, _, stderr = run_cli(
        "expand", llama_family(2)["base"], "--out", out, "--add-layers", "1", "--calibration", calibration,
        "--quiet", "--no-cache",
    )  # fmt: skip
    assert code == 0, stderr
    family_root = str(llama_family(2)["base"].parent)
    for name, content in published_texts(out).items():
        assert str(tmp_path) not in content and family_root not in content, name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["plan"]["expansion"]["basis"].startswith("calib.txt, ")
    assert report["inputs"] == [
        {"model": "base", "local": str(llama_family(2)["base"]), "revision": None, "base": True}
    ]
    assert "from `base` by duplicating" in (out / "README.md").read_text()


def test_names_rewrite_the_longest_path_first_and_once():
    names = Names({"/m/ft": "ft", "/m/ft-b": "ft-b", "ft": "x"})
    assert names.text("'/m/ft-b' and '/m/ft' and ft") == "'ft-b' and 'ft' and x"
    assert names.applied({"/m/ft": ["/m/ft-b", 1, None]}) == {"ft": ["ft-b", 1, None]}
    assert names.applied({"output_dir": "/elsewhere/out", "texts": ["rel/a.txt"]}, paths=True) == {
        "output_dir": "out",
        "texts": ["rel/a.txt"],
    }


def test_short_names_tell_apart_models_of_one_name_without_their_root():
    assert short_names(["/x/a/ft", "/y/b/ft", "/x/base", "org/base@v1"]) == {
        "/x/a/ft": "a/ft",
        "/y/b/ft": "b/ft",
        "/x/base": "x/base",
        "org/base@v1": "org/base@v1",
    }
    assert short_names(["org/run@s1", "org/run@s2", "org/other"]) == {
        "org/run@s1": "org/run@s1",
        "org/run@s2": "org/run@s2",
        "org/other": "other",
    }
