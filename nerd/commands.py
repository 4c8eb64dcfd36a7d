"""What each command of the command line does (cli.py parses): merge configs, analyze, expand,
evaluate and verify, each printing its tables, warnings and --json summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .analyze import analysis_summary, analyze_models, summary_text, write_figures, write_tables
from .store import MetricCache, default_cache_path
from .config import evaluate_options, expand_config, index_of_each, load_config, model_spec, output_path
from .filesystem import claim_dir, claim_output
from .evalfiles import write_evaluation
from .evaluate import Subject, evaluate_subjects, tokenization_notes
from .engine import uses_ray
from .errors import ConfigError, IntegrityError, MergeError
from .pipeline import plan_merge
from .recipe import RECIPE, recipe_or_problem, write_recipe
from .sections import Compute
from .plan import Evaluation
from .plots import perplexity_chart
from .report import choice_table, evaluation_table, expansion_table, spectrum_paths, tether_table
from .sources import resolve_model
from .spectra import cuda_available, pick_device
from .strategies import unmeasured
from .staging import staged_dir
from .verify import verify_output
from .write import write_merge


def run_merge(args: argparse.Namespace) -> int:
    configs = []
    for path in args.config:
        with refusal_as_json(args, path):
            configs.append(out_applied(load_config(path), args.out, len(args.config)))
    return run_configs([dataclasses.replace(c, compute=compute_of(args, c.compute)) for c in configs], args)


def run_expand(args: argparse.Namespace) -> int:
    options = {key: getattr(args, key) for key in args.dlec_keys if getattr(args, key) is not None}
    config = expand_config(
        args.model,
        args.out,
        options,
        device=requested_device(args, "expand"),
        shard_size=args.shard_size,
        compute=compute_of(args, Compute()),
    )
    return run_configs([config], args)


def out_applied(config, out: str | None, configs: int):
    """A config with --out DIR in place of its output_dir (as `mergekit-yaml config OUT`): one
    config only, the directory relative to the working directory, checked like output_dir."""
    if out is None:
        return config
    if configs != 1:
        raise ConfigError(f"--out {out}: one output directory, for one config; found {configs} configs")
    output_dir = output_path(out, Path.cwd(), str(config.source), config.models, key="--out")
    return dataclasses.replace(config, output_dir=output_dir, raw={**config.raw, "output_dir": str(output_dir)})


def compute_of(args: argparse.Namespace, configured: Compute) -> Compute:
    """A config's `compute:` section with --ray and --threads applied over it."""
    return Compute(
        executor="ray" if args.ray is not None else configured.executor,
        address=args.ray or configured.address,
        threads=args.threads or configured.threads,
    )


def one_cluster(configs: list) -> None:
    """The configs of one run that use Ray must use the same cluster: a process connects to one."""
    from .raycluster import address_of

    first = None
    for config in (c for c in configs if uses_ray(c.compute)):
        if first is not None and address_of(config.compute.address) != address_of(first.compute.address):
            raise ConfigError(
                f"{config.source}: compute.address: '{address_of(config.compute.address)}' is another cluster "
                f"than {first.source}'s '{address_of(first.compute.address)}': one run uses one cluster, "
                "run the configs of each separately"
            )
        first = first or config


def recipe_target(path: Path | None, configs: int, *, force: bool) -> None:
    """--emit-mergekit FILE: one config's recipe, to a file that does not exist yet (or --force)."""
    if path is None:
        return
    if configs != 1:
        raise ConfigError(f"--emit-mergekit {path}: one recipe is written, of one config; found {configs} configs")
    if path.is_dir() or (path.exists() and not force):
        what = "a directory" if path.is_dir() else "a file that exists (give --force to replace it)"
        raise ConfigError(f"--emit-mergekit {path}: {what}")
    if not path.parent.is_dir():
        raise ConfigError(f"--emit-mergekit {path}: no directory {path.parent}")


@contextmanager
def refusal_as_json(args: argparse.Namespace, source: Path | None) -> Iterator[None]:
    """A config refused before anything runs, with --json: its one result on stdout too (the
    `{config, error, exit_code}` a run-time failure gives), then the error as usual."""
    try:
        yield
    except MergeError as exc:
        if args.json:
            result = {"config": str(source) if source else None, "error": str(exc), "exit_code": exc.exit_code}
            print(json.dumps({"mastermerge_version": __version__, "results": [result]}, indent=2), file=args.json_out)
        raise


