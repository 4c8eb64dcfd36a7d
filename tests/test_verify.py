"""Output integrity end to end: a merge records the size and SHA-256 of every weight file in
merge_report.json, and `mastermerge verify` finds every kind of damage done to the files
afterwards, each as one line naming the file, with exit code 5 and no traceback."""

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from helpers import api_merge, merge

from nerd.cli import main
from nerd.errors import IntegrityError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def models(llama_family) -> list[Path]:
    """A base of 4 layers and a fine-tune of it."""
    family = llama_family(4)
    return [family["base"], family["ft"]]


@pytest.fixture(scope="module")
def sharded(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "out"
    api_merge(models, out, shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="module")
def single(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    api_merge(models, out)
    return out


def verify(out: Path, capsys, *flags) -> tuple[int, str, list[str]]:
    """Exit code, stdout, and stderr's lines of `mastermerge verify OUT`."""
    capsys.readouterr()  # what came before
    code = main(["verify", str(out), *flags])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.splitlines()


def report_of(out: Path) -> dict:
    return json.loads((out / "merge_report.json").read_text())


def header_of(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def assert_recorded_hashes_are_the_files(out: Path) -> dict:
    files = report_of(out)["files"]
    on_disk = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name == INDEX)
    assert sorted(files) == on_disk
    for name, record in files.items():
        data = (out / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    return files


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_report_records_size_and_sha256_and_verify_passes(request, capsys, layout):
    out = request.getfixturevalue(layout)
    files = assert_recorded_hashes_are_the_files(out)
    report = report_of(out)
    if layout == "single":
        assert list(files) == report["shards"] == ["model.safetensors"]
    else:
        assert list(files) == report["shards"] + [INDEX]
        assert report["shards"] == sorted(set(json.loads((out / INDEX).read_text())["weight_map"].values()))
    code, stdout, err = verify(out, capsys)
    assert code == 0 and "verify: 100%" in "\n".join(err)  # the progress bar, on stderr
    assert stdout.strip() == (
        f"{out}: ok: {len(report['shards'])} shard(s), {len(report['plan']['entries'])} tensors, "
        f"4 layers; tokenizer files (tokenizer.json, tokenizer_config.json) parse, largest token id "
        f"127 < 128 embedding rows; {len(files)} file(s), {sum(f['bytes'] for f in files.values()):,} "
        f"bytes, match the sizes and SHA-256 of merge_report.json"
    )
    code, stdout, err = verify(out, capsys, "--quiet", "--json")
    result = json.loads(stdout)
    assert code == 0 and err == [] and result["ok"] and result["problems"] == []
    assert result["layers"] == 4 and result["shards"] == report["shards"] and result["report"]
    assert result["tokenizer"] == {
        "files": ["tokenizer.json", "tokenizer_config.json"],
        "largest_id": 127,
        "embedding_rows": 128,
    }


@pytest.mark.parametrize("path", ["kernel copy refused", "converted"])
def test_hashes_equal_the_files_whichever_way_the_bytes_went(models, tmp_path, monkeypatch, capsys, path):
    """Tensors copied through memory (no copy_file_range) and converted ones (streamed from torch)."""
    if path == "kernel copy refused":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    out = tmp_path / "out"
    api_merge(models, out, shard_size="100KB", **({"dtype": "bfloat16"} if path == "converted" else {}))
    assert_recorded_hashes_are_the_files(out)
    assert verify(out, capsys, "--quiet")[0] == 0


def test_hash_read_back_in_many_small_pieces(models, tmp_path, monkeypatch, capsys):
    """Ranges handed over tensor by tensor and read back in chunks smaller than a tensor."""
    import nerd.write

    monkeypatch.setattr(nerd.write, "HASH_BATCH", 1)
    monkeypatch.setattr(nerd.write, "HASH_CHUNK", 1000)
    out = tmp_path / "out"
    api_merge(models, out, shard_size="100KB")
    assert_recorded_hashes_are_the_files(out)
    assert verify(out, capsys, "--quiet")[0] == 0


def test_failed_write_leaves_no_hashing_thread(models, tmp_path, monkeypatch):
    import nerd.write

    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 9:
            raise OSError(28, "No space left on device")
        return real(*args)

    real = nerd.write.copied_in_kernel
    monkeypatch.setattr(nerd.write, "copied_in_kernel", failing)
    assert merge(models, tmp_path, cache=None, as_json=False, shard_size="100KB").code == 4
    assert not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("mastermerge-hash")]


def flip_byte(out: Path, name: str) -> None:
    """Flip one byte in the middle of the shard's tensor data (the header stays valid)."""
    path = out / name
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[(start + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(out: Path, name: str) -> None:
    path = out / name
    os.truncate(path, path.stat().st_size - 100)


def edit_json(out: Path, name: str, change) -> None:
    data = json.loads((out / name).read_text())
    change(data)
    (out / name).write_text(json.dumps(data, indent=2))


def shard(n: int) -> str:
    return f"model-{n:05d}-of-{{total:05d}}.safetensors"


def tensor_of(out: Path, name: str) -> str:
    """The first tensor of a shard, by its header."""
    return next(t for t in header_of(out / name) if t != "__metadata__")


# (what is done to the copy of the sharded output, the file named, the problem's text). `{total}` is
# the number of shards, `{other}` the first tensor of shard 1.
TAMPERING = {
    "flipped byte": (
        lambda out: flip_byte(out, shard(2).format(total=count(out))),
        shard(2),
        "SHA-256 {got} differs from the {recorded} that merge_report.json records (the content changed)",
    ),
    "truncated shard": (
        lambda out: truncate(out, shard(3).format(total=count(out))),
        shard(3),
        "{size:,} bytes, merge_report.json records {recorded_bytes:,} (truncated or changed)",
    ),
    "deleted shard": (
        lambda out: (out / shard(2).format(total=count(out))).unlink(),
        shard(2),
        "missing (merge_report.json records {recorded_bytes:,} bytes)",
    ),
    "extra shard": (
        lambda out: shutil.copyfile(out / shard(1).format(total=count(out)), out / "model-00099-of-00099.safetensors"),
        "model-00099-of-00099.safetensors",
        "a weight file that merge_report.json does not record (not written by this merge)",
    ),
    "appended bytes": (
        lambda out: open(out / shard(1).format(total=count(out)), "ab").write(b"\0" * 64),
        shard(1),
        "64 bytes after the last tensor's data belong to no tensor (the file is longer than its header says)",
    ),
    "index points at another shard": (
        lambda out: edit_json(
            out, INDEX, lambda d: d["weight_map"].update({other(out): shard(2).format(total=count(out))})
        ),
        INDEX,
        "tensor '{other}' points to '" + shard(2) + "', which does not hold it (it is in '" + shard(1) + "')",
    ),
    "index points outside": (
        lambda out: edit_json(out, INDEX, lambda d: d["weight_map"].update({other(out): "../elsewhere.safetensors"})),
        INDEX,
        "tensor '{other}' points to '../elsewhere.safetensors', outside the directory",
    ),
    "a shard's record removed": (
        lambda out: edit_json(out, "merge_report.json", lambda d: d["files"].pop(shard(1).format(total=count(out)))),
        shard(1),
        "has no size or SHA-256 in merge_report.json",
    ),
    "index total_size": (
        lambda out: edit_json(out, INDEX, lambda d: d["metadata"].update(total_size=12)),
        INDEX,
        "metadata.total_size is 12, the tensors hold {total_size:,} bytes",
    ),
    "num_hidden_layers": (
        lambda out: edit_json(out, "config.json", lambda d: d.update(num_hidden_layers=5)),
        "config.json",
        "num_hidden_layers is 5, the weights have 4 layers (model.layers.0 to model.layers.3)",
    ),
    "hidden_size": (
        lambda out: edit_json(out, "config.json", lambda d: d.update(hidden_size=48)),
        "config.json",
        "hidden_size is 48, the embedding matrix 'model.embed_tokens.weight' is [128, 32] (width 32)",
    ),
    "vocab_size": (
        lambda out: edit_json(out, "config.json", lambda d: d.update(vocab_size=999)),
        "config.json",
        "vocab_size is 999, but 2 tensors have 128 rows: 'lm_head.weight', 'model.embed_tokens.weight'",
    ),
    "corrupt tokenizer.json": (
        lambda out: (out / "tokenizer.json").write_text('{"version": "1.0", "model": '),
        "tokenizer.json",
        "not valid JSON (Expecting value: line 1 column 29 (char 28))",
    ),
    "corrupt config.json": (
        lambda out: (out / "config.json").write_text('{"num_hidden_layers": 4,'),
        "config.json",
        "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 25 (char 24))",
    ),
    "header length": (
        lambda out: write_at(out / shard(1).format(total=count(out)), 0, (10**9).to_bytes(8, "little")),
        shard(1),
        "safetensors header length 1000000000 is larger than the file",
    ),
}


def count(out: Path) -> int:
    return len(report_of(out)["shards"])


def other(out: Path) -> str:
    return tensor_of(out, shard(1).format(total=count(out)))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_tampered_sharded_output_is_named_in_one_line(sharded, tmp_path, capsys, tampering):
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    damage, name, message = TAMPERING[tampering]
    recorded, first = report_of(out)["files"], other(out)
    damage(out)
    name = name.format(total=count(out))
    path = out / name
    fields = {
        "total": count(out),
        "other": first,
        "recorded": recorded.get(name, {}).get("sha256"),
        "recorded_bytes": recorded.get(name, {}).get("bytes"),
        "got": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None,
        "size": path.stat().st_size if path.is_file() else None,
        "total_size": sum(f["bytes"] for n, f in recorded.items() if n != INDEX)
        - sum(8 + int.from_bytes((sharded / n).read_bytes()[:8], "little") for n in recorded if n != INDEX),
    }
    code, stdout, err = verify(out, capsys, "--quiet")
    expected = f"mastermerge: verify: {path}: {message.format(**fields)}"
    assert code == IntegrityError.exit_code == 5
    assert stdout == ""
    assert any(line.startswith(expected) for line in err), (expected, err)
    problems = err[:-1]
    assert problems and all(line.startswith("mastermerge: verify: ") for line in problems)
    if name != "config.json":  # a damaged shard is not blamed on the config
        assert not [line for line in problems if "config.json" in line]
    assert err[-1] == f"mastermerge: error: {out}: verification failed: {len(problems)} problem(s)"


@pytest.mark.parametrize("tampering", ["flipped byte", "truncated shard", "extra shard"])
def test_tampered_single_file_output(single, tmp_path, capsys, tampering):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    target = out / "model.safetensors"
    recorded = report_of(out)["files"]["model.safetensors"]
    if tampering == "flipped byte":
        flip_byte(out, "model.safetensors")
        expected = (
            f"SHA-256 {hashlib.sha256(target.read_bytes()).hexdigest()} differs from the "
            f"{recorded['sha256']} that merge_report.json records (the content changed)"
        )
    elif tampering == "truncated shard":
        truncate(out, "model.safetensors")
        expected = (
            f"{recorded['bytes'] - 100:,} bytes, merge_report.json records {recorded['bytes']:,} (truncated or changed)"
        )
    else:
        shutil.copyfile(target, out / "model-00001-of-00002.safetensors")
        target = out / "model-00001-of-00002.safetensors"
        expected = "a weight file that merge_report.json does not record (not written by this merge)"
    code, _, err = verify(out, capsys, "--quiet")
    assert code == 5 and f"mastermerge: verify: {target}: {expected}" in err, err
    assert err[-1].startswith(f"mastermerge: error: {out}: verification failed")


def test_json_lists_the_problems(sharded, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    edit_json(out, "config.json", lambda d: d.update(num_hidden_layers=7))
    code, stdout, err = verify(out, capsys, "--quiet", "--json")
    result = json.loads(stdout)
    assert code == 5 and not result["ok"]
    assert result["problems"] == [
        {
            "file": str(out / "config.json"),
            "problem": "num_hidden_layers is 7, the weights have 4 layers (model.layers.0 to model.layers.3)",
        }
    ]
    assert err == [
        f"mastermerge: verify: {out / 'config.json'}: {result['problems'][0]['problem']}",
        f"mastermerge: error: {out}: verification failed: 1 problem(s)",
    ]


def test_report_of_an_earlier_version_without_hashes(single, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    edit_json(out, "merge_report.json", lambda d: d.pop("files"))
    code, _, err = verify(out, capsys, "--quiet")
    assert code == 5 and err[0] == (
        f"mastermerge: verify: {out / 'merge_report.json'}: records no sizes or SHA-256 "
        f"hashes of the weight files (written by an earlier mastermerge); their content "
        f"cannot be checked"
    )
    assert len(err) == 2  # everything else was checked and is fine


@pytest.mark.parametrize("what", ["missing", "file", "no weights", "pickled weights"])
def test_nothing_to_verify_is_a_one_line_error(tmp_path, capsys, what):
    target = tmp_path / "x"
    if what == "file":
        target.write_text("not a directory")
    elif what != "missing":
        target.mkdir()
        (target / "config.json").write_text("{}")
        if what == "pickled weights":
            (target / "pytorch_model.bin").write_bytes(b"")
    code, stdout, err = verify(target, capsys)
    expected = {
        "missing": "no such directory",
        "file": "not a directory; expected a model directory",
        "no weights": "no weights (model.safetensors, or an index json and its shards); nothing to verify",
        "pickled weights": "holds pickled weights only ('pytorch_model.bin'); verify checks safetensors checkpoints",
    }
    assert code == 3 and stdout == "" and err == [f"mastermerge: error: {target}: {expected[what]}"]


def test_expanded_output_verifies(models, tmp_path, capsys):
    out = tmp_path / "grown"
    assert (
        main(
            [
                "expand",
                str(models[0]),
                "--out",
                str(out),
                "--layers",
                "1,3",
                "--importance",
                "ner",
                "--shard-size",
                "100KB",
                "--no-cache",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert_recorded_hashes_are_the_files(out)
    code, stdout, _ = verify(out, capsys)
    assert code == 0 and ", 6 layers;" in stdout
    edit_json(out, "config.json", lambda d: d.update(num_hidden_layers=4))  # the depth before the expansion
    code, _, err = verify(out, capsys, "--quiet")
    assert code == 5 and err[0] == (
        f"mastermerge: verify: {out / 'config.json'}: num_hidden_layers is 4, the weights "
        f"have 6 layers (model.layers.0 to model.layers.5)"
    )
