"""The lazy reader: sharded and single files, pickles only with weights_only, bad files named."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from nerd.checkpoint import Checkpoint
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
    return {"a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16), "b.bias": torch.arange(5.0),
            "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4)}


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


def test_safetensors_preferred_over_bin(tmp_path):
    write_model(tmp_path / "m", sample())
    torch.save({"other": torch.ones(2)}, tmp_path / "m" / "pytorch_model.bin")
    assert set(Checkpoint.open(tmp_path / "m").tensors) == set(sample())


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


def test_index_pointing_outside_the_model_is_refused(tmp_path):
    write_model(tmp_path / "m", sample(), shards=2)
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["a.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"shard '../elsewhere.safetensors' points outside the model directory"):
        Checkpoint.open(tmp_path / "m")


def test_index_naming_a_missing_shard(tmp_path):
    write_model(tmp_path / "m", sample(), shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match=r"shard 'model-00002-of-00002.safetensors' is missing"):
        Checkpoint.open(tmp_path / "m")


def test_truncated_and_lying_headers(tmp_path):
    write_model(tmp_path / "m", sample())
    file = tmp_path / "m" / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(raw[:-10])
    with pytest.raises(ModelError, match=r"tensor '.*': data offsets .* lie outside the data"):
        Checkpoint.open(tmp_path / "m")
    file.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    with pytest.raises(ModelError, match=r"header length 1000000000 is larger than the file"):
        Checkpoint.open(tmp_path / "m")
    file.write_bytes(raw[:5])
    with pytest.raises(ModelError, match="truncated safetensors file"):
        Checkpoint.open(tmp_path / "m")


def test_no_weights_at_all(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match=r"no weight files"):
        Checkpoint.open(tmp_path / "m")
