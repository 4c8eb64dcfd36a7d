"""Where each tensor sits in the network: its depth in the stack of transformer blocks, or none.

Works by name, with the block names of the model's family (architecture.py): model.layers.N
(Llama, Mistral, Qwen2/3, Gemma, Phi-3), transformer.h.N (GPT-2, GPT-J, Falcon), gpt_neox.layers.N
(Pythia), encoder.layer.N (BERT, RoBERTa), model.decoder.layers.N (OPT), and for a model no family
claims any of them and blocks.N. Also checks that candidates agree on every tensor name, shape and
dtype before any spectrum is computed, except for the optional tensors: those that carry nothing
learned and that one transformers version saves where another does not, so some candidates may
lack them: integer and bool tensors whatever their names, the buffers transformers computes (the
family's `buffers`: position_ids, inv_freq, GPT-2's causal mask attn.bias, ...) and a head tied to
the input embedding (its `tied_head`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .architecture import Architecture, inferred
from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, numel
from .errors import ModelError

COMPARED_ELEMENTS = 2**22  # elements of a head and its embedding compared at a time


@dataclass(frozen=True)
class OptionalTensor:
    """A tensor that some candidates lack and that carries nothing learned: why it is optional, the
    candidates that have it (in candidate order, so the first is the base when it has it), and for
    a tied head the input embedding it is tied to."""

    name: str
    why: str
    holders: tuple[str, ...]
    missing_from: tuple[str, ...]
    tied_to: str | None = None


@dataclass(frozen=True)
class Layout:
    """The block stack of an architecture: its name prefix and the depth of every tensor."""

    stack: str | None
    depths: dict[str, int | None]

    @property
    def num_layers(self) -> int:
        found = [d for d in self.depths.values() if d is not None]
        return max(found) + 1 if found else 0

    def block(self, depth: int) -> list[str]:
        """Names of the tensors of one block, in checkpoint order."""
        return [name for name, d in self.depths.items() if d == depth]

    def non_layer(self) -> list[str]:
        return [name for name, d in self.depths.items() if d is None]


def layout_of(names: list[str], architecture: Architecture | None = None) -> Layout:
    """Find the block stack (the prefix with most numbered tensors) and each tensor's depth, by the
    block names of `architecture` (default: the inferred table's, every family's at once)."""
    blocks = {name: (architecture or inferred()).block_of(name) for name in names}
    stacks = Counter(block[0] for block in blocks.values() if block)
    stack = stacks.most_common(1)[0][0] if stacks else None
    depths = {name: block[1] if block and block[0] == stack else None for name, block in blocks.items()}
    return Layout(stack=stack, depths=depths)


def check_same_architecture(
    checkpoints: dict[str, Checkpoint], *, same_dtype: bool = True, architecture: Architecture | None = None
) -> dict[str, OptionalTensor]:
    """Every candidate must have the same tensor names and shapes (and dtypes if asked) as the
    first, except that an optional tensor may be missing from some (its shape must still agree
    wherever it is present). Returns the optional tensors that some candidate lacks, by name;
    `architecture` (default: inferred) tells the optional tensors and the blocks by name."""
    architecture = architecture or inferred()
    names = list(checkpoints)
    holders: dict[str, list[str]] = {}
    for name in names:
        for tensor in checkpoints[name].tensors:
            holders.setdefault(tensor, []).append(name)
    optional = {}
    for tensor, who in holders.items():
        if len(who) < len(names):
            found = optional_tensor(tensor, who, checkpoints, architecture)
            if found is not None:
                optional[tensor] = OptionalTensor(
                    tensor, found[0], tuple(who), tuple(n for n in names if n not in who), found[1]
                )
    (first_name, first), *others = checkpoints.items()
    for name, other in others:
        problems, dtypes_differ = [], False
        for tensor in sorted(set(first.tensors) | set(other.tensors)):
            a, b = first.tensors.get(tensor), other.tensors.get(tensor)
            if tensor in optional and b is not None and a is None:  # compared with the first that has it
                a = checkpoints[holders[tensor][0]].tensors[tensor]
                if a.shape != b.shape:
                    problems.append(f"{tensor} {list(a.shape)} in '{holders[tensor][0]}' vs {list(b.shape)}")
            elif a is None or b is None:
                if tensor not in optional:
                    missing_from = name if b is None else first_name
                    problems.append(f"{tensor} missing from '{missing_from}'")
            elif a.shape != b.shape:
                problems.append(f"{tensor} {list(a.shape)} vs {list(b.shape)}")
            elif same_dtype and a.dtype != b.dtype and tensor not in optional:  # copied from one: never mixed
                problems.append(f"{tensor} {a.dtype} vs {b.dtype}")
                dtypes_differ = True
        if problems:
            raise ModelError(difference_message(first_name, first, name, other, problems, dtypes_differ))
    if layout_of(list(first.tensors), architecture).stack is None:
        raise ModelError(
            f"model '{first_name}': no numbered transformer blocks found in the tensor names "
            f"(e.g. model.layers.0...); this architecture is not supported"
        )
    return optional


def difference_message(
    first_name: str, first: Checkpoint, name: str, other: Checkpoint, problems: list[str], dtypes_differ: bool
) -> str:
    """One line on how two candidates differ: their architectures first when config.json names two,
    then the first tensors that differ (a few when the architectures differ, else up to 8), and the
    dtype hint once."""
    classes = [declared_classes(c) for c in (first, other)]
    shown = 3 if None not in classes and classes[0] != classes[1] else 8
    listed = "; ".join(problems[:shown]) + (f"; ... {len(problems) - shown} more" if len(problems) > shown else "")
    hint = " (set dtype: in the config to cast both)" if dtypes_differ else ""
    if shown == 3:
        return (
            f"models '{first_name}' and '{name}' are different architectures ({classes[0]} vs {classes[1]}): "
            f"{len(problems)} tensor(s) differ, first {listed}"
        )
    return f"models '{first_name}' and '{name}' differ in {len(problems)} tensor(s): {listed}{hint}"


def declared_classes(checkpoint: Checkpoint) -> str | None:
    """The classes config.json's `architectures` names (e.g. LlamaForCausalLM), or None."""
    try:
        found = json.loads((Path(checkpoint.directory) / "config.json").read_text(encoding="utf-8")).get(
            "architectures"
        )
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return ", ".join(map(str, found)) if isinstance(found, list) and found else None


