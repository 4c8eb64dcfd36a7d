"""The Plan: pure data saying what the output is made of, decided before anything is written.

Every output tensor names its source candidate, the source tensor, the output dtype and a
transform: none, `blend` (the weighted mean of the same tensor of several candidates, which it
lists with their weights), or `zero` (the residual-writing projections of an identity-initialised
copy). The plan also carries the per-group choices (depth, each candidate's score, the winner or
the blend), every matrix's metrics, each candidate's compatibility with the base (tethers), and
after a DLEC pass the expansion (which blocks were copied where, with their
importance) and the rewritten config.json; the dry run prints it, the report records it, and the
writer executes it. An optional tensor (layout.py: a buffer, a tied head) that some candidates
lack is an entry like any other, marked with why it is optional and which lack it. The plan
also records the architecture family its tensor names were read with (architecture.py: "llama",
"gpt2", ..., or "inferred" when no family claims the base's config.json).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .architecture import INFERRED, Architecture, inferred
from .config import Selection, TetherOptions


def short_names(candidates: list[str]) -> dict[str, str]:
    """Column labels: the last path part of each model (without its revision); where two share it, as
    many of their last parts (the revision included) as tell them apart, so that a local model is
    never named by its path from the root (the whole reference only where nothing shorter differs)."""
    labels = {c: Path(c.split("@")[0].rstrip("/")).name or c for c in candidates}
    for parts in range(2, max((len(tail_parts(c)) for c in candidates), default=0) + 1):
        shared = [c for c in candidates if list(labels.values()).count(labels[c]) > 1]
        if not shared:
            break
        labels |= {c: "/".join(tail_parts(c)[-parts:]) for c in shared}
    return {c: label if list(labels.values()).count(label) == 1 else c for c, label in labels.items()}


def tail_parts(reference: str) -> list[str]:
    """The parts of a model's reference after its root ('/a/ft' -> ['a', 'ft'], 'org/x@v1' -> ['org', 'x@v1'])."""
    return [part for part in reference.rstrip("/").split("/") if part]


@dataclass(frozen=True)
class Choice:
    """One selection decision: a block at a depth, a single tensor, or the non-layer group."""

    group: str
    depth: int | None
    scores: dict[str, float | None]
    winner: str
    tensors: tuple[str, ...]
    note: str | None = None
    blend: dict[str, float] | None = None  # tether.mode blend: candidate -> weight (the winner is the best of them)
    runner_up: str | None = None  # the best of the other candidates that could have won
    margin: float | None = None  # how much better the winner's score is than the runner-up's (>= 0)
    pinned: bool = False  # selection.pin fixed the winner


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: copied from `tensor` of candidate `source`, written as `dtype`; with the
    `blend` transform, the weighted mean of `tensor` of the candidates in `blend` instead."""

    name: str
    source: str
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    transform: str | None = None  # "zero": zeros of this dtype and shape; "blend": the mean over `blend`
    blend: tuple[tuple[str, float], ...] = ()  # (candidate, weight), the weights summing to 1
    optional: str | None = None  # a tensor some candidates lack (nothing learned): why, and which lack it

    @property
    def candidates(self) -> tuple[str, ...]:
        """Every candidate whose data this entry reads."""
        return tuple(c for c, _ in self.blend) if self.transform == "blend" else (self.source,)


@dataclass(frozen=True)
class Tethers:
    """Every candidate's compatibility with the base at every depth (tether.py), the options that
    gated and blended with it, and what the gate means for the merge as a whole."""

    options: TetherOptions
    base: str
    scores: dict[str, dict[str, float | None]]  # group ("non-layer", "0", ...) -> other candidate -> score
    warnings: list[str] = field(default_factory=list)
    unmeasured: tuple[str, ...] = ()  # groups where the base has a NaN or Inf: nothing to compare with

    def eligible(self, group: str, candidate: str) -> bool:
        """Whether a candidate may supply this group: the base always; another candidate when its
        compatibility there is known and at least min_compatibility (a group without scores, the
        non-layer one when it is taken from the base, gates nobody); where the base's own group
        has a NaN or Inf, when the candidate is compatible with the base at another group."""
        if candidate == self.base or group not in self.scores:
            return True
        if group in self.unmeasured:
            return any(self.compatible(g, candidate) for g in self.scores if g not in self.unmeasured)
        return self.compatible(group, candidate)

    def compatible(self, group: str, candidate: str) -> bool:
        score = self.scores[group].get(candidate)
        return score is not None and score >= self.options.min_compatibility


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


@dataclass(frozen=True)
class Perplexity:
    """One model's perplexity on one text (evaluate.py), and what it was computed from."""

    model: str  # a candidate's name, or 'composite: <strategy>'
    role: str  # base | candidate | composite
    text: str
    kind: str  # causal | masked
    perplexity: float | None  # None when the model's logits hold NaN or Inf
    nll: float | None  # summed negative log-likelihood (nats) of the scored tokens
    tokens: int  # scored tokens
    windows: int
    window: int  # window length in tokens
    stride: int | None  # tokens between window starts (None for a masked LM: no overlap)
    reused: bool = False  # taken from the cache


