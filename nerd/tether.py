"""Tethers: how compatible each candidate's blocks still are with the base's, and blended tensors.

The DTNN write-up gives every layer a tether: two models' layers merge (their states are averaged)
when their tethers are compatible, and drift apart when they are not. Here a candidate's tether
at depth d is its block's weight matrices, compared with the base's block at the same depth:

- cosine (default): the cosine similarity of the block's 2-D weight matrices, each model's
  flattened into one vector, <c, b> / (|c| |b|). Fine-tuning moves a vector of millions of
  entries by a small fraction of its length, so a fine-tune of the base stays close to 1; an
  unrelated model of the same shapes (another pre-training, another random init) scores about 0,
  since independent high-dimensional vectors are nearly orthogonal.
- min_cosine: the smallest cosine of the block's matrices taken one at a time, so a single
  matrix that drifted (retrained attention) gates the block where the size-weighted cosine would
  hide it behind the larger MLP matrices. A matrix that is all zero on either side has no cosine
  and is left out.
- l2: 1 - |c - b| / |b| over the block's matrices: 1 for an identical block, 1 - r for a fine-tune
  that moved the weights by the fraction r of their norm, about 1 - sqrt(2) = -0.41 for an
  unrelated model of the same scale. Unlike the cosines it also sees a block that was rescaled.

Norms and biases (1-D tensors) are left out of the score: norm gains start at 1 in every model,
so they would make unrelated models look alike. A score comes from three sums per pair of
tensors, <c, b>, |c|^2 and |b|^2, accumulated in float64 a slice at a time (never a whole matrix
in float64) and cached in the metric cache under the two tensors' content digests, so a warm run
compares nothing. The sums are taken over every floating-point tensor of the group, so a NaN or
Inf anywhere in it (a norm included) is seen: such a block has no score, and neither has one
whose matrices are all zero on either side (min_cosine: on both sides of every matrix).

A candidate whose score at a depth is below tether.min_compatibility drifts there: it cannot
win that depth (mode select) or join its average (mode blend). The base is always eligible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tqdm import tqdm

from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, numel
from .config import Selection
from .engine import Pair
from .layout import Layout
from .plan import PlanEntry, Tethers
from .tethersums import Sums, slices

if TYPE_CHECKING:
    import torch

    from .engine import Engine

NON_LAYER = "non-layer"


def tether_groups(layout: Layout, infos: dict[str, TensorInfo], selection: Selection) -> dict[str, list[str]]:
    """The floating-point tensors compared for each group: every depth's block, and the non-layer
    group when it competes (taken from the base, it needs no gate). The layout holds the tensors
    every candidate has: optional ones that some lack (buffers, a tied head) are not compared."""

    def floats(tensors):
        return [t for t in tensors if infos[t].dtype in FLOAT_DTYPES]

    groups = {str(d): floats(layout.block(d)) for d in range(layout.num_layers)}
    if selection.non_layer == "compete":
        groups = {NON_LAYER: floats(layout.non_layer())} | groups
    return groups


def compatibility_of(
    checkpoints: dict[str, Checkpoint],
    groups: dict[str, list[str]],
    base: str,
    others: list[str],
    measure: str,
    engine: Engine,
    quiet: bool = False,
) -> dict[str, dict[str, float | None]]:
    """Group -> candidate (other than the base) -> its compatibility with the base's group."""
    scores: dict[str, dict[str, float | None]] = {}
    with tqdm(total=len(others) * sum(map(len, groups.values())), desc="tethers", unit="tensor", disable=quiet) as bar:
        for group, tensors in groups.items():
            scores[group] = {}
            for candidate in others:
                pairs = [Pair(checkpoints[candidate], checkpoints[base], tensor) for tensor in tensors]
                sums = {pair.tensor: s for pair, s in engine.tether_sums(pairs, bar).items()}
                finite = all(s is not None for s in sums.values())
                matrices = [s for t, s in sums.items() if checkpoints[base].tensors[t].is_matrix]
                scores[group][candidate] = compatibility(matrices, measure) if finite else None
    return scores


def compatibility(sums: list[Sums], measure: str) -> float | None:
    """One block's score from its matrices' sums (see the module docstring), None where undefined."""
    if not sums:
        return None
    if measure == "min_cosine":
        cosines = [dot / (math.sqrt(c_sq) * math.sqrt(b_sq)) for dot, c_sq, b_sq in sums if c_sq > 0 and b_sq > 0]
        return min(cosines) if cosines else None
    dot, c_sq, b_sq = (math.fsum(column) for column in zip(*sums))
    if b_sq == 0 or (measure == "cosine" and c_sq == 0):
        return None
    if measure == "l2":
        score = 1 - math.sqrt(max(c_sq + b_sq - 2 * dot, 0.0)) / math.sqrt(b_sq)
    else:
        score = dot / (math.sqrt(c_sq) * math.sqrt(b_sq))
    return score if math.isfinite(score) else None


def tether_warnings(tethers: Tethers, others: list[str]) -> list[str]:
    """What the gate means for the merge as a whole: which candidates are compatible with the base
    at no depth, and, when none is, that the models do not look like fine-tunes of one base."""
    scores, options, base = tethers.scores, tethers.options, tethers.base
    depths = [g for g in scores if g != NON_LAYER]

    def best(candidate):
        known = [scores[g][candidate] for g in depths if scores[g][candidate] is not None]
        return max(known) if known else None

    far = [c for c in others if depths and not any(tethers.eligible(g, c) for g in depths)]
    if not far:
        return []
    if len(far) == len(others):
        known = [b for b in map(best, far) if b is not None]
        top = f"best {options.measure} {max(known):.4g}" if known else f"no {options.measure} could be computed"
        return [
            f"no candidate is compatible with the base '{base}' at any depth ({top}, "
            f"tether.min_compatibility {options.min_compatibility:g}): the models do not look like fine-tunes "
            f"of one base, so every block comes from the base"
        ]
    return [
        f"'{c}' is compatible with the base at no depth ("
        + (
            f"best {options.measure} {best(c):.4g} < {options.min_compatibility:g}"
            if best(c) is not None
            else f"no {options.measure} could be computed"
        )
        + f"): it does not look like a fine-tune of '{base}'"
        for c in far
    ]


def blended_slices(entry: PlanEntry, checkpoints: dict[str, Checkpoint], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The entry's blend, flattened, a slice at a time: the weighted mean of its tensor over the
    blend's candidates, summed in float64 and rounded once to `dtype` (with equal weights, the sum
    divided by their number: the mean as a user would compute it, not a sum of thirds)."""
    import torch

    equal = len({weight for _, weight in entry.blend}) == 1
    for start, stop in slices(numel(entry.shape)):
        total = torch.zeros(stop - start, dtype=torch.float64)
        for candidate, weight in entry.blend:
            part = checkpoints[candidate].read_flat(entry.tensor, start, stop).to(torch.float64)
            total.add_(part, alpha=1.0 if equal else weight)
        yield (total / len(entry.blend) if equal else total).to(dtype)


def blended_tensor(entry: PlanEntry, checkpoints: dict[str, Checkpoint], dtype: torch.dtype) -> torch.Tensor:
    """The whole blend of an entry, in its shape (blended_slices joined)."""
    import torch

    return torch.cat(list(blended_slices(entry, checkpoints, dtype))).reshape(entry.shape)
