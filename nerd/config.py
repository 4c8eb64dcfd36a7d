"""The merge config: read a YAML file and validate all of it before any download or heavy work.

`load_config(path)` returns a `MergeConfig` or raises `ConfigError` with one line naming the
file, the key and the value. Relative paths in a config are relative to the config file.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, first_line, type_name
from .metrics import METRICS
from .spectra import cuda_available
from .staging import clean_leftovers

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DTYPES = ("keep", "float32", "float16", "bfloat16")
GRANULARITIES = ("block", "tensor")
NON_LAYER = ("base", "compete")
DEVICES = ("auto", "cpu", "cuda")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

TOP_KEYS = ("models", "base_model", "output_dir", "selection", "dtype", "shard_size", "device", "tether", "dlec",
            "evaluate")
SELECTION_KEYS = ("granularity", "non_layer", "metric", "goal", "target", "zero_matrices")
ZERO_MATRICES = ("exclude", "allow")
GOALS = ("max", "min", "target")
MODEL_KEYS = ("model", "revision")
DLEC_KEYS = ("add_layers", "growth", "layers", "importance", "calibration", "max_tokens", "init",
             "trust_remote_code")
IMPORTANCE = ("block_influence", "heavy_tail", "ner")
TETHER_KEYS = ("measure", "min_compatibility", "mode", "weights")
MEASURES = ("cosine", "min_cosine", "l2")
MODES = ("select", "blend")
BLEND_WEIGHTS = ("equal", "score", "compatibility")
INITS = ("copy", "identity")
EVALUATE_KEYS = ("texts", "max_tokens", "max_length", "stride", "strategies", "choose_by", "trust_remote_code")
STRATEGY_KEYS = ("name", "selection", "tether")
# keys a strategy does not inherit from the config when it sets the key they depend on
DEPENDENT_KEYS = {"metric": ("goal", "target"), "goal": ("target",), "mode": ("weights",)}
CONFIGURED = "as configured"  # the name of the config's own selection and tether settings among the strategies


@dataclass(frozen=True)
class ModelSpec:
    """One model as the config names it: a local directory or a hub repo at a revision."""

    ref: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def identity(self) -> str:
        """A key that is equal for two specs naming the same model."""
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision or 'main'}"

    def __str__(self) -> str:
        return self.ref


@dataclass(frozen=True)
class Selection:
    """How winners are chosen: by the mean of `metric` over a group's matrices, highest (max),
    lowest (min), or closest to `target` (the mean distance |metric - target|, lowest wins).
    `zero_matrices`: a group with an all-zero matrix is not selectable (exclude), or is scored
    on its other matrices (allow: the zero residual projections of an identity-initialised copy)."""

    granularity: str = "block"
    non_layer: str = "base"
    metric: str = "ner"
    goal: str = "max"
    target: float | None = None
    zero_matrices: str = "exclude"


@dataclass(frozen=True)
class TetherOptions:
    """The compatibility gate (tether.py): how each candidate block is compared with the base block
    at its depth (`measure`), the score below which it drifts and is not eligible there, and
    whether the eligible candidates compete (`select`) or are averaged (`blend`, with `weights`
    equal, proportional to the selection score, or proportional to the compatibility)."""

    measure: str = "cosine"
    min_compatibility: float = 0.5
    mode: str = "select"
    weights: str = "equal"


@dataclass(frozen=True)
class DlecOptions:
    """Layer expansion (dlec.py): how many blocks to duplicate (exactly one of `add_layers`,
    `growth`, `layers`), how to rank them (`importance`; None: nothing with `layers`, else
    block_influence when transformers is installed, else ner), the calibration text (None: the
    built-in one), and how copies start.
    `where` and `cli` say how errors name a key: 'merge.yaml: dlec.growth' or 'expand: --growth'."""

    add_layers: int | None = None
    growth: float | None = None
    layers: tuple[int, ...] | None = None
    importance: str | None = None
    calibration: Path | None = None
    max_tokens: int = 4096
    init: str = "copy"
    trust_remote_code: bool = False
    where: str = field(default="config", compare=False)
    cli: bool = field(default=False, compare=False)

    def key(self, name: str) -> str:
        """How the user wrote this option: dlec.add_layers in a config, --add-layers on the command line."""
        return "--" + name.replace("_", "-") if self.cli else f"dlec.{name}"

    def setting(self, name: str, value: str) -> str:
        """How the user would set it: 'dlec.init: copy' in a config, '--init copy' on the command line."""
        if self.cli:
            return self.key(name) + ("" if value == "true" else f" {value}")
        return f"{self.key(name)}: {value}"


@dataclass(frozen=True)
class Strategy:
    """One variant of the selection and tether settings that an evaluation compares: the config's
    own sections with `settings` (('tether.mode', 'blend'), ...) given over them."""

    name: str
    selection: Selection
    tether: TetherOptions
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class EvaluateOptions:
    """Perplexity evaluation (evaluate.py): the texts, how many of their tokens, the window length
    (None: the model's context, at most max_tokens) and stride (None: half a window), and for a
    merge the strategies compared and what chooses among them (`mean` over the texts, or one text).
    `where` and `cli` say how errors name a key: 'merge.yaml: evaluate.texts' or 'evaluate: --text'."""

    texts: tuple[Path, ...]
    names: tuple[str, ...]  # each text as the user wrote it
    max_tokens: int = 4096
    max_length: int | None = None
    stride: int | None = None
    strategies: tuple[Strategy, ...] = ()
    choose_by: str = "mean"
    trust_remote_code: bool = False
    where: str = field(default="config", compare=False)
    cli: bool = field(default=False, compare=False)

    def key(self, name: str) -> str:
        """How the user wrote this option: evaluate.max_length in a config, --max-length on the command line."""
        if self.cli:
            return "--text" if name == "texts" else "--" + name.replace("_", "-")
        return f"evaluate.{name}"

    def setting(self, name: str, value: str) -> str:
        if self.cli:
            return self.key(name) + ("" if value == "true" else f" {value}")
        return f"{self.key(name)}: {value}"

    def label(self, path: Path) -> str:
        """A text's name in tables: as the user wrote it."""
        return self.names[self.texts.index(path)]


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config. `candidates` is the tie-break order: base first, then the rest."""

    models: tuple[ModelSpec, ...]
    base: ModelSpec
    output_dir: Path
    selection: Selection = field(default_factory=Selection)
    dtype: str = "keep"
    shard_size: int = 2 * 10**9
    device: str = "auto"
    tether: TetherOptions = field(default_factory=TetherOptions)
    dlec: DlecOptions | None = None
    evaluate: EvaluateOptions | None = None
    source: Path | None = None
    raw: dict = field(default_factory=dict)

    @property
    def candidates(self) -> tuple[ModelSpec, ...]:
        return (self.base,) + tuple(m for m in self.models if m != self.base)


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (instead of keeping the last)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():  # !!map x: refused below
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' merges a mapping; its keys may be overridden
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue  # check_keys reports non-string keys with their place in the config
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        """A value its tag cannot hold (!!int abc, 2001-02-30, !!bool maybe) is a YAML error at its place."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            text = f"{node.value[:40]!r} " if isinstance(node, yaml.ScalarNode) else ""
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            why = f" ({first_line(exc)})" if isinstance(exc, (ValueError, OverflowError)) else ""
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {text}as {tag}{why}",
                                                    node.start_mark) from None

    def construct_yaml_int(self, node):
        """An integer beyond any float is refused: no setting needs one, and Python may not even print it."""
        value = super().construct_yaml_int(node) if len(node.value) <= 1000 else None
        if value is None or abs(value).bit_length() > 1024:
            raise ValueError("too large for any setting")
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def load_config(path: str | Path, *, force: bool = False, writing: bool = True) -> MergeConfig:
    """Read and validate one YAML config file.

    force: an existing, non-empty output directory written by mastermerge may be replaced.
    writing: False for a dry run, which writes nothing and so does not mind an existing output.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        reason = getattr(exc, "problem", None) or ("nested too deeply" if isinstance(exc, RecursionError)
                                                   else first_line(exc))
        raise ConfigError(f"{path}: not valid YAML{at}: {reason}") from None
    return config_from_dict(raw, base_dir=path.resolve().parent, source=path, force=force, writing=writing)


def config_from_dict(raw: Any, *, base_dir: Path, source: Path | None = None,
                     force: bool = False, writing: bool = True) -> MergeConfig:
    """Validate a config already parsed into Python data (what `load_config` does after YAML)."""
    where = str(source) if source else "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (models, base_model, output_dir, ...), "
                          f"found {type_name(raw)}")
    check_keys(raw, TOP_KEYS, where, "")
    for key in ("models", "base_model", "output_dir"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key '{key}'")

    models_raw = raw["models"]
    if not isinstance(models_raw, list):
        raise ConfigError(f"{where}: models: expected a list of models, found {type_name(models_raw)}")
    if len(models_raw) < 2:
        raise ConfigError(f"{where}: models: at least two candidate models are needed, "
                          f"found {len(models_raw)}")
    models = tuple(model_spec(item, base_dir, where, f"models[{i}]") for i, item in enumerate(models_raw))
    seen = index_of_each(models, where, lambda i: f"models[{i}]")

    base = model_spec(raw["base_model"], base_dir, where, "base_model")
    if base.identity not in seen:
        listed = ", ".join(repr(m.ref) for m in models)
        raise ConfigError(f"{where}: base_model: '{base.ref}' is not among the models ({listed})")
    base = models[seen[base.identity]]

    output_dir = output_path(raw["output_dir"], base_dir, where, models, force, writing)
    selection = selection_options({} if raw.get("selection") is None else raw["selection"], where)
    tether = tether_options({} if raw.get("tether") is None else raw["tether"], selection, where)
    dtype = choice(raw.get("dtype", "keep"), DTYPES, where, "dtype")
    shard_size = size_in_bytes(raw.get("shard_size", "2GB"), where, "shard_size")
    device = choice(raw.get("device", "auto"), DEVICES, where, "device")
    if device == "cuda" and not cuda_available():
        raise ConfigError(f"{where}: device: 'cuda' was asked for but torch sees no CUDA device "
                          f"(is a CUDA build of torch installed?); use auto or cpu")
    dlec = None if raw.get("dlec") is None else dlec_options(raw["dlec"], base_dir, where)
    evaluate = None if raw.get("evaluate") is None else evaluate_options(raw["evaluate"], base_dir, where, raw)
    return MergeConfig(models=models, base=base, output_dir=output_dir, selection=selection,
                       dtype=dtype, shard_size=shard_size, device=device, tether=tether, dlec=dlec,
                       evaluate=evaluate, source=source, raw=raw)


def expand_config(model: str, out: str, options: dict, *, force: bool, writing: bool, device: str = "auto",
                  shard_size: str = "2GB") -> MergeConfig:
    """The config of `mastermerge expand MODEL --out DIR`: one candidate, no selection, a DLEC pass.
    `options` holds the command line's DLEC options under their config names."""
    where, cwd = "expand", Path.cwd()
    spec = model_spec(model, cwd, where, "MODEL")
    return MergeConfig(models=(spec,), base=spec,
                       output_dir=output_path(out, cwd, where, (spec,), force, writing, key="--out"),
                       shard_size=size_in_bytes(shard_size, where, "--shard-size"), device=device,
                       dlec=dlec_options(options, cwd, where, cli=True),
                       raw={"expand": {"model": model, "out": out, "device": device, "shard_size": shard_size,
                                       **{k: v for k, v in options.items() if v is not None}}})


