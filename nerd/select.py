"""Selection: which candidate supplies each part of the output, from the matrices' scores.

A matrix's score is its selection metric (NER by default), or with `goal: target` its distance
|metric - target|; a group's score is the mean over its matrices; the highest mean wins with
`goal: max`, the lowest with `min` and `target`.

Granularity `block` (default): a depth's score is the mean score of its 2-D matrices and the
winner supplies every tensor of the block. Granularity `tensor`: each 2-D matrix is chosen on
its own score; a 1-D tensor of the same module (q_proj.bias beside q_proj.weight) follows that
matrix, the block's other tensors (norms) follow the block's mean-score winner. Non-layer
tensors (embeddings, final norm, lm_head) are one group: taken from the base, or, with
`non_layer: compete`, from the candidate with the best mean score over them, so tied embeddings
stay tied. Ties go to the earlier candidate, base first. A candidate with a matrix that has no
score (a metric undefined for it) in a group cannot win that group, nor can one with an unusable
tensor there (Health: a NaN or Inf in any floating-point tensor, an all-zero matrix unless
selection.zero_matrices is allow, which leaves such matrices out of the mean instead). A group
that nothing usable can supply is a ModelError.

Tethers (tether.py) gate every group: a candidate whose compatibility with the base at that depth
is below tether.min_compatibility drifts and cannot win it. With tether.mode blend, the group's
eligible candidates that have a score are averaged instead (when there are two or more), with
equal weights, weights proportional to their scores, or proportional to their compatibility; the
choice records the weights and, as its winner, the best of them.

selection.pin fixes chosen groups (a depth, with granularity tensor every choice at it, or the
non-layer group) to a candidate whatever the scores and tethers say; their choice is marked
pinned, its note says what the scores would have chosen and whether the candidate drifts there.
Notes name candidates as the tables do (plan.short_names); errors by their full reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .architecture import paired_matrix
from .checkpoint import TensorInfo
from .config import Selection
from .errors import ConfigError, ModelError
from .layout import Layout
from .plan import Choice, Tethers, short_names
from .spectra import ALL_ZERO

Scores = dict[str, dict[str, float | None]]  # candidate -> tensor -> score
Metrics = dict[str, dict[str, dict]]  # candidate -> tensor -> every metric and its `problem`


@dataclass(frozen=True)
class Rule:
    """What is compared and which way: `lower_wins` for goal min and target."""

    metric: str
    lower_wins: bool
    label: str  # what a score means, for tables: "mean ner", "mean |alpha - 2|"


def rule_of(selection: Selection) -> Rule:
    if selection.goal == "target":
        return Rule(selection.metric, True, f"mean |{selection.metric} - {selection.target:g}|")
    return Rule(selection.metric, selection.goal == "min", f"mean {selection.metric}")


def scores_of(metrics: Metrics, selection: Selection) -> Scores:
    """Each matrix's score: its metric, or its distance to the target; None where undefined."""

    def score(value):
        if value is None or selection.goal != "target":
            return value
        return abs(value - selection.target)

    return {c: {t: score(m[selection.metric]) for t, m in per.items()} for c, per in metrics.items()}


def winner_of(scores: dict[str, float | None], order: list[str], lower_wins: bool = False) -> str | None:
    """The best score (highest, or lowest if `lower_wins`); the earliest candidate in `order` wins
    ties; None if nobody has a score."""
    best, best_score = None, None
    for candidate in order:
        score = scores.get(candidate)
        if score is None:
            continue
        if best_score is None or (score < best_score if lower_wins else score > best_score):
            best, best_score = candidate, score
    return best


def group_score(scores: Scores, candidate: str, matrices: list[str]) -> float | None:
    """Mean score of a candidate over some matrices; None if any of them has no score."""
    values = [scores[candidate][m] for m in matrices]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


@dataclass(frozen=True)
class Health:
    """What cannot be used: candidate -> tensor -> why (NaN/Inf in any floating-point tensor, an
    all-zero matrix unless selection.zero_matrices is allow), and the all-zero matrices that are
    allowed and so left out of their group's mean score."""

    unusable: dict[str, dict[str, str]]
    zeros: dict[str, set[str]]

    def of(self, candidate: str, tensors: list[str]) -> list[str]:
        """'tensor: why' for each unusable tensor of the group."""
        return [f"{t}: {self.unusable[candidate][t]}" for t in tensors if t in self.unusable[candidate]]


