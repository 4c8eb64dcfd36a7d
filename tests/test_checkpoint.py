"""The lazy reader: sharded and single files, pickles only with weights_only, bad files named.

Checkpoints are untrusted input: every damaged or unsupported file below is a real file (written
with safetensors or torch.save, then corrupted) and must give one ModelError line naming the file."""

import json
import os
import pickle
import shlex
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from nerd.checkpoint import MAX_HEADER, Checkpoint
from nerd.cli import main
from nerd.errors import ModelError


def write_model(directory, tensors, shards=1):
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "b.bias": torch.arange(5.0),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }


def header_of(file):
    """The header length and the parsed header of a safetensors file."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def replace_header(file, text: bytes):
    """Put `text` where the file's header was, the length prefix updated and the data kept."""
    raw = file.read_bytes()
    length, _ = header_of(file)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def edit_header(file, edit):
    """Apply `edit` to the parsed header and write it back."""
    _, header = header_of(file)
    edit(header)
    replace_header(file, json.dumps(header).encode())


def refused(directory, pattern, file=None) -> str:
    """Checkpoint.open fails with one line matching `pattern`, starting with the offending file."""
    with pytest.raises(ModelError, match=pattern) as info:
        Checkpoint.open(directory)
    message = str(info.value)
    assert "\n" not in message
    if file is not None:
        assert message.startswith(f"{file}: "), message
    return message


@pytest.mark.parametrize("shards", [1, 3])
def test_reads_every_tensor_exactly(tmp_path, shards):
    tensors = sample()
    write_model(tmp_path / "m", tensors, shards)
    with Checkpoint.open(tmp_path / "m") as ckpt:
        assert set(ckpt.tensors) == set(tensors)
        for name, tensor in tensors.items():
            assert ckpt.tensors[name].shape == tuple(tensor.shape)
            assert torch.equal(ckpt.read(name), tensor)
        assert ckpt.tensors["a.weight"].is_matrix and not ckpt.tensors["c.ids"].is_matrix