def check_keys(mapping: dict, allowed: tuple[str, ...], where: str, prefix: str) -> None:
    """Refuse keys that are not allowed, suggesting the closest one (a nested key at top level too)."""
    sections = (("selection", SELECTION_KEYS), ("tether", TETHER_KEYS), ("dlec", DLEC_KEYS),
                ("evaluate", EVALUATE_KEYS))
    nested = {key: f"{section}.{key}" for section, keys in sections for key in keys} if not prefix else {}
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {prefix}{key!r}: keys must be strings, found {type_name(key)}")
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed) + list(nested), n=1)
            hint = (f"; did you mean '{nested.get(close[0], close[0])}'?" if close
                    else f"; known keys: {', '.join(allowed)}")
            raise ConfigError(f"{where}: {prefix}{key if key.isprintable() and key else repr(key)}: unknown key{hint}")


def model_spec(item: Any, base_dir: Path, where: str, key: str, require_config: bool = True) -> ModelSpec:
    """Parse one model entry: 'dir', 'org/name', 'org/name@rev' or {model: ..., revision: ...}.
    A local directory must hold a config.json unless `require_config` is False (analysis only)."""
    revision = None
    if isinstance(item, dict):
        check_keys(item, MODEL_KEYS, where, f"{key}.")
        if "model" not in item:
            raise ConfigError(f"{where}: {key}: missing required key 'model'")
        revision = item.get("revision")
        if isinstance(revision, (int, float)) and not isinstance(revision, bool):
            raise ConfigError(f"{where}: {key}.revision: found the number {revision!r}; quote it "
                              f"(revision: '{revision}') so YAML keeps it as written")
        if revision is not None and not (isinstance(revision, str) and revision.strip() and revision.isprintable()):
            raise ConfigError(f"{where}: {key}.revision: expected a branch, tag or commit, found {revision!r}")
        item = item["model"]
        key = f"{key}.model"
    if not isinstance(item, str) or not item.strip() or not item.strip().isprintable():
        raise ConfigError(f"{where}: {key}: expected a local directory or a hub id (org/name[@revision]), "
                          f"found {item!r}")
    ref = item.strip()
    with os_errors(where, key, ref):
        local = Path(ref).expanduser()
        local = local if local.is_absolute() else base_dir / local
        if looks_local(ref, local, base_dir):
            if revision is not None:
                raise ConfigError(f"{where}: {key}: '{ref}' is a local directory; 'revision' applies to hub ids only")
            if not local.is_dir():
                hint = f"; for the hub repo, write '{ref}@main'" if HUB_ID.match(ref) else ""
                raise ConfigError(f"{where}: {key}: local model directory '{ref}' does not exist "
                                  f"(looked at {local}){hint}")
            if require_config and not (local / "config.json").is_file():
                raise ConfigError(f"{where}: {key}: '{ref}' has no config.json; is it a transformers model directory?")
            return ModelSpec(ref=ref, path=local.resolve())
    repo_id, _, at_revision = ref.partition("@")
    if at_revision and revision is not None:
        raise ConfigError(f"{where}: {key}: revision given twice ('{ref}' and revision: {revision})")
    if not HUB_ID.match(repo_id) or (not at_revision and "@" in ref):
        hint = f"; a hub model without an organisation is written org/name, e.g. openai-community/{ref}" \
            if "/" not in ref and "@" not in ref else ""
        raise ConfigError(f"{where}: {key}: '{ref}' is neither an existing directory nor a hub id "
                          f"(org/name or org/name@revision){hint}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"{where}: {key}: '{repo_id}' is not a valid hub id: "
                          f"{first_line(exc)}") from None
    revision = at_revision or revision
    return ModelSpec(ref=f"{repo_id}@{revision}" if revision else repo_id, repo_id=repo_id, revision=revision)


