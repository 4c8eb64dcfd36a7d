"""The Ray executor against the local one on this machine, and the wall time N nodes would take.

    python benchmarks/ray.py     # about 10 minutes on 2 cores (the checkpoint built first if missing)

On the trained-spectra checkpoint of run.py (0.4B parameters, 37 matrices of 2048 x 2048 up to
32000 x 2048; built in benchmarks/work/ if missing) it runs, each as a fresh process, one at a time:
`mastermerge analyze` cold (the best of two runs) on the local executor (`--threads 2`), then against a Ray cluster of
this machine started with `ray start --head --num-cpus 2` (`--ray auto`, as a user runs it), once
with `--threads 2` (one task at a time, the same threads as local) and once with `--threads 1`
(two tasks at once). It also times each matrix's task alone (nodes.matrix_results, in one process,
on 1 and 2 threads). From those per-matrix times it computes the wall time of N such nodes: the
tasks, longest first, each given to the slot that frees first (N x 2 / threads slots), plus the
run's fixed cost measured here (process start, connecting, headers, writing the tables). Writes
benchmarks/results/ray.json and prints the tables the README shows. Not part of the tests.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CANDIDATES = 5  # the README's scenario: five candidates of this size
NODES = (1, 2, 4, 8, 16)
RUNS = 2  # each whole run measured this many times, the best kept (the machine's noise is a few seconds)
RAY = str(Path(sys.executable).parent / "ray")  # the ray command of this environment
RAY_ENV = os.environ | {"RAY_AUTH_MODE": "disabled"}  # a cluster of this machine for this run only


def measured(command: list[str], env=None) -> float:
    """The wall seconds of a command run to its end (it must succeed)."""
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(command[:4])} ... failed:\n{run.stderr[-2000:]}")
    return time.perf_counter() - start


def checkpoint(work: Path) -> Path:
    """run.py's trained-spectra checkpoint, built if missing."""
    path = work / "llama-trained"
    if not (path / "model.safetensors").exists():
        print("building the trained-spectra checkpoint ...", flush=True)
        code = (
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from inputs import LLAMA_TRAINED, TRAINED_EXPONENT, build; "
            "build(Path(sys.argv[2]), LLAMA_TRAINED, seed=5, spectrum=TRAINED_EXPONENT)"
        )
        subprocess.run([sys.executable, "-c", code, str(HERE), str(path)], check=True)
    return path


def analysis(model: Path, work: Path, *flags: str, env=None) -> float:
    """Seconds of a cold `mastermerge analyze` (a fresh cache), the best of RUNS."""
    cache, out = work / "ray-bench.sqlite", work / "ray-bench-analysis"
    command = [sys.executable, str(ROOT / "mastermerge.py"), "analyze", str(model), "--out", str(out)]
    best = float("inf")
    for _ in range(RUNS):
        cache.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        best = min(best, measured(command + ["--no-plots", "--quiet", "--cache", str(cache), *flags], env=env))
    return best


def matrix_times(model: Path, threads: int) -> list[dict]:
    """Each matrix's task alone (read, digest, spectrum, metrics), timed in this process."""
    from nerd.checkpoint import Checkpoint
    from nerd.nodes import Expected, matrix_results, origin_of

    times = []
    with Checkpoint.open(model) as opened:
        origin = origin_of(model.name, opened, None, None)
        for name, info in opened.tensors.items():
            if info.is_matrix:
                start = time.perf_counter()
                matrix_results(origin, [(name, Expected.of(info, opened.directory))], "cpu", threads)
                times.append({"tensor": name, "shape": list(info.shape), "seconds": time.perf_counter() - start})
    return times


def makespan(seconds: list[float], slots: int) -> float:
    """The compute wall time of tasks on `slots` equal slots: longest first, each to the slot free first."""
    free = [0.0] * slots
    for task in sorted(seconds, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + task)
    return max(free)


def node_table(times: dict[int, list[dict]], fixed: dict[int, float], cores: int) -> tuple[list[dict], str]:
    """Expected wall time of N nodes of `cores` cores for CANDIDATES candidates like this checkpoint."""
    rows, lines = [], ["| nodes | threads per task | slots | sum of task s | compute s | + fixed s | expected wall s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for n in NODES:
        for threads, per_matrix in times.items():
            tasks = [t["seconds"] for t in per_matrix] * CANDIDATES
            slots = n * (cores // threads)
            compute = makespan(tasks, slots)
            wall = compute + fixed[threads]
            rows.append({"nodes": n, "threads": threads, "slots": slots, "compute": compute, "wall": wall})
            lines.append(
                f"| {n} | {threads} | {slots} | {sum(tasks):.1f} | {compute:.1f} | {fixed[threads]:.1f} | {wall:.1f} |"
            )
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work", help="where run.py builds its inputs")
    parser.add_argument("--matrix-times", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.matrix_times:  # a fresh process of its own, so that no other run's state is in it
        print(json.dumps(matrix_times(Path(args.matrix_times[0]), int(args.matrix_times[1]))))
        return
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(work)
    print("local executor ...", flush=True)
    local = analysis(model, work, "--threads", "2")
    print("ray cluster of this machine ...", flush=True)
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--include-dashboard=false"], env=RAY_ENV, check=True)
    try:
        ray = {
            threads: analysis(model, work, "--ray", "auto", "--threads", str(threads), env=RAY_ENV)
            for threads in (2, 1)
        }
    finally:
        subprocess.run([RAY, "stop", "--force"], env=RAY_ENV, capture_output=True)
    print("per-matrix times ...", flush=True)
    times = {}
    for threads in (2, 1):
        run = subprocess.run(
            [sys.executable, __file__, "--matrix-times", str(model), str(threads)], capture_output=True, text=True
        )
        times[threads] = json.loads(run.stdout)
    fixed = {
        threads: max(0.0, ray[threads] - makespan([t["seconds"] for t in times[threads]], 2 // threads))
        for threads in (2, 1)
    }
    rows, nodes = node_table(times, fixed, cores=2)
    one = "\n".join(
        [
            "| run (37 matrices, cold cache) | wall s | against local |",
            "|---|---|---|",
            f"| local executor, --threads 2 | {local:.1f} | |",
            f"| Ray, 1 node of 2 CPUs, --threads 2 (1 task at a time) | {ray[2]:.1f} | {ray[2] / local - 1:+.1%} |",
            f"| Ray, 1 node of 2 CPUs, --threads 1 (2 tasks at once) | {ray[1]:.1f} | {ray[1] / local - 1:+.1%} |",
        ]
    )
    results = {"local": local, "ray": ray, "matrix_times": times, "fixed": fixed, "nodes": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ray.json").write_text(json.dumps(results | {"tables": [one, nodes]}, indent=2) + "\n")
    print(one + "\n\n" + nodes)


if __name__ == "__main__":
    main()
