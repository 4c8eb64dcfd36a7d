"""The heatmaps (PNG): scores or compatibilities by depth x candidate, the chosen path marked.

- heatmap_<metric>.png of a merge: each block's score per candidate, coloured by its difference
  from the winner's at its depth (symmetric-log, so a near tie and a wide gap both show), the
  score and that difference written in each cell and the winners (or a blend's members) boxed.
  Coloured by the score itself, the variation from depth to depth painted over the differences
  that chose the winner. When the non-layer group (embeddings, final norm, head) competes
  (selection.non_layer: compete), it is the first column, labelled non-layer, drawn as a depth is.
- heatmap_compatibility.png of a merge: the tethers, each candidate's compatibility with the base
  by depth x candidate (the non-layer group first when it competes), the drifting cells crossed
  out and the threshold on the colour bar.
- heatmap_ner.png of `analyze` (analyze.py draws it with `heatmap`): the mean NER by depth x model.

Beyond TALL_FROM depths (the non-layer group counting as one) the depths run down the figure
instead of across, so that it stays readable at the width of a page (a model card).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .plan import Choice, Plan, Tethers
from .plots import pyplot, save
from .plan import short_names
from .select import rule_of
from .tether import NON_LAYER

MARKED_CELLS = 400  # heatmaps with at most this many cells get their values written in
MOST_DIGITS = 8  # significant digits of a heatmap cell's score, at the most
TALL_FROM = 8  # heatmaps of more depths run them down the figure
DECADES = 4  # the colours of a merge's differences span this many decades below the largest, at the most


def heatmap(
    path: Path,
    values: np.ndarray,
    candidates: list[str],
    title: str,
    label: str,
    boxes: list[tuple[int, int]],
    lower_wins: bool = False,
    crosses: list[tuple[int, int]] = (),
    threshold: float | None = None,
    cells: np.ndarray | None = None,
    norm=None,
    columns: list[str] | None = None,
) -> Path:
    """values[candidate, depth] as colours (NaN: no score; `norm`: a matplotlib norm, by default
    linear from the lowest value to the highest), labelled `label` on the colour bar (with which way
    wins, unless `norm` is given), with red boxes on the (row, depth) cells in `boxes` (what was
    chosen), red crosses on those in `crosses` (what was refused), and `threshold` marked on the
    colour bar. Each cell shows its text in `cells` (default: its value to 4 significant digits)
    when there are few enough. `columns` labels the depths (default 0, 1, ...; a first column
    'non-layer' is set apart from them by a white line). Beyond TALL_FROM depths the depths run
    down instead of across, so that the figure stays readable at the width of a page."""
    plt = pyplot()
    if cells is None:
        cells = np.vectorize(lambda v: f"{v:.4g}" if np.isfinite(v) else "", otypes=[object])(values)
    tall = values.shape[1] > TALL_FROM
    fig, ax = plt.subplots(figsize=heatmap_size(values.shape, cells, tall))
    if norm is None:
        bounds = values[np.isfinite(values)].tolist() + ([threshold] if threshold is not None else [])
        low, high = (min(bounds), max(bounds)) if bounds else (0.0, 1.0)  # the threshold's line stays on the bar
        norm = plt.Normalize(low, high)
        label += "" if threshold is not None else " (lower wins)" if lower_wins else " (higher wins)"
    shown = values.T if tall else values
    image = ax.imshow(
        np.ma.masked_invalid(shown),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis_r" if lower_wins else "viridis",
        norm=norm,
    )
    if threshold is None:
        fig.colorbar(image, ax=ax, label=label)
    else:
        fig.colorbar(image, ax=ax, label=f"{label} (eligible from the red line up)").ax.axhline(
            threshold, color="red", linewidth=2
        )
    if values.size <= MARKED_CELLS:
        write_cells(ax, image, shown, cells.T if tall else cells, fontsize(fig, shown.shape[1], cells))
    flip = (lambda r, d: (d, r)) if tall else (lambda r, d: (r, d))
    mark_cells(ax, [flip(*b) for b in boxes], [flip(*c) for c in crosses])
    axis_labels(ax, candidates, columns or [str(d) for d in range(values.shape[1])], tall)
    if columns and columns[0] == NON_LAYER:  # a white line between it and the depths
        (ax.axhline if tall else ax.axvline)(0.5, color="white", linewidth=3)
    ax.set_title(title, fontsize=10, loc="left")
    return save(fig, plt, path)


def heatmap_size(shape: tuple[int, int], cells: np.ndarray, tall: bool) -> tuple[float, float]:
    """The figure's size in inches: room for each cell's lines of text, within 24 inches across."""
    rows, depths = shape
    lines = max((len(t.splitlines()) for t in cells.flat), default=1)
    if tall:
        return min(max(6.0, 3.2 + 1.1 * rows), 24), 2.0 + (0.1 + 0.15 * lines) * depths
    return min(max(6.0, 3 + (0.15 + 0.3 * lines) * depths), 24), 1.8 + (0.3 + 0.25 * lines) * rows


def axis_labels(ax, candidates: list[str], columns: list[str], tall: bool) -> None:
    """Candidates on one axis, the depths (labelled `columns`) on the other."""
    if tall:
        ax.set_xticks(range(len(candidates)), candidates, rotation=15 if len(candidates) > 2 else 0)
        ax.set_yticks(range(len(columns)), columns)
        ax.set_ylabel("depth (layer)")
    else:
        ax.set_yticks(range(len(candidates)), candidates)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_xlabel("depth (layer)")


def fontsize(fig, columns: int, cells: np.ndarray) -> float:
    """The cells' font size: 8 points, less where the widest line would not fit in its cell (the
    axes take about 70% of the figure's width; a digit is about 0.6 of the font size wide)."""
    widest = max((len(line) for text in cells.flat for line in text.splitlines()), default=1)
    cell_points = 0.7 * fig.get_figwidth() * 72 / columns
    return max(4.0, min(8.0, 0.75 * cell_points / (0.6 * max(widest, 1))))