def index_of_each(specs: tuple[ModelSpec, ...], where: str, label) -> dict[str, int]:
    """Position of each model by identity; a model named twice is refused (label(i) names entry i)."""
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.identity in seen:
            raise ConfigError(f"{where}: {label(i)}: '{spec.ref}' repeats {label(seen[spec.identity])}")
        seen[spec.identity] = i
    return seen


def looks_local(ref: str, local: Path, base_dir: Path) -> bool:
    """A path that exists, is written as a path, or whose first part is a local directory."""
    if ref.startswith((".", "/", "~")) or "\\" in ref or local.exists():
        return True
    return "@" not in ref and (base_dir / Path(ref).parts[0]).is_dir()


def output_path(value: Any, base_dir: Path, where: str, models: tuple[ModelSpec, ...],
                replace: bool, writing: bool, marker: str = "merge_report.json", key: str = "output_dir") -> Path:
    """The output directory, refused where writing it could destroy something the user has; with
    `replace` (--force) a non-empty one is accepted only if it holds `marker` (our own output)."""
    with os_errors(where, key, value):
        return checked_output_path(value, base_dir, where, models, replace, writing, marker, key)


def checked_output_path(value: Any, base_dir: Path, where: str, models: tuple[ModelSpec, ...],
                        replace: bool, writing: bool, marker: str, key: str) -> Path:
    """output_path without the translation of OS errors (a name too long, no permission) into ConfigError."""
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise ConfigError(f"{where}: {key}: expected a directory path, found {value!r}")
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    for spec in models:
        if spec.path is not None and (path == spec.path or spec.path in path.parents
                                      or path in spec.path.parents):
            raise ConfigError(f"{where}: {key}: '{value}' overlaps the input model '{spec.ref}'")
    from huggingface_hub import constants
    hub_cache = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    if path == hub_cache or hub_cache in path.parents or path in hub_cache.parents:
        raise ConfigError(f"{where}: {key}: '{value}' overlaps the Hugging Face cache ({hub_cache})")
    for name, protected in (("the current directory", Path.cwd().resolve()), ("the config file", base_dir)):
        if path == protected or path in protected.parents:
            raise ConfigError(f"{where}: {key}: '{value}' would contain or replace {name}; "
                              f"give the output a directory of its own")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: {key}: '{value}' exists and is a file, not a directory")
    if writing and path.parent.is_dir():
        clean_leftovers(path)  # a killed run's earlier output is put back before it is judged
    if writing and path.is_dir() and any(path.iterdir()):
        if not replace:
            raise ConfigError(f"{where}: {key}: '{value}' exists and is not empty "
                              f"(use --force to replace it)")
        if not (path / marker).is_file():
            raise ConfigError(f"{where}: {key}: '{value}' is not empty and was not written by "
                              f"mastermerge (no {marker}); refusing to replace it even with --force")
    return path


