"""The weight files of a model directory: which ones (an index json and its shards, one
safetensors file, or pickled .bin files) and the index's weight map, checked (no shard outside
the directory, every tensor in the shard the index names). checkpoint.py reads what they hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError, first_line, type_name

if TYPE_CHECKING:
    from .checkpoint import TensorInfo

INDEX = "model.safetensors.index.json"  # the index of a sharded safetensors checkpoint
WEIGHT_LAYOUTS = ((INDEX, "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def weight_files(directory: Path) -> tuple[Path | None, list[Path]]:
    """The index json (None without one) and the weight files of a model directory: safetensors
    preferred, pickled .bin otherwise."""
    for index_name, single in WEIGHT_LAYOUTS:
        index = directory / index_name
        if index.is_file():
            return index, [shard_path(directory, index, shard) for shard in sorted(set(index_map(index).values()))]
        if (directory / single).is_file():
            return None, [directory / single]
        pattern = "*" + Path(single).suffix
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return None, found
    raise ModelError(f"{directory}: no weight files (*.safetensors or *.bin) found")


def index_map(index: Path) -> dict[str, str]:
    """The weight_map of an index json: tensor name -> shard file."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise ModelError(f"{index}: '{exc.key}' appears twice; expected each tensor name once") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{index}: not a valid index json ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{index}: expected a JSON object with a 'weight_map', found {type_name(data, plain=True)}")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty one" if isinstance(weight_map, dict) else type_name(weight_map, plain=True)
        raise ModelError(f"{index}: expected a 'weight_map' object of tensor name -> shard file, found {found}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ModelError(f"{index}: weight_map: tensor '{name}': expected a shard file name, found {shard!r}")
    return weight_map


def shard_path(directory: Path, index: Path, shard: str) -> Path:
    """A shard named by an index, refused if it is absolute or climbs out with '..' (a symlinked
    shard, as in the hub cache, is followed)."""
    if outside_directory(shard):
        raise ModelError(
            f"{index}: shard '{shard}' points outside the model directory; refused (expected a file inside {directory})"
        )
    path = directory / shard
    if not path.is_file():
        raise ModelError(f"{index}: shard '{shard}' is missing")
    return path


def outside_directory(shard: str) -> bool:
    """Whether an index's shard name is absolute or climbs out with '..'."""
    return Path(shard).is_absolute() or ".." in Path(shard).parts


def check_index(directory: Path, index: Path, tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index names must be in the shard it names."""
    for name, shard in index_map(index).items():
        info = tensors.get(name)
        if info is None or info.file != directory / shard:
            found = "in no shard" if info is None else f"in '{info.file.name}'"
            raise ModelError(f"{index}: tensor '{name}' is not in shard '{shard}' (found {found})")


class DuplicateKey(ValueError):
    """A JSON object names one key twice (json.loads would silently keep the last)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: the object as a dict, refused if a key repeats."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result
