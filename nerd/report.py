"""What a merge tells people: the per-depth choice table, the tether (compatibility) table, the
expansion table and the evaluation table (for the terminal; card.py puts them in the model card),
and merge_report.json."""

from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .config import MergeConfig, Selection
from .importance import IMPORTANCE_LABELS
from .metrics import METRICS, path_counts
from .plan import Evaluation, Expansion, Plan, Tethers, short_names
from .public import model_names, public_names
from .select import rule_of


def choice_rows(plan: Plan) -> list[list[str]]:
    """Header and one row per choice: group, each candidate's score (the group mean of the
    selection metric, or of its distance to the target), the winner's margin over the runner-up,
    the winner, a note."""
    labels = short_names(plan.candidates)
    rows = [["depth"] + [labels[c] for c in plan.candidates] + ["margin", "winner"]]
    for choice in plan.choices:
        cells = ["-" if choice.scores[c] is None else f"{choice.scores[c]:.6g}" for c in plan.candidates]
        chosen = (
            ("pinned " if choice.pinned else "") + labels[choice.winner]
            if not choice.blend
            else "blend " + " + ".join(f"{labels[c]} {w:.3g}" for c, w in choice.blend.items())
        )
        margin = "-" if choice.margin is None else f"{choice.margin:.3g} over {labels[choice.runner_up]}"
        rows.append([choice.group] + cells + [margin, chosen + (f"  ({choice.note})" if choice.note else "")])
    return rows


def choice_table(plan: Plan) -> str:
    """The per-depth table as aligned plain text, for the terminal, under a line saying what the
    scores are."""
    rule = rule_of(plan.selection)
    rows = choice_rows(plan)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    wins = "lowest" if rule.lower_wins else "highest"
    head = f"scores: {rule.label} of each group's matrices, {wins} wins"
    if plan.tethers is not None and plan.tethers.options.mode == "blend":
        head += "; the compatible candidates are averaged (blend: weight of each)"
    if plan.base_joined:
        head += f"\nbase_model '{short_names(plan.candidates)[plan.base]}' is not among models: it joins them, first"
    return "\n".join([head, *lines])


def tether_rows(plan: Plan) -> list[list[str]]:
    """Header and one row per group: each other candidate's compatibility with the base, marked
    'drifts' where it is below the threshold."""
    tethers, labels = plan.tethers, short_names(plan.candidates)
    others = [c for c in plan.candidates if c != plan.base]
    rows = [["depth"] + [labels[c] for c in others]]
    for group, scores in tethers.scores.items():
        rows.append(
            [group]
            + [
                ("-" if scores[c] is None else f"{scores[c]:.6g}") + ("" if tethers.eligible(group, c) else " drifts")
                for c in others
            ]
        )
    return rows


def tether_line(tethers: Tethers) -> str:
    """What the compatibility is and what it gates."""
    options = tethers.options
    what = {
        "cosine": "cosine similarity of each block's weight matrices with the base's",
        "min_cosine": "smallest cosine similarity of a block's weight matrices with the base's",
        "l2": "1 - |candidate - base| / |base| over each block's weight matrices",
    }[options.measure]
    mode = (
        "compatible candidates compete"
        if options.mode == "select"
        else f"compatible candidates are averaged, {options.weights} weights"
    )
    return (
        f"tethers: {what}; below {options.min_compatibility:g} a candidate drifts (not eligible there); "
        f"mode {options.mode}: {mode}"
    )


def tether_table(plan: Plan) -> str:
    """The compatibility table as aligned plain text, under the line saying what it is."""
    rows = tether_rows(plan)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([tether_line(plan.tethers), *lines])


def evaluation_rows(evaluation: Evaluation) -> list[list[str]]:
    """Header and one row per model: its perplexity on each text, the mean, and the difference of the
    mean from the base's (first row); the written strategy marked; '-' where there is none."""
    base = next(r.model for r in evaluation.rows if r.role == "base")
    models = list(dict.fromkeys(r.model for r in evaluation.rows))
    table = {(r.model, r.text): r.perplexity for r in evaluation.rows}
    means = {m: mean_of([table[m, t] for t in evaluation.texts]) for m in models}
    written = {f"composite: {s.name}" for s in evaluation.strategies if s.written}
    rows = [["model"] + [Path(t).name for t in evaluation.texts] + ["mean", "vs base"]]
    for m in models:
        diff = None if m == base or None in (means[m], means[base]) else means[m] - means[base]
        change = "" if diff is None else f"{diff:+.4g} ({diff / means[base]:+.1%})"
        name = short_names([m])[m] if not m.startswith("composite: ") else m
        label = name + (" (base)" if m == base else " (written)" if m in written else "")
        rows.append(
            [label] + [fmt_perplexity(table[m, t]) for t in evaluation.texts] + [fmt_perplexity(means[m]), change]
        )
    return rows