def selection_options(value: Any, where: str, prefix: str = "") -> Selection:
    """Validate the `selection:` section (`prefix`: where it sits, such as 'evaluate.strategies[0].')."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {prefix}selection: expected a mapping, found {type_name(value)}")
    check_keys(value, SELECTION_KEYS, where, f"{prefix}selection.")
    metric = choice(value.get("metric", "ner"), tuple(METRICS), where, f"{prefix}selection.metric")
    if "goal" not in value and metric != "ner":
        raise ConfigError(f"{where}: {prefix}selection.goal: required with selection.metric: {metric} "
                          f"(max, min, or target with selection.target, e.g. goal: target, target: 2.0 for alpha)")
    goal = choice(value.get("goal", "max"), GOALS, where, f"{prefix}selection.goal")
    target = value.get("target")
    if goal == "target":
        if not finite_number(target):
            raise ConfigError(f"{where}: {prefix}selection.target: goal: target needs a finite number, found {target!r}")
        target = float(target)
    elif target is not None:
        raise ConfigError(f"{where}: {prefix}selection.target: only used with goal: target (goal is {goal})")
    return Selection(
        granularity=choice(value.get("granularity", "block"), GRANULARITIES, where, f"{prefix}selection.granularity"),
        non_layer=choice(value.get("non_layer", "base"), NON_LAYER, where, f"{prefix}selection.non_layer"),
        metric=metric, goal=goal, target=target,
        zero_matrices=choice(value.get("zero_matrices", "exclude"), ZERO_MATRICES, where, f"{prefix}selection.zero_matrices"),
    )


def tether_options(value: Any, selection: Selection, where: str, prefix: str = "") -> TetherOptions:
    """Validate the `tether:` section."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {prefix}tether: expected a mapping (min_compatibility, mode, ...), "
                          f"found {type_name(value)}")
    check_keys(value, TETHER_KEYS, where, f"{prefix}tether.")
    measure = choice(value.get("measure", "cosine"), MEASURES, where, f"{prefix}tether.measure")
    low = -1.0 if measure != "l2" else -math.inf
    threshold = value.get("min_compatibility", 0.5)
    if not finite_number(threshold) or not low <= threshold <= 1:
        span = "between -1 and 1" if measure != "l2" else "at most 1"
        raise ConfigError(f"{where}: {prefix}tether.min_compatibility: expected a number {span} ({measure}; "
                          f"{'-1' if measure != 'l2' else 'a large negative number'} lets every candidate through), "
                          f"found {threshold!r}")
    mode = choice(value.get("mode", "select"), MODES, where, f"{prefix}tether.mode")
    weights = choice(value.get("weights", "equal"), BLEND_WEIGHTS, where, f"{prefix}tether.weights")
    if weights != "equal" and mode != "blend":
        raise ConfigError(f"{where}: {prefix}tether.weights: only used with tether.mode: blend (mode is {mode})")
    if weights == "score" and selection.goal != "max":
        raise ConfigError(f"{where}: {prefix}tether.weights: score weighs candidates by their selection score, which needs "
                          f"selection.goal: max (goal is {selection.goal}, so a lower score is better); "
                          f"use equal or compatibility")
    if weights == "compatibility" and threshold <= 0:
        raise ConfigError(f"{where}: {prefix}tether.weights: compatibility needs tether.min_compatibility > 0, so every "
                          f"weight is positive (found {threshold!r}); use equal")
    return TetherOptions(measure=measure, min_compatibility=float(threshold), mode=mode, weights=weights)


