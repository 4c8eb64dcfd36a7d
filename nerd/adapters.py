"""PEFT LoRA adapters as candidates: which directories are adapters, what their adapter_config.json
says, and which base each one is read on.

A candidate whose directory (local, or a hub snapshot) holds adapter_config.json and
adapter_model.safetensors (or adapter_model.bin, loaded with weights_only=True) is an adapter, and
its weights are the merge's base plus the adapter's update (loraview.py computes them). Its
resolved path is an AdapterSource: the adapter's directory with the base's beside it, which
Checkpoint.open reads as that view, so every stage that opens a candidate by its path (the
spectra, the tethers, DLEC, the writer, a Ray worker) opens the adapter the same way.

What adapter_config.json must say, each refusal one ModelError line naming the file and the key:
peft_type LORA (other PEFT methods are refused by name), no DoRA (use_dora), none of the LoRA
variants whose merge is not W + scaling * B @ A (listed in VARIANTS), no initialisation that
changed the base's own weights (PiSSA, OLoRA, CorDA, LoRA-GA) or quantized it (LoftQ); r and
lora_alpha numbers, rank_pattern and alpha_pattern mappings of numbers. Its base_model_name_or_path
must be the merge's base when both are hub ids (compared case-insensitively, revisions aside);
otherwise the tensor shapes decide, when the view is opened.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError, first_line, type_name

if TYPE_CHECKING:
    from .sections import ModelSpec
    from .sources import ResolvedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # safetensors first
MODEL_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*")  # a whole model's
# Settings of LoRA variants whose merge is not W + scaling * B @ A (peft's own is_lora_variant fields with
# their own merge, and the ones that change which tensors there are), by the name their refusal gives them
VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA: its merge rescales each column by a learned magnitude)",
    "use_qalora": "QA-LoRA, which adapts a quantized base",
    "alora_invocation_tokens": "activated LoRA, which acts only after its invocation tokens and cannot be merged",
    "layer_replication": "layer replication, which repeats the base's layers",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing among LoRA experts (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config)",
}
# init_lora_weights values whose adapter is trained on a base other than the one saved on the hub
MODIFIED_BASE = {
    "pissa": "PiSSA moved the base's principal components into the adapter (convert it with peft's "
    "path_initial_model_for_weight_conversion)",
    "olora": "OLoRA changed the base's weights (convert it with peft's path_initial_model_for_weight_conversion)",
    "corda": "CorDA changed the base's weights (convert it with peft's path_initial_model_for_weight_conversion)",
    "lora_ga": "LoRA-GA changed the base's weights (convert it with peft's path_initial_model_for_weight_conversion)",
    "loftq": "LoftQ trained it on a quantized base; quantized bases are not supported",
}


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter candidate's weights come from: the adapter's directory and the merge's
    base's. It stands for the adapter's directory wherever a path is shown (str, os.fspath), and
    Checkpoint.open reads it as the base with the adapter merged in."""

    adapter: Path
    base: Path

    def __fspath__(self) -> str:
        return str(self.adapter)

    def __str__(self) -> str:
        return str(self.adapter)

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclass(frozen=True)
class LoraConfig:
    """What adapter_config.json says that the merge uses (read_config checked it)."""

    file: Path
    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """The rank and scaling of one module (its name in the base model, as peft matches its
        patterns): lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.alpha)
        return r, alpha / math.sqrt(r) if self.rslora else alpha / r


def pattern_key(patterns: dict, module: str) -> str:
    """The first key of a rank_pattern or alpha_pattern that matches the module's name or a dotted
    suffix of it, as a regular expression (peft's get_pattern_key); the module's name when none does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_adapter(directory: Path) -> bool:
    """Whether a directory holds a PEFT adapter: adapter_config.json and adapter weights, and no
    weights of a whole model."""
    return (
        (directory / ADAPTER_CONFIG).is_file()
        and any((directory / w).is_file() for w in ADAPTER_WEIGHTS)
        and not any(any(directory.glob(pattern)) for pattern in MODEL_WEIGHTS)
    )


def refuse_bare_adapter(directory: Path) -> None:
    """An adapter opened as a model of its own, without the base its weights are added to: refused."""
    if is_adapter(directory):
        raise ModelError(
            f"{directory}: a PEFT adapter ({ADAPTER_CONFIG}) has no weights of its own: name it among the "
            f"models of a merge, whose base_model it is merged into"
        )


def adapter_weights(directory: Path) -> Path:
    """The adapter's weight file: adapter_model.safetensors, else adapter_model.bin."""
    for name in ADAPTER_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise ModelError(f"{directory}: a PEFT adapter needs {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")


def read_config(directory: Path) -> LoraConfig:
    """adapter_config.json, checked: a plain LoRA whose merge is W + scaling * B @ A."""
    file = directory / ADAPTER_CONFIG
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{file}: cannot be read as JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: expected a JSON object, found {type_name(data, plain=True)}")
    refuse_variants(file, data)
    return LoraConfig(
        file=file,
        r=number(file, "r", data.get("r", 8), int),
        alpha=number(file, "lora_alpha", data.get("lora_alpha", 8), float),
        rslora=flag(file, "use_rslora", data.get("use_rslora", False)),
        fan_in_fan_out=flag(file, "fan_in_fan_out", data.get("fan_in_fan_out", False)),
        rank_pattern=pattern(file, "rank_pattern", data.get("rank_pattern"), int),
        alpha_pattern=pattern(file, "alpha_pattern", data.get("alpha_pattern"), float),
        base_model=text_or_none(data.get("base_model_name_or_path")),
    )


def refuse_variants(file: Path, data: dict) -> None:
    """Other PEFT methods, DoRA and the LoRA variants that do not merge as W + scaling * B @ A:
    refused by name."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        found = f"'{peft_type}'" if isinstance(peft_type, str) else "none"
        raise ModelError(
            f"{file}: peft_type: {found} adapters are not supported (expected 'LORA': only LoRA adapters "
            f"merge into their base as W + scaling * B @ A)"
        )
    for key, what in VARIANTS.items():
        if data.get(key):
            raise ModelError(f"{file}: {key}: {what} is not supported; only plain LoRA adapters are")
    init = data.get("init_lora_weights")
    method = init.lower().split("_niter_")[0] if isinstance(init, str) else None
    if method in MODIFIED_BASE:
        raise ModelError(f"{file}: init_lora_weights: '{init}' is not supported: {MODIFIED_BASE[method]}")


def number(file: Path, key: str, value: object, kind: type) -> float:
    """A positive number of the config (an integer where `kind` is int)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (kind is int and value != int(value)):
        expected = "a positive integer" if kind is int else "a positive number"
        raise ModelError(f"{file}: {key}: expected {expected}, found {value!r}")
    return kind(value)


def text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def flag(file: Path, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{file}: {key}: expected true or false, found {value!r}")
    return value


def pattern(file: Path, key: str, value: object, kind: type) -> dict:
    """rank_pattern or alpha_pattern: module pattern -> number (null or absent: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelError(f"{file}: {key}: expected a mapping of module pattern -> number, found {value!r}")
    for k in value:
        try:
            re.compile(k)
        except re.error as exc:
            raise ModelError(f"{file}: {key}: '{k}' is not a regular expression ({exc})") from None
    return {k: number(file, f"{key}.{k}", v, kind) for k, v in value.items()}


def paired(resolved: dict[str, ResolvedModel], base: ModelSpec) -> dict[str, ResolvedModel]:
    """The resolved models with every adapter among them paired with the merge's base (an
    AdapterSource for its path); the base itself must be a full model."""
    import dataclasses

    base_path = Path(resolved[base.ref].path)
    if is_adapter(base_path):
        raise ModelError(
            f"{base_path / ADAPTER_CONFIG}: base_model '{base.ref}' is a PEFT adapter; the base must be a full "
            f"model (the one the adapter was trained on), with the adapter among the other models"
        )
    out = {}
    for ref, model in resolved.items():
        if ref != base.ref and is_adapter(Path(model.path)):
            check_base_id(read_config(Path(model.path)), base)
            model = dataclasses.replace(model, path=AdapterSource(Path(model.path), base_path))
        out[ref] = model
    return out


def check_base_id(config: LoraConfig, base: ModelSpec) -> None:
    """The adapter's base_model_name_or_path must be the merge's base when both are hub ids."""
    found = config.base_model
    if base.repo_id is None or not found or not hub_id(found):
        return  # a local base, or an adapter trained on a local copy: the tensor shapes decide
    if found.split("@")[0].casefold() != base.repo_id.casefold():
        raise ModelError(
            f"{config.file}: base_model_name_or_path: expected '{base.repo_id}' (the merge's base_model), "
            f"found '{found}'; an adapter merges only into the base it was trained on"
        )


def hub_id(text: str) -> bool:
    """Whether a base_model_name_or_path is written as a hub id (org/name), not a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?", text) is not None and not Path(text).exists()
