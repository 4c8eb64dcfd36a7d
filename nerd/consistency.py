"""The checks `mastermerge verify` makes of a written model's files against each other, without
merge_report.json (nerd.verify compares them with the report): each shard's safetensors header
and its coverage of the data (check_headers), the index json against the shards (check_index),
config.json's layer count against the tensor names (check_config; its sizes against the shapes
are nerd.loadchecks'), and that the directory opens as a checkpoint (check_loads); each returns
Problems, a file and what is wrong with it in one line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .architecture import family_of
from .checkpoint import Checkpoint, TensorInfo, safetensors_header
from .errors import ModelError, first_line
from .layout import layout_of
from .weightfiles import INDEX, DuplicateKey, outside_directory, unique_keys

NAMED = 3  # tensor names shown in a line about several tensors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the output: the file it concerns and what is wrong, in one line."""

    file: Path
    message: str

    def line(self) -> str:
        return f"mastermerge: verify: {self.file}: {self.message}"


def check_headers(directory: Path, shards: list[str]) -> tuple[list[Problem], dict[str, list[TensorInfo]]]:
    """Each shard's header is valid and its tensors cover its data exactly; no tensor is in two
    shards. Returns the problems and the tensors of every shard whose header could be read."""
    problems, headers, seen = [], {}, {}
    for name in shards:
        path = directory / name
        if not is_plain_name(name) or not path.is_file():
            continue  # check_files names it
        try:
            infos = safetensors_header(path)
        except ModelError as exc:
            problems.append(Problem(path, str(exc).removeprefix(f"{path}: ")))
            continue
        problems += coverage_problems(path, infos)
        headers[name] = infos
        for info in infos:
            if info.name in seen:
                problems.append(Problem(path, f"tensor '{info.name}' is also in '{seen[info.name]}'"))
            seen.setdefault(info.name, name)
    return problems, headers


def coverage_problems(path: Path, infos: list[TensorInfo]) -> list[Problem]:
    """Bytes of the data that belong to no tensor (a gap, or bytes after the last tensor)."""
    with open(path, "rb") as handle:
        data_start = 8 + int.from_bytes(handle.read(8), "little")
    size, problems, covered = path.stat().st_size, [], data_start
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.begin > covered:
            problems.append(
                Problem(
                    path,
                    f"data bytes {covered - data_start}..{info.begin - data_start} before "
                    f"tensor '{info.name}' belong to no tensor",
                )
            )
        covered = max(covered, info.end)
    if size > covered:
        problems.append(
            Problem(
                path,
                f"{size - covered:,} bytes after the last tensor's data belong to no tensor "
                f"(the file is longer than its header says)",
            )
        )
    return problems


def check_index(
    directory: Path, shards: list[str], headers: dict[str, list[TensorInfo]], recorded: bool
) -> list[Problem]:
    """The index json (when merge_report.json records one, or there are several shards): every
    tensor maps to a shard of this output that holds it, every tensor of every shard is listed,
    and metadata.total_size is their bytes."""
    index = directory / INDEX
    if not (recorded or len(shards) > 1):
        return []  # a single file needs none (an index beside it is an extra file for check_files)
    if not index.is_file():
        return [] if recorded else [Problem(index, f"missing (the output has {len(shards)} shards)")]
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        return [Problem(index, f"tensor '{exc.key}' is listed twice")]
    except OSError as exc:
        return [Problem(index, f"cannot be read ({exc.strerror or exc})")]
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return [Problem(index, f"not valid JSON ({first_line(exc)})")]
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return [Problem(index, "has no 'weight_map' object of tensor name -> shard file")]
    problems, wrong = [], {}  # (shard named, what is wrong with it) -> the tensors pointing there
    holder = {info.name: name for name, infos in headers.items() for info in infos}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            problems.append(Problem(index, f"tensor '{tensor}' maps to {shard!r}, expected a shard file name"))
        elif outside_directory(shard):
            wrong.setdefault((shard, "outside the directory"), []).append(tensor)
        elif shard not in shards:
            what = "which is not a shard of this output" if (directory / shard).exists() else "which does not exist"
            wrong.setdefault((shard, what), []).append(tensor)
        elif shard in headers and holder.get(tensor) != shard:
            found = f"it is in '{holder[tensor]}'" if tensor in holder else "no shard holds it"
            wrong.setdefault((shard, f"which does not hold it ({found})"), []).append(tensor)
    for (shard, what), tensors in wrong.items():
        who = f"tensor '{tensors[0]}' points" if len(tensors) == 1 else f"{len(tensors)} tensors point"
        problems.append(Problem(index, f"{who} to '{shard}', {what}" + (f": {names(tensors)}" if tensors[1:] else "")))
    for shard, infos in headers.items():
        unlisted = [info.name for info in infos if info.name not in weight_map]
        if unlisted:
            problems.append(Problem(index, f"{len(unlisted)} tensor(s) of '{shard}' are not listed: {names(unlisted)}"))
    metadata = data.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if len(headers) == len(shards):
        size = sum(info.nbytes for infos in headers.values() for info in infos)
        if total is None:
            problems.append(Problem(index, f"has no metadata.total_size (the tensors hold {size:,} bytes)"))
        elif total != size:
            problems.append(Problem(index, f"metadata.total_size is {total!r}, the tensors hold {size:,} bytes"))
    return problems


def check_config(
    directory: Path, headers: dict[str, list[TensorInfo]], complete: bool = True
) -> tuple[list[Problem], int | None]:
    """config.json parses and its layer count is the number of blocks in the tensor names
    (compared only when every shard's header could be read: `complete`), the keys and names
    those of the model's family (architecture.py); its sizes against the tensors' shapes are
    nerd.loadchecks'. Returns the problems and the layers found."""
    path = directory / "config.json"
    infos = {info.name: info for shard in headers.values() for info in shard}
    config, problem = read_config(path)
    architecture = family_of(config)  # the inferred table without a config.json
    layout = layout_of(list(infos), architecture)
    layers = layout.num_layers if layout.stack is not None else None
    if problem is not None:
        return [Problem(path, problem)], layers
    if not complete:
        return [], None
    section, prefix = architecture.layer_section(config)
    key = next((k for k in architecture.layer_count_keys if k in section), None)
    if key is None or layers is None:
        return [], layers
    value = section[key]
    if type(value) is not int:
        return [Problem(path, f"{prefix}{key} is {value!r}, expected an integer ({layers} in the weights)")], layers
    if value != layers:
        return [
            Problem(
                path,
                f"{prefix}{key} is {value}, the weights have {layers} layers "
                f"({layout.stack}.0 to {layout.stack}.{layers - 1})",
            )
        ], layers
    return [], layers


def read_config(path: Path) -> tuple[dict | None, str | None]:
    """A JSON file's object (config.json's, a tokenizer's settings), or None and what is wrong with the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({first_line(exc)})"
    if not isinstance(config, dict):
        return None, f"a JSON {type(config).__name__}, expected an object"
    return config, None


def check_loads(directory: Path) -> list[Problem]:
    """The directory opens as a checkpoint the way a merge reads its inputs (nerd.checkpoint)."""
    try:
        Checkpoint.open(directory).close()
    except ModelError as exc:
        return [Problem(directory, first_line(exc))]
    return []


def is_plain_name(name: str) -> bool:
    """A file name of the directory itself: no folder, no '..', not absolute."""
    return bool(name) and Path(name).name == name and name not in (".", "..")


def names(items: list[str]) -> str:
    """The first NAMED names, quoted, and how many more."""
    more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
    return ", ".join(f"'{n}'" for n in items[:NAMED]) + more
