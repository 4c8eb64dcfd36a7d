"""The sections of the config's schema that stand on their own, below schema.py: `Schema`, the base
every section derives from (it reads what a config gives before pydantic validates the fields), the
keys of a section in order (`keys_of`, which config.py's messages follow) and those chosen together
(`dependents`), and the sections that need no other: a model (`ModelSpec`), how winners are chosen
(`Selection`) and the compatibility gate (`TetherOptions`). schema.py builds the passes' options and
the whole config on them.
"""

import dataclasses
import math
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    StrictStr,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from .metrics import METRICS
from .values import (
    CONFIG,
    MODEL_REF,
    DependsOn,
    NullIsDefault,
    Reading,
    finite_number,
    internal,
    model_ref,
    printable,
    printable_text,
    quoted_revision,
    rule,
)


@cache
def keys_of(cls: type) -> tuple[str, ...]:
    """The keys a config may give a section, in order (aliases where they differ from the attribute)."""
    return tuple(
        cls.__pydantic_fields__[f.name].alias or f.name
        for f in dataclasses.fields(cls)
        if not f.metadata.get("internal")
    )


@cache
def dependents(cls: type, key: str) -> frozenset[str]:
    """The keys chosen with `key` (DependsOn), and those chosen with them."""
    direct = {
        name
        for name, info in cls.__pydantic_fields__.items()
        if any(isinstance(m, DependsOn) and m.key == key for m in info.metadata)
    }
    return frozenset(direct.union(*(dependents(cls, k) for k in direct)))


@dataclass(frozen=True, config=CONFIG)
class Schema:
    """A section of the config. `shape` is what its value must be, for the message when it is not."""

    shape: ClassVar[str] = "a mapping"

    @model_validator(mode="before")
    @classmethod
    def read_input(cls, data: Any, info: ValidationInfo) -> Any:
        """What a config gives (a mapping; for a model, also a string) before its fields are
        validated; code that builds an object (keyword arguments, an instance) passes as it is."""
        if isinstance(data, (cls, ArgsKwargs)):
            return data
        return cls.read(data, info.context if isinstance(info.context, Reading) else None)

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        """Refuse an internal field written as a key; a key written as null takes its default where
        the field says so (NullIsDefault). Sections add what they derive from the keys."""
        if not isinstance(data, dict):
            return data
        for key in data:
            if isinstance(key, str) and key in cls.__pydantic_fields__ and key not in keys_of(cls):
                raise PydanticCustomError("unknown_key", "unknown key", {"at": (key,)})
        return {
            k: v
            for k, v in data.items()
            if not (
                v is None
                and k in cls.__pydantic_fields__
                and any(isinstance(m, NullIsDefault) for m in cls.__pydantic_fields__[k].metadata)
            )
        }


@dataclass(frozen=True, config=CONFIG)
class ModelSpec(Schema):
    """One model as the config names it: 'dir', 'org/name', 'org/name@rev' or {model: ..., revision: ...}.
    config.py looks at the filesystem and sets `path` (a local directory) or `repo_id` (a hub repo)."""

    shape: ClassVar[str] = MODEL_REF

    ref: Annotated[StrictStr, AfterValidator(model_ref), Field(alias="model", description=MODEL_REF)]
    path: Path | None = internal(None)
    repo_id: str | None = internal(None)
    revision: Annotated[
        StrictStr | None,
        BeforeValidator(quoted_revision),
        AfterValidator(lambda v: v if v is None else printable_text(v)),
        Field(description="a branch, tag or commit"),
    ] = None

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        if isinstance(data, dict):
            return super().read(data, reading)
        if not (isinstance(data, str) and printable(data.strip())):
            raise rule(f"expected {MODEL_REF}, found {data!r}")
        return {"model": data.strip()}

    @property
    def identity(self) -> str:
        """A key that is equal for two specs naming the same model."""
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision or 'main'}"


def pins(value: Any) -> Any:
    """selection.pin as a config writes it, {3: org/ft-a, non_layer: base}, as sorted (group, model)
    pairs: a depth is a whole number >= 0 (or its digits quoted), the non-layer group `non_layer`."""
    if isinstance(value, tuple):
        return value  # built in code, or resolved by config.py
    if not isinstance(value, dict):
        raise rule(f"expected a mapping of depths or non_layer to candidates, e.g. {{3: org/ft-a}}, found {value!r}")
    pairs = []
    for key, model in value.items():
        depth = int(key) if isinstance(key, str) and key.isdigit() else key
        if key in ("non-layer", "nonlayer", "non_layers"):
            raise rule(f"unknown group {key!r}; did you mean 'non_layer'?", (key,))
        if not (depth == "non_layer" or (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0)):
            raise rule(f"expected a depth (0, 1, ...) or non_layer, found {key!r}", (key,))
        if not (isinstance(model, str) and printable(model.strip())):
            raise rule(f"expected a candidate (as models lists it, or base), found {model!r}", (key,))
        pairs.append((depth, model.strip()))
    if len({p[0] for p in pairs}) < len(pairs):
        raise rule("a depth is pinned twice (3 and '3')")
    return tuple(sorted(pairs, key=lambda p: (p[0] != "non_layer", p[0] if p[0] != "non_layer" else 0)))