def test_integer_and_bool_buffers_are_read(tmp_path):
    buffers = {
        "position_ids": torch.arange(8, dtype=torch.int64).reshape(1, 8),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "u8": torch.arange(3, dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
        "w": torch.ones(2, 2),
    }
    write_model(tmp_path / "m", buffers)
    with Checkpoint.open(tmp_path / "m") as ckpt:
        for name, tensor in buffers.items():
            assert torch.equal(ckpt.read(name), tensor)


def test_safetensors_preferred_over_bin(tmp_path):
    write_model(tmp_path / "m", sample())
    torch.save({"other": torch.ones(2)}, tmp_path / "m" / "pytorch_model.bin")
    assert set(Checkpoint.open(tmp_path / "m").tensors) == set(sample())


def test_a_bin_index_beside_single_safetensors_is_not_checked(tmp_path):
    write_model(tmp_path / "m", sample())
    (tmp_path / "m" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin"}})
    )
    assert set(Checkpoint.open(tmp_path / "m").tensors) == set(sample())


# --- safetensors files cut short or with a lying header ---------------------------------------------


@pytest.mark.parametrize(
    "cut, pattern",
    [
        (lambda n, size: 0, r"truncated safetensors file: 0 bytes, expected at least 8 \(the header length\)"),
        (lambda n, size: 5, r"truncated safetensors file: 5 bytes, expected at least 8"),
        (lambda n, size: 8, r"safetensors header length \d+ is larger than the file \(8 bytes; truncated"),
        (lambda n, size: 8 + n // 2, r"safetensors header length \d+ is larger than the file"),
        (
            lambda n, size: 8 + n,
            r"tensor '.*': data offsets \[\d+, \d+\] lie outside the data \(0 bytes; file truncated",
        ),
        (
            lambda n, size: size - 1,
            r"tensor '.*': data offsets \[\d+, \d+\] lie outside the data \(\d+ bytes; file trunc",
        ),
    ],
    ids=["empty", "inside-length", "after-length", "inside-header", "after-header", "inside-data"],
)
def test_truncated_safetensors(tmp_path, cut, pattern):
    write_model(tmp_path / "m", sample())
    file = tmp_path / "m" / "model.safetensors"
    raw = file.read_bytes()
    length, _ = header_of(file)
    file.write_bytes(raw[: cut(length, len(raw))])
    refused(tmp_path / "m", pattern, file)


def test_header_length_larger_than_the_file(tmp_path):
    write_model(tmp_path / "m", sample())
    file = tmp_path / "m" / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    refused(tmp_path / "m", rf"header length 1000000000 is larger than the file \({len(raw)} bytes", file)


def test_header_above_the_limit_in_a_large_file(tmp_path):
    (tmp_path / "m").mkdir()
    file = tmp_path / "m" / "model.safetensors"
    with open(file, "wb") as f:  # a sparse file larger than the header it announces
        f.write(struct.pack("<Q", MAX_HEADER + 1) + b"{")
        f.truncate(MAX_HEADER + 4096)
    message = refused(tmp_path / "m", rf"header length {MAX_HEADER + 1} is above the {MAX_HEADER}-byte limit", file)
    assert "larger than the file" not in message


@pytest.mark.parametrize(
    "text, pattern",
    [
        (b'{"w": {"dtype": "F32", ', r"safetensors header is not valid JSON \("),
        (b'{"w\xff": {}}', r"safetensors header is not valid JSON \(.*utf-8"),
        (b"[" * 200_000 + b"]" * 200_000, r"safetensors header is not valid JSON \("),
        (b"[]", r"safetensors header is a JSON list, expected an object"),
        (b'"w"', r"safetensors header is a JSON str, expected an object"),
        (b"null", r"safetensors header is a JSON null, expected an object"),
    ],
    ids=["cut-json", "not-utf8", "deeply-nested", "list", "string", "null"],
)
def test_header_that_is_not_a_json_object(tmp_path, text, pattern):
    write_model(tmp_path / "m", {"w": torch.zeros(4, 3)})
    file = tmp_path / "m" / "model.safetensors"
    replace_header(file, text)
    refused(tmp_path / "m", pattern, file)


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        (None, 5, r"tensor 'w': header entry is int, expected an object with dtype, shape and data_offsets"),
        (None, ["F32", [4, 3], [0, 48]], r"tensor 'w': header entry is list, expected an object"),
        ("dtype", 5, r"tensor 'w': dtype 5 is not supported \(expected one of F64, F32, F16, BF16"),
        ("dtype", ["F32"], r"tensor 'w': dtype \['F32'\] is not supported"),
        ("dtype", None, r"tensor 'w': dtype None is not supported"),
        ("dtype", "f32", r"tensor 'w': dtype f32 is not supported"),
        ("shape", "4,3", r"tensor 'w': shape '4,3' is not a list of non-negative integers"),
        ("shape", [4, True], r"tensor 'w': shape \[4, True\] is not a list of non-negative integers"),
        ("shape", [4.0, 3], r"tensor 'w': shape \[4.0, 3\] is not a list"),
        ("shape", [-4, -3], r"tensor 'w': shape \[-4, -3\] is not a list of non-negative integers"),
        ("shape", None, r"tensor 'w': shape None is not a list"),
        ("data_offsets", [0, True], r"tensor 'w': data_offsets \[0, True\] is not a list of two integers"),
        ("data_offsets", [False, 48], r"tensor 'w': data_offsets \[False, 48\] is not a list of two integers"),
        ("data_offsets", [0.0, 48], r"tensor 'w': data_offsets \[0.0, 48\] is not a list of two integers"),
        ("data_offsets", [0], r"tensor 'w': data_offsets \[0\] is not a list of two integers"),
        ("data_offsets", [0, 24, 48], r"tensor 'w': data_offsets \[0, 24, 48\] is not a list of two integers"),
        ("data_offsets", "0:48", r"tensor 'w': data_offsets '0:48' is not a list of two integers"),
        ("data_offsets", [48, 0], r"tensor 'w': data offsets \[48, 0\] end before they begin"),
        ("data_offsets", [-8, 40], r"tensor 'w': data offsets \[-8, 40\] lie outside the data \(48 bytes"),
        ("data_offsets", [8, 56], r"tensor 'w': data offsets \[8, 56\] lie outside the data \(48 bytes"),
        ("data_offsets", [0, 40], r"tensor 'w': 40 bytes for shape \[4, 3\] F32, expected 48"),
        ("shape", [4, 4], r"tensor 'w': 48 bytes for shape \[4, 4\] F32, expected 64"),
    ],
)
def test_header_entries_with_wrong_types_or_values(tmp_path, field, value, pattern):
    write_model(tmp_path / "m", {"w": torch.zeros(4, 3)})
    file = tmp_path / "m" / "model.safetensors"

    def edit(header):
        if field is None:
            header["w"] = value
        else:
            header["w"][field] = value

    edit_header(file, edit)
    refused(tmp_path / "m", pattern, file)


