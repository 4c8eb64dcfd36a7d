"""An adapter candidate's weights, computed as they are read: the merge's base with a PEFT LoRA
adapter merged in, presented as a Checkpoint of the base's tensor table.

Every module the adapter targets reads as W + scaling * B @ A (transposed with fan_in_fan_out, and
for an embedding's lora_embedding_A/B, as peft merges them), a LoRA bias (lora_bias) as
b + scaling * the bias of B, and every tensor the adapter saves whole (modules_to_save, trained
biases) replaces the base's; scaling is lora_alpha / r (sqrt(r) with use_rslora), with rank_pattern
and alpha_pattern matched as peft matches them (adapters.py). Each merged tensor is computed on its
own when it is read, a block of rows at a time (so a large one never needs more than a few blocks
of memory; read_flat computes only the blocks of its span, the same blocks as read), in float32
(float64 where the base or the adapter is) and rounded once to the base's dtype. Float32 with
peft's order of operations, W + (B @ A) * scaling, rather than float64: where W and the update
nearly cancel, a more exact update differs from peft's merge by many units in the last place of
the (small) result, while this one gives peft's own bits (the tests measure it). Nothing else is
held: the base and the adapter are read tensor by tensor.

The table's entries name adapter_config.json as their file, so no tensor of the view is ever
copied as bytes of a file (the writer's in-kernel copy is for safetensors files only), a Ray node
finds it under the adapter's directory, and `sources_of` gives the files each value depends on:
the base's file with the adapter's weights and config, whose change invalidates the metric
cache's digest of it. An adapter tensor that fits no tensor of the base (a name it lacks, a shape
that differs, a rank other than its config's) is one ModelError line naming the file, the tensor,
and the expected and found shape.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import AdapterSource, LoraConfig, adapter_weights, read_config
from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, numel, tensor_bytes, torch_dtype
from .errors import ModelError

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."  # what peft puts before the base model's module names
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB])$")
BLOCK = 2**22  # elements of a merged tensor computed at a time (float32: 16 MiB)


@dataclass(frozen=True)
class Update:
    """How the adapter changes one tensor of the base: `kind` lora (W + scaling * B @ A, `keys` A
    and B, `transposed` for fan_in_fan_out and embeddings), bias (b + scaling * B's bias, `keys`
    that bias) or whole (replaced by the adapter's tensor, `keys` it). A lora or bias update of a
    tensor the adapter also saves whole (`replaced`) starts from that copy, as peft loads it."""

    kind: str
    keys: tuple[str, ...]
    scaling: float = 1.0
    transposed: bool = False
    replaced: str | None = None  # the adapter's own copy of the tensor updated (peft saves embeddings whole)


class AdapterCheckpoint(Checkpoint):
    """The base's tensors with the adapter merged in (see the module docstring); `base` and
    `lora` are the checkpoints it reads, closed with it."""

    def __init__(self, directory: Path, tensors: dict[str, TensorInfo], base: Checkpoint, lora: Checkpoint, updates):
        super().__init__(directory, tensors)
        self.base, self.lora, self.updates = base, lora, updates
        self.lora_file = adapter_weights(directory)

    def read(self, name: str) -> torch.Tensor:
        update = self.updates.get(name)
        if update is None:
            return self.base.read(name)
        info = self.tensors[name]
        if update.kind == "whole":
            return self.lora.read(update.keys[0]).to(torch_dtype(info.dtype))
        import torch

        blocks = [self.merged_block(name, start, stop) for start, stop in row_blocks(info)]
        return torch.cat(blocks).reshape(info.shape) if len(blocks) != 1 else blocks[0].reshape(info.shape)

    def read_bytes(self, name: str) -> bytearray:
        if name not in self.updates:
            return self.base.read_bytes(name)
        return bytearray(tensor_bytes(self.read(name)))

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements start..stop, computed in the same blocks of rows as `read` (so equal to its elements)."""
        update = self.updates.get(name)
        if update is None:
            return self.base.read_flat(name, start, stop)
        info = self.tensors[name]
        if update.kind == "whole":
            return self.lora.read_flat(update.keys[0], start, stop).to(torch_dtype(info.dtype))
        import torch

        if stop <= start:
            return torch.empty(0, dtype=torch_dtype(info.dtype))
        width = merged_shape(info)[1]
        blocks = [(first, last) for first, last in row_blocks(info) if first * width < stop and last * width > start]
        flat = torch.cat([self.merged_block(name, first, last).reshape(-1) for first, last in blocks])
        offset = blocks[0][0] * width
        return flat[start - offset : stop - offset].clone()

    def merged_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a lora or bias update's result (a bias: elements), in the base's
        dtype: W + (B @ A) * scaling (b + B's bias * scaling), in peft's order of operations, in
        float32 (float64 where the base or the adapter is), rounded once."""
        import torch

        update, info = self.updates[name], self.tensors[name]
        width = merged_shape(info)[1]
        source, tensor = (self.base, name) if update.replaced is None else (self.lora, update.replaced)
        weight = source.read_flat(tensor, start * width, stop * width).reshape(stop - start, width)
        parts = [self.lora.read(key) for key in update.keys]
        compute = torch.promote_types(torch.promote_types(weight.dtype, parts[0].dtype), torch.float32)
        if update.kind == "bias":
            delta = parts[0].to(compute)[start:stop, None] * update.scaling
        else:
            a, b = (part.to(compute) for part in parts)
            delta = ((b @ a[:, start:stop]).T if update.transposed else b[start:stop] @ a) * update.scaling
        return (weight.to(compute) + delta).to(torch_dtype(info.dtype))

    def sources_of(self, name: str) -> tuple[Path, ...]:
        """The base's file of the tensor, the adapter's weights and its config: what its value depends on."""
        return (*self.base.sources_of(name), self.lora_file, self.tensors[name].file)

    def close(self) -> None:
        self.base.close()
        self.lora.close()
        super().close()


def merged_shape(info: TensorInfo) -> tuple[int, int]:
    """The tensor as rows: a matrix's own, a vector as one element per row."""
    return (info.shape[0], info.shape[1]) if len(info.shape) == 2 else (numel(info.shape), 1)


def row_blocks(info: TensorInfo) -> list[tuple[int, int]]:
    """The rows of a merged tensor computed at a time: BLOCK elements' worth, and never a single row
    where the tensor has more (a product of one row takes another path in BLAS, which rounds
    otherwise than the whole product peft computes; of two rows or more it gives the same bits)."""
    rows, width = merged_shape(info)
    step = max(2, BLOCK // max(width, 1))
    blocks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] == 1:
        blocks[-2:] = [(blocks[-2][0], rows)]
    return blocks


def open_adapter(source: AdapterSource) -> AdapterCheckpoint:
    """The view of an adapter on its base: both opened, every adapter tensor matched to the base's."""
    config = read_config(source.adapter)
    with ExitStack() as stack:
        base = stack.enter_context(Checkpoint.open(source.base))
        lora = stack.enter_context(Checkpoint.of_files(source.adapter, [adapter_weights(source.adapter)]))
        updates = updates_of(lora, base, config)
        tensors = {name: TensorInfo(name, info.dtype, info.shape, config.file) for name, info in base.tensors.items()}
        view = AdapterCheckpoint(source.adapter, tensors, base, lora, updates)
        stack.pop_all()
    return view


def updates_of(lora: Checkpoint, base: Checkpoint, config: LoraConfig) -> dict[str, Update]:
    """Every base tensor the adapter changes, and how, each adapter tensor checked against it."""
    parts: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key, info in lora.tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"{info.file}: tensor '{key}': dtype {info.dtype}, expected a floating-point adapter weight"
            )
        found = LORA_KEY.match(key)
        if found:
            parts.setdefault(found["module"], {})[found["part"]] = key
        elif ".lora_" in key:
            raise ModelError(f"{info.file}: tensor '{key}' is not a LoRA tensor as peft saves them (lora_A/lora_B)")
        else:
            add(whole, base_name(base, lora, key, whole_name(key)), key, lora)
    updates: dict[str, Update] = {}
    for module, keys in parts.items():
        for name, update in module_updates(module, keys, lora, base, config):
            add(updates, name, dataclasses.replace(update, replaced=whole.get(name)), lora)
    updates |= {name: Update("whole", (key,)) for name, key in whole.items() if name not in updates}
    for name, update in updates.items():
        check_shapes(name, update, lora, base)
    return updates


def add(found: dict, name: str, update: Update | str, lora: Checkpoint) -> None:
    """Record what changes the base's tensor `name`; a second change of it is refused."""
    if name in found:
        keys = [u if isinstance(u, str) else u.keys[0] for u in (found[name], update)]
        raise ModelError(f"{lora.tensors[keys[1]].file}: tensors '{keys[0]}' and '{keys[1]}' both change '{name}'")
    found[name] = update


def whole_name(key: str) -> str:
    """The base tensor an adapter's saved-whole tensor replaces (modules_to_save, trained biases, an
    embedding's base_layer)."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


def module_updates(module: str, keys: dict[str, str], lora: Checkpoint, base: Checkpoint, config: LoraConfig):
    """The updates of one LoRA module: its weight's, and its bias's with lora_bias."""
    r, scaling = config.rank_and_scaling(module.removeprefix(PREFIX))
    embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
    pair = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    missing = [part for part in pair if part not in keys]
    if missing:
        key = next(iter(keys.values()))
        raise ModelError(f"{lora.tensors[key].file}: tensor '{key}' has no {module}.{missing[0]} beside it")
    a, b = keys[pair[0]], keys[pair[1]]
    if lora.tensors[a].shape[:1] != (r,):
        raise ModelError(
            f"{lora.tensors[a].file}: tensor '{a}': shape {list(lora.tensors[a].shape)}, expected rank {r} first "
            f"(r or rank_pattern of {config.file.name})"
        )
    weight = base_name(base, lora, a, module.removeprefix(PREFIX) + ".weight")
    yield weight, Update("lora", (a, b), scaling, transposed=embedding or config.fan_in_fan_out)
    if "lora_B.bias" in keys:
        yield (
            base_name(base, lora, keys["lora_B.bias"], weight.removesuffix("weight") + "bias"),
            Update("bias", (keys["lora_B.bias"],), scaling),
        )


def base_name(base: Checkpoint, lora: Checkpoint, key: str, name: str) -> str:
    """The base's tensor of that name, or the one whose name ends with it (or it with theirs: a
    base saved without its model's prefix)."""
    if name in base.tensors:
        return name
    found = [t for t in base.tensors if t.endswith("." + name) or name.endswith("." + t)]
    if len(found) == 1:
        return found[0]
    raise ModelError(
        f"{lora.tensors[key].file}: tensor '{key}': the base ({base.directory}) has no tensor '{name}'; "
        f"is the adapter for another base?"
    )


def check_shapes(name: str, update: Update, lora: Checkpoint, base: Checkpoint) -> None:
    """The adapter's tensors must fit the base's: A (r, in) and B (out, r) for W (out, in), or (in, out)
    transposed; a whole tensor or a bias of the base's shape; floating-point base weights."""
    target = base.tensors[name]
    if target.dtype not in FLOAT_DTYPES:
        raise ModelError(f"{target.file}: tensor '{name}': dtype {target.dtype}, which an adapter cannot change")
    keys = update.keys + ((update.replaced,) if update.replaced else ())
    shapes = {key: tuple(lora.tensors[key].shape) for key in keys}
    expected = dict.fromkeys(keys, tuple(target.shape))
    if update.kind == "lora":
        out, inputs = (target.shape[::-1] if update.transposed else target.shape) if len(target.shape) == 2 else (0, 0)
        r = shapes[update.keys[0]][0]
        expected |= {update.keys[0]: (r, inputs), update.keys[1]: (out, r)}
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise ModelError(
                f"{lora.tensors[key].file}: tensor '{key}': shape {list(shape)} does not fit the base's "
                f"'{name}' {list(target.shape)} (expected {list(expected[key])}); is the adapter for another base?"
            )
