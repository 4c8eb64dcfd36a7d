"""The merge config's schema, declared once: each section as a frozen pydantic dataclass, with its
keys, their types, choices (Literal) and defaults, and the rules between keys as validators.

config.py validates a YAML file against it and turns the first error into one line; after it come
the checks that need the filesystem (which models exist, the output directory, the text files).
The same classes are what the rest of the package uses: they compare, hash and copy
(dataclasses.replace, asdict) as the dataclasses they are. How a field is named in messages:
its key (an alias where the attribute is named otherwise, such as base_model), and its
`description`, what a value must be ('expected a directory path, found 3'). Fields marked
`internal` are not keys of a config: validation sets them (where the options came from, the text
names as written) or config.py does (the resolved model paths, the source file). The kinds of
values and the markers are in values.py.
"""

import dataclasses
import math
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    StrictInt,
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
    DirectoryPath,
    Flag,
    NullIsDefault,
    Reading,
    ShardSize,
    TextPath,
    Tokens,
    finite_number,
    flag,
    internal,
    listed,
    model_ref,
    printable,
    printable_text,
    quoted_revision,
    rule,
    two_or_more,
)

CONFIGURED = "as configured"  # the name of the config's own selection and tether settings among the strategies
Dtype = Literal["keep", "float32", "float16", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
Importance = Literal["block_influence", "heavy_tail", "ner"]
Init = Literal["copy", "identity"]
DEVICES, IMPORTANCE, INITS = get_args(Device), get_args(Importance), get_args(Init)  # the command line's choices


def option_key(options: Any, name: str) -> str:
    """How the user wrote an option: dlec.add_layers in a config, --add-layers on the command line
    (`options`: DlecOptions or EvaluateOptions, whose `cli` says which)."""
    if options.cli:
        return flag(name)
    return f"{'dlec' if isinstance(options, DlecOptions) else 'evaluate'}.{name}"


def option_setting(options: Any, name: str, value: str) -> str:
    """How the user would set it: 'dlec.init: copy' in a config, '--init copy' on the command line."""
    if options.cli:
        return option_key(options, name) + ("" if value == "true" else f" {value}")
    return f"{option_key(options, name)}: {value}"


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


@dataclass(frozen=True, config=CONFIG)
class Selection(Schema):
    """How winners are chosen: by the mean of `metric` over a group's matrices, highest (max),
    lowest (min), or closest to `target` (the mean distance |metric - target|, lowest wins).
    `zero_matrices`: a group with an all-zero matrix is not selectable (exclude), or is scored
    on its other matrices (allow: the zero residual projections of an identity-initialised copy)."""

    granularity: Literal["block", "tensor"] = "block"
    non_layer: Literal["base", "compete"] = "base"
    metric: Literal[tuple(METRICS)] = "ner"
    goal: Annotated[Literal["max", "min", "target"], DependsOn("metric")] = "max"
    target: Annotated[Annotated[float, Strict()] | None, DependsOn("goal"), Field(description="a finite number")] = None
    zero_matrices: Literal["exclude", "allow"] = "exclude"

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        data = super().read(data, reading)
        if not isinstance(data, dict):
            return data
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
class Options(Schema):
    """The options of a pass (dlec, evaluate), from a config section or a command's arguments:
    `where` and `cli` say how errors name a key ('merge.yaml: dlec.growth' or 'expand: --growth')."""

    where: str = internal("config", compare=False, kw_only=True)
    cli: bool = internal(False, compare=False, kw_only=True)

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        data = super().read(data, reading)
        if isinstance(data, dict) and reading:
            return data | {"where": reading.where, "cli": reading.cli}
        return data


@dataclass(frozen=True, config=CONFIG)
class DlecOptions(Options):
    """Layer expansion (dlec.py): how many blocks to duplicate (exactly one of `add_layers`,
    `growth`, `layers`), how to rank them (`importance`; None: nothing with `layers`, else
    block_influence when transformers is installed, else ner), the calibration text (None: the
    built-in one), and how copies start."""

    shape: ClassVar[str] = "a mapping (add_layers, growth or layers, ...)"

    add_layers: Annotated[StrictInt, Field(ge=1, description="a whole number of layers >= 1")] | None = None
    growth: (
        Annotated[
            float,
            Strict(),
            Field(gt=0, le=1, description="a fraction of the parameters in (0, 1], e.g. 0.16 for ~16% more"),
        ]
        | None
    ) = None
    layers: (
        Annotated[
            tuple[Annotated[StrictInt, Field(ge=0)], ...],
            BeforeValidator(listed),
            Field(min_length=1, description="a list of layer indices (0-based) to duplicate, e.g. [3, 7]"),
            AfterValidator(lambda layers: tuple(sorted(layers))),
        ]
        | None
    ) = None
    importance: Importance | None = None
    calibration: TextPath | None = None
    max_tokens: Annotated[StrictInt, Field(ge=2, description="a number of tokens >= 2")] = 4096
    init: Init = "copy"
    trust_remote_code: Flag = False

    @model_validator(mode="after")
    def check_choices(self) -> "DlecOptions":
        key = lambda name: option_key(self, name)  # noqa: E731
        given = [k for k in ("add_layers", "growth", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            found = " and ".join(key(k) for k in given) if given else "none"
            raise rule(f"give exactly one of {key('add_layers')}, {key('growth')} or {key('layers')}, found {found}")
        if self.calibration is not None and self.importance == "ner":
            raise rule(
                f"not used with {option_setting(self, 'importance', 'ner')} (importance from the weights "
                f"needs no text)",
                ("calibration",),
            )
        return self


@dataclass(frozen=True, config=CONFIG)
class Strategy(Schema):
    """One variant of the selection and tether settings that an evaluation compares: the config's
    own sections with `settings` (('tether.mode', 'blend'), ...) given over them. Written
    `{name: blend, tether: {mode: blend}}`; without a name, it is named by its settings."""

    shape: ClassVar[str] = "a mapping (name, selection, tether)"

    name: Annotated[StrictStr, AfterValidator(printable_text), Field(description="a short name")]
    selection: Selection
    tether: TetherOptions
    settings: tuple[tuple[str, Any], ...] = internal(())

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        """Each section is the config's, with the keys the strategy gives over it; a key it gives
        drops the config's keys chosen with it (DependsOn)."""
        data = super().read(data, reading)
        if not isinstance(data, dict):
            return data
        if not any(data.get(k) for k in ("selection", "tether")):
            raise rule("give the selection or tether settings it changes, e.g. tether: {mode: blend}")
        config, item, settings = reading.sections if reading else {}, dict(data), []
        for section, schema in (("selection", Selection), ("tether", TetherOptions)):
            own = data.get(section) or {}
            if not isinstance(own, dict):
                continue  # refused as a section that is not a mapping
            inherited = config.get(section) if isinstance(config.get(section), dict) else {}
            dropped = set().union(*(dependents(schema, k) for k in own if isinstance(k, str)))
            item[section] = {k: v for k, v in inherited.items() if k not in dropped} | own
            settings += [(f"{section}.{k}", v) for k, v in own.items()]
        item.setdefault("name", ", ".join(f"{k}: {v}" for k, v in settings) or "strategy")
        return item | {"settings": tuple(settings)}

    @model_validator(mode="after")
    def check_weights(self) -> "Strategy":
        check_score_weights(self.selection, self.tether)
        return self


@dataclass(frozen=True, config=CONFIG)
class EvaluateOptions(Options):
    """Perplexity evaluation (evaluate.py): the texts, how many of their tokens, the window length
    (None: the model's context, at most max_tokens) and stride (None: half a window), and for a
    merge the strategies compared and what chooses among them (`mean` over the texts, or one text).
    `names`: each text as the user wrote it, its name in tables."""

    shape: ClassVar[str] = "a mapping (texts, max_tokens, strategies, ...)"

    texts: Annotated[
        tuple[TextPath, ...],
        BeforeValidator(listed),
        Field(min_length=1, description="a list of text files, e.g. [held_out.txt]"),
    ]
    names: tuple[str, ...] = internal()
    max_tokens: Annotated[Tokens, NullIsDefault()] = 4096
    max_length: Tokens | None = None
    stride: Annotated[StrictInt, Field(ge=1, description="a whole number of tokens >= 1")] | None = None
    strategies: Annotated[
        tuple[Strategy, ...],
        BeforeValidator(listed),
        NullIsDefault(),
        Field(description="a list of variants, e.g. [{tether: {mode: blend}}]"),
    ] = ()
    choose_by: Annotated[StrictStr, Field(description="mean or one of the texts")] = "mean"
    trust_remote_code: Flag = False

    @classmethod
    def read(cls, data: Any, reading: Reading | None) -> Any:
        data = super().read(data, reading)
        if not isinstance(data, dict):
            return data
        texts = data.get("texts")
        return data | {"names": tuple(str(t).strip() for t in texts) if isinstance(texts, list) else ()}

    @model_validator(mode="after")
    def check_lengths(self) -> "EvaluateOptions":
        key = lambda name: option_key(self, name)  # noqa: E731
        if self.max_length and self.max_length > self.max_tokens:
            raise rule(
                f"{self.max_length} is longer than the {self.max_tokens} tokens used of each text "
                f"({key('max_tokens')})",
                ("max_length",),
            )
        if self.max_length and self.stride and self.stride >= self.max_length:
            raise rule(
                f"{self.stride} must be shorter than the window ({key('max_length')}: {self.max_length}), "
                f"or no window would overlap the next",
                ("stride",),
            )
        if self.choose_by != "mean" and self.choose_by not in self.names:
            raise rule(
                f"expected mean or one of the texts ({', '.join(self.names)}), found {self.choose_by!r}", ("choose_by",)
            )
        taken = [CONFIGURED]
        for i, strategy in enumerate(self.strategies):
            if strategy.name in taken:
                whose = "the config" if strategy.name == CONFIGURED else "another strategy"
                raise rule(f"'{strategy.name}' is already the name of {whose}", ("strategies", i, "name"))
            taken.append(strategy.name)
        return self


@dataclass(frozen=True, config=CONFIG)
class MergeConfig(Schema):
    """A validated merge config. `candidates` is the tie-break order: base first, then the rest.
    `source` is the config file, `raw` what it holds (both set by config.py)."""

    shape: ClassVar[str] = "a mapping of keys (models, base_model, output_dir, ...)"

    models: Annotated[
        tuple[ModelSpec, ...],
        BeforeValidator(two_or_more),
        BeforeValidator(listed),
        Field(description="a list of models"),
    ]
    base: Annotated[ModelSpec, Field(alias="base_model")]
    output_dir: DirectoryPath
    selection: Annotated[Selection, NullIsDefault()] = dataclasses.field(default_factory=Selection)
    dtype: Dtype = "keep"
    shard_size: ShardSize = 2 * 10**9
    device: Device = "auto"
    tether: Annotated[TetherOptions, NullIsDefault()] = dataclasses.field(default_factory=TetherOptions)
    dlec: DlecOptions | None = None
    evaluate: EvaluateOptions | None = None
    source: Path | None = internal(None)
    raw: dict = internal(default_factory=dict)

    @model_validator(mode="after")
    def check_weights(self) -> "MergeConfig":
        check_score_weights(self.selection, self.tether)
        return self

    @property
    def candidates(self) -> tuple[ModelSpec, ...]:
        return (self.base,) + tuple(m for m in self.models if m != self.base)