@dataclass(frozen=True, config=CONFIG)
class Selection(Schema):
    """How winners are chosen: by the mean of `metric` over a group's matrices, highest (max),
    lowest (min), or closest to `target` (the mean distance |metric - target|, lowest wins).
    `zero_matrices`: a group with an all-zero matrix is not selectable (exclude), or is scored
    on its other matrices (allow: the zero residual projections of an identity-initialised copy).
    `pin`: (depth or "non_layer", candidate) pairs that fix those groups to a candidate, whatever the
    scores say (config.py resolves each name to a candidate's reference; select.py takes it)."""

    granularity: Literal["block", "tensor"] = "block"
    non_layer: Literal["base", "compete"] = "base"
    metric: Literal[tuple(METRICS)] = "ner"
    goal: Annotated[Literal["max", "min", "target"], DependsOn("metric")] = "max"
    target: Annotated[Annotated[float, Strict()] | None, DependsOn("goal"), Field(description="a finite number")] = None
    zero_matrices: Literal["exclude", "allow"] = "exclude"
    pin: Annotated[
        tuple[tuple[int | Literal["non_layer"], str], ...],
        BeforeValidator(pins),
        NullIsDefault(),
        Field(description="a mapping of depths or non_layer to candidates, e.g. {3: org/ft-a, non_layer: base}"),
    ] = ()

    def pinned(self, group: int | str) -> str | None:
        """The candidate `selection.pin` fixes a depth (or "non_layer") to, as config.py resolved it."""
        return dict(self.pin).get(group)

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        data = super().read(data, reading)
        if not isinstance(data, dict):
            return data
        if data.get("non_layer") == "base" and "base" != (data.get("pin") or {}).get("non_layer", "base"):
            raise rule(
                "selection.non_layer: base takes the non-layer tensors from the base; leave it out (or "
                "compete) to pin them to another candidate",
                ("pin", "non_layer"),
            )
        metric, goal, target = data.get("metric", "ner"), data.get("goal", "max"), data.get("target")
        if not (isinstance(metric, str) and metric in METRICS):
            return data  # refused as the choice it is
        if "goal" not in data and metric != "ner":
            raise rule(
                f"required with selection.metric: {metric} (max, min, or target with selection.target, "
                f"e.g. goal: target, target: 2.0 for alpha)",
                ("goal",),
            )
        if goal == "target" and not finite_number(target):
            raise rule(f"goal: target needs a finite number, found {target!r}", ("target",))
        if goal in ("max", "min") and target is not None:
            raise rule(f"only used with goal: target (goal is {goal})", ("target",))
        return data


@dataclass(frozen=True, config=CONFIG)
class TetherOptions(Schema):
    """The compatibility gate (tether.py): how each candidate block is compared with the base block
    at its depth (`measure`), the score below which it drifts and is not eligible there, and
    whether the eligible candidates compete (`select`) or are averaged (`blend`, with `weights`
    equal, proportional to the selection score, or proportional to the compatibility)."""

    shape: ClassVar[str] = "a mapping (min_compatibility, mode, ...)"

    measure: Literal["cosine", "min_cosine", "l2"] = "cosine"
    min_compatibility: Annotated[float, Strict(), Field(description="a number at most 1")] = 0.5
    mode: Literal["select", "blend"] = "select"
    weights: Annotated[Literal["equal", "score", "compatibility"], DependsOn("mode")] = "equal"

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        """The threshold's range depends on the measure: a cosine is in [-1, 1], l2's score at most 1."""
        data = super().read(data, reading)
        if not isinstance(data, dict) or data.get("measure", "cosine") not in ("cosine", "min_cosine", "l2"):
            return data
        measure, threshold = data.get("measure", "cosine"), data.get("min_compatibility", 0.5)
        low = -1.0 if measure != "l2" else -math.inf
        if not finite_number(threshold) or not low <= threshold <= 1:
            span = "between -1 and 1" if measure != "l2" else "at most 1"
            everyone = "-1" if measure != "l2" else "a large negative number"
            raise rule(
                f"expected a number {span} ({measure}; {everyone} lets every candidate through), found {threshold!r}",
                ("min_compatibility",),
            )
        return data

    @model_validator(mode="after")
    def check_weights(self) -> "TetherOptions":
        if self.weights != "equal" and self.mode != "blend":
            raise rule(f"only used with tether.mode: blend (mode is {self.mode})", ("weights",))
        if self.weights == "compatibility" and self.min_compatibility <= 0:
            raise rule(
                f"compatibility needs tether.min_compatibility > 0, so every weight is positive "
                f"(found {self.min_compatibility:g}); use equal",
                ("weights",),
            )
        return self


def check_score_weights(selection: Selection, tether: TetherOptions) -> None:
    """Weights by the selection score need a score where higher is better."""
    if tether.weights == "score" and selection.goal != "max":
        raise rule(
            f"score weighs candidates by their selection score, which needs selection.goal: max (goal is "
            f"{selection.goal}, so a lower score is better); use equal or compatibility",
            ("tether", "weights"),
        )


@dataclass(frozen=True, config=CONFIG)
class Compute(Schema):
    """Where spectra and tether sums are computed (engine.py): `executor` local (this process), ray
    (a Ray cluster, raycluster.py, at `address`: auto, local, host:port or ray://...; None: RAY_ADDRESS,
    else auto), or auto (ray when RAY_ADDRESS is set, as in a Ray job, else local); `threads`, the
    BLAS and torch threads of each computation (None: every core of this machine), the same on
    every worker, so that a cluster's results are bit-identical to this machine's."""

    shape: ClassVar[str] = "a mapping (executor, address, threads)"

    executor: Literal["auto", "local", "ray"] = "auto"
    address: (
        Annotated[
            StrictStr,
            AfterValidator(printable_text),
            Field(description="a Ray address: auto, local, host:port or ray://host:port"),
        ]
        | None
    ) = None
    threads: Annotated[int, Strict(), Field(ge=1, description="a whole number of threads >= 1")] | None = None