@pytest.mark.parametrize("offsets, shown", [([0, 16], r"\[0, 16\]"), ([8, 24], r"\[8, 24\]")])
def test_overlapping_tensor_data_is_refused(tmp_path, offsets, shown):
    write_model(tmp_path / "m", {"x": torch.ones(4), "y": torch.zeros(4)})
    file = tmp_path / "m" / "model.safetensors"
    edit_header(file, lambda header: header["y"].__setitem__("data_offsets", offsets))
    refused(
        tmp_path / "m",
        rf"tensors 'x' \(data offsets \[0, 16\]\) and 'y' \(data offsets {shown}\) overlap; "
        r"expected disjoint byte ranges",
        file,
    )


@pytest.mark.parametrize(
    "duplicate, key",
    [
        (lambda h: ', "w": ' + json.dumps(h["w"]), "w"),
        (lambda h: ', "v": {"dtype": "F32", "dtype": "F16", "shape": [0], "data_offsets": [48, 48]}', "dtype"),
    ],
    ids=["tensor-name", "entry-field"],
)
def test_duplicate_keys_in_one_header_are_refused(tmp_path, duplicate, key):
    write_model(tmp_path / "m", {"w": torch.zeros(4, 3)})
    file = tmp_path / "m" / "model.safetensors"
    _, header = header_of(file)
    text = json.dumps(header)
    replace_header(file, (text[:-1] + duplicate(header) + "}").encode())
    refused(tmp_path / "m", rf"safetensors header names '{key}' twice; expected each tensor name", file)


@pytest.mark.parametrize("with_index", [True, False])
def test_duplicate_tensor_across_shards_is_refused(tmp_path, with_index):
    write_model(tmp_path / "m", sample(), shards=2)
    if not with_index:
        (tmp_path / "m" / "model.safetensors.index.json").unlink()
    second = tmp_path / "m" / "model-00002-of-00002.safetensors"
    save_file({"b.bias": torch.arange(5.0), "a.weight": torch.zeros(4, 3, dtype=torch.bfloat16)}, str(second))
    refused(
        tmp_path / "m",
        r"tensor 'a.weight' is also in model-00001-of-00002.safetensors; "
        r"expected each tensor in one file",
        second,
    )


def test_file_truncated_after_open_is_named_when_read(tmp_path):
    write_model(tmp_path / "m", {"w": torch.ones(64, 64)})
    file = tmp_path / "m" / "model.safetensors"
    with Checkpoint.open(tmp_path / "m") as ckpt:
        os.truncate(file, file.stat().st_size - 100)
        with pytest.raises(
            ModelError,
            match=r"tensor 'w' is cut short: expected 16384 bytes at offset \d+, "
            r"found 16284 \(file truncated\?\)",
        ):
            ckpt.read("w")


# --- unsupported dtypes and quantized checkpoints ---------------------------------------------------


def test_int8_weights_are_refused_as_quantized(tmp_path):
    write_model(tmp_path / "m", {"w": torch.ones(4, 4, dtype=torch.int8), "b": torch.zeros(4)})
    refused(
        tmp_path / "m",
        r"tensor 'w': dtype I8 means an integer-quantized checkpoint; quantized checkpoints are "
        r"not supported \(dequantize it first\)",
        tmp_path / "m" / "model.safetensors",
    )


@pytest.mark.parametrize(
    "torch_name, name",
    [
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("float8_e8m0fnu", "F8_E8M0"),
        ("float4_e2m1fn_x2", "F4"),
        ("uint16", "U16"),
        ("uint32", "U32"),
        ("uint64", "U64"),
    ],
)
def test_unsupported_dtypes_are_named(tmp_path, torch_name, name):
    if not hasattr(torch, torch_name):
        pytest.skip(f"this torch has no {torch_name}")
    write_model(tmp_path / "m", {"w": torch.zeros(4, 8, dtype=torch.uint8).view(getattr(torch, torch_name))})
    refused(
        tmp_path / "m",
        rf"tensor 'w': dtype {name} is not supported \(expected one of F64, F32, F16, BF16, "
        r"I64, I32, I16, U8, BOOL\)",
        tmp_path / "m" / "model.safetensors",
    )


