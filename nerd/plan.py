"""The Plan: pure data saying what the output is made of, decided before anything is written.

Every output tensor names its source candidate, the source tensor, the output dtype and a
transform (none, or `zero` for the residual-writing projections of an identity-initialised copy).
The plan also carries the per-group choices (depth, each candidate's score, the winner), every
matrix's metrics, and after a DLEC pass the expansion (which blocks were copied where, with their
importance) and the rewritten config.json; the dry run prints it, the report records it, and the
writer executes it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Selection

INPUT_EMBEDDING = re.compile(r"embed_tokens|embed_in|\bwte\b|\bwpe\b|embeddings\.")


@dataclass(frozen=True)
class Choice:
    """One selection decision: a block at a depth, a single tensor, or the non-layer group."""

    group: str
    depth: int | None
    scores: dict[str, float | None]
    winner: str
    tensors: tuple[str, ...]
    note: str | None = None


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: copied from `tensor` of candidate `source`, written as `dtype`."""

    name: str
    source: str
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    transform: str | None = None  # "zero": write zeros of this dtype and shape instead of the source's data


@dataclass(frozen=True)
class AddedLayer:
    """One duplicated block: `source` is its depth before the expansion, `depth` the copy's depth after."""

    source: int
    depth: int
    score: float | None


@dataclass(frozen=True)
class Expansion:
    """What a DLEC pass did: the importance of every block (by depth before the expansion), the
    copies, how they start, and the parameter count before and after."""

    importance: str
    scores: list[float | None]
    added: list[AddedLayer]
    init: str
    params_before: int
    params_after: int
    layer_map: list[int]  # output depth -> source depth
    basis: str  # what the scores were computed from: "weights", or the calibration text and tokens
    config_changes: list[str]  # what was rewritten in config.json
    note: str | None = None
    stats_reused: bool = False


@dataclass
class Plan:
    """Everything the writer needs, and everything the report and the dry run show."""

    candidates: list[str]
    sources: dict[str, Path]
    revisions: dict[str, str | None]
    base: str
    output_dir: Path
    shard_size: int
    entries: list[PlanEntry]
    choices: list[Choice]
    metrics: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    selection: Selection = field(default_factory=Selection)
    spectra_computed: int = 0
    spectra_reused: int = 0
    config: dict | None = None  # config.json of the output when it differs from the base's (expansion)
    expansion: Expansion | None = None

    def to_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "base": self.base,
            "selection": asdict(self.selection),
            "choices": [asdict(c) | {"tensors": list(c.tensors)} for c in self.choices],
            "expansion": None if self.expansion is None else asdict(self.expansion),
            "entries": [asdict(e) | {"shape": list(e.shape)} for e in self.entries],
        }


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def output_order(name: str, depth: int | None) -> tuple:
    """Embeddings first, then the blocks in depth order, then the rest (final norm, lm_head)."""
    if depth is not None:
        return (1, depth, natural_key(name))
    return (0 if INPUT_EMBEDDING.search(name) else 2, 0, natural_key(name))