def run_configs(configs: list, args: argparse.Namespace) -> int:
    """Plan and write (or with --dry-run, print) each config in turn, sharing one metric cache."""
    outputs: dict[Path, Path] = {}
    with refusal_as_json(args, None):
        one_cluster(configs)
        recipe_target(args.emit_mergekit, len(configs), force=args.force)
        check_cache_flag(args)
    for config in configs:
        with refusal_as_json(args, config.source):
            if not args.dry_run and config.output_dir in outputs:
                raise ConfigError(
                    f"{config.source}: output_dir: {config.output_dir} is also the output of "
                    f"{outputs[config.output_dir]}"
                )
            outputs[config.output_dir] = config.source
            if not args.dry_run:  # a killed run's leftovers dealt with, a non-empty output refused
                claim_output(config, force=args.force)
    with refusal_as_json(args, None):
        cache = cache_of(args)
    results = []
    try:
        for config in configs:
            try:
                plan = plan_merge(config, cache=cache, quiet=args.quiet)
                recipe, problem = recipe_or_problem(plan)
                if problem:
                    if args.emit_mergekit:
                        raise ConfigError(f"{config.source or 'expand ' + plan.base}: no mergekit recipe: {problem}")
                    plan.notes.append(f"no {RECIPE}: {problem}")
                if not args.json and not args.quiet:  # the dry run's tables too: --quiet hides them
                    print(plan_text(config, plan) + "\n")
                evaluation_warnings = plan.evaluation.warnings if plan.evaluation else []
                for warning in plan.warnings + (plan.tethers.warnings if plan.tethers else []) + evaluation_warnings:
                    print(f"mastermerge: warning: {config.source}: {warning}", file=sys.stderr)
                for note in plan.notes if not args.quiet else ():
                    print(f"mastermerge: note: {config.source or 'expand ' + plan.base}: {note}", file=sys.stderr)
                if not args.dry_run:
                    write_merge(plan, config, quiet=args.quiet)
                    if not args.json:
                        print(f"wrote {plan.output_dir}")
                if args.emit_mergekit:
                    write_recipe(args.emit_mergekit, recipe)
                    if not args.json:
                        print(f"wrote {args.emit_mergekit}")
                results.append(summary_of(config, plan, written=not args.dry_run))
            except MergeError as exc:
                results.append(
                    {
                        "config": str(config.source) if config.source else None,
                        "error": str(exc),
                        "exit_code": exc.exit_code,
                    }
                )
                raise
            except KeyboardInterrupt as exc:
                finished = [r["output_dir"] for r in results if r["written"]]
                if finished:
                    exc.add_note(f"written before it: {', '.join(finished)}")
                raise
    finally:
        cache.close()
        if args.json:  # also after a failure: the configs that finished are reported
            print(json.dumps({"mastermerge_version": __version__, "results": results}, indent=2), file=args.json_out)
    return 0


def regex_flag(value: str | None, flag: str) -> re.Pattern | None:
    """A flag's regular expression, compiled; one line when it is not one."""
    if value is None:
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConfigError(f"analyze: {flag}: '{value}' is not a valid regular expression ({exc})") from None


