"""What each command of the command line does (cli.py parses): merge configs, analyze, expand,
evaluate and verify, each printing its tables, warnings and --json summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .batch import Batch, cache_of, run_configs
from .analyze import analysis_summary, analyze_models, summary_text, write_figures, write_tables
from .config import evaluate_options, expand_config, index_of_each, load_config, model_spec, output_path
from .filesystem import claim_dir
from .evalfiles import write_evaluation
from .evaluate import Subject, evaluate_subjects, tokenization_notes
from .errors import ConfigError, IntegrityError, MergeError
from .sections import Compute
from .plan import Evaluation
from .plots import perplexity_chart
from .report import evaluation_table
from .sources import resolve_model
from .spectra import cuda_available, pick_device
from .strategies import unmeasured
from .staging import staged_dir
from .verify import verify_output


def run_merge(args: argparse.Namespace) -> int:
    """Read every config (a refused one stops the batch, or with --keep-going is reported and left
    out), then run those read (batch.run_configs)."""
    batch, configs = Batch(args, list(args.config)), []
    try:
        for i, path in enumerate(args.config):
            config = batch.attempt(i, "refused", lambda: out_applied(load_config(path), args.out, len(args.config)))
            if config is not None:
                configs.append(dataclasses.replace(config, compute=compute_of(args, config.compute)))
    except (MergeError, KeyboardInterrupt):
        batch.print_json()
        raise
    return run_configs(configs, args, batch)


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


def requested_device(args: argparse.Namespace, where: str) -> str:
    """The --device asked for: 'cuda' only where torch sees a CUDA device."""
    if args.device == "cuda" and not cuda_available():
        raise ConfigError(f"{where}: --device: 'cuda' was asked for but torch sees no CUDA device")
    return args.device
