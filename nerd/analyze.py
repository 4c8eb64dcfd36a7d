"""`mastermerge analyze`: every metric of every weight matrix of one or more models.

The models are resolved like merge candidates (local directories or hub ids), every 2-D matrix
gets its exact spectrum and metrics (metrics.py) through the shared metric cache, and the output
directory receives metrics.csv and metrics.json (one row per matrix: model, tensor, depth, shape,
every metric), the figures of plots.py and heatmaps.py, and a per-model summary that is also printed: the mean,
minimum and maximum of each metric, the matrices with alpha < 2 or > 6, and those with rank loss.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, heatmaps, plots
from .checkpoint import opened_checkpoints
from .config import ModelSpec
from .sections import Compute
from .errors import ConfigError
from .engine import Engine, Work, executor_of, reachable
from .layout import layout_of
from .metrics import METRICS, path_counts
from .public import short_names
from .sources import resolve_model
from .store import MetricCache

ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0  # HTSR: below 2 over-fit (very heavy tail), above 6 under-trained
LISTED = 12  # matrices named per summary line before "... N more"


@dataclass
class Analysis:
    """One row per matrix of every model, and the singular values behind them (for figures)."""

    models: list[str]
    paths: dict[str, Path]
    revisions: dict[str, str | None]
    rows: list[dict] = field(default_factory=list)
    spectra: dict[tuple[str, str], np.ndarray | None] = field(default_factory=dict)  # (model, tensor)
    same_layout: bool = True
    spectra_computed: int = 0
    spectra_reused: int = 0

    def rows_of(self, model: str) -> list[dict]:
        return [row for row in self.rows if row["model"] == model]


def analyze_models(
    specs: list[ModelSpec],
    cache: MetricCache,
    device: str = "auto",
    quiet: bool = False,
    esd: re.Pattern | None = None,
    compute: Compute = Compute(),
    tensors: re.Pattern | None = None,
) -> Analysis:
    """Resolve the models and compute every metric of every matrix (cached) where `compute` says
    (engine.py), or of those whose names match `tensors` (a ConfigError when none does); the
    singular values of the matrices whose names match `esd` are kept for their figures."""
    reachable(compute)
    resolved = {spec.ref: resolve_model(spec) for spec in specs}
    names = list(resolved)
    analysis = Analysis(names, {n: r.path for n, r in resolved.items()}, {n: r.revision for n, r in resolved.items()})
    engine = Engine(cache, executor_of(compute, device, resolved))
    computed = cache.computed
    with opened_checkpoints({n: resolved[n].path for n in names}) as checkpoints:
        shapes = {n: {t: i.shape for t, i in c.tensors.items()} for n, c in checkpoints.items()}
        analysis.same_layout = all(s == shapes[names[0]] for s in shapes.values())
        chosen = {
            n: [t for t, i in c.tensors.items() if i.is_matrix and (tensors is None or tensors.search(t))]
            for n, c in checkpoints.items()
        }
        total = sum(map(len, chosen.values()))
        if tensors is not None and total == 0:
            raise ConfigError(f"analyze: --tensors: '{tensors.pattern}' matches no weight matrix of the models")
        with tqdm(total=total, desc="spectra", unit="matrix", disable=quiet) as bar:
            for name in names:
                checkpoint = checkpoints[name]
                depths = layout_of(list(checkpoint.tensors)).depths
                for work, metrics in engine.metrics([Work(checkpoint, t) for t in chosen[name]], bar).items():
                    tensor = work.tensor
                    if esd is not None and esd.search(tensor):
                        analysis.spectra[(name, tensor)] = engine.spectrum(work).values
                    analysis.rows.append(
                        {
                            "model": name,
                            "tensor": tensor,
                            "depth": depths[tensor],
                            "shape": list(checkpoint.tensors[tensor].shape),
                            **metrics,
                        }
                    )
    analysis.spectra_computed = cache.computed - computed
    analysis.spectra_reused = len(analysis.rows) - analysis.spectra_computed
    return analysis


def analysis_summary(analysis: Analysis) -> dict[str, dict]:
    """Per model: mean, min and max of every metric; matrices with alpha out of [2, 6]; rank loss."""
    summary = {}
    for model in analysis.models:
        rows = analysis.rows_of(model)
        stats = {}
        for metric in METRICS:
            values = [r[metric] for r in rows if r[metric] is not None]
            stats[metric] = (
                {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
                if values
                else None
            )
        summary[model] = {
            "matrices": len(rows),
            "layers": len({r["depth"] for r in rows if r["depth"] is not None}),
            "metrics": stats,
            "alpha_below_2": [r["tensor"] for r in rows if r["alpha"] is not None and r["alpha"] < ALPHA_LOW],
            "alpha_above_6": [r["tensor"] for r in rows if r["alpha"] is not None and r["alpha"] > ALPHA_HIGH],
            "rank_loss": {r["tensor"]: r["rank_loss"] for r in rows if r["rank_loss"]},
            "no_spectrum": {r["tensor"]: r["problem"] for r in rows if r["problem"]},
            "spectrum_paths": path_counts(rows),
        }
    return summary


def summary_text(analysis: Analysis, summary: dict[str, dict]) -> str:
    """The per-model summary as plain text for the terminal."""
    labels = short_names(analysis.models)
    lines = []
    for model, s in summary.items():
        lines.append(f"{labels[model]}: {s['matrices']} matrices, {s['layers']} layers ({model})")
        width = max(len(m) for m in METRICS)
        lines.append(f"  {'metric'.ljust(width)}  {'mean':>11}  {'min':>11}  {'max':>11}")
        for metric, stat in s["metrics"].items():
            cells = ["-"] * 3 if stat is None else [f"{stat[k]:.5g}" for k in ("mean", "min", "max")]
            lines.append(f"  {metric.ljust(width)}  " + "  ".join(c.rjust(11) for c in cells))
        lines.append(f"  alpha < {ALPHA_LOW:g} (very heavy tail, possibly over-fit): {listing(s['alpha_below_2'])}")
        lines.append(f"  alpha > {ALPHA_HIGH:g} (close to random, under-trained): {listing(s['alpha_above_6'])}")
        lines.append(
            "  spectra: "
            + ", ".join(f"{n} {path}" for path, n in s["spectrum_paths"].items())
            + " (gram: exact from the Gram matrix; refined: smallest values recomputed; svd: float64 SVD)"
        )
        lines.append("  rank loss: " + listing([f"{t} (-{n})" for t, n in s["rank_loss"].items()]))
        if s["no_spectrum"]:
            lines.append("  no spectrum: " + listing([f"{t} ({p})" for t, p in s["no_spectrum"].items()]))
        lines.append("")
    return "\n".join(lines).rstrip()


def listing(items: list[str]) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:LISTED])
    return f"{len(items)}: {shown}" + (f", ... {len(items) - LISTED} more" if len(items) > LISTED else "")


def write_tables(analysis: Analysis, summary: dict, out: Path) -> None:
    """metrics.csv and metrics.json."""
    columns = ["model", "tensor", "depth", "shape", *METRICS, "problem", "path"]
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in analysis.rows:
            writer.writerow([csv_cell(row[c]) if c != "shape" else "x".join(map(str, row[c])) for c in columns])
    document = {
        "mastermerge_version": __version__,
        "models": [
            {"model": m, "path": str(analysis.paths[m]), "revision": analysis.revisions[m]} for m in analysis.models
        ],
        "metrics": METRICS,
        "summary": summary,
        "rows": analysis.rows,
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def csv_cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_figures(analysis: Analysis, out: Path, quiet: bool) -> list[Path]:
    """heatmap_ner.png (one column per depth), smin_histogram.png, and esd/<model>/<tensor>.png
    for the matrices whose spectra were kept (no heatmap without blocks)."""
    labels = short_names(analysis.models)
    written = [
        ner_heatmap(analysis, out, labels),
        plots.smin_histogram(
            out / "smin_histogram.png",
            {labels[m]: [r["s_min"] for r in analysis.rows_of(m) if r["s_min"] is not None] for m in analysis.models},
        ),
    ]
    chosen = [
        r for r in analysis.rows if analysis.spectra.get((r["model"], r["tensor"])) is not None and not r["problem"]
    ]
    for row in tqdm(chosen, desc="ESD figures", unit="figure", disable=quiet or not chosen):
        values = analysis.spectra[(row["model"], row["tensor"])]
        title = (
            f"{labels[row['model']]}: {row['tensor']} {row['shape'][0]}x{row['shape'][1]}\n"
            f"alpha {fmt(row['alpha'])}, KS {fmt(row['alpha_ks'])}, detX tail {row['detx_tail']}, "
            f"NER {row['ner']:.4f}"
        )
        written.append(
            plots.esd(
                out / "esd" / plots.file_name(labels[row["model"]]) / f"{plots.file_name(row['tensor'])}.png",
                values**2,
                row,
                title,
            )
        )
    return [p for p in written if p is not None]


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def ner_heatmap(analysis: Analysis, out: Path, labels: dict[str, str]) -> Path | None:
    """Mean NER of each block by depth x model; when the models share one architecture the best
    model at each depth (what a merge of them would choose) is marked."""
    depths = sorted({r["depth"] for r in analysis.rows if r["depth"] is not None})
    if not depths:
        return None
    values = np.full((len(analysis.models), depths[-1] + 1), math.nan)
    for i, model in enumerate(analysis.models):
        for depth in depths:
            scores = [r["ner"] for r in analysis.rows_of(model) if r["depth"] == depth]
            if scores and None not in scores:
                values[i, depth] = float(np.mean(scores))
    best: list[int | None] = [None] * values.shape[1]
    if analysis.same_layout and len(analysis.models) > 1:
        for depth in depths:
            column = values[:, depth]
            best[depth] = int(np.nanargmax(column)) if np.isfinite(column).any() else None
    title = "mean NER per block" + ("; red boxes: best at each depth" if any(b is not None for b in best) else "")
    return heatmaps.heatmap(
        out / "heatmap_ner.png",
        values,
        [labels[m] for m in analysis.models],
        title,
        "mean ner",
        [(r, d) for d, r in enumerate(best) if r is not None],
    )
