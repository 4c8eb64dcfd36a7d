"""The command line: one argparse parser with a subcommand per job, the options they share declared once.

`mastermerge --config a.yaml [b.yaml ...]` (or `mastermerge merge --config ...`) merges,
`mastermerge analyze MODEL [MODEL ...] --out DIR` writes every metric of every matrix (analyze.py),
`mastermerge expand MODEL --out DIR --add-layers N` duplicates a model's most important blocks (dlec.py),
`mastermerge evaluate MODEL [MODEL ...] --text FILE --out DIR` measures perplexities (evaluate.py),
and `mastermerge verify DIR` checks a model directory as a loader reads it, and an output also
against its merge_report.json (verify.py).
What each command does is in commands.py; this module only parses and reports errors.

Every config is validated before any model is downloaded; the configs then run in order and
share one metric cache. Exit codes: 0 success, 1 internal error (a bug: please report it),
2 bad config or arguments, 3 a model cannot be resolved, read or matched to the others,
4 the output cannot be written, 5 `verify` found the directory damaged, not loadable or not matching its report,
6 the Ray cluster cannot be reached or lost the work, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from pathlib import Path

from . import __version__
from .store import default_cache_path
from .commands import run_analyze, run_evaluate, run_expand, run_merge, run_verify
from .config import DEVICES, IMPORTANCE, INITS
from .errors import MergeError
from .interrupts import exit_code, interrupts_raised

EXIT_CODES = (
    "Exit codes: 0 ok, 1 internal error, 2 bad config/arguments, 3 bad or unreachable model, "
    "4 output not writable, 5 verify found a problem, 6 Ray cluster unreachable or lost the work, "
    "130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."
)
MODELS_HELP = "local model directories or hub ids org/name[@revision]"


def thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, found '{text}'")
    return int(text)


def layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer indices separated by commas, e.g. 3,7,7; found '{text}'"
        ) from None


# The DLEC options of `expand`, named as in a config's `dlec:` section (their dest is the config key).
DLEC_FLAGS: dict[str, dict] = {
    "add_layers": dict(type=int, metavar="N", help="duplicate the N most important blocks"),
    "growth": dict(
        type=float,
        metavar="F",
        help="duplicate the most important blocks until the parameters grow by about F (0.16: ~16%%)",
    ),
    "layers": dict(
        type=layer_list,
        metavar="D,D,...",
        help="duplicate exactly these blocks (0-based; a block listed twice gets two copies)",
    ),
    "init": dict(
        choices=INITS,
        help="copy (default): exact duplicates; identity: the copies' residual-writing "
        "projections are zero, so the model computes the same function",
    ),
    "importance": dict(
        choices=IMPORTANCE, help="block_influence (default with transformers), heavy_tail, or ner (weights only)"
    ),
    "calibration": dict(metavar="FILE", help="calibration text (default: a built-in text)"),
    "max_tokens": dict(type=int, metavar="N", help="use the first N tokens of the text (default 4096)"),
    "trust_remote_code": dict(
        action="store_true",
        default=None,
        help="let transformers run the model's own code (config.json auto_map) for the calibration",
    ),
}


def shared_parsers() -> dict[str, argparse.ArgumentParser]:
    """The option sets the commands share, each declared once (argparse parent parsers)."""
    reporting = argparse.ArgumentParser(add_help=False)
    reporting.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    reporting.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, no table and no summary (errors and problems still shown)",
    )
    reporting.add_argument("--debug", action="store_true", help="show tracebacks")
    reporting.add_argument("--version", action="version", version=f"mastermerge {__version__}")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where models and spectra run (default auto: CUDA when torch sees a device)",
    )
    caching = argparse.ArgumentParser(add_help=False)
    cache = caching.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache", type=Path, metavar="FILE", help=f"metric cache (SQLite); default {default_cache_path()}"
    )
    cache.add_argument("--no-cache", action="store_true", help="keep spectra in memory only")
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument("--force", action="store_true", help="replace an earlier mastermerge output")
    planning = argparse.ArgumentParser(add_help=False)
    planning.add_argument("--dry-run", action="store_true", help="print the plan's tables, write nothing")
    planning.add_argument(
        "--emit-mergekit",
        type=Path,
        metavar="FILE",
        help="also write the plan's mergekit recipe (the mergekit_config.yml every output holds) to FILE, "
        "with --dry-run too; an existing FILE only with --force",
    )
    computing = argparse.ArgumentParser(add_help=False)
    computing.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="compute spectra and tether sums on a Ray cluster: auto (the one `ray start` runs here), "
        "local (a cluster of this machine), host:port or ray://host:port; without ADDRESS the "
        "config's compute.address, else RAY_ADDRESS, else auto",
    )
    computing.add_argument(
        "--threads",
        type=thread_count,
        metavar="N",
        help="threads of each computation, here and on every Ray worker (default: every core of this machine)",
    )
    return {
        "reporting": reporting,
        "caching": caching,
        "device": device,
        "writing": writing,
        "planning": planning,
        "computing": computing,
    }


def parser() -> argparse.ArgumentParser:
    """The whole command line: `mastermerge [merge] --config ...` and the other commands."""
    shared = shared_parsers()
    p = argparse.ArgumentParser(
        prog="mastermerge",
        description="Merge fine-tunes layer by layer: at every depth, keep the candidate whose weight matrices have "
        "the highest Normalized Effective Rank (or another metric). `mastermerge --config FILE.yaml` "
        "merges (the same as `mastermerge merge --config FILE.yaml`; see mastermerge merge --help).",
        epilog=EXIT_CODES,
    )
    p.add_argument("--version", action="version", version=f"mastermerge {__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, uses: tuple[str, ...], **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[shared[u] for u in uses], epilog=EXIT_CODES, **kwargs)

    every = ("reporting", "caching", "writing")
    merge = command(
        "merge",
        (*every, "computing", "planning"),  # a merge's device is its config's
        prog="mastermerge [merge]",
        help="merge the candidates of one or more configs (the default command)",
        description="Merge the candidates of each config: all are validated first, then run in order, "
        "sharing one metric cache.",
    )
    merge.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar="YAML",
        type=Path,
        help="one or more merge configs; all are validated first, then run in order",
    )
    merge.add_argument(
        "--out",
        metavar="DIR",
        help="the output directory, in place of the config's output_dir (one config; as mergekit-yaml's OUT)",
    )
    merge.add_argument(
        "--keep-going",
        action="store_true",
        help="run the other configs of a batch past one refused or failed (exit code: the first failure's)",
    )
    merge.set_defaults(action=run_merge)

    analyze = command(
        "analyze",
        (*every, "computing", "device"),
        help="every metric of every weight matrix, with figures",
        description="Every metric of every weight matrix (NER, alpha, detX, rank collapse, ...): "
        "metrics.csv, metrics.json, figures and a per-model summary.",
    )
    analyze.add_argument("models", nargs="+", metavar="MODEL", help=MODELS_HELP)
    analyze.add_argument("--out", required=True, metavar="DIR", help="directory for the tables and figures")
    analyze.add_argument(
        "--esd",
        metavar="REGEX",
        help="also draw the ESD of every matrix whose name matches, e.g. 'layers\\.0\\.' or '.' for "
        "all (about 0.3 s per figure; default: none)",
    )
    analyze.add_argument(
        "--tensors",
        metavar="REGEX",
        help="analyze only the matrices whose names match, e.g. 'self_attn' (default: every matrix)",
    )
    analyze.add_argument("--no-plots", action="store_true", help="tables only, no figures")
    analyze.set_defaults(action=run_analyze)

    expand = command(
        "expand",
        (*every, "computing", "device", "planning"),
        help="DLEC layer expansion of one model",
        description="DLEC layer expansion of one model: duplicate its most important blocks (by block "
        "influence on a calibration text, heavy-tail share, or the NER of the weights), each "
        "right after its source, and write the expanded model. Give exactly one of "
        "--add-layers, --growth, --layers.",
    )
    expand.add_argument("model", metavar="MODEL", help="a local model directory or a hub id org/name[@revision]")
    expand.add_argument("--out", required=True, metavar="DIR", help="directory for the expanded model")
    for key, options in DLEC_FLAGS.items():
        expand.add_argument(f"--{key.replace('_', '-')}", dest=key, **options)
    expand.add_argument(
        "--shard-size", default="2GB", metavar="SIZE", help="maximum size of one output file (default 2GB)"
    )
    expand.set_defaults(action=run_expand, dlec_keys=tuple(DLEC_FLAGS))

    evaluate = command(
        "evaluate",
        (*every, "device"),
        help="perplexity of models on texts",
        description="The perplexity of each model on each text (causal LMs: next-token; masked LMs: "
        "a seeded 15%% of the tokens masked), as a table with each model's difference "
        "from the first (the base): evaluation.csv, evaluation.json and perplexity.png.",
    )
    evaluate.add_argument("models", nargs="+", metavar="MODEL", help=f"{MODELS_HELP}; the first is the base")
    evaluate.add_argument(
        "--text", action="append", required=True, metavar="FILE", help="a UTF-8 text (repeat for more)"
    )
    evaluate.add_argument("--out", required=True, metavar="DIR", help="directory for the tables and the figure")
    evaluate.add_argument(
        "--max-tokens", type=int, metavar="N", help="use the first N tokens of each text (default 4096)"
    )
    evaluate.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="window length in tokens (default: the model's context, at most --max-tokens)",
    )
    evaluate.add_argument(
        "--stride", type=int, metavar="N", help="tokens between window starts (default: half a window)"
    )
    evaluate.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="let transformers run a model's own code (config.json auto_map)",
    )
    evaluate.add_argument("--no-plots", action="store_true", help="tables only, no figure")
    evaluate.set_defaults(action=run_evaluate)

    verify = command(
        "verify",
        ("reporting",),
        help="check a model directory as a loader reads it (an output also against its merge_report.json)",
        description="Check a model directory: the safetensors headers and the index are valid and "
        "agree, config.json's layer count and sizes (vocab_size, hidden_size, intermediate_size, "
        "the attention heads, the positions) match the tensors' shapes, the tokenizer files parse "
        "and no token id is past the embedding's rows. A directory mastermerge wrote is also "
        "checked against its merge_report.json: every shard and the index json exist with their "
        "recorded sizes and SHA-256, no weight file was added, the tensors are the plan's. One "
        "line per problem. Exit code 5 when a problem is found, 3 when DIR does not exist or "
        "holds no safetensors weights.",
    )
    verify.add_argument(
        "directory", metavar="DIR", type=Path, help="a model directory (a mastermerge output or any other)"
    )
    verify.set_defaults(action=run_verify)
    return p


COMMANDS = ("merge", "analyze", "expand", "evaluate", "verify")


def with_command(argv: list[str]) -> list[str]:
    """The arguments with the command named: `merge` unless the first argument is a command (or asks
    for the top-level help or version)."""
    if argv[:1] and argv[0] in (*COMMANDS, "-h", "--help", "--version"):
        return argv
    return ["merge", *argv]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(with_command(sys.argv[1:] if argv is None else list(argv)))
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    args.json_out = sys.stdout  # with --json, the summary alone: anything else printed meanwhile goes to stderr
    try:
        with interrupts_raised(), contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            return args.action(args)
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


if __name__ == "__main__":
    sys.exit(main())
