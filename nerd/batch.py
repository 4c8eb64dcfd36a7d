"""A run of merge configs (`mastermerge --config a.yaml b.yaml ...`, and expand's one config): each
validated, its output claimed, then planned and written in turn with one metric cache, and what
became of every config given, for --json and for the exit code.

Without --keep-going the batch stops at the first config refused or failed (those finished keep
their complete output); with it, a refused or failed config is reported (one error line) and the
rest still run, and the exit code is the first failure's. Either way --json lists every config
given, in order, with its `status`: written, planned (--dry-run), refused (before anything ran),
failed (while it ran) or skipped (never ran, with the `reason`).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .engine import uses_ray
from .errors import ConfigError, MergeError
from .filesystem import claim_output
from .pipeline import plan_merge
from .recipe import RECIPE, recipe_or_problem, write_recipe
from .report import choice_table, evaluation_table, expansion_table, spectrum_paths, tether_table
from .store import MetricCache, default_cache_path
from .write import write_merge


@dataclass
class Batch:
    """What became of each config given (`sources`, in order; None for expand's): its result once
    it has one. `stopped` says why the configs without one never ran."""

    args: argparse.Namespace
    sources: list[Path | None]
    results: dict[int, dict] = field(default_factory=dict)
    failures: list[MergeError] = field(default_factory=list)
    stopped: str = ""
    refusal: MergeError | None = None  # what refused the batch as a whole

    @property
    def keep_going(self) -> bool:
        return bool(getattr(self.args, "keep_going", False))

    def attempt(self, index: int | None, status: str, work: Callable[[], object]) -> object | None:
        """work() for the config at `index` (None: the whole batch); a MergeError becomes its result
        (`status` refused or failed) and is raised again, unless the batch keeps going past it."""
        try:
            return work()
        except MergeError as exc:
            where = self.sources[index] if index is not None else None
            self.failures.append(exc)
            if index is not None:
                self.results[index] = {"config": name_of(where), "status": status, "error": str(exc)}
                self.results[index]["exit_code"] = exc.exit_code
            if index is None or not self.keep_going:
                what = "was refused" if status == "refused" else "failed"
                self.stopped = self.stopped or (
                    f"{name_of(where)} {what} first (--keep-going runs the rest)"
                    if index is not None
                    else "the batch was refused"
                )
                self.refusal = exc if index is None else None
                raise
            report_error(exc, self.args.debug)
            return None
        except KeyboardInterrupt:
            self.stopped = self.stopped or "interrupted"
            raise

    def listing(self) -> list[dict]:
        """Every config given, in order: its result, or why it never ran."""
        return [
            self.results.get(i) or {"config": name_of(s), "status": "skipped", "reason": f"not run: {self.stopped}"}
            for i, s in enumerate(self.sources)
        ]

    def print_json(self) -> None:
        if self.args.json:
            listing = {"mastermerge_version": __version__, "results": self.listing()}
            if self.refusal is not None:
                listing |= {"error": str(self.refusal), "exit_code": self.refusal.exit_code}
            print(json.dumps(listing, indent=2), file=self.args.json_out)

    def exit_code(self) -> int:
        """0, or the first failure's code, with one line naming each config that failed."""
        if not self.failures:
            return 0
        failed = [r for r in self.listing() if r.get("error")]
        listed = ", ".join(f"{r['config']} ({r['status']}, exit {r['exit_code']})" for r in failed)
        print(f"mastermerge: {len(failed)} of {len(self.sources)} configs did not finish: {listed}", file=sys.stderr)
        return self.failures[0].exit_code


def name_of(source: Path | None) -> str | None:
    return str(source) if source else None


def report_error(exc: MergeError, debug: bool) -> None:
    """The error line the command line prints (cli.main), for a config the batch keeps going past."""
    if debug:
        traceback.print_exception(exc)
    print(f"mastermerge: error: {exc}", file=sys.stderr)


def run_configs(configs: list, args: argparse.Namespace, batch: Batch | None = None) -> int:
    """Plan and write (or with --dry-run, print) each config in turn, sharing one metric cache.
    `batch` holds the configs given (those refused when read among them); by default, `configs`."""
    batch = batch or Batch(args, [c.source for c in configs])
    index = {id(c): i for i, c in zip(runnable(batch), configs)}
    try:
        batch.attempt(None, "refused", lambda: checked_batch(configs, args))
        configs = [c for c in configs if batch.attempt(index[id(c)], "refused", claimed(c, configs, args))]
        cache = batch.attempt(None, "refused", lambda: cache_of(args))
    except (MergeError, KeyboardInterrupt):
        batch.print_json()
        raise
    try:
        for config in configs:
            i = index[id(config)]
            result = batch.attempt(i, "failed", lambda: merged(config, args, cache))
            if result is not None:
                batch.results[i] = result
    except KeyboardInterrupt as exc:
        finished = [r["output_dir"] for r in batch.results.values() if r.get("written")]
        if finished:
            exc.add_note(f"written before it: {', '.join(finished)}")
        raise
    finally:
        cache.close()
        batch.print_json()  # also after a failure: the configs that finished are reported
    return batch.exit_code()


def runnable(batch: Batch) -> list[int]:
    """The indices of the configs that were read (not refused when read), in order."""
    return [i for i in range(len(batch.sources)) if i not in batch.results]


def checked_batch(configs: list, args: argparse.Namespace) -> None:
    """What is refused of the batch as a whole, before any config runs."""
    one_cluster(configs)
    recipe_target(args.emit_mergekit, len(configs), force=args.force)
    check_cache_flag(args)


def claimed(config, configs: list, args: argparse.Namespace) -> Callable[[], bool]:
    """The check of a config's output before anything runs: not another config's output, and (to be
    written) a killed run's leftovers dealt with, a non-empty output refused."""

    def claim() -> bool:
        earlier = next(c for c in configs if c.output_dir == config.output_dir)
        if not args.dry_run and earlier is not config:
            raise ConfigError(
                f"{config.source}: output_dir: {config.output_dir} is also the output of {earlier.source}"
            )
        if not args.dry_run:
            claim_output(config, force=args.force)
        return True

    return claim


def merged(config, args: argparse.Namespace, cache: MetricCache) -> dict:
    """Plan one config, print its tables, warnings and notes, write it (unless --dry-run): its result."""
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
    return summary_of(config, plan, written=not args.dry_run)


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


def cache_of(args: argparse.Namespace) -> MetricCache:
    """The metric cache the flags ask for: --no-cache (memory), --cache FILE, or the default file."""
    check_cache_flag(args)
    return MetricCache(None if args.no_cache else args.cache or default_cache_path())


def check_cache_flag(args: argparse.Namespace) -> None:
    """--cache FILE must be in a directory that exists: a mistyped path is not created (one that
    exists but cannot hold the cache, a read-only one, still runs in memory with a warning)."""
    if args.cache is not None and not args.cache.parent.exists():
        raise ConfigError(f"--cache {args.cache}: no directory {args.cache.parent} (create it, or give another FILE)")


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


def summary_of(config, plan, written: bool) -> dict:
    return {
        "config": name_of(config.source),
        "status": "written" if written else "planned",
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
                "pinned": c.pinned,
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
