"""The checks of a config that look outside it, after its schema (schema.py, sections.py) has
validated it: which model references are local directories and which are hub ids, the output
directory, the text files, and whether transformers is installed for an evaluation. Each refusal
is one ConfigError line naming the file (or command), the key and the value as written.

Nothing here changes the disk except `claim_output` (and `claim_dir`), the explicit step right before
a run writes: it puts back or removes what a killed run left beside the output (staging.py), then
refuses an output that is not empty unless --force is given and the output is our own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .adapters import ADAPTER_CONFIG
from .errors import ConfigError, first_line
from .schema import DlecOptions, EvaluateOptions, MergeConfig, option_key
from .sections import ModelSpec, Selection
from .staging import clean_leftovers

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
OUR_REPORT = "merge_report.json"  # what marks a directory as a merge's output


def resolved_spec(spec: ModelSpec, base_dir: Path, where: str, key: str, require_config: bool = True) -> ModelSpec:
    """The model a validated spec names: a local directory (which must hold a config.json, or a PEFT
    adapter's adapter_config.json, unless `require_config` is False, for analysis only) or a hub
    repo at a revision."""
    ref, revision = spec.ref, spec.revision
    with os_errors(where, key, ref):
        local = Path(ref).expanduser()
        local = local if local.is_absolute() else base_dir / local
        if looks_local(ref, local, base_dir):
            if local.exists() and not local.is_dir():
                raise ConfigError(f"{where}: {key}: {file_given(ref, local, require_config)}")
            if revision is not None:
                raise ConfigError(f"{where}: {key}: '{ref}' is a local directory; 'revision' applies to hub ids only")
            if not local.is_dir():
                hint = f"; for the hub repo, write '{ref}@main'" if HUB_ID.match(ref) else ""
                raise ConfigError(
                    f"{where}: {key}: local model directory '{ref}' does not exist (looked at {local}){hint}"
                )
            if require_config and not (local / "config.json").is_file() and not (local / ADAPTER_CONFIG).is_file():
                raise ConfigError(
                    f"{where}: {key}: '{ref}' has no config.json (nor a PEFT adapter's {ADAPTER_CONFIG}); is it a "
                    f"transformers model directory?"
                )
            return ModelSpec(ref=ref, path=local.resolve())
    repo_id, _, at_revision = ref.partition("@")
    if at_revision and revision is not None:
        raise ConfigError(f"{where}: {key}: revision given twice ('{ref}' and revision: {revision})")
    if not HUB_ID.match(repo_id) or (not at_revision and "@" in ref):
        hint = (
            f"; a hub model without an organisation is written org/name, e.g. openai-community/{ref}"
            if "/" not in ref and "@" not in ref
            else ""
        )
        looked = f"; looked for the directory at {local}" if "@" not in ref else ""
        raise ConfigError(
            f"{where}: {key}: '{ref}' is neither an existing directory nor a hub id "
            f"(org/name or org/name@revision){looked}{hint}"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"{where}: {key}: '{repo_id}' is not a valid hub id: {first_line(exc)}") from None
    revision = at_revision or revision
    return ModelSpec(ref=f"{repo_id}@{revision}" if revision else repo_id, repo_id=repo_id, revision=revision)


def file_given(ref: str, local: Path, require_config: bool) -> str:
    """The refusal of a file named where a model directory is expected (its model.safetensors, its
    config.json): what to give instead, its directory where that is a model directory."""
    parent = local.parent
    if not require_config or (parent / "config.json").is_file() or (parent / ADAPTER_CONFIG).is_file():
        written = Path(ref).parent
        at = "" if written.is_absolute() else f" ({parent.resolve()})"
        return f"'{ref}' is a file, not a model directory; give its directory, '{written}'{at}"
    return (
        f"'{ref}' is a file, not a model directory; give the directory that holds the model's config.json "
        f"(or a PEFT adapter's {ADAPTER_CONFIG})"
    )


def looks_local(ref: str, local: Path, base_dir: Path) -> bool:
    """A path that exists, is written as a path, or whose first part is a local directory."""
    if ref.startswith((".", "/", "~")) or "\\" in ref or local.exists():
        return True
    return "@" not in ref and (base_dir / Path(ref).parts[0]).is_dir()


def index_of_each(specs: tuple[ModelSpec, ...], where: str, label: Callable[[int], str]) -> dict[str, int]:
    """Position of each model by identity; a model named twice is refused (label(i) names entry i)."""
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.identity in seen:
            raise ConfigError(f"{where}: {label(i)}: '{spec.ref}' repeats {label(seen[spec.identity])}")
        seen[spec.identity] = i
    return seen


def checked_output_path(
    value: str, base_dir: Path, where: str, models: tuple[ModelSpec, ...], key: str = "output_dir"
) -> Path:
    """The resolved output directory (`value` as written, a path string), refused where writing it
    could destroy something the user has: an input model, the Hugging Face cache, the working
    directory or the config's, a file."""
    with os_errors(where, key, value):
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else base_dir / path).resolve()
        for spec in models:
            if spec.path is not None and (path == spec.path or spec.path in path.parents or path in spec.path.parents):
                raise ConfigError(f"{where}: {key}: '{value}' overlaps the input model '{spec.ref}'")
        from huggingface_hub import constants

        hub_cache = Path(constants.HF_HUB_CACHE).expanduser().resolve()
        if path == hub_cache or hub_cache in path.parents or path in hub_cache.parents:
            raise ConfigError(f"{where}: {key}: '{value}' overlaps the Hugging Face cache ({hub_cache})")
        for name, protected in (("the current directory", Path.cwd().resolve()), ("the config file", base_dir)):
            if path == protected or path in protected.parents:
                raise ConfigError(
                    f"{where}: {key}: '{value}' would contain or replace {name}; give the output a directory of its own"
                )
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{where}: {key}: '{value}' exists and is a file, not a directory")
    return path


