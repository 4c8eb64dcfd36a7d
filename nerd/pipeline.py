"""Planning: resolve the candidates, score every matrix, tether them to the base, choose (or
blend), expand if asked, evaluate the strategies if asked (strategies.py), and return the Plan.

The Python API, stage by stage (the CLI is a thin layer over it):

    from nerd import claim_output, load_config, plan_merge, write_merge, MetricCache
    config = load_config("my.yaml")
    claim_output(config)  # before writing: a killed run's leftovers, a non-empty output_dir refused
    plan = plan_merge(config, cache=MetricCache())
    write_merge(plan, config)

A config with one model (`mastermerge expand`, config.expand_config) has nothing to choose: its
plan copies the model, and the DLEC pass expands it.

Optional tensors (layout.py: buffers, a head tied to the embedding, by the base's family) that some
candidates lack are left out of the scores, the tethers and the choices; each comes from the
first candidate that has it (a tied head: as a copy of the output's embedding), and the plan's
notes say so.
"""

from __future__ import annotations

import dataclasses
from contextlib import closing
from dataclasses import dataclass, field

from tqdm import tqdm

from .architecture import Architecture, architecture_of
from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, opened_checkpoints
from .config import MergeConfig
from .dlec import expanded
from .engine import Engine, Work, executor_of, reachable
from .errors import ConfigError, ModelError
from .layout import Layout, OptionalTensor, check_same_architecture, layout_of
from .plan import Choice, Plan, PlanEntry, Tethers, output_order
from .select import Health, choices_of, health_of
from .sidefiles import module_notes
from .sources import resolve_models
from .spectra import NOT_FINITE, finite_problem, pick_device
from .store import MetricCache, default_cache_path
from .strategies import chosen_strategy
from .tether import compatibility_of, tether_groups, tether_warnings

CAST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def plan_merge(config: MergeConfig, cache: MetricCache | None = None, quiet: bool = False) -> Plan:
    """Resolve the candidates, score every matrix, measure their compatibility with the base,
    choose or blend, apply the `dlec:` expansion if the config has one, evaluate the strategies if
    it asks, and return the plan (nothing written).

    Without a `cache`, the default metric cache is opened for this call and closed after it.
    """
    if cache is None:
        with closing(MetricCache(default_cache_path())) as own:
            return plan_merge(config, cache=own, quiet=quiet)
    computed, reused = cache.computed, cache.reused
    reachable(config.compute)  # a cluster asked for is connected to before anything is downloaded
    resolved = resolve_models(config.candidates, config.base)
    executor = executor_of(config.compute, config.device, resolved)
    architecture = architecture_of(resolved[config.base.ref].path)  # the tensor names are read as its family's
    notes = module_notes(resolved[config.base.ref].path)  # a modules.json path outside the base is refused here
    with opened_checkpoints({name: r.path for name, r in resolved.items()}) as checkpoints:
        tensors = candidate_tensors(checkpoints, config, architecture)
        decision = Decision()
        if len(checkpoints) > 1:
            decision = decided(config, checkpoints, tensors, Engine(cache, executor), quiet)
    plan = composite_plan(config, resolved, tensors, decision, notes, architecture)
    if config.dlec is not None:
        plan = expanded(plan, config.dlec, cache, pick_device(config.device), quiet, executor)
    if config.evaluate is not None:  # every strategy planned (from the cache) and evaluated; the best one kept
        plan = chosen_strategy(
            config, plan, lambda variant: plan_merge(variant, cache=cache, quiet=quiet), cache, quiet
        )
    plan.spectra_computed, plan.spectra_reused = cache.computed - computed, cache.reused - reused
    return plan


@dataclass
class Tensors:
    """What the candidates hold: every tensor of the output (`infos`, by name, with their `layout`),
    the optional ones some candidates lack, and the rest, which is scored, tethered and chosen."""

    infos: dict[str, TensorInfo]
    layout: Layout
    optional: dict[str, OptionalTensor]
    shared: Layout
    shared_infos: dict[str, TensorInfo]