def dlec_options(value: Any, base_dir: Path, where: str, cli: bool = False) -> DlecOptions:
    """Validate the `dlec:` section (or the expand command's options, with `cli`)."""
    blank = DlecOptions(where=where, cli=cli)
    key = blank.key
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: dlec: expected a mapping (add_layers, growth or layers, ...), "
                          f"found {type_name(value)}")
    check_keys(value, DLEC_KEYS, where, "dlec.")
    given = [k for k in ("add_layers", "growth", "layers") if value.get(k) is not None]
    if len(given) != 1:
        found = " and ".join(key(k) for k in given) if given else "none"
        raise ConfigError(f"{where}: {'' if cli else 'dlec: '}give exactly one of {key('add_layers')}, "
                          f"{key('growth')} or {key('layers')}, found {found}")
    add_layers = value.get("add_layers")
    if add_layers is not None and (isinstance(add_layers, bool) or not isinstance(add_layers, int) or add_layers < 1):
        raise ConfigError(f"{where}: {key('add_layers')}: expected a whole number of layers >= 1, found {add_layers!r}")
    growth = value.get("growth")
    if growth is not None:
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 0 < growth <= 1:
            raise ConfigError(f"{where}: {key('growth')}: expected a fraction of the parameters in (0, 1], "
                              f"e.g. 0.16 for ~16% more, found {growth!r}")
        growth = float(growth)
    layers = value.get("layers")
    if layers is not None:
        if (not isinstance(layers, list) or not layers
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in layers)):
            raise ConfigError(f"{where}: {key('layers')}: expected a list of layer indices (0-based) to "
                              f"duplicate, e.g. [3, 7], found {layers!r}")
        layers = tuple(sorted(layers))
    importance = value.get("importance")
    if importance is not None:
        importance = choice(importance, IMPORTANCE, where, key("importance"))
    calibration = value.get("calibration")
    if calibration is not None:
        if importance == "ner":
            raise ConfigError(f"{where}: {key('calibration')}: not used with {blank.setting('importance', 'ner')} "
                              f"(importance from the weights needs no text)")
        calibration = text_path(calibration, base_dir, where, key("calibration"), "calibration text")
    max_tokens = value.get("max_tokens", 4096)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"{where}: {key('max_tokens')}: expected a number of tokens >= 2, found {max_tokens!r}")
    trust = value.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ConfigError(f"{where}: {key('trust_remote_code')}: expected true or false, found {trust!r}")
    return DlecOptions(add_layers=add_layers, growth=growth, layers=layers, importance=importance,
                       calibration=calibration, max_tokens=max_tokens,
                       init=choice(value.get("init", "copy"), INITS, where, key("init")),
                       trust_remote_code=trust, where=where, cli=cli)


