"""The command line: `mastermerge --config a.yaml [b.yaml ...]` merges, `mastermerge analyze
MODEL [MODEL ...] --out DIR` writes every metric of every matrix (analyze.py), and `mastermerge
expand MODEL --out DIR --add-layers N` duplicates a model's most important blocks (dlec.py),
`mastermerge evaluate MODEL [MODEL ...] --text FILE --out DIR` measures perplexities (evaluate.py),
and `mastermerge verify DIR` checks a written output against its merge_report.json (verify.py).

Every config is validated before any model is downloaded; the configs then run in order and
share one metric cache. Exit codes: 0 success, 1 internal error (a bug: please report it),
2 bad config or arguments, 3 a model cannot be resolved, read or matched to the others,
4 the output cannot be written, 5 `verify` found the output damaged or not matching its report,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .analyze import analysis_summary, analyze_models, summary_text, write_figures, write_tables
from .cache import MetricCache, default_cache_path
from .config import DEVICES, IMPORTANCE, INITS, claim_output, evaluate_options, expand_config, index_of_each, \
    load_config, model_spec, output_path
from .evaluate import Subject, evaluate_subjects, tokenization_notes, write_evaluation
from .errors import ConfigError, IntegrityError, MergeError
from .interrupts import exit_code, interrupts_raised
from .pipeline import plan_merge
from .plan import Evaluation
from .plots import perplexity_chart
from .report import choice_table, evaluation_table, expansion_table, spectrum_paths, tether_table
from .sources import resolve_model
from .spectra import cuda_available, pick_device
from .strategies import unmeasured
from .staging import staged_dir
from .verify import verify_output
from .write import write_merge


COMMANDS = ("analyze", "expand", "evaluate", "verify")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mastermerge",
        description="Merge fine-tunes layer by layer: at every depth, keep the candidate whose weight "
                    "matrices have the highest Normalized Effective Rank (or another metric). "
                    "Spectral diagnostics without merging: mastermerge analyze --help; layer expansion of "
                    "one model: mastermerge expand --help; perplexity of models on texts: mastermerge evaluate --help; "
                    "checking a written output: mastermerge verify --help.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad config/arguments, 3 bad or unreachable model, "
               "4 output not writable, 5 verify found a problem, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).")
    p.add_argument("--config", nargs="+", required=True, metavar="YAML", type=Path,
                   help="one or more merge configs; all are validated first, then run in order")
    p.add_argument("--dry-run", action="store_true", help="print the per-depth choices, write nothing")
    p.add_argument("--force", action="store_true", help="replace an output directory that is not empty")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table (errors still shown)")
    common_options(p)
    return p


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mastermerge analyze",
        description="Every metric of every weight matrix (NER, alpha, detX, rank collapse, ...): "
                    "metrics.csv, metrics.json, figures and a per-model summary.",
        epilog="Exit codes as for the merge: 0 ok, 2 bad arguments, 3 bad or unreachable model, 4 output not writable.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="local model directories or hub ids org/name[@revision]")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the tables and figures")
    p.add_argument("--force", action="store_true", help="replace an earlier analysis in --out")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where spectra are computed (default auto)")
    p.add_argument("--esd", metavar="REGEX",
                   help="also draw the ESD of every matrix whose name matches, e.g. 'layers\\.0\\.' or '.' for all "
                        "(about 0.3 s per figure; default: none)")
    p.add_argument("--no-plots", action="store_true", help="tables only, no figures")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary (errors still shown)")
    common_options(p)
    return p


def expand_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mastermerge expand",
        description="DLEC layer expansion of one model: duplicate its most important blocks (by block influence "
                    "on a calibration text, heavy-tail share, or the NER of the weights), each right after its "
                    "source, and write the expanded model.",
        epilog="Give exactly one of --add-layers, --growth, --layers. Exit codes as for the merge.")
    p.add_argument("model", metavar="MODEL", help="a local model directory or a hub id org/name[@revision]")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the expanded model")
    p.add_argument("--add-layers", type=int, metavar="N", help="duplicate the N most important blocks")
    p.add_argument("--growth", type=float, metavar="F",
                   help="duplicate the most important blocks until the parameters grow by about F (0.16: ~16%%)")
    p.add_argument("--layers", type=layer_list, metavar="D,D,...",
                   help="duplicate exactly these blocks (0-based; a block listed twice gets two copies)")
    p.add_argument("--init", choices=INITS, help="copy (default): exact duplicates; identity: the copies' "
                   "residual-writing projections are zero, so the model computes the same function")
    p.add_argument("--importance", choices=IMPORTANCE,
                   help="block_influence (default with transformers), heavy_tail, or ner (weights only)")
    p.add_argument("--calibration", metavar="FILE", help="calibration text (default: a built-in text)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="use the first N tokens of the text (default 4096)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="let transformers run the model's own code (config.json auto_map) for the calibration")
    p.add_argument("--shard-size", default="2GB", metavar="SIZE", help="maximum size of one output file (default 2GB)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where the model and spectra run (default auto)")
    p.add_argument("--dry-run", action="store_true", help="print the importance and the copies, write nothing")
    p.add_argument("--force", action="store_true", help="replace an earlier mastermerge output in --out")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table (errors still shown)")
    common_options(p)
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mastermerge verify",
        description="Check a directory written by mastermerge against its merge_report.json: every shard and the "
                    "index json exist with their recorded sizes and SHA-256, no weight file was added, the "
                    "safetensors headers and the index are valid and agree, and config.json's layer count and "
                    "hidden size match the weights. One line per problem.",
        epilog="Exit codes: 0 everything matches, 5 a problem was found, 3 not a directory or no merge_report.json.")
    p.add_argument("directory", metavar="DIR", type=Path, help="a mastermerge output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary (problems still shown)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"mastermerge {__version__}")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mastermerge evaluate",
        description="The perplexity of each model on each text (causal LMs: next-token; masked LMs: a seeded 15%% "
                    "of the tokens masked), as a table with each model's difference from the first (the base): "
                    "evaluation.csv, evaluation.json and perplexity.png in --out.",
        epilog="Exit codes as for the merge: 0 ok, 2 bad arguments or text, 3 bad or unreachable model, "
               "4 output not writable.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="local model directories or hub ids org/name[@revision]; the first is the base")
    p.add_argument("--text", action="append", required=True, metavar="FILE", help="a UTF-8 text (repeat for more)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the tables and the figure")
    p.add_argument("--max-tokens", type=int, metavar="N", help="use the first N tokens of each text (default 4096)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="window length in tokens (default: the model's context, at most --max-tokens)")
    p.add_argument("--stride", type=int, metavar="N", help="tokens between window starts (default: half a window)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="let transformers run a model's own code (config.json auto_map)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where the models run (default auto)")
    p.add_argument("--no-plots", action="store_true", help="tables only, no figure")
    p.add_argument("--force", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table (errors still shown)")
    common_options(p)
    return p


def layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices separated by commas, e.g. 3,7,7; found '{text}'") \
            from None


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", type=Path, metavar="FILE",
                       help=f"metric cache (SQLite); default {default_cache_path()}")
    cache.add_argument("--no-cache", action="store_true", help="keep spectra in memory only")
    p.add_argument("--version", action="version", version=f"mastermerge {__version__}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["analyze"]:
        args, action = analyze_parser().parse_args(argv[1:]), run_analyze
    elif argv[:1] == ["expand"]:
        args, action = expand_parser().parse_args(argv[1:]), run_expand
    elif argv[:1] == ["verify"]:
        args, action = verify_parser().parse_args(argv[1:]), run_verify
    elif argv[:1] == ["evaluate"]:
        args, action = evaluate_parser().parse_args(argv[1:]), run_evaluate
    elif any(c in argv for c in COMMANDS):
        command = next(c for c in COMMANDS if c in argv)
        parser().error(f"'{command}' must come first: mastermerge analyze MODEL [MODEL ...] --out DIR, "
                       f"mastermerge expand MODEL --out DIR [options], mastermerge evaluate MODEL [MODEL ...] "
                       f"--text FILE --out DIR, or mastermerge verify DIR")
    else:
        args, action = parser().parse_args(argv), run
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    try:
        with interrupts_raised():
            return action(args)
    except KeyboardInterrupt as exc:
        what = "; ".join(getattr(exc, "__notes__", ())) or "no output was being written"
        print(f"mastermerge: interrupted ({exc.args[0] if exc.args else 'SIGINT'}); {what}", file=sys.stderr)
        return exit_code(exc)
    except MergeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"mastermerge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        print("mastermerge: internal error (the traceback above); please report it", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    return run_configs([load_config(path) for path in args.config], args)


def run_expand(args: argparse.Namespace) -> int:
    options = {key: getattr(args, key) for key in ("add_layers", "growth", "layers", "init", "importance",
                                                   "calibration", "max_tokens", "trust_remote_code")}
    config = expand_config(args.model, args.out, {k: v for k, v in options.items() if v is not None},
                           device=args.device, shard_size=args.shard_size)
    if args.device == "cuda" and not cuda_available():
        raise ConfigError("expand: --device: 'cuda' was asked for but torch sees no CUDA device")
    return run_configs([config], args)


def run_configs(configs: list, args: argparse.Namespace) -> int:
    """Plan and write (or with --dry-run, print) each config in turn, sharing one metric cache."""
    outputs: dict[Path, Path] = {}
    for config in configs:
        if not args.dry_run and config.output_dir in outputs:
            raise ConfigError(f"{config.source}: output_dir: {config.output_dir} is also the output of "
                              f"{outputs[config.output_dir]}")
        outputs[config.output_dir] = config.source
        if not args.dry_run:
            claim_output(config, force=args.force)  # a killed run's leftovers dealt with, a non-empty output refused
    cache = cache_of(args)
    results = []
    try:
        for config in configs:
            try:
                plan = plan_merge(config, cache=cache, quiet=args.quiet)
                if not args.json and (args.dry_run or not args.quiet):
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
                results.append(summary_of(config, plan, written=not args.dry_run))
            except MergeError as exc:
                results.append({"config": str(config.source) if config.source else None, "error": str(exc),
                                "exit_code": exc.exit_code})
                raise
            except KeyboardInterrupt as exc:
                finished = [r["output_dir"] for r in results if r["written"]]
                if finished:
                    exc.add_note(f"written before it: {', '.join(finished)}")
                raise
    finally:
        cache.close()
        if args.json:  # also after a failure: the configs that finished are reported
            print(json.dumps({"mastermerge_version": __version__, "results": results}, indent=2))
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    where = "analyze"
    specs = [model_spec(item, Path.cwd(), where, f"MODEL {i + 1}", require_config=False)
             for i, item in enumerate(args.models)]
    index_of_each(tuple(specs), where, lambda i: f"MODEL {i + 1}")
    out = output_path(args.out, Path.cwd(), where, tuple(specs), args.force, True, marker="metrics.json",
                      key="--out")
    try:
        pattern = None if args.no_plots or args.esd is None else re.compile(args.esd)
    except re.error as exc:
        raise ConfigError(f"{where}: --esd: '{args.esd}' is not a valid regular expression ({exc})") from None
    if args.device == "cuda" and not cuda_available():
        raise ConfigError(f"{where}: --device: 'cuda' was asked for but torch sees no CUDA device")
    with closing(cache_of(args)) as cache:
        analysis = analyze_models(specs, cache, args.device, args.quiet, esd=pattern)
    summary = analysis_summary(analysis)
    figures = []
    with staged_dir(out) as tmp:
        write_tables(analysis, summary, tmp)
        if not args.no_plots:
            figures = write_figures(analysis, tmp, args.quiet)
    if args.json:
        print(json.dumps({"mastermerge_version": __version__, "out": str(out), "summary": summary,
                          "figures": [str(out / f.relative_to(tmp)) for f in figures],
                          "spectra_computed": analysis.spectra_computed,
                          "spectra_reused": analysis.spectra_reused}, indent=2))
    elif not args.quiet:
        print(summary_text(analysis, summary))
        if not args.no_plots and not figures:
            print("no figures: matplotlib is not installed (pip install 'mastermerge[plots]')", file=sys.stderr)
        print(f"\nwrote {out}: metrics.csv, metrics.json" + (f" and {len(figures)} figures" if figures else ""))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    where = "evaluate"
    specs = [model_spec(item, Path.cwd(), where, f"MODEL {i + 1}") for i, item in enumerate(args.models)]
    index_of_each(tuple(specs), where, lambda i: f"MODEL {i + 1}")
    options = evaluate_options({"texts": args.text, "max_tokens": args.max_tokens, "max_length": args.max_length,
                                "stride": args.stride, "trust_remote_code": bool(args.trust_remote_code)},
                               Path.cwd(), where, cli=True)
    out = output_path(args.out, Path.cwd(), where, tuple(specs), args.force, True, marker="evaluation.json",
                      key="--out")
    if args.device == "cuda" and not cuda_available():
        raise ConfigError(f"{where}: --device: 'cuda' was asked for but torch sees no CUDA device")
    subjects = [Subject(spec.ref, "base" if i == 0 else "candidate", resolve_model(spec).path)
                for i, spec in enumerate(specs)]
    with closing(cache_of(args)) as cache:
        rows = evaluate_subjects(subjects, list(options.texts), options, cache, pick_device(args.device), args.quiet)
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
        print(json.dumps({"mastermerge_version": __version__, "out": str(out), **asdict(evaluation),
                          "figure": str(out / "perplexity.png") if figure else None}, indent=2))
    elif not args.quiet:
        print(evaluation_table(evaluation))
        if not args.no_plots and figure is None:
            print("no figure: matplotlib is not installed (pip install 'mastermerge[plots]')", file=sys.stderr)
        print(f"\nwrote {out}: evaluation.csv, evaluation.json" + (", perplexity.png" if figure else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Print one line per problem (stderr) and the summary (stdout), or the JSON; a problem raises
    IntegrityError (exit code 5) after them."""
    result = verify_output(args.directory, quiet=args.quiet)
    for problem in result.problems:
        print(problem.line(), file=sys.stderr)
    if args.json:
        print(json.dumps({"mastermerge_version": __version__, **result.to_dict()}, indent=2))
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


def cache_of(args: argparse.Namespace) -> MetricCache:
    """The metric cache the flags ask for: --no-cache (memory), --cache FILE, or the default file."""
    return MetricCache(None if args.no_cache else args.cache or default_cache_path())


def summary_of(config, plan, written: bool) -> dict:
    return {
        "config": str(config.source) if config.source else None,
        "output_dir": str(plan.output_dir),
        "written": written,
        "candidates": plan.candidates,
        "base": plan.base,
        "choices": [{"group": c.group, "depth": c.depth, "scores": c.scores, "winner": c.winner,
                     "runner_up": c.runner_up, "margin": c.margin, "blend": c.blend, "note": c.note}
                    for c in plan.choices],
        "tethers": None if plan.tethers is None else asdict(plan.tethers),
        "expansion": None if plan.expansion is None else asdict(plan.expansion),
        "evaluation": None if plan.evaluation is None else asdict(plan.evaluation),
        "spectra_computed": plan.spectra_computed,
        "spectrum_paths": spectrum_paths(plan),
        "spectra_reused": plan.spectra_reused,
    }


if __name__ == "__main__":
    sys.exit(main())
