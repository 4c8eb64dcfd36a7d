"""Strategies: let the measurement choose. With an `evaluate:` section, the base, every candidate
and the composite of each strategy (the config's own selection and tether settings, then each
variant of `evaluate.strategies`) are evaluated on the texts (evaluate.py), and the strategy whose
composite has the lowest perplexity (the mean over the texts, or on the text `choose_by` names)
is the plan that gets written. Each variant is planned like the config itself, so its spectra
and tether sums come from the metric cache: a strategy costs its evaluation, not a spectrum.
Ties go to the earlier strategy, the config's own first. A PEFT adapter candidate is evaluated as
the composite that takes every tensor from its view on the base.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .adapters import AdapterSource
from .architecture import architecture_of
from .checkpoint import FLOAT_DTYPES, Checkpoint
from .config import CONFIGURED, MergeConfig, Strategy
from .errors import ModelError
from .evaluate import Subject, evaluate_subjects
from .plan import Evaluation, Perplexity, Plan, PlanEntry, StrategyResult
from .report import mean_of
from .spectra import pick_device

if TYPE_CHECKING:
    from .store import MetricCache


def chosen_strategy(
    config: MergeConfig, plan: Plan, plan_variant: Callable[[MergeConfig], Plan], cache: MetricCache, quiet: bool
) -> Plan:
    """The plan of the best strategy, with the evaluation of all of them attached."""
    options = config.evaluate
    strategies = [Strategy(CONFIGURED, config.selection, config.tether)] + list(options.strategies)
    plans = [plan] + [
        plan_variant(dataclasses.replace(config, selection=s.selection, tether=s.tether, evaluate=None))
        for s in options.strategies
    ]
    subjects = [candidate_subject(plan, c) for c in plan.candidates]
    subjects += [
        Subject(f"composite: {s.name}", "composite", plan.sources[plan.base], p) for s, p in zip(strategies, plans)
    ]
    rows = evaluate_subjects(subjects, list(options.texts), options, cache, pick_device(config.device), quiet)
    texts = list(options.names)  # each text as the user wrote it
    scores = [strategy_score(rows, f"composite: {s.name}", texts, options.choose_by) for s in strategies]
    ranked = sorted((i for i in range(len(strategies)) if scores[i] is not None), key=lambda i: (scores[i], i))
    if not ranked:
        raise ModelError(
            f"{config.source or 'config'}: evaluate: no strategy's composite has a finite perplexity "
            f"(NaN or Inf in its logits); nothing written"
        )
    best, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    results = [StrategyResult(s.name, dict(s.settings), scores[i], i == best) for i, s in enumerate(strategies)]
    warnings = unmeasured(rows) + worse_than_base(rows, texts, f"composite: {strategies[best].name}", options.choose_by)
    evaluation = Evaluation(
        texts=texts, choose_by=options.choose_by, rows=rows, strategies=results, reason="", warnings=warnings
    )
    if runner is not None:
        evaluation = dataclasses.replace(
            evaluation, runner_up=strategies[runner].name, margin=scores[runner] - scores[best]
        )
    evaluation = dataclasses.replace(evaluation, reason=reason_of(evaluation, results[best]))
    return dataclasses.replace(plans[best], evaluation=evaluation)


def candidate_subject(plan: Plan, name: str) -> Subject:
    """The base or a candidate, to evaluate from its directory; a PEFT adapter, which has no model of
    its own, as the plan that takes every tensor of its view on the base (loraview.py)."""
    source = plan.sources[name]
    if not isinstance(source, AdapterSource):
        return Subject(name, "base" if name == plan.base else "candidate", source)
    architecture = architecture_of(source.base)
    with Checkpoint.open(source) as view:
        entries = [
            PlanEntry(t, name, t, info.dtype, info.shape, optional=buffer_reason(t, info.dtype, architecture))
            for t, info in view.tensors.items()
        ]
    whole = dataclasses.replace(plan, entries=entries, config=None, expansion=None, evaluation=None)
    return Subject(name, "candidate", source.base, whole)


def buffer_reason(tensor: str, dtype: str, architecture) -> str | None:
    """Why a tensor may have no place in the transformers model (a buffer), or None."""
    return "a buffer" if dtype not in FLOAT_DTYPES or architecture.is_buffer(tensor) else None


def strategy_score(rows: list[Perplexity], model: str, texts: list[str], choose_by: str) -> float | None:
    """A model's mean perplexity over the texts, or its perplexity on the text chosen by; None
    where one is missing."""
    mine = {r.text: r.perplexity for r in rows if r.model == model}
    return mine[choose_by] if choose_by != "mean" else mean_of([mine[t] for t in texts])


def unmeasured(rows: list[Perplexity]) -> list[str]:
    """A warning for each model and text without a perplexity (NaN or Inf in the logits)."""
    return [
        f"{r.model} on {r.text}: NaN or Inf in the model's logits, so no perplexity"
        for r in rows
        if r.perplexity is None
    ]


def reason_of(evaluation: Evaluation, written: StrategyResult) -> str:
    """'written: blend, the lowest mean perplexity (40.21), 0.69 (1.7%) below as configured (40.90)'."""
    by = "mean perplexity" if evaluation.choose_by == "mean" else f"perplexity on {Path(evaluation.choose_by).name}"
    if evaluation.runner_up is None:
        return f"written: {written.name} (the only strategy), {by} {written.score:.4f}"
    runner = evaluation.margin + written.score
    return (
        f"written: {written.name}, the lowest {by} ({written.score:.4f}), {evaluation.margin:.4g} "
        f"({evaluation.margin / runner:.1%}) below the runner-up {evaluation.runner_up} ({runner:.4f})"
    )


def worse_than_base(rows: list[Perplexity], texts: list[str], written: str, choose_by: str = "mean") -> list[str]:
    """A warning when the written composite's perplexity (by what chose it) is higher than the base's."""
    base = next(r.model for r in rows if r.role == "base")
    ours, theirs = (strategy_score(rows, m, texts, choose_by) for m in (written, base))
    if ours is None or theirs is None or ours <= theirs:
        return []
    what = "mean perplexity" if choose_by == "mean" else f"perplexity on {Path(choose_by).name}"
    return [
        f"the written composite's {what} ({ours:.4f}) is higher than the base's ({theirs:.4f}): "
        f"the merge did not help on these texts"
    ]