@pytest.mark.parametrize("name", ["F6_E2M3", "F6_E3M2"])
def test_fp6_dtypes_are_named(tmp_path, name):
    write_model(tmp_path / "m", {"w": torch.zeros(4, dtype=torch.uint8)})
    file = tmp_path / "m" / "model.safetensors"
    edit_header(file, lambda header: header["w"].__setitem__("dtype", name))
    refused(tmp_path / "m", rf"tensor 'w': dtype {name} is not supported", file)


QUANTIZED = [  # tensors a quantized checkpoint has beside (or instead of) its weights, and the method named
    (
        {
            "model.layers.0.mlp.down_proj.weight": torch.ones(4, 4, dtype=torch.int8),
            "model.layers.0.mlp.down_proj.weight.SCB": torch.ones(4),
        },
        "bitsandbytes int8",
    ),
    ({"model.layers.0.mlp.down_proj.weight_format": torch.zeros(1, dtype=torch.uint8)}, "bitsandbytes int8"),
    ({"model.layers.0.mlp.down_proj.weight.absmax": torch.ones(4)}, "bitsandbytes 4-bit"),
    ({"model.layers.0.mlp.down_proj.weight.quant_map": torch.ones(16)}, "bitsandbytes 4-bit"),
    (
        {"model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)},
        "bitsandbytes 4-bit",
    ),
    ({"model.layers.0.mlp.down_proj.qweight": torch.zeros(2, 4, dtype=torch.int32)}, "GPTQ/AWQ"),
    ({"model.layers.0.mlp.down_proj.qzeros": torch.zeros(1, 1, dtype=torch.int32)}, "GPTQ/AWQ"),
    ({"model.layers.0.mlp.down_proj.scales": torch.ones(1, 4, dtype=torch.float16)}, "GPTQ/AWQ"),
    ({"model.layers.0.mlp.down_proj.g_idx": torch.zeros(4, dtype=torch.int32)}, "GPTQ/AWQ"),
    ({"model.layers.0.mlp.down_proj.weight_scale": torch.ones(())}, "fp8"),
    ({"model.layers.0.mlp.down_proj.input_scale": torch.ones(())}, "fp8"),
]


@pytest.mark.parametrize("extra, method", QUANTIZED, ids=[next(reversed(t)).split(".", 4)[-1] for t, _ in QUANTIZED])
def test_quantized_tensor_names_are_refused(tmp_path, extra, method):
    write_model(tmp_path / "m", {"model.embed_tokens.weight": torch.ones(8, 4), **extra})
    name = next(n for n in extra if not n.endswith(".weight"))
    refused(
        tmp_path / "m",
        rf"tensor '{name}': quantized checkpoint \({method}\) is not supported; "
        r"dequantize it first",
        tmp_path / "m" / "model.safetensors",
    )


@pytest.mark.parametrize(
    "quantization, method",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes"),
        ({"bits": 4}, "unknown method"),
    ],
)
def test_quantization_config_is_refused(tmp_path, quantization, method):
    write_model(tmp_path / "m", sample())
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": quantization}))
    refused(tmp_path / "m", rf"quantized checkpoint \({method}\) is not supported; dequantize it first$", config)


