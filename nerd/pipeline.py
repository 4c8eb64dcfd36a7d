"""Planning: resolve the candidates, score every matrix, tether them to the base, choose (or
blend), expand if asked, and return the Plan.

The Python API, stage by stage (the CLI is a thin layer over it):

    from nerd import load_config, plan_merge, write_merge, MetricCache
    config = load_config("my.yaml")
    plan = plan_merge(config, cache=MetricCache())
    write_merge(plan, config)

A config with one model (`mastermerge expand`, config.expand_config) has nothing to choose: its
plan copies the model, and the DLEC pass expands it.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, closing

from tqdm import tqdm

from .cache import MetricCache, default_cache_path
from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo
from .config import MergeConfig
from .dlec import expanded
from .errors import ConfigError
from .layout import check_same_architecture, layout_of
from .plan import Choice, Plan, PlanEntry, Tethers, output_order
from .select import choices_of
from .sources import resolve_model
from .spectra import pick_device
from .tether import compatibility_of, tether_groups, tether_warnings

CAST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def plan_merge(config: MergeConfig, cache: MetricCache | None = None, quiet: bool = False) -> Plan:
    """Resolve the candidates, score every matrix, measure their compatibility with the base,
    choose or blend, apply the `dlec:` expansion if the config has one, and return the plan
    (nothing written).

    Without a `cache`, the default metric cache is opened for this call and closed after it.
    """
    if cache is None:
        with closing(MetricCache(default_cache_path())) as own:
            return plan_merge(config, cache=own, quiet=quiet)
    names = [spec.ref for spec in config.candidates]
    resolved = {spec.ref: resolve_model(spec) for spec in config.candidates}
    computed, reused = cache.computed, cache.reused
    with ExitStack() as stack:
        checkpoints = {name: stack.enter_context(Checkpoint.open(resolved[name].path)) for name in names}
        check_same_architecture(checkpoints, same_dtype=config.dtype == "keep")
        infos = checkpoints[config.base.ref].tensors
        layout = layout_of(list(infos))
        metrics: dict[str, dict[str, dict]] = {name: {} for name in names}
        tethers, choices = None, []
        if len(names) > 1:
            matrices = [t for t, info in infos.items() if info.is_matrix]
            with tqdm(total=len(names) * len(matrices), desc="spectra", unit="matrix", disable=quiet) as bar:
                for name in names:
                    metrics[name] = cache.metrics_of_all(checkpoints[name], matrices, config.device, bar)
            others = names[1:]
            scores = compatibility_of(checkpoints, tether_groups(layout, infos, config.selection), names[0],
                                      others, config.tether.measure, cache, quiet)
            tethers = Tethers(config.tether, names[0], scores)
            tethers = dataclasses.replace(tethers, warnings=tether_warnings(tethers, others))
            try:
                choices = choices_of(layout, infos, metrics, names, config.selection, tethers)
            except ConfigError as exc:
                raise ConfigError(f"{config.source or 'config'}: {exc}") from None
    chosen = {t: c for c in choices for t in c.tensors}
    entries = [plan_entry(t, infos[t], chosen.get(t), config)
               for t in sorted(infos, key=lambda t: output_order(t, layout.depths[t]))]
    plan = Plan(candidates=names, sources={n: r.path for n, r in resolved.items()},
                revisions={n: r.revision for n, r in resolved.items()}, base=config.base.ref,
                output_dir=config.output_dir, shard_size=config.shard_size, entries=entries,
                choices=choices, metrics=metrics, selection=config.selection, tethers=tethers)
    if config.dlec is not None:
        plan = expanded(plan, config.dlec, cache, pick_device(config.device), quiet)
    plan.spectra_computed, plan.spectra_reused = cache.computed - computed, cache.reused - reused
    return plan


def plan_entry(name: str, info: TensorInfo, choice: Choice | None, config: MergeConfig) -> PlanEntry:
    """The output tensor `name`: from its group's winner (the base when nothing chose), or the
    group's blend for a floating-point tensor (an integer one, such as a buffer, comes from the winner)."""
    dtype = output_dtype(info.dtype, config.dtype)
    source = config.base.ref if choice is None else choice.winner
    if choice is not None and choice.blend and info.dtype in FLOAT_DTYPES:
        return PlanEntry(name, source, name, dtype, info.shape, "blend", tuple(choice.blend.items()))
    return PlanEntry(name, source, name, dtype, info.shape)


def output_dtype(dtype: str, requested: str) -> str:
    """The requested dtype for floating-point tensors; integer and bool tensors keep theirs."""
    return CAST[requested] if requested in CAST and dtype in FLOAT_DTYPES else dtype
