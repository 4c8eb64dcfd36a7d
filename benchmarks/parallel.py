"""Two merges on one cold metric cache: each alone, both as one batch, and both started together.

    python benchmarks/parallel.py [WORK_DIR] [--code DIR]   # DIR: another checkout's mastermerge.py

Builds (once) a small trained-spectra checkpoint and two fine-tunes of it (benchmarks/inputs.py's
power-law matrices: 2 layers, hidden 1024, MLP 2816, vocabulary 8000), writes two merge configs of
the three, and measures, each from an empty cache file, the wall time of: one merge alone; both
configs as one batch (`--config a.yaml b.yaml`, one process); both merges started at the same
moment as two processes on one cache file (the time until both have finished), and how many
spectra each of those two computed (--json's spectra_computed); and the same two started together
with the cores split between them (`--threads` half the cores each). Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import TRAINED_EXPONENT, Shape, build  # noqa: E402

SMALL_TRAINED = Shape(layers=2, hidden=1024, intermediate=2816, vocab=8000, heads=16, kv_heads=16)


def models(work: Path) -> list[Path]:
    base = build(work / "small-trained", SMALL_TRAINED, seed=5, spectrum=TRAINED_EXPONENT)
    return [base] + [
        build(work / f"small-trained-ft{i}", SMALL_TRAINED, seed=5 + i, base=base, noise=0.02) for i in (1, 2)
    ]


def config(work: Path, name: str, candidates: list[Path]) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"models": [str(m) for m in candidates], "base_model": str(candidates[0]), "output_dir": str(work / name)}
        )
    )
    return path


def command(code: Path, cache: Path, *configs: Path, threads: int | None = None) -> list[str]:
    split = [] if threads is None else ["--threads", str(threads)]
    return [
        sys.executable,
        str(code),
        "--config",
        *map(str, configs),
        "--cache",
        str(cache),
        "--quiet",
        "--json",
        *split,
    ]


def fresh(work: Path, name: str) -> Path:
    """An empty cache file, and no outputs left from an earlier measurement."""
    cache = work / f"{name}.sqlite"
    for path in work.glob(f"{name}.sqlite*"):
        path.unlink()
    for out in ("a", "b"):
        subprocess.run(["rm", "-rf", str(work / out)], check=True)
    return cache


def timed(commands: list[list[str]]) -> tuple[float, list[dict]]:
    """The wall time until every command (started together) has ended, and their --json results."""
    start = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate() for p in procs]
    seconds = time.monotonic() - start
    for p, (_, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise SystemExit(f"a run failed ({p.returncode}): {err}")
    return seconds, [r for out, _ in outputs for r in json.loads(out)["results"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    candidates = models(args.work)
    a = config(args.work, "a", candidates)
    b = config(args.work, "b", candidates)
    code = args.code / "mastermerge.py"
    alone, _ = timed([command(code, fresh(args.work, "alone"), a)])
    batch, _ = timed([command(code, fresh(args.work, "batch"), a, b)])
    cache = fresh(args.work, "parallel")
    parallel, results = timed([command(code, cache, a), command(code, cache, b)])
    computed = [r["spectra_computed"] for r in results]
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    cache = fresh(args.work, "split")
    split, results = timed([command(code, cache, c, threads=half) for c in (a, b)])
    print(
        json.dumps(
            {
                "alone_s": round(alone, 1),
                "batch_s": round(batch, 1),
                "parallel_s": round(parallel, 1),
                "computed": computed,
                f"split_threads_{half}_s": round(split, 1),
                "split_computed": [r["spectra_computed"] for r in results],
            }
        )
    )


if __name__ == "__main__":
    main()
