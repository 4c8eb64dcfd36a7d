"""Lazy checkpoint reading: tensor names, shapes and dtypes up front, one tensor's data at a time.

Safetensors files (single or sharded with an index json) are parsed here, header checked against
the file, and each tensor is read with one positioned read into memory that belongs to it, so
a merge holds a few tensors at most. Pickled .bin files load only with torch's weights_only=True
and are memory-mapped.

Checkpoints are untrusted input: a truncated file, a malformed or lying header (wrong types,
duplicate names, offsets outside the data or overlapping), an index naming shards outside the
model directory or tensors its shards lack, an unsupported dtype, or a quantized checkpoint
(int8/fp8 weights, bitsandbytes/GPTQ/AWQ/fp8 tensor names, a quantization_config in config.json)
is a ModelError of one line naming the file, the tensor or key, what was expected and what was found
(the tensor names that mark a quantized checkpoint are architecture.py's; pickles load in pickled.py).
A PEFT adapter on the merge's base opens as a subclass that computes its merged tensors (loraview.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NoReturn

from .architecture import quantization_of
from .errors import ModelError, first_line, type_name
from .weightfiles import DuplicateKey, check_index, unique_keys, weight_files
from .pickled import load_pickle

if TYPE_CHECKING:
    import torch

    from .adapters import AdapterSource

# safetensors dtype -> torch's name for it; torch itself is imported only where tensors are made
# (importing it takes over a second, which a warm merge or a config error should not pay).
# Integer and bool tensors are buffers (position_ids, masks); int8 weights mean a quantized checkpoint.
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "U8": "uint8",
    "BOOL": "bool",
}
ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
QUANTIZED_DTYPES = ("I8", "int8", "qint8", "quint8", "qint32", "quint4x2", "quint2x4")  # safetensors and torch names
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
    def open(cls, directory: str | Path | AdapterSource) -> "Checkpoint":
        """The checkpoint of a model directory: every weight file found and checked (safetensors headers
        parsed, pickles loaded), no safetensors data read yet. A PEFT adapter on a base (an
        AdapterSource) opens as the base with the adapter merged in (loraview.py)."""
        from .adapters import AdapterSource, refuse_bare_adapter

        if isinstance(directory, AdapterSource):
            from .loraview import open_adapter

            return open_adapter(directory)
        directory = Path(directory)
        refuse_bare_adapter(directory)
        refuse_quantized_config(directory / "config.json")
        index, files = weight_files(directory)
        checkpoint = cls.of_files(directory, files)
        if index is not None:
            check_index(directory, index, checkpoint.tensors)
        return checkpoint

    @classmethod
    def of_files(cls, directory: Path, files: list[Path]) -> "Checkpoint":
        """The checkpoint of these weight files of a directory (each tensor in one of them)."""
        tensors: dict[str, TensorInfo] = {}
        pickles = {file: load_pickle(file) for file in files if file.suffix != ".safetensors"}
        for file in files:
            infos = safetensors_header(file) if file not in pickles else pickle_header(file, pickles[file])
            for info in infos:
                if info.name in tensors:
                    raise ModelError(
                        f"{file}: tensor '{info.name}' is also in {tensors[info.name].file.name}; "
                        f"expected each tensor in one file"
                    )
                tensors[info.name] = info
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

    def sources_of(self, name: str) -> tuple[Path, ...]:
        """The files the tensor's value is read from (its own; an adapter's merged tensor has several)."""
        return (self.tensors[name].file,)

    def read_span(self, info: TensorInfo, begin: int, end: int) -> bytearray:
        """Bytes begin..end of the tensor's safetensors file."""
        buffer = bytearray(end - begin)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = open(info.file, "rb")
            handle.seek(begin)
            count = handle.readinto(buffer)
        except OSError as exc:
            raise ModelError(f"{info.file}: tensor '{info.name}' cannot be read ({exc.strerror or exc})") from None
        if count != len(buffer):
            raise ModelError(
                f"{info.file}: tensor '{info.name}' is cut short: expected {len(buffer)} bytes at "
                f"offset {begin}, found {count} (file truncated?)"
            )
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


@contextmanager
def opened_checkpoints(directories: Mapping[str, str | Path]) -> Iterator[dict[str, Checkpoint]]:
    """The checkpoint of each model directory, by name; all closed on the way out, also when one
    of them cannot be opened."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(Checkpoint.open(path)) for name, path in directories.items()}


def refuse_quantized_config(config: Path) -> None:
    """A quantization_config in config.json means quantized weights: refused. A config.json that is
    missing or unreadable is left to the code that uses it (weights alone can be analyzed)."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return
    quantization = data.get("quantization_config") if isinstance(data, dict) else None
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
        method = method if isinstance(method, str) else "unknown method"
        raise ModelError(f"{config}: quantized checkpoint ({method}) is not supported; dequantize it first")


def refuse_quantized_names(file: Path, names: Iterable[str]) -> None:
    """Tensor names that only quantized checkpoints have (scales, packed weights, quant states): refused."""
    for name in names:
        method = quantization_of(name)
        if method is not None:
            raise ModelError(
                f"{file}: tensor '{name}': quantized checkpoint ({method}) is not supported; dequantize it first"
            )