def run_analyze(args: argparse.Namespace) -> int:
    where = "analyze"
    specs = [
        model_spec(item, Path.cwd(), where, f"MODEL {i + 1}", require_config=False)
        for i, item in enumerate(args.models)
    ]
    index_of_each(tuple(specs), where, lambda i: f"MODEL {i + 1}")
    out = output_path(args.out, Path.cwd(), where, tuple(specs), key="--out")
    claim_dir(out, args.out, where, "--out", args.force, marker="metrics.json")
    pattern = None if args.no_plots else regex_flag(args.esd, "--esd")
    chosen = regex_flag(args.tensors, "--tensors")
    device = requested_device(args, where)
    with closing(cache_of(args)) as cache:
        analysis = analyze_models(
            specs, cache, device, args.quiet, esd=pattern, compute=compute_of(args, Compute()), tensors=chosen
        )
    if pattern is not None and not analysis.spectra:
        print(
            f"mastermerge: warning: analyze: --esd: '{args.esd}' matches no matrix analyzed: no ESD figure",
            file=sys.stderr,
        )
    summary = analysis_summary(analysis)
    figures = []
    with staged_dir(out) as tmp:
        write_tables(analysis, summary, tmp)
        if not args.no_plots:
            figures = write_figures(analysis, tmp, args.quiet)
    if args.json:
        print(
            json.dumps(
                {
                    "mastermerge_version": __version__,
                    "out": str(out),
                    "summary": summary,
                    "figures": [str(out / f.relative_to(tmp)) for f in figures],
                    "spectra_computed": analysis.spectra_computed,
                    "spectra_reused": analysis.spectra_reused,
                },
                indent=2,
            ),
            file=args.json_out,
        )
    elif not args.quiet:
        print(summary_text(analysis, summary))
        print(f"\nwrote {out}: metrics.csv, metrics.json" + (f" and {len(figures)} figures" if figures else ""))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    where = "evaluate"
    specs = [model_spec(item, Path.cwd(), where, f"MODEL {i + 1}") for i, item in enumerate(args.models)]
    index_of_each(tuple(specs), where, lambda i: f"MODEL {i + 1}")
    options = evaluate_options(
        {
            "texts": args.text,
            "max_tokens": args.max_tokens,
            "max_length": args.max_length,
            "stride": args.stride,
            "trust_remote_code": bool(args.trust_remote_code),
        },
        Path.cwd(),
        where,
        cli=True,
    )
    out = output_path(args.out, Path.cwd(), where, tuple(specs), key="--out")
    claim_dir(out, args.out, where, "--out", args.force, marker="evaluation.json")
    device = requested_device(args, where)
    subjects = [
        Subject(spec.ref, "base" if i == 0 else "candidate", resolve_model(spec).path) for i, spec in enumerate(specs)
    ]
    with closing(cache_of(args)) as cache:
        rows = evaluate_subjects(subjects, list(options.texts), options, cache, pick_device(device), args.quiet)
    texts = list(options.names)
    figure = None
    with staged_dir(out) as tmp:
        write_evaluation(rows, texts, tmp, {"models": [{"model": s.name, "path": str(s.directory)} for s in subjects]})
        if not args.no_plots:
            figure = perplexity_chart(tmp / "perplexity.png", rows, texts)
    evaluation = Evaluation(texts=texts, choose_by="mean", rows=rows, strategies=[], reason="")
    for warning in unmeasured(rows):
        print(f"mastermerge: warning: {warning}", file=sys.stderr)
    for note in tokenization_notes(rows) if not args.quiet else ():
        print(f"mastermerge: note: {note}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "mastermerge_version": __version__,
                    "out": str(out),
                    **asdict(evaluation),
                    "figure": str(out / "perplexity.png") if figure else None,
                },
                indent=2,
            ),
            file=args.json_out,
        )
    elif not args.quiet:
        print(evaluation_table(evaluation))
        print(f"\nwrote {out}: evaluation.csv, evaluation.json" + (", perplexity.png" if figure else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Print one line per problem (stderr) and the summary (stdout), or the JSON; a problem raises
    IntegrityError (exit code 5) after them."""
    result = verify_output(args.directory, quiet=args.quiet)
    for problem in result.problems:
        print(problem.line(), file=sys.stderr)
    if args.json:
        print(json.dumps({"mastermerge_version": __version__, **result.to_dict()}, indent=2), file=args.json_out)
    elif result.ok and not args.quiet:
        print(result.summary())
    if not result.ok:
        raise IntegrityError(result.summary())
    return 0


def plan_text(config, plan) -> str:
    """What the terminal shows of a plan: the choice table of a merge, the expansion table of a DLEC pass."""
    parts = [f"{config.source or 'expand ' + plan.base}:"]
    if plan.choices:
        parts.append(choice_table(plan))
    if plan.tethers is not None:
        parts.append(tether_table(plan))
    if plan.expansion is not None:
        parts.append(expansion_table(plan))
    if plan.evaluation is not None:
        parts.append(evaluation_table(plan.evaluation))
    return "\n".join(parts)


def requested_device(args: argparse.Namespace, where: str) -> str:
    """The --device asked for: 'cuda' only where torch sees a CUDA device."""
    if args.device == "cuda" and not cuda_available():
        raise ConfigError(f"{where}: --device: 'cuda' was asked for but torch sees no CUDA device")
    return args.device


def cache_of(args: argparse.Namespace) -> MetricCache:
    """The metric cache the flags ask for: --no-cache (memory), --cache FILE, or the default file."""
    check_cache_flag(args)
    return MetricCache(None if args.no_cache else args.cache or default_cache_path())


def check_cache_flag(args: argparse.Namespace) -> None:
    """--cache FILE must be in a directory that exists: a mistyped path is not created (one that
    exists but cannot hold the cache, a read-only one, still runs in memory with a warning)."""
    if args.cache is not None and not args.cache.parent.exists():
        raise ConfigError(f"--cache {args.cache}: no directory {args.cache.parent} (create it, or give another FILE)")


def summary_of(config, plan, written: bool) -> dict:
    return {
        "config": str(config.source) if config.source else None,
        "output_dir": str(plan.output_dir),
        "written": written,
        "candidates": plan.candidates,
        "base": plan.base,
        "choices": [
            {
                "group": c.group,
                "depth": c.depth,
                "scores": c.scores,
                "winner": c.winner,
                "runner_up": c.runner_up,
                "margin": c.margin,
                "blend": c.blend,
                "note": c.note,
            }
            for c in plan.choices
        ],
        "tethers": None if plan.tethers is None else asdict(plan.tethers),
        "expansion": None if plan.expansion is None else asdict(plan.expansion),
        "evaluation": None if plan.evaluation is None else asdict(plan.evaluation),
        "spectra_computed": plan.spectra_computed,
        "spectrum_paths": spectrum_paths(plan),
        "spectra_reused": plan.spectra_reused,
    }
