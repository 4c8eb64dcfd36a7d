"""The Plan: pure data saying what the output is made of, decided before anything is written.

Every output tensor names its source candidate, the source tensor and the output dtype. The
plan also carries the per-group choices (depth, each candidate's score, the winner) and every
matrix's metrics, which the dry run prints, the report records, and the writer executes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Selection


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

    def to_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "base": self.base,
            "selection": asdict(self.selection),
            "choices": [asdict(c) | {"tensors": list(c.tensors)} for c in self.choices],
            "entries": [asdict(e) | {"shape": list(e.shape)} for e in self.entries],
        }


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
