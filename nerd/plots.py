"""Figures (PNG, matplotlib) for what people would rather look at.

- the heatmaps of a merge and of `analyze`: heatmaps.py.
- esd/<model>/<tensor>.png: the ESD of one matrix on log-log axes, its power-law fit (red, from
  xmin) and the detX threshold (purple), as in the weightwatcher blog post "Deep Learning and Effective
  Correlation Spaces" (C. Martin, calculatedcontent.com): where the two lines meet, the SETOL volume-preserving condition holds.
- expansion_curve.png: DLEC's curve, each block's importance by depth, the duplicated blocks
  marked (with the number of copies where there is more than one).
- smin_histogram.png: the smallest singular value of every matrix on a log axis (the
  rank-collapse figure of C. Martin's calculatedcontent.com post on rank collapse in deep networks), one series per model.
- perplexity.png: an evaluation's perplexity of every model on every text and their mean.

matplotlib is a dependency; it is imported on first use (`pyplot`), so a command that draws
nothing starts without it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .importance import IMPORTANCE_LABELS
from .plan import Plan
from .public import short_names
from .report import parameter_line


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def expansion_curve(plan: Plan, directory: Path) -> str | None:
    """expansion_curve.png: importance by depth before the expansion, copied blocks ringed in red.
    Returns the file name, or None without a measured expansion."""
    expansion = plan.expansion
    if expansion is None or all(v is None for v in expansion.scores):
        return None
    plt = pyplot()
    values = np.array([math.nan if v is None else v for v in expansion.scores], dtype=float)
    depths = np.arange(len(values))
    label = IMPORTANCE_LABELS[expansion.importance]
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2 + 0.3 * len(values)), 18), 3.8))
    ax.plot(depths, values, marker="o", markersize=4, color="tab:blue", label=label)
    copies = Counter(a.source for a in expansion.added)
    chosen = sorted(copies)
    ax.scatter(
        chosen,
        values[chosen],
        s=140,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        label=f"duplicated ({len(expansion.added)} copies)",
        zorder=3,
    )
    for depth, count in copies.items():
        if count > 1 and np.isfinite(values[depth]):
            ax.annotate(
                f"x{count}", (depth, values[depth]), textcoords="offset points", xytext=(6, 6), color="red", fontsize=8
            )
    ax.set_xlabel("depth (layer, before the expansion)")
    ax.set_ylabel(expansion.importance)
    ax.set_xticks(depths if len(depths) <= 40 else depths[:: max(1, len(depths) // 20)])
    ax.set_title(f"DLEC expansion curve: {parameter_line(expansion)}", fontsize=10, loc="left")
    ax.legend(fontsize=7)
    name = "expansion_curve.png"
    save(fig, plt, directory / name)
    return name


def esd(path: Path, eigenvalues: np.ndarray, metrics: dict, title: str) -> Path:
    """The ESD histogram (log-spaced bins, density) with the power-law fit and the detX line."""
    plt = pyplot()
    lam = eigenvalues[eigenvalues > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if len(lam) > 1 and lam.max() > lam.min():
        bins = np.logspace(math.log10(lam.min()), math.log10(lam.max()), max(10, min(100, len(lam) // 4)))
    else:
        bins = 10
    ax.hist(lam, bins=bins, density=True, color="tab:blue", alpha=0.6, label="ESD")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide when the ESD spans under a decade
    alpha, xmin, tail = metrics.get("alpha"), metrics.get("alpha_xmin"), metrics.get("alpha_tail")
    if alpha is not None:
        x = np.logspace(math.log10(xmin), math.log10(lam.max()), 50)
        share = tail / len(lam)  # the fit describes the tail's share of the whole ESD
        ax.plot(
            x, share * (alpha - 1) / xmin * (x / xmin) ** -alpha, color="red", label=f"power law, alpha = {alpha:.2f}"
        )
        ax.axvline(xmin, color="red", linestyle="--", label=f"xmin = {xmin:.3g} (tail of {tail})")
    if metrics.get("detx_lambda") is not None:
        ax.axvline(
            metrics["detx_lambda"],
            color="purple",
            linestyle=":",
            linewidth=2,
            label=f"detX = 1 at {metrics['detx_lambda']:.3g} (tail of {metrics['detx_tail']})",
        )
    ax.set_xlabel("eigenvalue of W^T W (squared singular value)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9, loc="left")
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.87)  # fixed: tight_layout doubles the time
    return save(fig, plt, path, tight=False)


def smin_histogram(path: Path, smallest: dict[str, list[float]]) -> Path:
    """One step histogram per model of its matrices' smallest singular values, log-spaced bins;
    exact zeros (rank collapse) are counted in the legend."""
    plt = pyplot()
    positive = [v for values in smallest.values() for v in values if v > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if positive:
        low, high = math.log10(min(positive)), math.log10(max(positive))
        bins = np.logspace(low - 0.1, high + 0.1, 30)
        for model, values in smallest.items():
            zeros = sum(v <= 0 for v in values)
            ax.hist(
                [v for v in values if v > 0],
                bins=bins,
                histtype="step",
                linewidth=1.5,
                label=model + (f" ({zeros} exactly zero)" if zeros else ""),
            )
    ax.set_xscale("log")
    ax.set_xlabel("smallest singular value s_min of each matrix")
    ax.set_ylabel("matrices")
    ax.set_title("Rank collapse: s_min across matrices", fontsize=10, loc="left")
    ax.legend(fontsize=7)
    return save(fig, plt, path)


def save(fig, plt, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def file_name(text: str) -> str:
    """A name safe for a file: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    return re.sub(r"[^\w.\-]", "_", text)


def evaluation_chart(plan: Plan, directory: Path) -> str | None:
    """perplexity.png of a merge's evaluation; the file name, or None without an evaluation."""
    evaluation = plan.evaluation
    if evaluation is None:
        return None
    written = next(f"composite: {s.name}" for s in evaluation.strategies if s.written)
    perplexity_chart(directory / "perplexity.png", evaluation.rows, evaluation.texts, written)
    return "perplexity.png"


def perplexity_chart(path: Path, rows: list, texts: list[str], written: str | None = None) -> Path:
    """Grouped bars: each model's perplexity on each text and the mean, the base's as a dashed line
    per group, the written composite outlined in red."""
    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    table = {(r.model, r.text): math.nan if r.perplexity is None else r.perplexity for r in rows}
    groups = texts + ["mean"]
    for m in models:
        table[m, "mean"] = sum(table[m, t] for t in texts) / len(texts)  # NaN (no bar) where one is missing
    base = next(r.model for r in rows if r.role == "base")
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(min(max(6.4, 1.2 + 0.35 * len(models) * len(groups)), 20), 4.6))
    labels = short_names([m for m in models if not m.startswith("composite: ")])
    for i, m in enumerate(models):
        xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(
            xs,
            [table[m, g] for g in groups],
            width * 0.92,
            label=labels.get(m, m),
            edgecolor="red" if m == written else "none",
            linewidth=2 if m == written else 0,
        )
        if len(models) * len(groups) <= 40:
            ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
    for g in range(len(groups)):
        ax.hlines(table[base, groups[g]], g - 0.45, g + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(groups)), [Path(g).name for g in groups])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(
        "Perplexity by model and text (dashed: the base)" + ("; red outline: written" if written else ""),
        fontsize=10,
        loc="left",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, plt, path)