def mean_of(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing."""
    return None if not values or None in values else sum(values) / len(values)


def fmt_perplexity(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluation_header(evaluation: Evaluation) -> str:
    """What the numbers are: the kind of perplexity and the windows."""
    first = evaluation.rows[0]
    kinds = {r.kind for r in evaluation.rows}
    kind = (
        "causal LM: exp of the mean next-token NLL"
        if kinds == {"causal"}
        else "masked LM: exp of the mean NLL of the masked tokens"
        if kinds == {"masked"}
        else "causal LMs: next-token NLL, masked LMs: NLL of the masked tokens, exp of the mean"
    )
    if len({(r.window, r.stride) for r in evaluation.rows}) > 1:
        windows = "windows of each model's context (evaluation.csv has each one's)"
    else:
        windows = f"windows of {first.window} tokens" + (f", stride {first.stride}" if first.stride else "")
    return f"perplexity ({kind}; {windows}; lower is better)"


def evaluation_table(evaluation: Evaluation) -> str:
    """The perplexity table for the terminal, with the strategy written and why."""
    rows = evaluation_rows(evaluation)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([evaluation_header(evaluation), *lines] + [evaluation.reason] * bool(evaluation.reason))


def expansion_table(plan: Plan) -> str:
    """The expansion for the terminal: parameters, what the scores are, and every block's score with
    the depths of its copies."""
    expansion = plan.expansion
    copies: dict[int, list[int]] = {}
    for added in expansion.added:
        copies.setdefault(added.source, []).append(added.depth)
    lines = [
        f"expansion: {parameter_line(expansion)}; init: {expansion.init}",
        f"importance: {importance_line(expansion)}" + (" (cached)" if expansion.stats_reused else ""),
    ]
    if expansion.note:
        lines.append(f"note: {expansion.note}")
    lines.append(f"{'depth':<7}{'importance':<14}copied to")
    for depth, score in enumerate(expansion.scores):
        to = ", ".join(str(d) for d in copies.get(depth, []))
        lines.append(f"{depth:<7}{fmt_score(score):<14}{to}".rstrip())
    lines.append("config.json: " + "; ".join(expansion.config_changes))
    return "\n".join(lines)


def importance_line(expansion: Expansion) -> str:
    """'block influence (...), from the built-in calibration text, 1953 tokens in ...'."""
    label = IMPORTANCE_LABELS[expansion.importance]
    return label if expansion.importance == "none" else f"{label}, from {expansion.basis}"


def parameter_line(expansion: Expansion) -> str:
    """'parameters 2.78B -> 3.25B (+17.0%)'."""
    before, after = expansion.params_before, expansion.params_after
    return f"parameters {human_count(before)} -> {human_count(after)} ({(after - before) / before:+.1%})"


def human_count(n: int) -> str:
    for size, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.4g}"


def selection_sentence(selection: Selection) -> str:
    """What wins, in words."""
    what = (
        "Normalized Effective Rank (NER, the entropy of the singular values divided by its maximum)"
        if selection.metric == "ner"
        else f"`{selection.metric}` ({METRICS[selection.metric]})"
    )
    if selection.goal == "target":
        return f"Score: the mean distance of {what} to {selection.target:g}; the lowest wins."
    return f"Score: the mean {what}; the {'highest' if selection.goal == 'max' else 'lowest'} wins."


def spectrum_paths(plan: Plan) -> dict[str, dict[str, int]]:
    """Per candidate, how many of its matrices' spectra took each path (spectra.PATHS)."""
    return {candidate: path_counts(metrics.values()) for candidate, metrics in plan.metrics.items()}


def report_of(plan: Plan, config: MergeConfig, files: dict[str, dict]) -> dict:
    """merge_report.json: version, inputs with revisions, config, every score, the plan, the
    weight files (`shards`, in order) and, for each of them and the index json, its size and
    SHA-256 (`files`: name -> {"bytes", "sha256"}, what `mastermerge verify` checks). Models and
    files are named as the output names them (public.py): no path of this machine but each local
    model's directory in its input (`local`)."""
    names = public_names(plan, config)
    return {
        "mastermerge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_file": config.source and names.applied(str(config.source), paths=True),
        "config": names.applied(config.raw, paths=True),
        "inputs": inputs_of(plan),
    } | names.applied(
        {
            "selection": asdict(plan.selection),
            "metrics": plan.metrics,
            "spectrum_paths": spectrum_paths(plan),
            "plan": plan.to_dict(),
            "shards": [name for name in files if name.endswith(".safetensors")],
            "files": files,
        }
    )


def inputs_of(plan: Plan) -> list[dict]:
    """Each candidate as the report names it (`model`), with where it came from: a hub model its
    repo id (`hub`) and the commit used, a local one its directory (`local`), the one path of this
    machine that the output holds."""
    inputs = []
    for candidate, name in model_names(plan).items():
        revision = plan.revisions[candidate]
        where = {"hub": candidate.split("@")[0]} if revision else {"local": str(plan.sources[candidate])}
        inputs.append({"model": name, **where, "revision": revision, "base": candidate == plan.base})
    return inputs
