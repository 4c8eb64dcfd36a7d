"""Config validation: every mistake is one line naming the key and value, exit code 2, no work done."""

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from nerd.cli import main
from nerd.config import claim_output, load_config
from nerd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "models"


def write_config(tmp_path, **overrides):
    config = {
        "models": [str(EXAMPLES / "tiny-base"), str(EXAMPLES / "tiny-docs"), str(EXAMPLES / "tiny-code")],
        "base_model": str(EXAMPLES / "tiny-base"),
        "output_dir": str(tmp_path / "out"),
    }
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def error_of(path, capsys, *extra):
    code = main(["--config", str(path), "--no-cache", "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


CASES = [
    ({"dtyp": "float16"}, "dtyp: unknown key; did you mean 'dtype'?"),
    ({"granularty": "tensor"}, "granularty: unknown key; did you mean 'selection.granularity'?"),
    ({"selection": {"granulrity": "block"}}, "selection.granulrity: unknown key; did you mean 'granularity'?"),
    ({"selection": {"granularity": "layer"}}, "selection.granularity: expected one of block, tensor, found 'layer'"),
    ({"selection": "block"}, "selection: expected a mapping, found a string"),
    ({"dtype": "fp16"}, "dtype: expected one of keep, float32, float16, bfloat16, found 'fp16'"),
    ({"shard_size": "lots"}, "shard_size: expected a positive size such as 2GB or 500MB, found 'lots'"),
    ({"shard_size": -5}, "shard_size: expected a positive size"),
    ({"device": "tpu"}, "device: expected one of auto, cpu, cuda, found 'tpu'"),
    ({"models": "tiny-base"}, "models: expected a list of models, found a string"),
    (
        {"models": [str(EXAMPLES / "tiny-base")]},
        "models: at least two candidate models are needed (base_model one of them), found 1",
    ),
    ({"models": []}, "models: at least two candidate models are needed (base_model one of them), found 1"),
    (
        {"models": [str(EXAMPLES / "tiny-base"), "./no/such/dir"]},
        "models[1]: local model directory './no/such/dir' does not exist",
    ),
    ({"models": [str(EXAMPLES / "tiny-base"), 42]}, "models[1]: expected a local directory or a hub id"),
    (
        {"models": [str(EXAMPLES / "tiny-base"), "not a hub id!"]},
        "models[1]: 'not a hub id!' is neither an existing directory nor a hub id",
    ),
    (
        {"models": [str(EXAMPLES / "tiny-base"), str(EXAMPLES / "tiny-base")]},
        "models[1]: '" + str(EXAMPLES / "tiny-base") + "' repeats models[0]",
    ),
    (
        {"models": [str(EXAMPLES / "tiny-base"), {"model": "org/name", "revison": "x"}]},
        "models[1].revison: unknown key; did you mean 'revision'?",
    ),
    ({"base_model": None}, "missing required key 'base_model'"),
    ({"output_dir": 3}, "output_dir: expected a directory path, found 3"),
    ({"output_dir": "a\0b"}, "output_dir: expected a directory path, found 'a\\x00b'"),
    ({"device": "cuda"} if not __import__("torch").cuda.is_available() else {"device": "gpu"}, "device: "),
    ({"models": [str(EXAMPLES / "tiny-base"), "org/name-"]}, "models[1]: 'org/name-' is not a valid hub id"),
    ({"models": [str(EXAMPLES / "tiny-base"), "gpt2"]}, "is written org/name, e.g. openai-community/gpt2"),
    (
        {"models": [str(EXAMPLES / "tiny-base"), {"model": "org/x", "revision": 1.0}]},
        "models[1].revision: found the number 1.0; quote it",
    ),
    (
        {"output_dir": str(EXAMPLES / "tiny-docs")},
        "output_dir: '" + str(EXAMPLES / "tiny-docs") + "' overlaps the input model",
    ),
    ({"selection": {"metric": "alfa", "goal": "max"}}, "selection.metric: expected one of ner, erank, "),
    ({"selection": {"metric": "alfa", "goal": "max"}}, "found 'alfa'; did you mean 'alpha'?"),
    ({"selection": {"metric": "alpha"}}, "selection.goal: required with selection.metric: alpha"),
    ({"selection": {"metric": "alpha", "goal": "closest"}}, "selection.goal: expected one of max, min, target"),
    (
        {"selection": {"metric": "alpha", "goal": "target"}},
        "selection.target: goal: target needs a finite number, found None",
    ),
    ({"selection": {"metric": "alpha", "goal": "target", "target": "two"}}, "needs a finite number, found 'two'"),
    ({"selection": {"metric": "alpha", "goal": "target", "target": float("nan")}}, "needs a finite number, found nan"),
    ({"selection": {"goal": "min", "target": 2}}, "selection.target: only used with goal: target (goal is min)"),
    ({"metric": "alpha"}, "metric: unknown key; did you mean 'selection.metric'?"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_config_is_one_clear_line(tmp_path, capsys, overrides, message):
    path = write_config(tmp_path, **overrides)
    code, line = error_of(path, capsys)
    assert code == 2
    assert line.startswith(f"mastermerge: error: {path}: ")
    assert message in line
    assert not (tmp_path / "out").exists()


def test_output_dir_not_empty_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    path = write_config(tmp_path)
    code, line = error_of(path, capsys)
    assert code == 2 and "output_dir: '" in line and "exists and is not empty (use --force" in line
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["--config", str(path), "--no-cache", "--quiet", "--dry-run"]) == 0  # writes nothing
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    # --force replaces only a previous mastermerge output, never a directory of the user's
    code, line = error_of(path, capsys, "--force")
    assert code == 2 and "was not written by mastermerge (no merge_report.json); refusing to replace it" in line
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "merge_report.json").write_text("{}")
    config = load_config(path)  # loading judges nothing on disk; claiming the output before writing does
    claim_output(config, force=True)
    assert config.output_dir == out.resolve()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        claim_output(config)


@pytest.mark.parametrize("output", [".", "..", "{home}"])
def test_output_dir_never_contains_the_config_or_the_working_directory(tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, output_dir=output.format(home=Path.home()))
    code, line = error_of(path, capsys, "--force")
    assert code == 2 and "output_dir: '" in line
    assert "give the output a directory of its own" in line or "overlaps the Hugging Face cache" in line
    assert path.exists()


def test_mistyped_relative_path_is_not_taken_for_a_hub_id(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    path = write_config(tmp_path, models=[str(EXAMPLES / "tiny-base"), "models/tiny-dcos"])
    code, line = error_of(path, capsys)
    assert code == 2
    assert "models[1]: local model directory 'models/tiny-dcos' does not exist" in line
    assert "for the hub repo, write 'models/tiny-dcos@main'" in line


def test_duplicate_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("models: [org/a, org/b]\nbase_model: org/a\nbase_model: org/b\noutput_dir: out\n")
    code, line = error_of(path, capsys)
    assert code == 2 and "key 'base_model' is given twice" in line and "line 3" in line


def test_selection_by_metric_parses(tmp_path):
    config = load_config(write_config(tmp_path, selection={"metric": "alpha", "goal": "target", "target": 2}))
    assert (config.selection.metric, config.selection.goal, config.selection.target) == ("alpha", "target", 2.0)
    config = load_config(write_config(tmp_path, selection={"metric": "stable_rank", "goal": "min"}))
    assert (config.selection.goal, config.selection.target) == ("min", None)


def test_empty_selection_means_defaults(tmp_path):
    config = load_config(write_config(tmp_path))
    path = tmp_path / "merge.yaml"
    path.write_text(path.read_text() + "selection:\n")
    assert load_config(path).selection == config.selection


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [a, b\nbase_model: a\n")
    code, line = error_of(path, capsys)
    assert code == 2 and "not valid YAML at line" in line
    code, line = error_of(tmp_path / "missing.yaml", capsys)
    assert code == 2 and "config file not found" in line
    path.write_text("- just\n- a list\n")
    code, line = error_of(path, capsys)
    assert code == 2 and "expected a mapping of keys" in line


def test_every_config_is_validated_before_any_work(tmp_path, capsys):
    good = write_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "models": ["org/a", "org/b"],
                "base_model": "org/a",
                "output_dir": str(tmp_path / "out2"),
                "dtyp": "float16",
            }
        )
    )
    code = main(["--config", str(good), str(bad), "--no-cache", "--quiet"])
    assert code == 2
    assert "dtyp: unknown key; did you mean 'dtype'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # the good config did not run either


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    config = load_config(REPO / "mastermerge_config.yaml")
    assert config.base.path == (EXAMPLES / "tiny-base").resolve()
    assert config.output_dir == (REPO / "merged" / "tiny-composite").resolve()
    assert [c.ref for c in config.candidates][0] == "examples/models/tiny-base"


def test_hub_ids_and_revisions_parse(tmp_path):
    path = write_config(
        tmp_path,
        models=["org/base", "org/ft@v1.0", {"model": "org/other", "revision": "abc123"}],
        base_model="org/base",
    )
    config = load_config(path)
    assert [(m.repo_id, m.revision) for m in config.models] == [
        ("org/base", None),
        ("org/ft", "v1.0"),
        ("org/other", "abc123"),
    ]
    # two revisions of one repo are two candidates with names of their own
    path = write_config(
        tmp_path,
        models=["org/x@step1", {"model": "org/x", "revision": "step2"}],
        base_model={"model": "org/x", "revision": "step1"},
    )
    config = load_config(path)
    assert [c.ref for c in config.candidates] == ["org/x@step1", "org/x@step2"]


def test_no_traceback_without_debug(tmp_path):
    path = write_config(tmp_path, dtype="fp8")
    run = subprocess.run(
        [sys.executable, str(REPO / "mastermerge.py"), "--config", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    run = subprocess.run(
        [sys.executable, str(REPO / "mastermerge.py"), "--config", str(path), "--debug"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "Traceback" in run.stderr


def test_loading_changes_nothing_on_disk_and_claiming_the_output_cleans_up(tmp_path, capsys):
    path = write_config(tmp_path)
    leftover = tmp_path / ".out.mastermerge-999999999.tmp"  # what a killed run (no such process) left
    leftover.mkdir()
    config = load_config(path)
    assert leftover.exists() and not (tmp_path / "out").exists()
    claim_output(config)
    assert not leftover.exists() and "left by a run that was killed" in capsys.readouterr().err


def test_every_key_says_what_it_expects():
    """The one-line messages come from the schema: each key is a section, a choice or has a description."""
    from nerd.messages import core, description_of, field_type
    from nerd.sections import keys_of
    from nerd.schema import MergeConfig, Schema

    checked = []

    def check(schema, loc):
        annotation = field_type(MergeConfig, loc)
        inner = core(annotation)
        if isinstance(inner, type) and issubclass(inner, Schema):
            for key in keys_of(inner):
                check(schema, loc + (key,))
        elif (
            getattr(inner, "__origin__", None) is tuple
            and isinstance(core(inner.__args__[0]), type)
            and issubclass(core(inner.__args__[0]), Schema)
        ):
            check(schema, loc + (0,))
        else:
            assert description_of(annotation) or getattr(inner, "__origin__", None) is Literal, loc
            checked.append(loc)

    check(MergeConfig, ())
    assert ("evaluate", "strategies", 0, "tether", "weights") in checked and len(checked) > 40
