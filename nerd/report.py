"""What a merge tells people: the per-depth choice table, the model card and merge_report.json."""

from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .config import MergeConfig, Selection
from .metrics import METRICS
from .plan import Plan
from .select import rule_of


def short_names(candidates: list[str]) -> dict[str, str]:
    """Column labels: the last path part of each model, the full reference where those collide."""
    last = {c: Path(c.split("@")[0].rstrip("/")).name or c for c in candidates}
    return {c: last[c] if list(last.values()).count(last[c]) == 1 else c for c in candidates}


def choice_rows(plan: Plan) -> list[list[str]]:
    """Header and one row per choice: group, each candidate's score (the group mean of the
    selection metric, or of its distance to the target), the winner, a note."""
    labels = short_names(plan.candidates)
    rows = [["depth"] + [labels[c] for c in plan.candidates] + ["winner"]]
    for choice in plan.choices:
        cells = ["-" if choice.scores[c] is None else f"{choice.scores[c]:.6g}" for c in plan.candidates]
        rows.append([choice.group] + cells + [labels[choice.winner] + (f"  ({choice.note})" if choice.note else "")])
    return rows


def choice_table(plan: Plan) -> str:
    """The per-depth table as aligned plain text, for the terminal, under a line saying what the
    scores are."""
    rule = rule_of(plan.selection)
    rows = choice_rows(plan)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    wins = "lowest" if rule.lower_wins else "highest"
    return "\n".join([f"scores: {rule.label} of each group's matrices, {wins} wins", *lines])


def model_card(plan: Plan, heatmap: str | None = None) -> str:
    """README.md of the output: what it was made from, the choice at every depth, and the heatmap
    figure when one was drawn."""
    rows = choice_rows(plan)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    models = "\n".join(f"- `{c}`" + (" (base)" if c == plan.base else "") for c in plan.candidates)
    heatmap = f"\n![{plan.selection.metric} by depth and candidate]({heatmap})\n" if heatmap else ""
    base_model = f"base_model: {plan.base.split('@')[0]}\n" if plan.revisions[plan.base] else ""
    return f"""---
{base_model}library_name: transformers
tags:
- merge
- mastermerge
---
# Composite model

Made by mastermerge {__version__}: at every depth, the candidate whose weight matrices score best
supplies the block. {selection_sentence(plan.selection)} Granularity: {plan.selection.granularity}.

Candidates (ties go to the earlier one):
{models}

Scores are the {rule_of(plan.selection).label} over the matrices of each group; the winner
supplies its tensors.

{chr(10).join(table)}
{heatmap}
Every metric of every matrix is in merge_report.json.
"""


def selection_sentence(selection: Selection) -> str:
    """What wins, in words."""
    what = ("Normalized Effective Rank (NER, the entropy of the singular values divided by its maximum)"
            if selection.metric == "ner" else f"`{selection.metric}` ({METRICS[selection.metric]})")
    if selection.goal == "target":
        return f"Score: the mean distance of {what} to {selection.target:g}; the lowest wins."
    return f"Score: the mean {what}; the {'highest' if selection.goal == 'max' else 'lowest'} wins."


def report_of(plan: Plan, config: MergeConfig, shards: list[str]) -> dict:
    """merge_report.json: version, inputs with revisions, config, every score, and the plan."""
    return {
        "mastermerge_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_file": str(config.source) if config.source else None,
        "config": config.raw,
        "inputs": [{"model": c, "path": str(plan.sources[c]), "revision": plan.revisions[c],
                    "base": c == plan.base} for c in plan.candidates],
        "selection": asdict(plan.selection),
        "metrics": plan.metrics,
        "plan": plan.to_dict(),
        "shards": shards,
    }
