"""Lazy checkpoint reading: tensor names, shapes and dtypes up front, one tensor's data at a time.

Safetensors files (single or sharded with an index json) are parsed here, header checked against
the file, and each tensor is read with one positioned read into memory that belongs to it, so
a merge holds a few tensors at most. Pickled .bin files load only with torch's weights_only=True
and are memory-mapped.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError, first_line

if TYPE_CHECKING:
    import torch

# safetensors dtype -> torch's name for it; torch itself is imported only where tensors are made
# (importing it takes over a second, which a warm merge or a config error should not pay)
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype (safetensors name), shape and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * ITEMSIZES[self.dtype]

    @property
    def is_matrix(self) -> bool:
        """A 2-D floating-point weight: the tensors that get a spectrum."""
        return len(self.shape) == 2 and self.dtype in FLOAT_DTYPES and min(self.shape) > 0


class Checkpoint:
    """The weights of one model directory, read lazily."""

    def __init__(self, directory: Path, tensors: dict[str, TensorInfo]):
        self.directory = directory
        self.tensors = tensors
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, directory: str | Path) -> "Checkpoint":
        directory = Path(directory)
        files = weight_files(directory)
        tensors: dict[str, TensorInfo] = {}
        pickles = {file: load_pickle(file) for file in files if file.suffix != ".safetensors"}
        for file in files:
            infos = safetensors_header(file) if file not in pickles else pickle_header(file, pickles[file])
            for info in infos:
                if info.name in tensors:
                    raise ModelError(f"{file}: tensor '{info.name}' is also in {tensors[info.name].file.name}")
                tensors[info.name] = info
        check_index(directory, tensors)
        checkpoint = cls(directory, tensors)
        checkpoint._handles.update(pickles)
        return checkpoint

    def read(self, name: str) -> torch.Tensor:
        """The tensor's data, in memory owned by the returned tensor."""
        info = self.tensors[name]
        if info.file.suffix != ".safetensors":
            return self._handles[info.file][name]
        return as_tensor(self.read_bytes(name), info)

    def read_bytes(self, name: str) -> bytearray:
        """The tensor's raw little-endian bytes, exactly as safetensors stores them."""
        info = self.tensors[name]
        if info.file.suffix != ".safetensors":
            return bytearray(tensor_bytes(self.read(name)))
        return self.read_span(info, info.begin, info.end)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements start..stop of the tensor flattened (row-major), read on their own: a slice of
        a large tensor without the rest of it in memory."""
        info = self.tensors[name]
        if info.file.suffix != ".safetensors":
            return self.read(name).reshape(-1)[start:stop].clone()
        import torch
        size = ITEMSIZES[info.dtype]
        data = self.read_span(info, info.begin + start * size, info.begin + stop * size)
        dtype = torch_dtype(info.dtype)
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)

    def read_span(self, info: TensorInfo, begin: int, end: int) -> bytearray:
        """Bytes begin..end of the tensor's safetensors file."""
        buffer = bytearray(end - begin)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb")
        handle.seek(begin)
        if handle.readinto(buffer) != len(buffer):
            raise ModelError(f"{info.file}: tensor '{info.name}' is cut short (file truncated?)")
        return buffer

    def close(self) -> None:
        for handle in self._handles.values():
            if hasattr(handle, "close"):
                handle.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: safetensors preferred, pickled .bin otherwise."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            return [shard_path(directory, index, shard) for shard in sorted(set(index_map(index).values()))]
        if (directory / single).is_file():
            return [directory / single]
        pattern = "*" + Path(single).suffix
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found
    raise ModelError(f"{directory}: no weight files (*.safetensors or *.bin) found")


def index_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index}: not a valid index json ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index}: expected a 'weight_map' of tensor name -> shard file")
    return weight_map


def shard_path(directory: Path, index: Path, shard: str) -> Path:
    """A shard named by an index, refused if it points outside the model directory."""
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise ModelError(f"{index}: shard '{shard}' points outside the model directory; refused")
    path = directory / shard
    if not path.is_file():
        raise ModelError(f"{index}: shard '{shard}' is missing")
    return path


def check_index(directory: Path, tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index names must be in the shard it names."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if not index.is_file():
            continue
        for name, shard in index_map(index).items():
            info = tensors.get(name)
            if info is None or info.file.name != Path(shard).name:
                raise ModelError(f"{index}: tensor '{name}' is not in shard '{shard}'")
        return


def safetensors_header(file: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header; tensors in file order."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelError(f"{file}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > MAX_HEADER:
            raise ModelError(f"{file}: safetensors header length {length} is larger than the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: safetensors header is not a JSON object")
    data_start, data_size = 8 + length, size - 8 - length
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos.append(tensor_info(file, name, entry, data_start, data_size))
    return sorted(infos, key=lambda info: info.begin)


def tensor_info(file: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ModelError(f"{file}: tensor '{name}': header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise ModelError(f"{file}: tensor '{name}': dtype {dtype} is not supported "
                         f"(supported: {', '.join(SAFETENSORS_DTYPES)}; quantized formats are not)")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ModelError(f"{file}: tensor '{name}': invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ModelError(f"{file}: tensor '{name}': data offsets {offsets!r} lie outside the data "
                         f"({data_size} bytes)")
    info = TensorInfo(name, dtype, tuple(shape), file, data_start + offsets[0], data_start + offsets[1])
    if info.end - info.begin != info.nbytes:
        raise ModelError(f"{file}: tensor '{name}': {info.end - info.begin} bytes for shape {shape} "
                         f"{dtype}, expected {info.nbytes}")
    return info


def load_pickle(file: Path) -> dict:
    """A pickled state dict, loaded with weights_only=True (no code runs) and memory-mapped."""
    try:
        try:
            import torch
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or bad files
        raise ModelError(f"{file}: refused to load pickled weights with weights_only=True: {first_line(exc)}") from None
    import torch
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{file}: expected a state dict of tensors")
    return state


def pickle_header(file: Path, state: dict) -> list[TensorInfo]:
    names = {torch_name: name for name, torch_name in SAFETENSORS_DTYPES.items()}
    infos = []
    for name, tensor in state.items():
        dtype = names.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise ModelError(f"{file}: tensor '{name}': dtype {tensor.dtype} is not supported")
        infos.append(TensorInfo(name, dtype, tuple(tensor.shape), file))
    return infos


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    import torch
    return getattr(torch, SAFETENSORS_DTYPES[name])


def as_tensor(data: bytearray, info: TensorInfo) -> torch.Tensor:
    """A tensor over the given raw bytes (no copy), with the dtype and shape of `info`."""
    import torch
    dtype = torch_dtype(info.dtype)
    if not data:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (what safetensors stores)."""
    import torch
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