def optional_tensor(
    tensor: str, holders: list[str], checkpoints: dict[str, Checkpoint], architecture: Architecture
) -> tuple[str, str | None] | None:
    """Why a tensor that some candidates lack carries nothing learned, and the embedding a tied
    head is tied to; None for a learned weight."""
    info = checkpoints[holders[0]].tensors[tensor]
    if all(checkpoints[h].tensors[tensor].dtype not in FLOAT_DTYPES for h in holders):
        return ("a bool buffer" if info.dtype == "BOOL" else "an integer buffer"), None
    if architecture.is_buffer(tensor):
        return "a buffer transformers computes", None
    if architecture.is_tied_head(tensor):
        embedding = tied_embedding(info, checkpoints[holders[0]].tensors, architecture)
        if embedding is not None and (
            says_tied(next(iter(checkpoints.values())))
            or all(same_values(checkpoints[h], tensor, embedding) for h in holders)
        ):
            return f"a head tied to {embedding}", embedding
    return None


def tied_embedding(head: TensorInfo, tensors: dict[str, TensorInfo], architecture: Architecture) -> str | None:
    """The one input embedding of the head's shape and dtype, if there is one."""
    found = [
        t
        for t, info in tensors.items()
        if architecture.is_word_embedding(t) and (info.shape, info.dtype) == (head.shape, head.dtype)
    ]
    return found[0] if len(found) == 1 else None


def says_tied(checkpoint: Checkpoint) -> bool:
    """Whether the model's config.json says tie_word_embeddings: true (at the top or in text_config)."""
    try:
        config = json.loads((checkpoint.directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    sections = [config, config.get("text_config")] if isinstance(config, dict) else []
    return any(isinstance(s, dict) and s.get("tie_word_embeddings") is True for s in sections)


def same_values(checkpoint: Checkpoint, a: str, b: str) -> bool:
    """Whether two tensors of a checkpoint hold the same bytes (compared a slice at a time)."""
    import torch

    infos = [checkpoint.tensors.get(a), checkpoint.tensors.get(b)]
    if None in infos or (infos[0].shape, infos[0].dtype) != (infos[1].shape, infos[1].dtype):
        return False
    n = numel(checkpoint.tensors[a].shape)
    for start in range(0, n, COMPARED_ELEMENTS):
        stop = min(start + COMPARED_ELEMENTS, n)
        x, y = checkpoint.read_flat(a, start, stop), checkpoint.read_flat(b, start, stop)
        if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            return False
    return True
