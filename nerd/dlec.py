"""DLEC layer expansion: a Plan -> Plan rewrite that duplicates the blocks that matter most.

DLEC (the Distributive Layer Expansion Curve repository, github.com/Steel-skull/DLEC) grows a
model by copying its most beneficial layers instead of stacking whole ranges as passthrough
frankenmerges do. Here:

1. every block gets an importance score (importance.py: block influence on a calibration text
   by default, the original heavy-tail share, or the NER of its weights);
2. the blocks to copy are an explicit `layers` list, the `add_layers` most important blocks, or
   the most important blocks whose parameters bring the model closest to `growth` (0.16: ~16%
   more parameters);
3. each copy is inserted right after its source, every later block is renumbered, and the
   config is rewritten: the layer count, every per-layer list (layer_types, ...), the layer-index
   lists (mlp_only_layers, moe_layers) and Qwen's max_window_layers; then, when transformers is
   installed, both architectures are built on the meta device (no memory): per-layer settings the
   config derives from a rule (a sliding-window pattern) are written out as explicit lists, and an
   expansion that would make transformers build any block unlike its source (a sparse-step rule
   for mixture-of-experts layers) is refused;
4. with `init: identity` the copy's residual-writing projections (o_proj, down_proj and their
   kin, weights and biases) are zero, so the copy adds nothing to the residual stream and the
   expanded model computes exactly the function of the original, ready to be fine-tuned; which
   tensors those are, and whether the blocks are pre-norm as this needs, the model's family
   says (architecture.py), as it says the layer-count keys of config.json.

Every copy is a plan entry of its own, so the writer stores it as separate data.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import TYPE_CHECKING

from .architecture import Architecture, family_of
from .checkpoint import numel
from .config import DlecOptions
from .schema import option_key, option_setting
from .errors import ConfigError, ModelError, first_line
from .importance import block_modules, layer_importance
from .layout import Layout, layout_of
from .plan import AddedLayer, Expansion, Plan, PlanEntry, output_order

if TYPE_CHECKING:
    import torch

INDEX_LIST_KEYS = ("mlp_only_layers", "moe_layers")
NOT_PER_LAYER = re.compile(r"^(architectures|.*token_ids?|.*suppress_tokens|bad_words_ids|forced_decoder_ids)$")


def expanded(plan: Plan, options: DlecOptions, cache, device, quiet: bool, executor=None) -> Plan:
    """The plan with the chosen blocks duplicated, renumbered, and its config rewritten; the NER of
    matrices the plan has no metrics for computed by `executor` (engine.py; default this process)."""
    config_file = plan.sources[plan.base] / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architecture = family_of(config)
    layout = layout_of([e.name for e in plan.entries], architecture)
    if options.init == "identity":
        check_pre_norm(config, options)
    importance = layer_importance(plan, layout, options, cache, device, quiet, executor)
    sizes = [sum(numel(e.shape) for e in plan.entries if layout.depths[e.name] == d) for d in range(layout.num_layers)]
    before = sum(numel(e.shape) for e in plan.entries)
    copies = layers_to_copy(importance.scores, sizes, before, options)
    layer_map = expanded_layers(layout.num_layers, copies)
    entries = expanded_entries(plan.entries, layout, layer_map, options, architecture)
    new_config, changes = expanded_config(config, layout.num_layers, layer_map, config_file)
    unchecked = check_with_transformers(
        config, new_config, layout.num_layers, layer_map, layout.stack, changes, config_file
    )
    added = [
        AddedLayer(source, depth, importance.scores[source])
        for depth, source in enumerate(layer_map)
        if depth and layer_map[depth - 1] == source
    ]
    expansion = Expansion(
        importance=importance.kind,
        scores=importance.scores,
        added=added,
        init=options.init,
        params_before=before,
        params_after=sum(numel(e.shape) for e in entries),
        layer_map=layer_map,
        basis=importance.basis,
        config_changes=changes,
        note="; ".join(filter(None, [importance.note, unchecked, growth_note(options, sizes, before, copies)])) or None,
        stats_reused=importance.reused,
    )
    return dataclasses.replace(plan, entries=entries, config=new_config, expansion=expansion)


def check_pre_norm(config: dict, options: DlecOptions) -> None:
    """init: identity needs blocks that add their output to an unnormalised residual stream."""
    if family_of(config).post_norm(config):
        raise ConfigError(
            f"{options.where}: {option_key(options, 'init')}: identity needs pre-norm blocks, but "
            f"{config.get('model_type')} normalises after adding each block's output, so no copy "
            f"can pass its input through unchanged; use {option_setting(options, 'init', 'copy')}"
        )


def layers_to_copy(scores: list[float | None], sizes: list[int], total: int, options: DlecOptions) -> list[int]:
    """The depths to duplicate, in depth order (a depth listed twice gets two copies)."""
    n = len(scores)
    if options.layers is not None:
        missing = [d for d in options.layers if d >= n]
        if missing:
            raise ConfigError(
                f"{options.where}: {option_key(options, 'layers')}: layer {missing[0]} does not "
                f"exist; the model has {n} layers (0 to {n - 1})"
            )
        return list(options.layers)
    ranked = sorted(range(n), key=lambda d: (scores[d] is None, -(scores[d] or 0.0), d))
    if options.add_layers is not None:
        if options.add_layers > n:
            raise ConfigError(
                f"{options.where}: {option_key(options, 'add_layers')}: {options.add_layers} is more "
                f"than the {n} layers of the model (each is copied at most once; to copy one twice, "
                f"list it twice in {option_key(options, 'layers')})"
            )
        return sorted(ranked[: options.add_layers])
    target, added, count, gap = options.growth * total, 0, 0, options.growth * total
    for i, depth in enumerate(ranked):
        added += sizes[depth]
        if abs(added - target) < gap:
            count, gap = i + 1, abs(added - target)
    if count == 0:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'growth')}: {options.growth:g} of {total:,} "
            f"parameters is less than half of one block ({min(sizes):,}); "
            f"use {option_setting(options, 'add_layers', '1')}"
        )
    return sorted(ranked[:count])


def growth_note(options: DlecOptions, sizes: list[int], total: int, copies: list[int]) -> str | None:
    """What a growth larger than every block copied once gives instead (each is copied at most once)."""
    if options.growth is None or len(copies) < len(sizes) or options.growth * total - sum(sizes) <= min(sizes) / 2:
        return None
    return (
        f"{option_key(options, 'growth')}: {options.growth:g} asks for more than every block copied once, "
        f"which adds {sum(sizes) / total:+.0%} of the parameters (each block is copied at most once; "
        f"list a block twice in {option_key(options, 'layers')} to copy it again)"
    )


def expanded_layers(num_layers: int, copies: list[int]) -> list[int]:
    """Output depth -> source depth: every block, each followed by its copies."""
    return [d for d in range(num_layers) for _ in range(1 + copies.count(d))]


def expanded_entries(
    entries: list[PlanEntry], layout: Layout, layer_map: list[int], options: DlecOptions, architecture: Architecture
) -> list[PlanEntry]:
    """The plan's entries with every block at its new depth and each copy as entries of its own
    (the residual writers of `architecture` zeroed with init: identity), in output order."""
    placed = [(e, layout.depths[e.name]) for e in entries if layout.depths[e.name] is None]
    for depth, source in enumerate(layer_map):
        is_copy = depth > 0 and layer_map[depth - 1] == source
        block = [e for e in entries if layout.depths[e.name] == source]
        zeroed = (
            identity_writers(block, source, options, architecture) if is_copy and options.init == "identity" else set()
        )
        prefix, renamed = f"{layout.stack}.{source}.", f"{layout.stack}.{depth}."
        for e in block:
            zero = {"transform": "zero", "blend": ()} if e.name in zeroed else {}
            placed.append((dataclasses.replace(e, name=renamed + e.name[len(prefix) :], **zero), depth))
    return [e for e, _ in sorted(placed, key=lambda p: output_order(p[0].name, p[1], architecture))]


def identity_writers(block: list[PlanEntry], depth: int, options: DlecOptions, architecture: Architecture) -> set[str]:
    """The tensors of a block that write into the residual stream, for both the attention and the
    MLP; refused when either is not found (an architecture we do not know)."""
    parts = {e.name: architecture.residual_writer(e.name) for e in block}
    writers = {name for name, part in parts.items() if part is not None}
    attention = {name for name, part in parts.items() if part == "attention"}
    if not attention or not writers - attention:
        found = ", ".join(sorted(writers)) or "none"
        raise ConfigError(
            f"{options.where}: {option_key(options, 'init')}: identity needs the residual-writing "
            f"projections of both the attention and the MLP of block {depth} (o_proj/down_proj or "
            f"their kin); found {found}; use {option_setting(options, 'init', 'copy')}"
        )
    return writers


def expanded_config(config: dict, num_layers: int, layer_map: list[int], config_file) -> tuple[dict, list[str]]:
    """config.json for the expanded model, and a list of what changed."""
    new = copy.deepcopy(config)
    architecture = family_of(config)
    section, where = architecture.layer_section(new)
    keys = architecture.layer_count_keys
    counts = [k for k in keys if k in section]
    if not counts:
        raise ModelError(f"{config_file}: no layer count ({', '.join(keys)}) found; cannot expand this architecture")
    changes = []
    for key in counts:
        if section[key] != num_layers:
            raise ModelError(
                f"{config_file}: {where}{key} is {section[key]!r}, but the weights have {num_layers} blocks"
            )
        section[key] = len(layer_map)
        changes.append(f"{where}{key}: {num_layers} -> {len(layer_map)}")
    for key, value in section.items():
        if key in INDEX_LIST_KEYS and isinstance(value, list):
            section[key] = [depth for depth, source in enumerate(layer_map) if source in value]
            changes.append(f"{where}{key}: layer indices renumbered")
        elif isinstance(value, list) and len(value) == num_layers and not NOT_PER_LAYER.match(key):
            section[key] = [value[source] for source in layer_map]
            changes.append(f"{where}{key}: per-layer list expanded")
    window = section.get("max_window_layers")
    if isinstance(window, int) and not isinstance(window, bool):
        section["max_window_layers"] = sum(source < window for source in layer_map)
        changes.append(f"{where}max_window_layers: {window} -> {section['max_window_layers']}")
    return new, changes


def check_with_transformers(
    config: dict, new_config: dict, num_layers: int, layer_map: list[int], stack: str, changes: list[str], config_file
) -> str | None:
    """Build the original and the expanded architecture with transformers on the meta device and
    make every output block match its source: a per-layer setting transformers derives from a rule
    is written into `new_config` as an explicit list (noted in `changes`); a block transformers
    would build differently is refused. Returns why the check could not run, or None."""
    import torch

    try:
        import transformers
    except ImportError:
        return "config.json not checked against transformers (not installed)"
    model_type, named = config.get("model_type"), (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, named, None) if isinstance(named, str) else None
    if model_type not in transformers.CONFIG_MAPPING or "auto_map" in config or model_class is None:
        return f"config.json not checked against transformers (it does not know {named or model_type})"
    config_class = transformers.CONFIG_MAPPING[model_type]
    try:
        old = layer_config(config_class.from_dict(config)).to_dict()
        with torch.device("meta"):
            before = model_class(config_class.from_dict(config))
    except Exception as exc:  # an architecture transformers cannot build from this config as it stands
        return f"config.json not checked against transformers (it cannot build the original: {first_line(exc)})"
    section, where = family_of(new_config).layer_section(new_config)
    expected = {
        key: [value[source] for source in layer_map]
        for key, value in old.items()
        if isinstance(value, list) and len(value) == num_layers and not NOT_PER_LAYER.match(key)
    }
    derived = layer_config(config_class.from_dict(new_config)).to_dict()
    rewritten = [key for key in expected if derived.get(key) != expected[key]]
    for key in rewritten:
        section[key] = expected[key]
        changes.append(f"{where}{key}: written out per layer (transformers derived it from a rule)")
    if rewritten:
        derived = layer_config(config_class.from_dict(new_config)).to_dict()
        ignored = [key for key in rewritten if derived.get(key) != expected[key]]
        if ignored:
            raise ModelError(
                f"{config_file}: {where}{ignored[0]}: transformers does not keep the expanded per-layer "
                f"values; this expansion of {model_type} is not supported"
            )
    try:
        with torch.device("meta"):
            after = model_class(config_class.from_dict(new_config))
    except Exception as exc:
        raise ModelError(
            f"{config_file}: transformers cannot build the expanded {model_type} "
            f"({first_line(exc)}); this expansion is refused"
        ) from None
    old_blocks = block_modules(before, stack, num_layers, f"{config_file}:")
    new_blocks = block_modules(after, stack, len(layer_map), f"{config_file}: expanded,")
    for depth, source in enumerate(layer_map):
        built, wanted = parameter_shapes(new_blocks[depth]), parameter_shapes(old_blocks[source])
        if built != wanted:
            differ = sorted(set(built.items()) ^ set(wanted.items()))[0][0]
            raise ModelError(
                f"{config_file}: after the expansion, transformers would build block {depth} unlike its "
                f"source block {source} (e.g. '{differ}'): {model_type} lays out its layers by a rule "
                f"(such as decoder_sparse_step) that copies cannot follow; this expansion is refused"
            )
    return None


def layer_config(config):
    """The part of a config that describes the blocks (the text model's, for a multimodal one)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def parameter_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}
