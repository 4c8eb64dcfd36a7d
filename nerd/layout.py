"""Where each tensor sits in the network: its depth in the stack of transformer blocks, or none.

Works by name for the common families: model.layers.N (Llama, Mistral, Qwen2/3, Gemma, Phi-3),
transformer.h.N (GPT-2, GPT-J, Falcon), gpt_neox.layers.N (Pythia), encoder.layer.N (BERT,
RoBERTa), model.decoder.layers.N (OPT) and blocks.N. Also checks that candidates agree on
every tensor name, shape and dtype before any spectrum is computed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import ModelError

LAYER_NAME = re.compile(r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<depth>\d+)\.")


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


def layout_of(names: list[str]) -> Layout:
    """Find the block stack (the prefix with most numbered tensors) and each tensor's depth."""
    matches = {name: LAYER_NAME.match(name) for name in names}
    stacks = Counter(m.group("stack") for m in matches.values() if m)
    stack = stacks.most_common(1)[0][0] if stacks else None
    depths = {name: int(m.group("depth")) if m and m.group("stack") == stack else None
              for name, m in matches.items()}
    return Layout(stack=stack, depths=depths)


def check_same_architecture(checkpoints: dict[str, Checkpoint], *, same_dtype: bool = True) -> None:
    """Every candidate must have the same tensor names and shapes (and dtypes if asked) as the first."""
    (first_name, first), *others = checkpoints.items()
    for name, other in others:
        problems = []
        for tensor in sorted(set(first.tensors) | set(other.tensors)):
            a, b = first.tensors.get(tensor), other.tensors.get(tensor)
            if a is None or b is None:
                missing_from = name if b is None else first_name
                problems.append(f"{tensor} missing from '{missing_from}'")
            elif a.shape != b.shape:
                problems.append(f"{tensor} {list(a.shape)} vs {list(b.shape)}")
            elif same_dtype and a.dtype != b.dtype:
                problems.append(f"{tensor} {a.dtype} vs {b.dtype} (set dtype: in the config to cast both)")
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
            raise ModelError(f"models '{first_name}' and '{name}' differ in {len(problems)} tensor(s): {shown}")
    if layout_of(list(first.tensors)).stack is None:
        raise ModelError(f"model '{first_name}': no numbered transformer blocks found in the tensor names "
                         f"(e.g. model.layers.0...); this architecture is not supported")
