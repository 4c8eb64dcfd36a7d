"""The plan's model in memory: the composite a plan describes, built with transformers before
anything is written, for the DLEC calibration run (importance.py) and the evaluation (evaluate.py).

The model is loaded from the base's directory (the class its config.json names) and every tensor
the plan takes from another candidate, or blends, is copied into it; after a DLEC expansion the
model is built from the plan's rewritten config.json and every tensor is copied in. Also here:
the content digest of a model (a plan's composite, or a directory) that keys the cached results
of running it, and the precision it runs in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .architecture import architecture_of
from .checkpoint import Checkpoint, numel, opened_checkpoints, torch_dtype
from .errors import ModelError, first_line
from .layout import layout_of
from .plan import Plan, PlanEntry, output_order
from .tether import blended_tensor

if TYPE_CHECKING:
    import torch

    from .store import MetricCache


def model_classes(transformers, config: dict, fallbacks: tuple[str, ...]) -> list:
    """The classes to try: the one config.json names (its `architectures`, unless the model brings its
    own code), then the named transformers auto classes."""
    named = (config.get("architectures") or [None])[0]
    own = getattr(transformers, named, None) if isinstance(named, str) and "auto_map" not in config else None
    return [c for c in [own] + [getattr(transformers, name) for name in fallbacks] if c is not None]


def dtype_keyword(transformers) -> str:
    """transformers 5 calls from_pretrained's dtype argument `dtype`, 4 `torch_dtype`."""
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def loaded_model(
    transformers,
    directory: Path,
    classes: list,
    dtype,
    trust_remote_code: bool,
    purpose: str,
    hint: str = "",
    complete: bool = False,
) -> torch.nn.Module:
    """The model of a directory, by the first class that loads it; ModelError naming the purpose
    ('to run the calibration text') and a hint ('; use dlec.importance: ner') when none does, and
    with `complete` when the checkpoint lacks weights the class has (transformers would draw them
    at random)."""
    kwargs = {dtype_keyword(transformers): dtype, "trust_remote_code": trust_remote_code}
    error = None
    for cls in classes:
        try:
            model, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
        except Exception as exc:  # ValueError for a class that does not fit, OSError for files, ...
            error = error or exc
            continue
        missing = sorted(info.get("missing_keys") or ())
        if complete and missing:
            raise ModelError(
                f"{directory}: the checkpoint has no weights for {len(missing)} tensor(s) of "
                f"{type(model).__name__} ({', '.join(missing[:3])}), which transformers would draw at "
                f"random, so its results would mean nothing"
            )
        return model
    raise ModelError(
        f"{directory}: transformers {transformers.__version__} cannot load this model {purpose} "
        f"({first_line(error)}){hint}"
    )


def composite_model(
    transformers,
    plan: Plan,
    config: dict,
    classes: list,
    device: torch.device | str,
    dtype,
    trust_remote_code: bool,
    purpose: str,
    hint: str = "",
) -> torch.nn.Module:
    """The model the plan describes, in memory: the base loaded with transformers and every tensor
    the plan takes from another candidate (or blends) copied in; after an expansion (plan.config),
    the model built from the rewritten config.json with every tensor copied in. `config` is the
    base's config.json, parsed."""
    import torch

    base_dir = plan.sources[plan.base]
    if plan.config is None:
        model = loaded_model(transformers, base_dir, classes, dtype, trust_remote_code, purpose, hint)
    else:  # a deeper model than the base: built from the rewritten config, every tensor copied in below
        model = grown_model(transformers, plan, classes, dtype, purpose, hint)
    state = model.state_dict()
    with opened_checkpoints(plan.used_sources()) as checkpoints, torch.no_grad():
        for entry in plan.entries:
            if plan.config is None and unchanged(entry, plan.base, checkpoints):  # loaded with the base as it is
                continue
            name = state_name(entry.name, state, getattr(model, "base_model_prefix", ""))
            if name is None and entry.optional:  # a buffer this version of transformers does not keep
                continue
            if name is None:
                raise ModelError(
                    f"{base_dir}: the composite's tensor '{entry.name}' (from "
                    f"{', '.join(entry.candidates)}) has no place in the transformers model{hint}"
                )
            state[name].copy_(entry_tensor(entry, checkpoints))
        if plan.config is not None and getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model.to(device).eval()


def unchanged(entry: PlanEntry, base: str, checkpoints: dict[str, Checkpoint]) -> bool:
    """An entry that copies the base's own tensor in its own dtype."""
    return (
        entry.candidates == (base,)
        and entry.transform is None
        and entry.tensor == entry.name
        and checkpoints[base].tensors[entry.tensor].dtype == entry.dtype
    )


def plan_dtype(plan: Plan) -> torch.dtype:
    """The output's floating-point dtype: that of the plan's first floating-point tensor."""
    return next(torch_dtype(e.dtype) for e in plan.entries if torch_dtype(e.dtype).is_floating_point)