@pytest.mark.parametrize("config", ['{"model_type": "llama", "quantization_config": null}', "[]", "{not json"])
def test_config_without_a_quantization_config_is_fine(tmp_path, config):
    write_model(tmp_path / "m", sample())
    (tmp_path / "m" / "config.json").write_text(config)
    assert set(Checkpoint.open(tmp_path / "m").tensors) == set(sample())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda: torch.ones(4, 4, dtype=torch.int8),
            r"tensor 'w': dtype int8 means an integer-quantized checkpoint; quantized checkpoints are not supported",
        ),
        (
            lambda: torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8),
            r"tensor 'w': dtype qint8 means an integer-quantized checkpoint",
        ),
        (
            lambda: torch.zeros(4, 4).to(torch.float8_e4m3fn),
            r"tensor 'w': dtype float8_e4m3fn is not supported \(expected one of float64, float32, float16, bfloat16",
        ),
        (lambda: torch.zeros(4, 4).to(torch.float8_e5m2), r"tensor 'w': dtype float8_e5m2 is not supported"),
        (lambda: torch.zeros(4, 4, dtype=torch.uint16), r"tensor 'w': dtype uint16 is not supported"),
        (lambda: torch.zeros(4, 4, dtype=torch.complex64), r"tensor 'w': dtype complex64 is not supported"),
        (lambda: torch.eye(4).to_sparse(), r"tensor 'w': layout torch.sparse_coo is not supported \(expected a dense"),
    ],
    ids=["int8", "qint8", "float8_e4m3fn", "float8_e5m2", "uint16", "complex64", "sparse"],
)
def test_pickled_dtypes_follow_the_same_rules(tmp_path, make, pattern):
    (tmp_path / "m").mkdir()
    file = tmp_path / "m" / "pytorch_model.bin"
    torch.save({"b": torch.zeros(4), "w": make()}, file)
    refused(tmp_path / "m", pattern, file)


@pytest.mark.parametrize(
    "state, pattern",
    [
        (
            {"model.layers.0.mlp.down_proj.qweight": torch.zeros(2, 4, dtype=torch.int32)},
            r"tensor 'model.layers.0.mlp.down_proj.qweight': quantized checkpoint \(GPTQ/AWQ\) is not supported",
        ),
        ([torch.ones(2)], r"expected a state dict of tensor name -> tensor, found list"),
        ({"w": torch.ones(2), "step": 3}, r"entry 'step': expected a tensor, found int"),
        ({1: torch.ones(2)}, r"key 1: expected a tensor name \(a string\), found int"),
    ],
    ids=["quantized-name", "list", "not-a-tensor", "int-key"],
)
def test_pickled_state_dict_is_checked(tmp_path, state, pattern):
    (tmp_path / "m").mkdir()
    file = tmp_path / "m" / "pytorch_model.bin"
    torch.save(state, file)
    refused(tmp_path / "m", pattern, file)


def test_pickled_buffers_are_read(tmp_path):
    state = {"w": torch.randn(3, 3), "ids": torch.arange(4), "mask": torch.tensor([True]), "u8": torch.ones(2).byte()}
    (tmp_path / "m").mkdir()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with Checkpoint.open(tmp_path / "m") as ckpt:
        for name, tensor in state.items():
            assert torch.equal(ckpt.read(name), tensor)


@pytest.mark.parametrize(
    "data, pattern",
    [
        (b"", r"not a readable PyTorch checkpoint, damaged or truncated\? \(EOFError\)$"),
        (b"hello world" * 10, r"not a readable PyTorch checkpoint, damaged or truncated\? \("),
    ],
    ids=["empty", "garbage"],
)
def test_unreadable_pickle_is_named(tmp_path, data, pattern):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(data)
    refused(tmp_path / "m", pattern, tmp_path / "m" / "pytorch_model.bin")


def test_truncated_zip_pickle_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    file = tmp_path / "m" / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, file)
    file.write_bytes(file.read_bytes()[:5000])
    # torch's zip reader says RuntimeError or OSError depending on where the cut is
    refused(
        tmp_path / "m", r"not a readable PyTorch checkpoint, damaged or truncated\? \((RuntimeError|OSError): ", file
    )


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Exploit()}, f)
    with pytest.raises(ModelError, match=r"pytorch_model.bin: refused to load pickled weights with weights_only=True"):
        Checkpoint.open(tmp_path / "m")
    assert not marker.exists()


def test_malicious_zip_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    (tmp_path / "m").mkdir()
    file = tmp_path / "m" / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": Exploit()}, file)
    assert zipfile.is_zipfile(file)  # torch.save's own format, the one transformers writes
    message = refused(tmp_path / "m", r"refused to load pickled weights with weights_only=True: .*system", file)
    assert "weights_only` set to `False`" not in message  # torch's advice to disable the protection is not passed on
    assert not marker.exists()


# --- index json ---------------------------------------------------------------------------------------


