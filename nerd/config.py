"""The merge config: read a YAML file and validate all of it before any download or heavy work.

`load_config(path)` returns a `MergeConfig` or raises `ConfigError` with one line naming the
file, the key (its dotted path, such as selection.goal), what was expected and what was found,
with the closest key or choice where one was misspelt. Relative paths in a config are relative
to the config file. The schema is declared in schema.py (and sections.py); this module reads the
YAML, validates it against the schema, turns pydantic's first error into that line (messages.py),
and runs the checks that look outside the config (filesystem.py). Loading changes nothing on disk: `claim_output` is the
separate step before a run writes.

This module is also the config's API: the classes of schema.py and sections.py and the checks of
filesystem.py that the commands use are imported from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, first_line
from .filesystem import (
    checked_output_path,
    claim_output,
    index_of_each,
    read_text,
    resolved_dlec,
    resolved_evaluate,
    resolved_pins,
    resolved_spec,
)
from .messages import validated
from .schema import CONFIGURED, DEVICES, IMPORTANCE, INITS, DlecOptions, EvaluateOptions, MergeConfig, Strategy
from .sections import Compute, ModelSpec, Selection, TetherOptions
from .spectra import cuda_available
from .values import DirectoryPath, Reading, ShardSize

__all__ = [
    "CONFIGURED",
    "DEVICES",
    "IMPORTANCE",
    "INITS",
    "DlecOptions",
    "EvaluateOptions",
    "MergeConfig",
    "ModelSpec",
    "Selection",
    "Strategy",
    "TetherOptions",
    "claim_output",
    "config_from_dict",
    "dlec_options",
    "evaluate_options",
    "expand_config",
    "index_of_each",
    "load_config",
    "model_spec",
    "output_path",
    "read_text",
]


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (instead of keeping the last)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():  # !!map x: refused below
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' merges a mapping; its keys may be overridden
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue  # the schema reports non-string keys with their place in the config
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
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
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {text}as {tag}{why}", node.start_mark
            ) from None

    def construct_yaml_int(self, node):
        """An integer beyond any float is refused: no setting needs one, and Python may not even print it."""
        value = super().construct_yaml_int(node) if len(node.value) <= 1000 else None
        if value is None or abs(value).bit_length() > 1024:
            raise ValueError("too large for any setting")
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate one YAML config file (nothing on disk changes; see claim_output)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        reason = getattr(exc, "problem", None) or (
            "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        )
        raise ConfigError(f"{path}: not valid YAML{at}: {reason}") from None
    return config_from_dict(raw, base_dir=path.resolve().parent, source=path)


def config_from_dict(raw: Any, *, base_dir: Path, source: Path | None = None) -> MergeConfig:
    """Validate a config already parsed into Python data (what `load_config` does after YAML):
    the schema, then the models, the output directory and the text files on disk."""
    where = str(source) if source else "config"
    config = validated(MergeConfig, raw, Reading(where, sections=own_sections(raw)))
    models = tuple(
        resolved_spec(spec, base_dir, where, entry_key(raw["models"][i], f"models[{i}]"))
        for i, spec in enumerate(config.models)
    )
    seen = index_of_each(models, where, lambda i: f"models[{i}]")
    base = resolved_spec(config.base, base_dir, where, entry_key(raw["base_model"], "base_model"))
    joined = base.identity not in seen
    if joined:  # as mergekit's configs do: the base is a candidate, the first
        models, seen = (base, *models), {m.identity: i for i, m in enumerate((base, *models))}
    if len(models) < 2:
        raise ConfigError(
            f"{where}: models: at least two candidate models are needed (base_model one of them), found {len(models)}"
        )
    output_dir = checked_output_path(raw["output_dir"], base_dir, where, models)
    if config.device == "cuda" and not cuda_available():
        raise ConfigError(
            f"{where}: device: 'cuda' was asked for but torch sees no CUDA device "
            f"(is a CUDA build of torch installed?); use auto or cpu"
        )
    dlec = config.dlec and resolved_dlec(config.dlec, raw["dlec"], base_dir)
    evaluate = config.evaluate and resolved_evaluate(config.evaluate, raw["evaluate"], base_dir)
    base = models[seen[base.identity]]
    if evaluate:
        evaluate = dataclasses.replace(
            evaluate,
            strategies=tuple(
                dataclasses.replace(
                    s,
                    selection=resolved_pins(
                        s.selection, models, base, base_dir, where, f"evaluate.strategies[{i}].selection.pin"
                    ),
                )
                for i, s in enumerate(evaluate.strategies)
            ),
        )
    return dataclasses.replace(
        config,
        models=models,
        base=base,
        selection=resolved_pins(config.selection, models, base, base_dir, where, "selection.pin"),
        output_dir=output_dir,
        dlec=dlec,
        evaluate=evaluate,
        source=source,
        raw=raw,
        base_joined=joined,
    )


def own_sections(raw: Any) -> dict:
    """The config's own selection and tether sections, which the strategies of `evaluate:` vary."""
    return {k: raw.get(k) for k in ("selection", "tether")} if isinstance(raw, dict) else {}