@dataclass
class Decision:
    """What the scores decided: every candidate's metrics, the tethers, the choices, and warnings."""

    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)
    tethers: Tethers | None = None
    choices: list[Choice] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def candidate_tensors(checkpoints: dict[str, Checkpoint], config: MergeConfig, architecture: Architecture) -> Tensors:
    """The tensors of the candidates, checked to be one architecture (optional tensors aside), their
    names read as the base's family names them."""
    optional = check_same_architecture(checkpoints, same_dtype=config.dtype == "keep", architecture=architecture)
    infos = dict(checkpoints[config.base.ref].tensors)
    infos |= {t: checkpoints[o.holders[0]].tensors[t] for t, o in optional.items() if t not in infos}
    layout = layout_of(list(infos), architecture)
    shared = Layout(layout.stack, {t: d for t, d in layout.depths.items() if t not in optional})
    return Tensors(infos, layout, optional, shared, {t: info for t, info in infos.items() if t not in optional})


def candidate_metrics(
    checkpoints: dict[str, Checkpoint], tensors: Tensors, engine: Engine, quiet: bool
) -> dict[str, dict[str, dict]]:
    """Every metric of every shared matrix of every candidate, by candidate and tensor."""
    matrices = [t for t, info in tensors.shared_infos.items() if info.is_matrix]
    metrics = {}
    with tqdm(total=len(checkpoints) * len(matrices), desc="spectra", unit="matrix", disable=quiet) as bar:
        for name, checkpoint in checkpoints.items():
            found = engine.metrics([Work(checkpoint, t) for t in matrices], bar)
            metrics[name] = {work.tensor: values for work, values in found.items()}
    return metrics


def decided(
    config: MergeConfig, checkpoints: dict[str, Checkpoint], tensors: Tensors, engine: Engine, quiet: bool
) -> Decision:
    """Score the candidates, tether them to the base (the first) and choose at every depth."""
    names = list(checkpoints)
    metrics = candidate_metrics(checkpoints, tensors, engine, quiet)
    health = health_of(
        metrics, {n: nonfinite_tensors(checkpoints[n], tensors.optional) for n in names}, config.selection
    )
    groups = tether_groups(tensors.shared, tensors.shared_infos, config.selection)
    scores = compatibility_of(checkpoints, groups, names[0], names[1:], config.tether.measure, engine, quiet)
    base_nonfinite = {t for t, why in health.unusable[names[0]].items() if why == NOT_FINITE}
    unmeasured = tuple(g for g, members in groups.items() if base_nonfinite.intersection(members))
    tethers = Tethers(config.tether, names[0], scores, unmeasured=unmeasured)
    tethers = dataclasses.replace(tethers, warnings=tether_warnings(tethers, names[1:]))
    try:
        choices = choices_of(tensors.shared, tensors.shared_infos, metrics, names, config.selection, tethers, health)
    except (ConfigError, ModelError) as exc:
        raise type(exc)(f"{config.source or 'config'}: {exc}") from None
    return Decision(metrics, tethers, choices, unusable_warnings(health, tensors.layout))


def composite_plan(
    config: MergeConfig,
    resolved: dict,
    tensors: Tensors,
    decision: Decision,
    notes: list[str],
    architecture: Architecture,
) -> Plan:
    """The plan of the composite: every output tensor from its group's winner or blend, in output order."""
    chosen = {t: c for c in decision.choices for t in c.tensors}
    by_name = {t: plan_entry(t, info, chosen.get(t), config) for t, info in tensors.shared_infos.items()}
    for t, tensor in tensors.optional.items():  # after the others: a tied head copies its embedding's entry
        by_name[t] = optional_entry(tensor, tensors.infos[t], by_name, config)
    depths = tensors.layout.depths
    entries = [by_name[t] for t in sorted(by_name, key=lambda t: output_order(t, depths[t], architecture))]
    names = list(resolved)
    return Plan(
        candidates=names,
        sources={n: r.path for n, r in resolved.items()},
        revisions={n: r.revision for n, r in resolved.items()},
        base=config.base.ref,
        output_dir=config.output_dir,
        shard_size=config.shard_size,
        entries=entries,
        choices=decision.choices,
        metrics=decision.metrics or {n: {} for n in names},
        selection=config.selection,
        tethers=decision.tethers,
        warnings=decision.warnings,
        notes=optional_notes(tensors.optional, by_name) + notes,
        architecture=architecture.name,
        base_joined=config.base_joined,
    )