def evaluate_options(value: Any, base_dir: Path, where: str, raw: dict | None = None, cli: bool = False) -> EvaluateOptions:
    """Validate the `evaluate:` section (or the evaluate command's options, with `cli`); `raw` is
    the whole config, whose selection and tether sections the strategies vary."""
    blank = EvaluateOptions((), (), where=where, cli=cli)
    key = blank.key
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: evaluate: expected a mapping (texts, max_tokens, strategies, ...), "
                          f"found {type_name(value)}")
    check_keys(value, EVALUATE_KEYS, where, "evaluate.")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"{where}: {'evaluate' if cli else 'evaluate:'}: runs the models with transformers, which "
                          f"is not installed (pip install 'mastermerge[transformers]')")
    texts = value.get("texts")
    if not isinstance(texts, list) or not texts:
        raise ConfigError(f"{where}: {key('texts')}: expected a list of text files, e.g. [held_out.txt], found "
                          f"{texts!r}")
    paths = tuple(text_path(t, base_dir, where, f"{key('texts')}[{i}]" if not cli else key("texts"), "text")
                  for i, t in enumerate(texts))
    for i, path in enumerate(paths):
        read_text(path, where, f"{key('texts')}[{i}]" if not cli else key("texts"))
        if path in paths[:i]:
            raise ConfigError(f"{where}: {key('texts')}: '{texts[i]}' is given twice")
    numbers = {}
    for name, low in (("max_tokens", 2), ("max_length", 2), ("stride", 1)):
        number = value.get(name)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < low):
            raise ConfigError(f"{where}: {key(name)}: expected a whole number of tokens >= {low}, found {number!r}")
        numbers[name] = number
    if numbers["max_length"] and numbers["max_length"] > (numbers["max_tokens"] or 4096):
        raise ConfigError(f"{where}: {key('max_length')}: {numbers['max_length']} is longer than the "
                          f"{numbers['max_tokens'] or 4096} tokens used of each text ({key('max_tokens')})")
    if numbers["max_length"] and numbers["stride"] and numbers["stride"] >= numbers["max_length"]:
        raise ConfigError(f"{where}: {key('stride')}: {numbers['stride']} must be shorter than the window "
                          f"({key('max_length')}: {numbers['max_length']}), or no window would overlap the next")
    names = tuple(str(t).strip() for t in texts)
    choose_by = value.get("choose_by", "mean")
    if choose_by != "mean" and choose_by not in names:
        raise ConfigError(f"{where}: {key('choose_by')}: expected mean or one of the texts ({', '.join(names)}), "
                          f"found {choose_by!r}")
    trust = value.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ConfigError(f"{where}: {key('trust_remote_code')}: expected true or false, found {trust!r}")
    strategies = strategies_of(value.get("strategies"), raw or {}, where) if not cli else ()
    return EvaluateOptions(paths, names, max_tokens=numbers["max_tokens"] or 4096, max_length=numbers["max_length"],
                           stride=numbers["stride"], strategies=strategies, choose_by=choose_by,
                           trust_remote_code=trust, where=where, cli=cli)