def claim_dir(path: Path, value: str, where: str, key: str, force: bool, marker: str = OUR_REPORT) -> None:
    """Right before a run writes `path`: a killed run's leftovers beside it are removed, and an earlier
    output it had moved aside is put back (staging.clean_leftovers, each step reported on stderr);
    then `path` is refused if it is not empty, unless `force` and it holds `marker` (our own output)."""
    with os_errors(where, key, value):
        if path.parent.is_dir():
            clean_leftovers(path)
        if path.is_dir() and any(path.iterdir()):
            if not force:
                raise ConfigError(f"{where}: {key}: '{value}' exists and is not empty (use --force to replace it)")
            if not (path / marker).is_file():
                raise ConfigError(
                    f"{where}: {key}: '{value}' is not empty and was not written by "
                    f"mastermerge (no {marker}); refusing to replace it even with --force"
                )


def claim_output(config: MergeConfig, *, force: bool = False) -> None:
    """claim_dir for a config's output_dir (or the --out of `mastermerge expand`): the step between
    loading a config and writing it (the CLI runs it for every config before any work; a dry run,
    which writes nothing, does not)."""
    expand = config.raw.get("expand")
    if isinstance(expand, dict):
        where, key, value = "expand", "--out", expand["out"]
    else:
        where, key = str(config.source or "config"), "output_dir"
        value = config.raw.get("output_dir", str(config.output_dir))
    claim_dir(config.output_dir, value, where, key, force)


def resolved_dlec(options: DlecOptions, value: dict, base_dir: Path) -> DlecOptions:
    """The `dlec:` section (or the expand command's options) with its calibration text found."""
    if options.calibration is None:
        return options
    calibration = text_path(
        value["calibration"], base_dir, options.where, option_key(options, "calibration"), "calibration text"
    )
    return dataclasses.replace(options, calibration=calibration)


def resolved_evaluate(options: EvaluateOptions, value: dict, base_dir: Path) -> EvaluateOptions:
    """The `evaluate:` section (or the evaluate command's options) with its texts found and read;
    refused without transformers, which runs the models."""
    where = options.where
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(
            f"{where}: {'' if options.cli else 'evaluate: '}runs the models with transformers, which "
            f"is not installed (pip install 'mastermerge[transformers]')"
        )
    texts = value["texts"]
    keys = [option_key(options, "texts") + ("" if options.cli else f"[{i}]") for i in range(len(texts))]
    paths = tuple(text_path(t, base_dir, where, k, "text") for t, k in zip(texts, keys))
    for i, path in enumerate(paths):
        read_text(path, where, keys[i])
        if path in paths[:i]:
            raise ConfigError(f"{where}: {option_key(options, 'texts')}: '{texts[i]}' is given twice")
    return dataclasses.replace(options, texts=paths)


def text_path(value: str, base_dir: Path, where: str, key: str, what: str) -> Path:
    """The resolved path of a text file the config names (relative to the config file)."""
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


@contextmanager
def os_errors(where: str, key: str, value: Any):
    """A path the system refuses to look at (a name too long, ~user unknown, no permission, a symlink
    loop) becomes a one-line ConfigError naming the key."""
    try:
        yield
    except RecursionError:
        raise
    except (OSError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise ConfigError(f"{where}: {key}: cannot use {value!r} as a path: {reason}") from None


def resolved_pins(
    selection: Selection, models: tuple[ModelSpec, ...], base: ModelSpec, base_dir: Path, where: str, key: str
):
    """selection.pin with each name replaced by the reference of the candidate it names (the plan's
    name for it): `base` is base_model; otherwise the name as models (or base_model) write it, a
    name of the same model written otherwise (./ft-a for ft-a), or a directory name only one
    candidate has (the tables' short name)."""
    if not selection.pin:
        return selection
    pins = []
    for group, name in selection.pin:
        at = f"{key}.non_layer" if group == "non_layer" else f"{key}[{group}]"
        pins.append((group, candidate_named(name, models, base, base_dir, f"{where}: {at}")))
    return dataclasses.replace(selection, pin=tuple(pins))


def candidate_named(name: str, models: tuple[ModelSpec, ...], base: ModelSpec, base_dir: Path, where: str) -> str:
    """The reference of the candidate `name` names (resolved_pins); ConfigError naming the candidates if none."""
    if name in (m.ref for m in models):
        return name
    if name == "base":
        return base.ref
    try:
        identity = resolved_spec(ModelSpec(ref=name), base_dir, where, "").identity
    except ConfigError:
        identity = None
    same = [m.ref for m in models if m.identity == identity]
    named = [m.ref for m in models if Path(m.ref.split("@")[0].rstrip("/")).name == name]
    if same or len(named) == 1:
        return (same or named)[0]
    listed = ", ".join(repr(m.ref) for m in models)
    why = f"names {len(named)} of them" if named else "is not one of them"
    raise ConfigError(f"{where}: '{name}' {why}: the candidates are {listed}, or base for base_model")
