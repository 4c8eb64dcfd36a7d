"""The mergekit recipe of a plan: mergekit_config.yml in every output (mergekit's own outputs hold
one too) and, with `--emit-mergekit FILE`, from a dry run. Run through mergekit (`mergekit-yaml
mergekit_config.yml OUT`), it rebuilds the plan's tensors from the same candidates (hub models at
the commit the plan used, local ones by their path).

A plan whose every output block is one block of one candidate (a selected depth, a DLEC copy: the
source block again, its zeroed projections `scale: 0`) is a passthrough recipe of slices, runs of
consecutive blocks of one candidate joined. A plan that mixes candidates inside a block (tensor
granularity) or blends them is a linear recipe (`normalize: false`): each tensor's weight per
candidate given by a filter on its name, 1 for the candidate it is taken from, the plan's weights
for a blend, 0 otherwise, computed in float32 and written in the plan's dtype. mergekit takes the
input embeddings from the first slice's sources and the other non-layer tensors from the last
slice's, so a zero-length slice of the candidates that supply them opens and closes the recipe
where the first or last block's sources are not those.

Equal to mergekit's output tensor for tensor where nothing is blended (the tests run mergekit on
it); a blend mergekit computes in float32, ours in float64, so those may differ in the last place.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from .adapters import AdapterSource
from .architecture import Architecture, families, inferred
from .checkpoint import FLOAT_DTYPES
from .errors import ConfigError
from .plan import Plan, PlanEntry

RECIPE = "mergekit_config.yml"
MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # the ones mergekit writes


@dataclass(frozen=True)
class Part:
    """Where one output tensor comes from: a depth of the source models (None: a non-layer tensor),
    the candidates' weights, and whether it is written as zeros."""

    depth: int | None
    weights: tuple[tuple[str, float], ...]
    zero: bool = False


def recipe_or_problem(plan: Plan) -> tuple[str | None, str | None]:
    """The recipe as YAML (with a comment saying what wrote it), or why no mergekit recipe rebuilds
    the plan."""
    try:
        recipe = recipe_of(plan)
    except ConfigError as exc:
        return None, str(exc)
    header = f"# The mergekit recipe of this mastermerge plan: mergekit-yaml {RECIPE} OUT\n"
    if has_adapters(plan):
        header += "# (its LoRA adapters, BASE+ADAPTER, need mergekit-yaml's --lora-merge-cache DIR)\n"
    return header + yaml.dump(recipe, Dumper=Dumper, sort_keys=False, default_flow_style=None), None


class Dumper(yaml.SafeDumper):
    """YAML without anchors: the same slice twice (a zero-length one at both ends) is written twice."""

    def ignore_aliases(self, data) -> bool:
        return True