def strategies_of(value: Any, raw: dict, where: str) -> tuple[Strategy, ...]:
    """The config's own settings (CONFIGURED) and each listed variant, validated as the sections
    they vary are: `{name: blend, tether: {mode: blend}}` gives tether.mode: blend over the config's."""
    if value is None:
        value = []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: evaluate.strategies: expected a list of variants, e.g. "
                          f"[{{tether: {{mode: blend}}}}], found {type_name(value)}")
    strategies = []
    for i, item in enumerate(value):
        at = f"evaluate.strategies[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: {at}: expected a mapping (name, selection, tether), found {type_name(item)}")
        check_keys(item, STRATEGY_KEYS, where, f"{at}.")
        if not any(item.get(k) for k in ("selection", "tether")):
            raise ConfigError(f"{where}: {at}: give the selection or tether settings it changes, e.g. "
                              f"tether: {{mode: blend}}")
        sections = {}
        for section in ("selection", "tether"):
            own = item.get(section) or {}
            if not isinstance(own, dict):
                raise ConfigError(f"{where}: {at}.{section}: expected a mapping, found {type_name(own)}")
            inherited = dict(raw.get(section) or {}) if isinstance(raw.get(section), dict) else {}
            for key, dependents in DEPENDENT_KEYS.items():  # a new metric brings its own goal, a new mode its weights
                if key in own:
                    for dependent in dependents:
                        inherited.pop(dependent, None)
            sections[section] = inherited | own
        selection = selection_options(sections["selection"], where, f"{at}.")
        tether = tether_options(sections["tether"], selection, where, f"{at}.")
        settings = tuple((f"{section}.{k}", v) for section in ("selection", "tether")
                         for k, v in (item.get(section) or {}).items())
        name = item.get("name", ", ".join(f"{k}: {v}" for k, v in settings))
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise ConfigError(f"{where}: {at}.name: expected a short name, found {name!r}")
        taken = [CONFIGURED] + [s.name for s in strategies]
        if name in taken:
            raise ConfigError(f"{where}: {at}.name: '{name}' is already the name of "
                              f"{'the config' if name == CONFIGURED else 'another strategy'}")
        strategies.append(Strategy(name, selection, tether, settings))
    return tuple(strategies)