def write_cells(ax, image, values: np.ndarray, cells: np.ndarray, size: float) -> None:
    """Each cell's text (values and cells as drawn: [y, x]), black on a light colour and white on a dark one."""
    for (y, x), text in np.ndenumerate(cells):
        if text:
            red, green, blue, _ = image.cmap(image.norm(values[y, x])) if np.isfinite(values[y, x]) else (1, 1, 1, 1)
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            ax.text(x, y, text, ha="center", va="center", fontsize=size, color="black" if light else "white")


def mark_cells(ax, boxes: list[tuple[int, int]], crosses: list[tuple[int, int]]) -> None:
    """Red boxes around the (y, x) cells in `boxes`, red crosses over those in `crosses`."""
    from matplotlib.patches import Rectangle

    for y, x in boxes:
        ax.add_patch(Rectangle((x - 0.46, y - 0.46), 0.92, 0.92, fill=False, edgecolor="red", linewidth=2.2))
    for y, x in crosses:
        ax.plot([x - 0.4, x + 0.4], [y - 0.4, y + 0.4], color="red", linewidth=1.5)
        ax.plot([x - 0.4, x + 0.4], [y + 0.4, y - 0.4], color="red", linewidth=1.5)


def block_choices(plan: Plan) -> list[Choice]:
    """The per-depth block choices of a merge, in depth order."""
    return [c for c in plan.choices if c.depth is not None and c.group == str(c.depth)]


def figure_choices(plan: Plan) -> list[Choice]:
    """The groups a merge's heatmaps show, one column each: the non-layer group first when it
    competed (selection.non_layer: compete, and a candidate has a score there), then every depth's
    block; none without blocks."""
    blocks = block_choices(plan)
    competed = [
        c
        for c in plan.choices
        if c.depth is None and plan.selection.non_layer == "compete" and any(s is not None for s in c.scores.values())
    ]
    return competed + blocks if blocks else []


def column_label(choice: Choice) -> str:
    """A column's label and its group's key in the tethers: 'non-layer', or the block's depth."""
    return NON_LAYER if choice.depth is None else str(choice.depth)


def score_matrix(plan: Plan, choices: list[Choice]) -> np.ndarray:
    """Each candidate's score (row) in each of the choices (column); NaN where it has none."""
    return np.array(
        [[math.nan if c.scores[m] is None else c.scores[m] for c in choices] for m in plan.candidates], dtype=float
    )


def merge_heatmap(plan: Plan, directory: Path) -> str | None:
    """heatmap_<metric>.png of a merge: each block's score per candidate, coloured by its difference
    from the winner's score at that depth (what decided the depth, where the scores themselves vary
    more from depth to depth than between candidates), both written in the cells; the winners (or
    the blend's members) boxed; the non-layer group in the first column when it competed.
    Returns the file name, or None without blocks."""
    groups = figure_choices(plan)
    if not groups:
        return None
    values = score_matrix(plan, groups)
    rule = rule_of(plan.selection)
    gaps = winner_gaps(values, [plan.candidates.index(c.winner) for c in groups], rule.lower_wins)
    labels = short_names(plan.candidates)
    name = f"heatmap_{plan.selection.metric}.png"
    title = (
        f"{rule.label} per block over its difference from the depth's winner\ncolour: the difference; red boxes: chosen"
        + (
            " (block winners; per-matrix winners in merge_report.json)"
            if plan.selection.granularity == "tensor"
            else ""
        )
        + ("\nnon-layer: the embeddings, final norm and head, chosen as one group" if groups[0].depth is None else "")
    )
    difference = f"winner's {rule.label} minus this one's" if rule.lower_wins else f"{rule.label} minus the winner's"
    boxes = [(plan.candidates.index(m), d) for d, c in enumerate(groups) for m in (c.blend or [c.winner])]
    heatmap(
        directory / name,
        gaps,
        [labels[c] for c in plan.candidates],
        title,
        f"{difference}\nat its depth (0: the winner)",
        boxes,
        cells=gap_cells(values, gaps),
        norm=gap_norm(gaps),
        columns=[column_label(c) for c in groups],
    )
    return name


