"""A file named where a model directory is expected, and a relative name found nowhere: one line
that says what was given and what to give (or where it looked), exit code 2, nothing written."""

import pytest
from helpers import run_cli, write_config


@pytest.fixture
def family(llama_family):
    return llama_family(2)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_config_entry_naming_a_file_in_a_model_directory_names_the_directory(tmp_path, family, name):
    given = family["ft-a"] / name
    config = write_config(tmp_path / "m.yaml", [family["base"], given], tmp_path / "out")
    code, _, stderr = run_cli("--config", config, "--no-cache", "--quiet")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert (
        f"m.yaml: models[1]: '{given}' is a file, not a model directory; give its directory, '{family['ft-a']}'"
        in stderr
    )
    assert "does not exist" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_relative_file_names_its_directory_as_written_and_where_it_is(tmp_path, family):
    config = write_config(tmp_path / "m.yaml", [family["base"], "ft/config.json"], tmp_path / "out")
    (tmp_path / "ft").symlink_to(family["ft-a"])
    code, _, stderr = run_cli("--config", config, "--no-cache", "--quiet")
    assert code == 2
    assert "models[1]: 'ft/config.json' is a file, not a model directory; give its directory, 'ft' (" in stderr
    assert not (tmp_path / "out").exists()


def test_a_file_outside_any_model_directory_says_what_to_give(tmp_path, family):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    config = write_config(tmp_path / "m.yaml", [family["base"], notes], tmp_path / "out")
    code, _, stderr = run_cli("--config", config, "--no-cache", "--quiet")
    assert code == 2
    assert (
        f"models[1]: '{notes}' is a file, not a model directory; give the directory that holds the model's "
        f"config.json" in stderr
    )


@pytest.mark.parametrize(
    "command, extra",
    [("analyze", []), ("evaluate", ["--text", "{text}"]), ("expand", ["--add-layers", "1"])],
)
def test_a_command_given_a_weight_file_names_its_directory(tmp_path, family, command, extra):
    text = tmp_path / "t.txt"
    text.write_text("some words to measure the models on, more than a few of them.\n" * 4)
    weights = family["base"] / "model.safetensors"
    args = [a.format(text=text) for a in extra]
    code, stdout, stderr = run_cli(command, weights, "--out", tmp_path / "out", "--no-cache", *args)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    key = "MODEL" if command == "expand" else "MODEL 1"
    assert (
        f"{command}: {key}: '{weights}' is a file, not a model directory; give its directory, '{family['base']}'"
        in stderr
    )
    assert not (tmp_path / "out").exists()


def test_a_bare_name_found_nowhere_says_where_it_looked(tmp_path, family):
    config = write_config(tmp_path / "m.yaml", [family["base"], "lm-base"], tmp_path / "out")
    code, _, stderr = run_cli("--config", config, "--no-cache", "--quiet")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "models[1]: 'lm-base' is neither an existing directory nor a hub id" in stderr
    assert f"looked for the directory at {tmp_path.resolve() / 'lm-base'};" in stderr
    assert stderr.rstrip().endswith("e.g. openai-community/lm-base")


def test_a_bare_name_on_the_command_line_is_looked_for_in_the_working_directory(tmp_path, family, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("analyze", "lm-base", "--out", tmp_path / "out", "--no-cache")
    assert code == 2
    assert "analyze: MODEL 1: 'lm-base' is neither" in stderr
    assert f"looked for the directory at {tmp_path.resolve() / 'lm-base'};" in stderr
    assert "e.g. openai-community/lm-base" in stderr
    assert not (tmp_path / "out").exists()