def text_path(value: Any, base_dir: Path, where: str, key: str, what: str) -> Path:
    """The resolved path of a text file the config names (relative to the config file)."""
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise ConfigError(f"{where}: {key}: expected the path of a text file, found {value!r}")
    with os_errors(where, key, value):
        path = Path(value.strip()).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if path.is_dir():
            raise ConfigError(f"{where}: {key}: '{value}' is a directory, not a text file")
        if not path.is_file():
            raise ConfigError(f"{where}: {key}: {what} '{value}' not found (looked at {path})")
        return path.resolve()


def read_text(path: Path, where: str, key: str) -> str:
    """A text file's content: ConfigError when it cannot be read, is not UTF-8 or is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: {key}: {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {key}: cannot read {path} ({exc.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{where}: {key}: {path} is empty")
    return text


def choice(value: Any, allowed: tuple[str, ...], where: str, key: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: {key}: expected one of {', '.join(allowed)}, found {value!r}{hint}")
    return value


def size_in_bytes(value: Any, where: str, key: str) -> int:
    """Parse 5000000, '500MB', '2GB' or '1.5GiB' into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = SIZE.match(value) if isinstance(value, str) else None
        size = float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()] if match else 0
        if size == math.inf:
            raise ConfigError(f"{where}: {key}: {value!r} is too large for a size in bytes")
        size = int(size)
    if size <= 0:
        raise ConfigError(f"{where}: {key}: expected a positive size such as 2GB or 500MB, found {value!r}")
    return size


def finite_number(value: Any) -> bool:
    """A finite int or float, not true/false (an int too large for a float is not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@contextmanager
def os_errors(where: str, key: str, value: str):
    """A path the system refuses to look at (a name too long, ~user unknown, no permission, a symlink
    loop) becomes a one-line ConfigError naming the key."""
    try:
        yield
    except RecursionError:
        raise
    except (OSError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise ConfigError(f"{where}: {key}: cannot use {value!r} as a path: {reason}") from None