def grown_model(transformers, plan: Plan, classes: list, dtype, purpose: str, hint: str) -> torch.nn.Module:
    """A freshly initialised model of the plan's rewritten config.json (an expansion), by the first
    class that builds it, in `dtype` ("auto": the dtype of the plan's first floating-point tensor)."""
    config = transformers.AutoConfig.for_model(**plan.config)
    if dtype == "auto":
        dtype = plan_dtype(plan)
    error = None
    for cls in classes:
        try:
            build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
            return build(config, dtype=dtype)
        except Exception as exc:  # ValueError for a class that does not fit the config
            error = error or exc
    raise ModelError(
        f"{plan.sources[plan.base]}: transformers {transformers.__version__} cannot build the expanded "
        f"model {purpose} ({first_line(error)}){hint}"
    )


def entry_tensor(entry: PlanEntry, opened: dict[str, Checkpoint]) -> torch.Tensor:
    """The values of one output tensor as the writer writes it: zeros, a blend, or the source tensor
    in the output dtype."""
    if entry.transform == "zero":
        import torch

        return torch.zeros(entry.shape, dtype=torch_dtype(entry.dtype))
    if entry.transform == "blend":
        return blended_tensor(entry, opened, torch_dtype(entry.dtype))
    return opened[entry.source].read(entry.tensor).to(torch_dtype(entry.dtype))  # as written (dtype: float16 ...)


def state_name(name: str, state: dict, prefix: str) -> str | None:
    """The model's name for a checkpoint tensor: the same, or with the base model prefix added or
    removed (checkpoints saved without it, such as GPT-2's 'h.0...' for 'transformer.h.0...')."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(prefix + ".")]
    return next((n for n in candidates if n in state), None)


def code_digest(directory: Path, config: dict | None = None):
    """A running digest of what a model is besides its tensors: its config.json (`config`, the
    rewritten one of an expansion, when given) and its own code (*.py)."""
    digest = hashlib.sha256(
        repr(sorted(config.items())).encode() if config is not None else (directory / "config.json").read_bytes()
    )
    for code in sorted(directory.glob("*.py")):
        digest.update(code.name.encode() + b"\0" + code.read_bytes())
    return digest


def model_digest(plan: Plan, cache: MetricCache) -> str:
    """A digest of the model a plan describes: the base's config.json (the output's after an
    expansion), its own code, and the content digest of every tensor the plan takes, wherever it
    comes from. A plan that copies one candidate whole has that candidate's directory_digest."""
    digest = code_digest(plan.sources[plan.base], plan.config)
    with opened_checkpoints(plan.used_sources()) as checkpoints:
        for entry in plan.entries:
            if entry.transform == "blend":
                key = blend_key(entry, checkpoints, cache)
            elif entry.transform == "zero":
                key = f"zero\0{entry.dtype}{list(entry.shape)}"
            else:
                key = cache.content_digest(checkpoints[entry.source], entry.tensor)
            digest.update(f"{entry.name}\0{key}\0{entry.dtype}\0".encode())
    return digest.hexdigest()


def directory_digest(directory: Path, cache: MetricCache) -> str:
    """A digest of the model in a directory: config.json, its own code and every tensor's content."""
    digest = code_digest(directory)
    with Checkpoint.open(directory) as checkpoint:
        for name in sorted(checkpoint.tensors, key=natural_order(checkpoint)):
            key, dtype = cache.content_digest(checkpoint, name), checkpoint.tensors[name].dtype
            digest.update(f"{name}\0{key}\0{dtype}\0".encode())
    return digest.hexdigest()


def natural_order(checkpoint: Checkpoint):
    """The order a plan lists a checkpoint's tensors in (embeddings, blocks by depth, the rest), by
    the names of the model's family."""
    architecture = architecture_of(checkpoint.directory)
    depths = layout_of(list(checkpoint.tensors), architecture).depths
    return lambda name: output_order(name, depths[name], architecture)


def blend_key(entry: PlanEntry, opened: dict[str, Checkpoint], cache: MetricCache) -> str:
    """A content key of a blended tensor: the digests of what it averages with their weights, its
    dtype and shape (the candidates' names do not matter)."""
    parts = [(cache.content_digest(opened[c], entry.tensor), weight) for c, weight in entry.blend]
    return hashlib.blake2b(f"blend\0{entry.dtype}{list(entry.shape)}\0{parts}".encode(), digest_size=20).hexdigest()


def run_dtype(parameters: int, device: torch.device | str) -> torch.dtype | str:
    """float32 on a CPU when 4 bytes per parameter fit in half the available memory, else the
    stored dtype ("auto"): CPUs multiply bf16/fp16 several times slower than float32."""
    import torch

    if torch.device(device).type != "cpu":
        return "auto"
    return torch.float32 if 4 * parameters < available_memory() / 2 else "auto"


def plan_parameters(plan: Plan) -> int:
    return sum(numel(e.shape) for e in plan.entries)


def available_memory() -> int:
    """Bytes of memory available to a new allocation: MemAvailable on Linux, else all of it."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