def gap_norm(gaps: np.ndarray):
    """The colours of the differences from the winners: symmetric-log, linear within the smallest
    nonzero difference (or DECADES decades below the largest, if that is more) and logarithmic
    beyond, so that a near tie shows as clearly apart from its winner as a wide gap; 0 (the
    winners) at the top of the bar unless a candidate that could not win (tethers) scores better."""
    from matplotlib.colors import Normalize, SymLogNorm

    finite = gaps[np.isfinite(gaps)]
    nonzero = np.abs(finite[finite != 0])
    if not len(nonzero):
        return Normalize(-1.0, 0.0)  # every candidate ties with its winner (or none has a score)
    threshold = max(nonzero.min(), nonzero.max() * 10.0**-DECADES)
    return SymLogNorm(threshold, linscale=1.0, vmin=min(finite.min(), 0.0), vmax=max(finite.max(), 0.0), base=10)


def winner_gaps(values: np.ndarray, winners: list[int], lower_wins: bool) -> np.ndarray:
    """values[candidate, depth] minus the winner's at each depth, signed so that worse is negative
    (0 for the winner; NaN where either has no score)."""
    gaps = values - values[winners, np.arange(values.shape[1])]
    return -gaps if lower_wins else gaps


def gap_cells(values: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Each cell's text: the score, with enough significant digits that the smallest difference
    shows in them (4 to MOST_DIGITS), over its difference from the winner (2 digits; 0 for it)."""
    digits = score_digits(values, gaps)
    cells = np.full(values.shape, "", dtype=object)
    for index, value in np.ndenumerate(values):
        if np.isfinite(value):
            gap = gaps[index]
            cells[index] = f"{value:.{digits}g}\n" + (
                "-" if not np.isfinite(gap) else "0" if gap == 0 else f"{gap:+.2g}"
            )
    return cells


def score_digits(values: np.ndarray, gaps: np.ndarray) -> int:
    """Significant digits that tell the closest candidates apart: the largest score's leading digit
    down to the smallest nonzero difference's second one, 4 at the least and MOST_DIGITS at the most."""
    finite = np.abs(values[np.isfinite(values)])
    smallest = np.abs(gaps[np.isfinite(gaps) & (gaps != 0)])
    if not len(smallest) or not finite.max():
        return 4
    span = math.floor(math.log10(finite.max())) - math.floor(math.log10(smallest.min())) + 2
    return max(4, min(MOST_DIGITS, span))


def compatibility_matrix(tethers: Tethers, keys: list[str], others: list[str]) -> np.ndarray:
    """Each other candidate's compatibility (row) in each group (column, by its key); NaN where none
    was measured."""
    found = [[tethers.scores.get(k, {}).get(m) for k in keys] for m in others]
    return np.array([[math.nan if v is None else v for v in row] for row in found], dtype=float)


def compatibility_heatmap(plan: Plan, directory: Path) -> str | None:
    """heatmap_compatibility.png: every other candidate's compatibility with the base by depth,
    crosses where it drifts (below the threshold, marked on the colour bar), boxes where it supplies
    the block; the non-layer group in the first column when it competed. Returns the file name, or
    None without tethers."""
    groups = figure_choices(plan)
    if plan.tethers is None or not groups:
        return None
    tethers, others = plan.tethers, [c for c in plan.candidates if c != plan.base]
    keys = [column_label(c) for c in groups]
    values = compatibility_matrix(tethers, keys, others)
    crosses = [(r, d) for r, m in enumerate(others) for d, k in enumerate(keys) if not tethers.eligible(k, m)]
    boxes = [(others.index(m), d) for d, c in enumerate(groups) for m in (c.blend or [c.winner]) if m in others]
    labels = short_names(plan.candidates)
    name = "heatmap_compatibility.png"
    options = tethers.options
    heatmap(
        directory / name,
        values,
        [labels[c] for c in others],
        f"{options.measure} with the base '{labels[plan.base]}' per block\nred x: drifts "
        f"(below {options.min_compatibility:g}); red boxes: supplies the block",
        options.measure,
        boxes,
        crosses=crosses,
        threshold=options.min_compatibility,
        columns=keys,
    )
    return name
