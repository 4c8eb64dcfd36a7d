"""The evaluation's files: evaluation.csv and evaluation.json, every model's perplexity on every
text and its mean, with the difference from the base's (what `mastermerge evaluate` and a merge's
evaluation write beside the terminal table of nerd.report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import __version__
from .plan import Perplexity
from .report import mean_of


def write_evaluation(rows: list[Perplexity], texts: list[str], out: Path, extra: dict | None = None) -> None:
    """evaluation.csv (one row per model and text, and its mean; each with its difference from the
    base's) and evaluation.json (the same with the windows and the inputs); empty where a model
    has no perplexity."""
    means = mean_rows(rows, texts)
    base = next(r.model for r in rows if r.role == "base")
    reference = {r.text: r.perplexity for r in rows + means if r.model == base}
    columns = [
        "model",
        "role",
        "text",
        "perplexity",
        "diff_from_base",
        "relative_diff",
        "nll",
        "tokens",
        "windows",
        "window",
        "stride",
        "kind",
        "reused",
    ]
    records = []
    for r in rows + means:
        diff = None if None in (r.perplexity, reference[r.text]) else r.perplexity - reference[r.text]
        records.append(
            {
                "model": r.model,
                "role": r.role,
                "text": r.text,
                "perplexity": r.perplexity,
                "diff_from_base": diff,
                "relative_diff": None if diff is None else diff / reference[r.text],
                "nll": r.nll,
                "tokens": r.tokens,
                "windows": r.windows,
                "window": r.window,
                "stride": r.stride,
                "kind": r.kind,
                "reused": r.reused,
            }
        )
    with open(out / "evaluation.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
    document = {"mastermerge_version": __version__, "texts": texts, "base": base, **(extra or {}), "rows": records}
    (out / "evaluation.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def mean_rows(rows: list[Perplexity], texts: list[str]) -> list[Perplexity]:
    """Per model, a row for the mean over the texts (text 'mean': the mean of the perplexities,
    None if one is missing; nll and tokens summed)."""
    means = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and r.text in texts]
        nll = None if any(r.nll is None for r in mine) else sum(r.nll for r in mine)
        means.append(
            Perplexity(
                model,
                mine[0].role,
                "mean",
                mine[0].kind,
                mean_of([r.perplexity for r in mine]),
                nll,
                sum(r.tokens for r in mine),
                sum(r.windows for r in mine),
                mine[0].window,
                mine[0].stride,
                all(r.reused for r in mine),
            )
        )
    return means