def write_recipe(path: Path, text: str) -> None:
    """A recipe written to `path` whole or not at all (a temporary file beside it, renamed)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def recipe_of(plan: Plan) -> dict:
    """The mergekit configuration (a mapping for yaml) that rebuilds the plan."""
    architecture = families().get(plan.architecture, inferred())
    blocks, non_layer = block_parts(plan, architecture)
    floats = [e.dtype for e in plan.entries if e.dtype in FLOAT_DTYPES]
    if any(dtype not in MERGEKIT_DTYPES for dtype in floats):
        unknown = sorted(set(floats) - set(MERGEKIT_DTYPES))
        raise ConfigError(f"the output holds {', '.join(unknown)} tensors, which mergekit does not write")
    passthrough = all(len(weights_of(parts)) == 1 and not blended(parts) for parts in [non_layer, *blocks.values()])
    slices = [block_slice(plan, parts, passthrough) for parts in joined_runs(blocks)]
    opening = zero_length_slice(plan, non_layer, passthrough)
    if not slices or slice_models(slices[0]) != slice_models(opening):
        slices.insert(0, opening)
    if slice_models(slices[-1]) != slice_models(opening):
        slices.append(opening)
    dtype = MERGEKIT_DTYPES[Counter(floats).most_common(1)[0][0]]
    if passthrough:
        return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}
    return {
        "merge_method": "linear",
        "slices": slices,
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": dtype,
    }


def block_parts(plan: Plan, architecture: Architecture) -> tuple[dict[int, dict[str, Part]], dict[str, Part]]:
    """Each output block's tensors (by their name inside the block) and the non-layer tensors (by
    full name), each with its Part."""
    blocks: dict[int, dict[str, Part]] = {}
    non_layer: dict[str, Part] = {}
    for entry in plan.entries:
        placed, source = architecture.block_of(entry.name), architecture.block_of(entry.tensor)
        part = Part(None if source is None else source[1], entry_weights(entry), entry.transform == "zero")
        if placed is None:
            non_layer[entry.name] = part
        else:
            blocks.setdefault(placed[1], {})[entry.name.removeprefix(f"{placed[0]}.{placed[1]}.")] = part
    for depth, parts in blocks.items():
        if len({p.depth for p in parts.values()}) != 1:
            raise ConfigError(
                f"output block {depth} takes tensors of several source depths, which no mergekit slice does"
            )
    return dict(sorted(blocks.items())), non_layer


def entry_weights(entry: PlanEntry) -> tuple[tuple[str, float], ...]:
    """The candidates an entry reads, each with its weight."""
    return tuple(entry.blend) if entry.transform == "blend" else ((entry.source, 1.0),)


def weights_of(parts: dict[str, Part]) -> list[str]:
    """The candidates any of the parts reads, in order of first use."""
    return list(dict.fromkeys(c for p in parts.values() for c, _ in p.weights))


def blended(parts: dict[str, Part]) -> bool:
    return any(len(p.weights) > 1 for p in parts.values())


def joined_runs(blocks: dict[int, dict[str, Part]]) -> list[list[dict[str, Part]]]:
    """The blocks in output order, consecutive ones joined where each continues the last from the
    next source depth with the same candidates, weights and zeros (a slice of several layers)."""
    runs: list[list[dict[str, Part]]] = []
    for parts in blocks.values():
        last = runs[-1][-1] if runs else None
        if last is not None and same_but_depth(last, parts):
            runs[-1].append(parts)
        else:
            runs.append([parts])
    return runs


def same_but_depth(last: dict[str, Part], parts: dict[str, Part]) -> bool:
    """Whether `parts` is `last` one source depth further on."""
    depth = next(iter(last.values())).depth
    return last.keys() == parts.keys() and all(
        p.depth == depth + 1 and (p.weights, p.zero) == (last[name].weights, last[name].zero)
        for name, p in parts.items()
    )


def block_slice(plan: Plan, run: list[dict[str, Part]], passthrough: bool) -> dict:
    """One mergekit slice: a run of blocks of the same candidates from consecutive source depths."""
    first = run[0]
    depth = next(iter(first.values())).depth
    return {"sources": [source(plan, c, first, (depth, depth + len(run)), passthrough) for c in weights_of(first)]}


def zero_length_slice(plan: Plan, non_layer: dict[str, Part], passthrough: bool) -> dict:
    """A slice of no layers whose sources supply the non-layer tensors."""
    return {"sources": [source(plan, c, non_layer, (0, 0), passthrough) for c in weights_of(non_layer)]}


def source(plan: Plan, candidate: str, parts: dict[str, Part], layers: tuple[int, int], passthrough: bool) -> dict:
    """A candidate's entry in a slice: its layers and, where it is not the whole slice, the weight
    (linear) or scale (passthrough) of each tensor by name."""
    found: dict = {"model": reference(plan, candidate), "layer_range": list(layers)}
    values = {name: 0.0 if p.zero else dict(p.weights).get(candidate, 0.0) for name, p in parts.items()}
    setting = "scale" if passthrough else "weight"
    if passthrough and all(v == 1.0 for v in values.values()):
        return found
    return found | {"parameters": {setting: filtered(values)}}


def filtered(values: dict[str, float]) -> float | list[dict]:
    """A mergekit setting of one value per tensor: a number when all agree, else a filter per
    tensor that differs from the most common value (mergekit takes the first filter found in a
    tensor's name, so the longest names go first), then that value."""
    common = Counter(values.values()).most_common(1)[0][0]
    if all(v == common for v in values.values()):
        return common
    conditions = [{"filter": n, "value": v} for n, v in sorted(values.items(), key=lambda i: -len(i[0])) if v != common]
    return [*conditions, {"value": common}]


def slice_models(piece: dict) -> list[tuple[str, object]]:
    """What a slice reads from, for comparing slices: each source's model and parameters."""
    return [(s["model"], s.get("parameters")) for s in piece["sources"]]


def reference(plan: Plan, candidate: str) -> str:
    """How mergekit names a candidate: a hub id at the commit the plan used, or a local path; a
    LoRA adapter as BASE+ADAPTER (mergekit merges it into the base with peft)."""
    revision = plan.revisions.get(candidate)
    own = f"{candidate.split('@')[0]}@{revision}" if revision else str(plan.sources[candidate])
    if isinstance(plan.sources[candidate], AdapterSource):
        return f"{reference(plan, plan.base)}+{own}"
    return own


def has_adapters(plan: Plan) -> bool:
    return any(isinstance(source, AdapterSource) for source in plan.sources.values())