def entry_key(item: Any, key: str) -> str:
    """How messages name a model entry: models[1], or models[1].model where it is a mapping."""
    return f"{key}.model" if isinstance(item, dict) else key


def expand_config(
    model: str,
    out: str,
    options: dict,
    *,
    device: str = "auto",
    shard_size: str = "2GB",
    compute: Compute = Compute(),
) -> MergeConfig:
    """The config of `mastermerge expand MODEL --out DIR`: one candidate, no selection, a DLEC pass.
    `options` holds the command line's DLEC options under their config names."""
    where, cwd = "expand", Path.cwd()
    spec = model_spec(model, cwd, where, "MODEL")
    return MergeConfig(
        models=(spec,),
        base=spec,
        output_dir=output_path(out, cwd, where, (spec,), key="--out"),
        shard_size=validated(ShardSize, shard_size, Reading(where, cli=True), "--shard-size"),
        device=device,
        compute=compute,
        dlec=dlec_options(options, cwd, where, cli=True),
        raw={
            "expand": {
                "model": model,
                "out": out,
                "device": device,
                "shard_size": shard_size,
                **{k: v for k, v in options.items() if v is not None},
            }
        },
    )


def dlec_options(value: Any, base_dir: Path, where: str, cli: bool = False) -> DlecOptions:
    """Validate the `dlec:` section (or the expand command's options, with `cli`)."""
    options = validated(DlecOptions, value, Reading(where, cli=cli), "" if cli else "dlec")
    return resolved_dlec(options, value, base_dir)


def evaluate_options(
    value: Any, base_dir: Path, where: str, raw: dict | None = None, cli: bool = False
) -> EvaluateOptions:
    """Validate the `evaluate:` section (or the evaluate command's options, with `cli`); `raw` is
    the whole config, whose selection and tether sections the strategies vary."""
    reading = Reading(where, cli=cli, sections=own_sections(raw))
    options = validated(EvaluateOptions, value, reading, "" if cli else "evaluate")
    return resolved_evaluate(options, value, base_dir)


def model_spec(item: Any, base_dir: Path, where: str, key: str, require_config: bool = True) -> ModelSpec:
    """One model entry ('dir', 'org/name', 'org/name@rev' or {model: ..., revision: ...}) validated and
    looked up; a local directory must hold a config.json unless `require_config` is False (analysis)."""
    spec = validated(ModelSpec, item, Reading(where), key)
    return resolved_spec(spec, base_dir, where, entry_key(item, key), require_config)


def output_path(value: Any, base_dir: Path, where: str, models: tuple[ModelSpec, ...], key: str = "output_dir") -> Path:
    """A command's output directory, validated (filesystem.checked_output_path); nothing on disk
    changes (filesystem.claim_dir claims it right before writing)."""
    validated(DirectoryPath, value, Reading(where), key)
    return checked_output_path(value, base_dir, where, models, key)