def health_of(metrics: Metrics, vector_problems: dict[str, dict[str, str]], selection: Selection) -> Health:
    """The Health of every candidate from its matrices' spectra and its other tensors' values."""
    allow = selection.zero_matrices == "allow"
    unusable, zeros = {}, {}
    for c, per in metrics.items():
        problems = {t: m["problem"] for t, m in per.items() if m.get("problem")}
        zeros[c] = {t for t, p in problems.items() if p == ALL_ZERO} if allow else set()
        unusable[c] = {t: p for t, p in problems.items() if t not in zeros[c]} | vector_problems.get(c, {})
    return Health(unusable, zeros)


def group_choice(
    label: str,
    depth: int | None,
    tensors: list[str],
    matrices: list[str],
    scores: Scores,
    order: list[str],
    rule: Rule,
    health: Health,
    tethers: Tethers,
    fixed: str | None = None,
    pinned: str | None = None,
    labels: dict[str, str] | None = None,
) -> Choice:
    """Choose one candidate for a group of tensors, by mean score among those its tethers let
    through and that have no unusable tensor in it, unless `fixed` (the base) or `pinned`
    (selection.pin) names it; or, with tether.mode blend, average the eligible ones. ModelError
    when nothing usable can supply the group. Notes name candidates by `labels` (the tables' names)."""
    place = "the non-layer group" if depth is None else f"depth {depth}" if label == str(depth) else label
    name = (labels or {}).get
    broken = {c: health.of(c, tensors) for c in order}
    per_candidate = {
        c: None if broken[c] else group_score(scores, c, [m for m in matrices if m not in health.zeros[c]])
        for c in order
    }
    key = "non-layer" if depth is None else str(depth)
    drifted = [c for c in order if not tethers.eligible(key, c)]
    eligible = [c for c in order if c not in drifted]
    if pinned is not None:
        return pinned_choice(
            Choice(label, depth, per_candidate, pinned, tuple(tensors)), broken, eligible, rule, tethers, labels
        )
    if fixed is not None:
        if broken[fixed]:
            raise ModelError(
                f"{place}: the base '{fixed}' cannot supply it ({'; '.join(broken[fixed])}) and "
                f"selection.non_layer is base; set selection.non_layer: compete to take it from "
                f"another candidate"
            )
        return Choice(label, depth, per_candidate, fixed, tuple(tensors), "taken from the base")
    winner = winner_of(per_candidate, eligible, rule.lower_wins)
    notes = []
    if any(broken.values()):
        notes.append("not selectable: " + "; ".join(f"{name(c, c)} ({'; '.join(b)})" for c, b in broken.items() if b))
    if winner is None:
        usable = [c for c in eligible if not broken[c]]
        if not usable:
            raise ModelError(
                f"{place}: no candidate can supply it: "
                + "; ".join(f"'{c}' " + ("; ".join(broken[c]) if broken[c] else "drifts from the base") for c in order)
                + "; nothing written"
            )
        winner = usable[0]
        notes.append(
            f"no {'eligible ' if drifted else ''}candidate has a score here; taken from "
            + ("the base" if winner == order[0] else f"{name(winner, winner)}, the first usable one")
        )
    else:
        unscored = []
        for c in order:
            if per_candidate[c] is None and not broken[c]:
                reasons = [
                    f"{m}: {rule.metric} undefined"
                    for m in matrices
                    if scores[c][m] is None and m not in health.zeros[c]
                ]
                unscored.append(f"{name(c, c)} ({'; '.join(reasons)})")
        if unscored and matrices:
            notes.append(f"not selectable, no {rule.metric}: " + "; ".join(unscored))
    if key in tethers.unmeasured:
        notes.append(
            f"the base's block has a NaN or Inf, so no {tethers.options.measure} was measured here; "
            f"candidates compatible with the base at other depths are eligible"
        )
    elif any(per_candidate[c] is not None for c in drifted):  # those without a score are already explained
        notes.append(drift_note(tethers, key, [c for c in drifted if per_candidate[c] is not None], labels))
    members = [c for c in eligible if per_candidate[c] is not None]
    blend, runner_up, margin = None, None, None
    if tethers.options.mode == "blend" and len(members) > 1:
        blend = blend_weights(members, per_candidate, tethers, key, place, rule)
    elif per_candidate[winner] is not None:
        runner_up = winner_of(per_candidate, [c for c in eligible if c != winner], rule.lower_wins)
        if runner_up is not None:
            margin = abs(per_candidate[winner] - per_candidate[runner_up])
    return Choice(
        label, depth, per_candidate, winner, tuple(tensors), "; ".join(notes) or None, blend, runner_up, margin
    )


