"""The merge config's schema, declared once: each section as a frozen pydantic dataclass, with its
keys, their types, choices (Literal) and defaults, and the rules between keys as validators.

config.py validates a YAML file against it and turns the first error into one line (messages.py); after it come
the checks that need the filesystem (which models exist, the output directory, the text files).
The same classes are what the rest of the package uses: they compare, hash and copy
(dataclasses.replace, asdict) as the dataclasses they are. How a field is named in messages:
its key (an alias where the attribute is named otherwise, such as base_model), and its
`description`, what a value must be ('expected a directory path, found 3'). Fields marked
`internal` are not keys of a config: validation sets them (where the options came from, the text
names as written) or config.py does (the resolved model paths, the source file). The kinds of
values and the markers are in values.py; the base class and the sections that stand on their own
(a model, the selection, the tether gate) in sections.py. This module holds the options of the
passes (dlec, evaluate and its strategies) and the whole config (`MergeConfig`).
"""

import dataclasses
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.dataclasses import dataclass

from .sections import Compute, ModelSpec, Schema, Selection, TetherOptions, check_score_weights, dependents
from .values import (
    CONFIG,
    DirectoryPath,
    Flag,
    NullIsDefault,
    Reading,
    ShardSize,
    TextPath,
    Tokens,
    flag,
    internal,
    listed,
    printable_text,
    rule,
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
    `source` is the config file, `raw` what it holds (both set by config.py). A base_model that is
    not among the models (mergekit's configs usually leave it out) joins them as the first
    (config.py puts it there and sets `base_joined`)."""

    shape: ClassVar[str] = "a mapping of keys (models, base_model, output_dir, ...)"

    models: Annotated[
        tuple[ModelSpec, ...],
        BeforeValidator(listed),
        Field(description="a list of models"),
    ]
    base: Annotated[ModelSpec, Field(alias="base_model")]
    output_dir: DirectoryPath
    selection: Annotated[Selection, NullIsDefault()] = dataclasses.field(default_factory=Selection)
    dtype: Dtype = "keep"
    shard_size: ShardSize = 2 * 10**9
    device: Device = "auto"
    compute: Annotated[Compute, NullIsDefault()] = dataclasses.field(default_factory=Compute)
    tether: Annotated[TetherOptions, NullIsDefault()] = dataclasses.field(default_factory=TetherOptions)
    dlec: DlecOptions | None = None
    evaluate: EvaluateOptions | None = None
    source: Path | None = internal(None)
    raw: dict = internal(default_factory=dict)
    base_joined: bool = internal(False)  # base_model is not among models: it joins them, as the first

    @model_validator(mode="after")
    def check_weights(self) -> "MergeConfig":
        check_score_weights(self.selection, self.tether)
        return self

    @property
    def candidates(self) -> tuple[ModelSpec, ...]:
        return (self.base,) + tuple(m for m in self.models if m != self.base)