def edit_index(directory, edit):
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data)
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_model_is_refused(tmp_path, shard):
    write_model(tmp_path / "m", sample(), shards=2)
    index = edit_index(tmp_path / "m", lambda data: data["weight_map"].__setitem__("a.weight", shard))
    refused(tmp_path / "m", rf"shard '{shard}' points outside the model directory; refused", index)


def test_symlinked_shard_is_followed(tmp_path):
    write_model(tmp_path / "m", sample(), shards=2)
    blob = tmp_path / "blobs" / "0123abcd"  # the hub cache: snapshot files are links to blobs elsewhere
    blob.parent.mkdir()
    shard = tmp_path / "m" / "model-00001-of-00002.safetensors"
    shard.rename(blob)
    shard.symlink_to(blob)
    with Checkpoint.open(tmp_path / "m") as ckpt:
        assert torch.equal(ckpt.read("a.weight"), sample()["a.weight"])


def test_index_naming_a_missing_shard(tmp_path):
    write_model(tmp_path / "m", sample(), shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match=r"shard 'model-00002-of-00002.safetensors' is missing"):
        Checkpoint.open(tmp_path / "m")


@pytest.mark.parametrize(
    "data, pattern",
    [
        (
            {"weight_map": ["model-00001-of-00002.safetensors"]},
            r"expected a 'weight_map' object of tensor name -> shard "
            r"file, found list",
        ),
        ({"metadata": {}}, r"expected a 'weight_map' object of tensor name -> shard file, found null"),
        ({"weight_map": {}}, r"expected a 'weight_map' object of tensor name -> shard file, found an empty one"),
        (["weight_map"], r"expected a JSON object with a 'weight_map', found list"),
        ({"weight_map": {"a.weight": 1}}, r"weight_map: tensor 'a.weight': expected a shard file name, found 1"),
        ({"weight_map": {"a.weight": None}}, r"weight_map: tensor 'a.weight': expected a shard file name, found None"),
    ],
    ids=["list", "missing", "empty", "not-an-object", "number", "null"],
)
def test_index_with_a_malformed_weight_map(tmp_path, data, pattern):
    write_model(tmp_path / "m", sample(), shards=2)
    index = tmp_path / "m" / "model.safetensors.index.json"
    index.write_text(json.dumps(data))
    refused(tmp_path / "m", pattern, index)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", ', r"not a valid index json \("),
        (
            '{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", '
            '"a.weight": "model-00002-of-00002.safetensors"}}',
            r"'a.weight' appears twice; expected each tensor name once",
        ),
    ],
    ids=["cut", "duplicate"],
)
def test_index_that_is_not_valid(tmp_path, text, pattern):
    write_model(tmp_path / "m", sample(), shards=2)
    index = tmp_path / "m" / "model.safetensors.index.json"
    index.write_text(text)
    refused(tmp_path / "m", pattern, index)


@pytest.mark.parametrize(
    "name, shard, found",
    [
        ("a.weight", "model-00002-of-00002.safetensors", "in 'model-00001-of-00002.safetensors'"),
        ("ghost.weight", "model-00001-of-00002.safetensors", "in no shard"),
    ],
)
def test_index_listing_a_tensor_its_shard_lacks(tmp_path, name, shard, found):
    write_model(tmp_path / "m", sample(), shards=2)
    index = edit_index(tmp_path / "m", lambda data: data["weight_map"].__setitem__(name, shard))
    refused(tmp_path / "m", rf"tensor '{name}' is not in shard '{shard}' \(found {found}\)$", index)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match=r"no weight files"):
        Checkpoint.open(tmp_path / "m")


# --- the command line ---------------------------------------------------------------------------------


def test_cli_reports_a_corrupted_candidate_in_one_line(tmp_path, capsys):
    from helpers import write_config

    from examples.tiny_models import build_model

    base = build_model("llama", tmp_path / "base", seed=0, tokenizer=False)
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.05, tokenizer=False)
    file = ft / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    out = tmp_path / "out"
    config = write_config(tmp_path / "m.yaml", [base, ft], out)
    capsys.readouterr()
    assert main(["--config", str(config), "--no-cache", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"mastermerge: error: {file}: tensor '")
    assert "lie outside the data" in err
    assert not out.exists()
