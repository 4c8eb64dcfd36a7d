"""Selection: which candidate supplies each part of the output, from the matrices' scores.

Granularity `block` (default): a depth's score is the mean NER of its 2-D matrices and the
winner supplies every tensor of the block. Granularity `tensor`: each 2-D matrix is chosen on
its own score; a 1-D tensor of the same module (q_proj.bias beside q_proj.weight) follows that
matrix, the block's other tensors (norms) follow the block's mean-score winner. Non-layer
tensors (embeddings, final norm, lm_head) are one group: taken from the base, or, with
`non_layer: compete`, from the candidate with the best mean score over them, so tied embeddings
stay tied. Ties go to the earlier candidate, base first. A candidate with an unscorable matrix
(NaN/Inf or all zero) in a group cannot win that group.
"""

from __future__ import annotations

from .checkpoint import TensorInfo
from .layout import Layout
from .plan import Choice

Scores = dict[str, dict[str, float | None]]  # candidate -> tensor -> score


def winner_of(scores: dict[str, float | None], order: list[str]) -> str | None:
    """The highest score; the earliest candidate in `order` wins ties; None if nobody has a score."""
    best, best_score = None, None
    for candidate in order:
        score = scores.get(candidate)
        if score is not None and (best_score is None or score > best_score):
            best, best_score = candidate, score
    return best


def group_score(scores: Scores, candidate: str, matrices: list[str]) -> float | None:
    """Mean score of a candidate over some matrices; None if any of them has no score."""
    values = [scores[candidate][m] for m in matrices]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def group_choice(label: str, depth: int | None, tensors: list[str], matrices: list[str],
                 scores: Scores, order: list[str], fixed: str | None = None) -> Choice:
    """Choose one candidate for a group of tensors, by mean score unless `fixed` names it."""
    per_candidate = {c: group_score(scores, c, matrices) for c in order}
    if fixed is not None:
        return Choice(label, depth, per_candidate, fixed, tuple(tensors), "taken from the base")
    winner = winner_of(per_candidate, order)
    note = None
    if winner is None:
        winner, note = order[0], "no candidate has a score here; taken from the base"
    else:
        unscored = [f"{c} ({', '.join(m for m in matrices if scores[c][m] is None)})"
                    for c in order if per_candidate[c] is None]
        if unscored and matrices:
            note = "not selectable, no NER (NaN/Inf or all-zero): " + "; ".join(unscored)
    return Choice(label, depth, per_candidate, winner, tuple(tensors), note)


def choices_of(layout: Layout, infos: dict[str, TensorInfo], scores: Scores, order: list[str],
               granularity: str, non_layer: str) -> list[Choice]:
    """All selection decisions, non-layer group first, then depth by depth."""
    base = order[0]
    rest = layout.non_layer()
    choices = [group_choice("non-layer", None, rest, [t for t in rest if infos[t].is_matrix], scores, order,
                            fixed=base if non_layer == "base" else None)]
    for depth in range(layout.num_layers):
        block = layout.block(depth)
        matrices = [t for t in block if infos[t].is_matrix]
        block_choice = group_choice(str(depth), depth, block, matrices, scores, order)
        if granularity == "block":
            choices.append(block_choice)
            continue
        followers = {t: module_matrix(t, matrices) for t in block if t not in matrices}
        leftovers = [t for t, m in followers.items() if m is None]
        choices.append(Choice(str(depth), depth, block_choice.scores, block_choice.winner,
                              tuple(leftovers), block_choice.note))
        for matrix in matrices:
            own = [matrix] + [t for t, m in followers.items() if m == matrix]
            choices.append(group_choice(matrix, depth, own, [matrix], scores, order))
    return choices


def module_matrix(tensor: str, matrices: list[str]) -> str | None:
    """The 2-D matrix of the same module as a 1-D tensor (x.bias -> x.weight), if there is one."""
    module = tensor.rsplit(".", 1)[0]
    same = [m for m in matrices if m.rsplit(".", 1)[0] == module]
    return same[0] if len(same) == 1 else None