def plan_entry(name: str, info: TensorInfo, choice: Choice | None, config: MergeConfig) -> PlanEntry:
    """The output tensor `name`: from its group's winner (the base when nothing chose), or the
    group's blend for a floating-point tensor (an integer one, such as a buffer, comes from the winner)."""
    dtype = output_dtype(info.dtype, config.dtype)
    source = config.base.ref if choice is None else choice.winner
    if choice is not None and choice.blend and info.dtype in FLOAT_DTYPES:
        return PlanEntry(name, source, name, dtype, info.shape, "blend", tuple(choice.blend.items()))
    return PlanEntry(name, source, name, dtype, info.shape)


def optional_entry(
    tensor: OptionalTensor, info: TensorInfo, entries: dict[str, PlanEntry], config: MergeConfig
) -> PlanEntry:
    """An optional tensor, never chosen by score: a tied head is a copy of the output's embedding
    entry (so the two stay equal, whichever candidate supplies the embedding); anything else comes
    as is from the first candidate that has it, the base when it does."""
    why = f"{tensor.why}, missing from {quoted(tensor.missing_from)}"
    if tensor.tied_to is not None:
        return dataclasses.replace(entries[tensor.tied_to], name=tensor.name, optional=why)
    return PlanEntry(
        tensor.name, tensor.holders[0], tensor.name, output_dtype(info.dtype, config.dtype), info.shape, optional=why
    )


def optional_notes(optional: dict[str, OptionalTensor], entries: dict[str, PlanEntry]) -> list[str]:
    """One line per kind of optional tensor, the candidates that lack it and where it came from:
    'embeddings.position_ids: an integer buffer (nothing learned), missing from 'a': taken from 'base''."""
    groups: dict[tuple[str, tuple[str, ...], str], list[str]] = {}
    for name, tensor in optional.items():
        entry = entries[name]
        source = f"a blend of {quoted(entry.candidates)}" if entry.transform == "blend" else quoted([entry.source])
        how = (
            f"written as a copy of the output's {tensor.tied_to} (from {source})"
            if tensor.tied_to
            else f"taken from {source}"
        )
        groups.setdefault((tensor.why, tensor.missing_from, how), []).append(name)
    lines = []
    for (why, missing, how), names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"{shown}: {why} (nothing learned), missing from {quoted(missing)}: {how}")
    return lines


def quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def nonfinite_tensors(checkpoint: Checkpoint, skip=()) -> dict[str, str]:
    """The floating-point tensors other than matrices (norms, biases) that hold a NaN or Inf, except
    those in `skip` (optional tensors: a mask buffer may hold -inf); the matrices' own come with
    their spectra."""
    return {
        name: NOT_FINITE
        for name, info in checkpoint.tensors.items()
        if info.dtype in FLOAT_DTYPES
        and not info.is_matrix
        and name not in skip
        and finite_problem(checkpoint.read_bytes(name), info.dtype) is not None
    }


def unusable_warnings(health: Health, layout: Layout) -> list[str]:
    """One line per candidate with unusable tensors: which (the first three) and where."""
    lines = []
    for candidate, tensors in health.unusable.items():
        if tensors:
            shown = "; ".join(f"{t} {why}" for t, why in list(tensors.items())[:3])
            more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
            depths = sorted({layout.depths[t] for t in tensors if layout.depths[t] is not None})
            where = ", ".join(
                ["the non-layer group"] * any(layout.depths[t] is None for t in tensors)
                + [f"depth {d}" for d in depths]
            )
            lines.append(f"'{candidate}': {shown}{more}: it cannot supply {where}")
    return lines


def output_dtype(dtype: str, requested: str) -> str:
    """The requested dtype for floating-point tensors; integer and bool tensors keep theirs."""
    return CAST[requested] if requested in CAST and dtype in FLOAT_DTYPES else dtype