def refuse_dtype(file: Path, name: str, dtype: object, supported: Iterable[str]) -> NoReturn:
    """A dtype mastermerge does not read, int8 and quantized ones with their own message."""
    if dtype in QUANTIZED_DTYPES:
        raise ModelError(
            f"{file}: tensor '{name}': dtype {dtype} means an integer-quantized checkpoint; quantized "
            f"checkpoints are not supported (dequantize it first)"
        )
    raise ModelError(
        f"{file}: tensor '{name}': dtype {dtype} is not supported (expected one of {', '.join(supported)})"
    )


def safetensors_header(file: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header; tensors in file order."""
    size, text = header_text(file)
    header = header_json(file, text)
    names = [name for name in header if name != "__metadata__"]
    refuse_quantized_names(file, names)
    data_start = 8 + len(text)
    infos = [tensor_info(file, name, header[name], data_start, size - data_start) for name in names]
    infos.sort(key=lambda info: (info.begin, info.end))
    refuse_overlaps(file, infos, data_start)
    return infos


def header_text(file: Path) -> tuple[int, bytes]:
    """The file's size and its header bytes, the length checked against the file and MAX_HEADER."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ModelError(
                    f"{file}: truncated safetensors file: {size} bytes, expected at least 8 (the header length)"
                )
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ModelError(
                    f"{file}: safetensors header length {length} is larger than the file ({size} bytes; "
                    f"truncated, or not a safetensors file?)"
                )
            if length > MAX_HEADER:
                raise ModelError(
                    f"{file}: safetensors header length {length} is above the {MAX_HEADER}-byte limit "
                    f"(not a safetensors file?)"
                )
            return size, handle.read(length)
    except OSError as exc:
        raise ModelError(f"{file}: cannot read ({exc.strerror or exc})") from None


def header_json(file: Path, text: bytes) -> dict:
    """The header parsed: a JSON object whose keys (tensor names, entry fields) are unique."""
    try:
        header = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise ModelError(
            f"{file}: safetensors header names '{exc.key}' twice; expected each tensor name "
            f"(and each field of an entry) once"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{file}: safetensors header is not valid JSON ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: safetensors header is a JSON {type_name(header, plain=True)}, expected an object")
    return header


def tensor_info(file: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    """One header entry checked: its dtype, its shape, and its byte range inside the data."""
    if not isinstance(entry, dict):
        raise ModelError(
            f"{file}: tensor '{name}': header entry is {type_name(entry, plain=True)}, expected an object "
            f"with dtype, shape and data_offsets"
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        refuse_dtype(file, name, dtype, SAFETENSORS_DTYPES)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ModelError(f"{file}: tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ModelError(f"{file}: tensor '{name}': data_offsets {offsets!r} is not a list of two integers")
    if offsets[0] > offsets[1]:
        raise ModelError(f"{file}: tensor '{name}': data offsets {offsets} end before they begin")
    if offsets[0] < 0 or offsets[1] > data_size:
        raise ModelError(
            f"{file}: tensor '{name}': data offsets {offsets} lie outside the data ({data_size} bytes; file truncated?)"
        )
    info = TensorInfo(name, dtype, tuple(shape), file, data_start + offsets[0], data_start + offsets[1])
    if info.end - info.begin != info.nbytes:
        raise ModelError(
            f"{file}: tensor '{name}': {info.end - info.begin} bytes for shape {shape} {dtype}, expected {info.nbytes}"
        )
    return info


def refuse_overlaps(file: Path, infos: list[TensorInfo], data_start: int) -> None:
    """Tensors (sorted by offset) must not share bytes: one tensor's data aliased by another is refused."""
    last = None
    for info in infos:
        if last is not None and info.begin < last.end and info.begin < info.end:
            raise ModelError(
                f"{file}: tensors '{last.name}' (data offsets {offsets_of(last, data_start)}) and "
                f"'{info.name}' (data offsets {offsets_of(info, data_start)}) overlap; "
                f"expected disjoint byte ranges"
            )
        if last is None or info.end > last.end:
            last = info


def offsets_of(info: TensorInfo, data_start: int) -> list[int]:
    """The tensor's data_offsets as its header wrote them."""
    return [info.begin - data_start, info.end - data_start]


def pickle_header(file: Path, state: dict) -> list[TensorInfo]:
    """The TensorInfo of every tensor of a pickled state dict, dtypes and layouts checked."""
    import torch

    refuse_quantized_names(file, state)
    names = {torch_name: name for name, torch_name in SAFETENSORS_DTYPES.items()}
    infos = []
    for name, tensor in state.items():
        torch_name = str(tensor.dtype).removeprefix("torch.")
        if torch_name not in names or tensor.is_quantized:
            refuse_dtype(file, name, torch_name, names)
        if tensor.layout != torch.strided:
            raise ModelError(
                f"{file}: tensor '{name}': layout {tensor.layout} is not supported (expected a dense, strided tensor)"
            )
        infos.append(TensorInfo(name, names[torch_name], tuple(tensor.shape), file))
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