@dataclass(frozen=True)
class StrategyResult:
    """One strategy of an evaluation: its settings, the score it was chosen by, and the outcome."""

    name: str
    settings: dict
    score: float | None  # mean perplexity over the texts, or the perplexity on the text chosen by
    written: bool = False


@dataclass(frozen=True)
class Evaluation:
    """The perplexities of the base, the candidates and each strategy's composite, and which
    strategy was written and why (with its margin over the runner-up)."""

    texts: list[str]
    choose_by: str  # "mean" or one text
    rows: list[Perplexity]
    strategies: list[StrategyResult]
    reason: str  # why the written strategy was written
    runner_up: str | None = None
    margin: float | None = None  # the runner-up's score minus the written one's (>= 0)
    warnings: list[str] = field(default_factory=list)  # the written composite is worse than the base, ...


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
    tethers: Tethers | None = None
    expansion: Expansion | None = None
    warnings: list[str] = field(default_factory=list)  # tensors that cannot be used (NaN/Inf, all zero)
    notes: list[str] = field(default_factory=list)  # optional tensors' sources, module folders copied as is
    evaluation: Evaluation | None = None  # evaluate: the perplexities, and the strategy written
    architecture: str = INFERRED  # the family of the base's config.json (architecture.py), or "inferred"
    base_joined: bool = False  # base_model was not among the config's models: it joined them, as the first

    def used_sources(self) -> dict[str, Path]:
        """The directory of every candidate the entries read, by name."""
        return {c: self.sources[c] for c in self.candidates if any(c in e.candidates for e in self.entries)}

    def to_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "base": self.base,
            "base_joined": self.base_joined,
            "architecture": self.architecture,
            "selection": asdict(self.selection),
            "choices": [asdict(c) | {"tensors": list(c.tensors)} for c in self.choices],
            "tethers": None if self.tethers is None else asdict(self.tethers),
            "expansion": None if self.expansion is None else asdict(self.expansion),
            "evaluation": None if self.evaluation is None else asdict(self.evaluation),
            "warnings": self.warnings,
            "notes": self.notes,
            "entries": [entry_dict(e) for e in self.entries],
        }


def entry_dict(entry: PlanEntry) -> dict:
    """An entry as the report holds it; a blend names its members (`blend`) and no single source."""
    found = asdict(entry) | {"shape": list(entry.shape), "blend": dict(entry.blend)}
    if entry.transform == "blend":
        del found["source"]
    return found


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def output_order(name: str, depth: int | None, architecture: Architecture | None = None) -> tuple:
    """Embeddings first (the input embeddings of `architecture`, default: inferred), then the
    blocks in depth order, then the rest (final norm, lm_head)."""
    if depth is not None:
        return (1, depth, natural_key(name))
    return (0 if (architecture or inferred()).is_input_embedding(name) else 2, 0, natural_key(name))