def pinned_choice(
    choice: Choice,
    broken: dict[str, list[str]],
    eligible: list[str],
    rule: Rule,
    tethers: Tethers,
    labels: dict[str, str] | None = None,
) -> Choice:
    """The group selection.pin fixes to `choice.winner`, whatever the scores and tethers say (the
    note says what they say); ModelError when that candidate cannot supply it (a NaN, ...)."""
    pinned, depth = choice.winner, choice.depth
    key = "non-layer" if depth is None else str(depth)
    place = "the non-layer group" if depth is None else f"depth {depth}" if choice.group == str(depth) else choice.group
    if broken[pinned]:
        raise ModelError(
            f"{place}: selection.pin fixes it to '{pinned}', which cannot supply it ({'; '.join(broken[pinned])})"
        )
    notes = []
    best = winner_of(choice.scores, eligible, rule.lower_wins)
    if best is not None and best != pinned:
        notes.append(f"by score {(labels or {}).get(best, best)} would win")
    if not tethers.eligible(key, pinned):
        notes.append(drift_note(tethers, key, [pinned], labels))
    return dataclasses.replace(choice, note="; ".join(notes) or None, pinned=True)


def drift_note(tethers: Tethers, key: str, drifted: list[str], labels: dict[str, str] | None = None) -> str:
    """'drifts (cosine below 0.5): alien 0.0012', or 'alien no cosine (NaN/Inf or all-zero weights)'."""
    options = tethers.options
    found = ", ".join(
        f"{(labels or {}).get(c, c)} "
        + (
            f"no {options.measure} (NaN/Inf or all-zero weights)"
            if tethers.scores[key][c] is None
            else f"{tethers.scores[key][c]:.6g}"
        )
        for c in drifted
    )
    return f"drifts ({options.measure} below {options.min_compatibility:g}): {found}"


def blend_weights(
    members: list[str], per_candidate: dict[str, float | None], tethers: Tethers, key: str, place: str, rule: Rule
) -> dict[str, float]:
    """Each member's share of the average: equal, or proportional to its score or compatibility
    (ConfigError without the config file's name, which the caller adds, if one is not positive)."""
    kind = tethers.options.weights
    if kind == "equal":
        return {c: 1 / len(members) for c in members}
    if kind == "compatibility" and key in tethers.unmeasured:  # no compatibility was measured here
        return {c: 1 / len(members) for c in members}
    raw = {c: per_candidate[c] if kind == "score" else tethers.scores.get(key, {}).get(c, 1.0) for c in members}
    for c, value in raw.items():
        if value <= 0:
            what = rule.label if kind == "score" else tethers.options.measure
            raise ConfigError(
                f"tether.weights: {kind}: '{c}' has {what} {value:.4g} at {place}; weights "
                f"proportional to it need positive values; use tether.weights: equal"
            )
    total = sum(raw.values())
    return {c: value / total for c, value in raw.items()}


def choices_of(
    layout: Layout,
    infos: dict[str, TensorInfo],
    metrics: Metrics,
    order: list[str],
    selection: Selection,
    tethers: Tethers,
    health: Health,
) -> list[Choice]:
    """All selection decisions, non-layer group first, then depth by depth; a depth selection.pin
    names that the base does not have is refused (ConfigError without the config file's name)."""
    base, rule, labels = order[0], rule_of(selection), short_names(order)
    scores = scores_of(metrics, selection)
    beyond = [d for d, _ in selection.pin if d != "non_layer" and d >= layout.num_layers]
    if beyond:
        raise ConfigError(
            f"selection.pin[{beyond[0]}]: no such depth: the base has {layout.num_layers} blocks "
            f"(depths 0 to {layout.num_layers - 1})"
        )

    def choose(label, depth, tensors, matrices, fixed=None):
        pinned = selection.pinned("non_layer" if depth is None else depth)
        return group_choice(
            label, depth, tensors, matrices, scores, order, rule, health, tethers, fixed, pinned, labels
        )

    rest = layout.non_layer()
    choices = [
        choose(
            "non-layer",
            None,
            rest,
            [t for t in rest if infos[t].is_matrix],
            fixed=base if selection.non_layer == "base" else None,
        )
    ]
    for depth in range(layout.num_layers):
        block = layout.block(depth)
        matrices = [t for t in block if infos[t].is_matrix]
        if selection.granularity == "block":
            choices.append(choose(str(depth), depth, block, matrices))
            continue
        followers = {t: paired_matrix(t, matrices) for t in block if t not in matrices}
        leftovers = [t for t, m in followers.items() if m is None]  # norms: the block's winner, by mean score
        choices.append(choose(str(depth), depth, leftovers, matrices))
        for matrix in matrices:
            own = [matrix] + [t for t, m in followers.items() if m == matrix]
            choices.append(choose(matrix, depth, own, [matrix]))
    return choices
