"""The benchmark suite: mastermerge's analysis and merge against the bare float64 work, a
torch.linalg.svdvals loop, weightwatcher and mergekit, on inputs it builds itself.

    python benchmarks/run.py              # about 15 minutes on 2 cores (plus a one-time set-up)
    python benchmarks/run.py --7b-block   # also one 7B-shaped block (4096 x 4096, 4096 x 11008)

It builds (once, in benchmarks/work/) two 0.39B-parameter Llama-shaped bf16 checkpoints, one with
Gaussian weights and one with trained-like power-law spectra (hidden 2048, MLP 5632, condition
numbers about 100), two fine-tunes of each, and a 0.2B Gaussian one, and installs the reference tools (weightwatcher 0.7.7 with
powerlaw 1.5, mergekit) into a virtual environment of their own, benchmarks/.venv-ref, so they
never touch mastermerge's. Every measured command runs as a fresh process on the same machine,
one at a time; its wall time and peak resident memory come from the operating system (wait4).
This script itself stays small (it imports neither torch nor the models), because Linux counts
a parent's resident memory at fork time into its child's peak.
Writes benchmarks/results/benchmark.json and prints the table the README shows. Not part of
the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

REFERENCE = HERE / ".venv-ref"
REFERENCE_PACKAGES = ["weightwatcher==0.7.7", "powerlaw==1.5", "mergekit"]
WW = (
    "import sys, weightwatcher as ww; d = ww.WeightWatcher().analyze(model=sys.argv[1]); "
    "print(len(d), int(d['alpha'].isna().sum()))"
)
TARGETS = {"analysis / floor": 1.2, "weightwatcher / analysis": 2.5, "warm / cold": 0.10, "merge / mergekit": 0.5}


class Measured(subprocess.Popen):
    """Popen that keeps the child's peak resident memory (MB) when it is reaped (wait4)."""

    peak_mb = None

    def _try_wait(self, wait_flags):
        pid, status, usage = os.wait4(self.pid, wait_flags)
        if pid:
            self.peak_mb = usage.ru_maxrss / 1024  # kB on Linux
        return pid, status


def measured(command: list[str], **kwargs) -> dict:
    """Run a command; its wall seconds, peak resident memory (MB) and output."""
    start = time.perf_counter()
    process = Measured(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(command[:4])} ... failed (exit {process.returncode}):\n{err[-2000:]}")
    return {"seconds": seconds, "peak_mb": process.peak_mb, "stdout": out.strip()}


def reference_python() -> Path:
    """The reference tools' interpreter, its environment created on first use."""
    python = REFERENCE / "bin" / "python"
    if not python.exists():
        print("setting up benchmarks/.venv-ref (weightwatcher, mergekit) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(REFERENCE)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU build, before anything pulls CUDA
        subprocess.run(pip + REFERENCE_PACKAGES, check=True)
    return python


def mastermerge(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "mastermerge.py"), *args]


def baseline(kind: str, model: Path | None = None) -> dict:
    result = measured([sys.executable, str(HERE / "baselines.py"), kind] + ([str(model)] if model else []))
    return result | json.loads(result["stdout"])


def analysis(model: Path, work: Path, cache: Path) -> dict:
    out = work / "analysis"
    shutil.rmtree(out, ignore_errors=True)
    return measured(
        mastermerge("analyze", str(model), "--out", str(out), "--no-plots", "--cache", str(cache), "--quiet", "--force")
    )


def spectrum_paths(work: Path) -> dict[str, int]:
    """How many matrices of the last analysis took each spectrum path (gram, refined, svd)."""
    summary = json.loads((work / "analysis" / "metrics.json").read_text())["summary"]
    return next(iter(summary.values()))["spectrum_paths"]


def benchmark_analysis(model: Path, work: Path, ref: Path) -> dict:
    cache = work / "analysis.sqlite"
    cache.unlink(missing_ok=True)
    cold = analysis(model, work, cache)
    paths = spectrum_paths(work)
    warm = analysis(model, work, cache)
    bare, syrk, svdvals = baseline("bare", model), baseline("syrk", model), baseline("svdvals", model)
    ww = measured([str(ref), "-c", WW, str(model)], env=os.environ | {"HF_HUB_OFFLINE": "1"}) if ref else None
    return {
        "cold": cold | {"paths": paths},
        "warm": warm,
        "bare": bare,
        "syrk": syrk,
        "svdvals": svdvals,
        "weightwatcher": ww,
        "floor": min(bare["seconds"], syrk["seconds"]),
        "gflops": bare["flops"] / cold["seconds"] / 1e9,
        "executed_gflops": bare["syrk_flops"] / cold["seconds"] / 1e9,
    }


def benchmark_merge(models: list[Path], work: Path, ref: Path | None) -> dict:
    """mastermerge with a warm metric cache against mergekit's passthrough of the same selection."""
    cache, out = work / "merge.sqlite", work / "merged"
    cache.unlink(missing_ok=True)  # the plan computes every spectrum; the merge after it finds them cached
    config = work / "merge.yaml"
    config.write_text(
        yaml.safe_dump({"models": [str(m) for m in models], "base_model": str(models[0]), "output_dir": str(out)})
    )
    plan = measured(mastermerge("--config", str(config), "--cache", str(cache), "--dry-run", "--json", "--quiet"))
    choices = json.loads(plan["stdout"])["results"][0]["choices"]
    shutil.rmtree(out, ignore_errors=True)  # both tools write a fresh directory
    merge = measured(mastermerge("--config", str(config), "--cache", str(cache), "--quiet"))
    result = {"plan_cold": plan, "merge_warm": merge}
    if ref:
        slices = [
            {"sources": [{"model": c["winner"], "layer_range": [c["depth"], c["depth"] + 1]}]}
            for c in choices
            if c["depth"] is not None
        ]
        kit = work / "mergekit.yaml"
        kit.write_text(yaml.safe_dump({"slices": slices, "merge_method": "passthrough", "dtype": "bfloat16"}))
        kit_out = work / "mergekit-out"
        shutil.rmtree(kit_out, ignore_errors=True)
        result["mergekit"] = measured(
            [str(ref.parent / "mergekit-yaml"), str(kit), str(kit_out), "--quiet"],
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
    return result


def family_rows(label: str, a: dict, m: dict, memory_target_mb: float) -> list[tuple]:
    """The table rows of one checkpoint family: its analysis against the baselines, its merge."""
    cold, floor = a["cold"]["seconds"], a["floor"]
    paths = ", ".join(f"{n} {p}" for p, n in a["cold"]["paths"].items())
    rows = [
        (
            f"{label}: mastermerge analyze, cold cache",
            cold,
            a["cold"]["peak_mb"],
            f"= {cold / floor:.2f}x the floor (target <= {TARGETS['analysis / floor']}x); spectra: {paths}",
        )
    ]
    measured = [
        ("warm", "mastermerge analyze, warm cache", f"{a['warm']['seconds'] / cold:.1%} of cold (target < 10%)"),
        (
            "bare",
            "bare float64 Gram (gemm) + eigvalsh, torch (work only)",
            "the floor" * (a["bare"]["seconds"] == floor),
        ),
        (
            "syrk",
            "bare float64 Gram (syrk) + eigvalsh, numpy (work only)",
            "the floor" * (a["syrk"]["seconds"] == floor),
        ),
        (
            "svdvals",
            "torch.linalg.svdvals loop, float32 (work only)",
            f"{a['svdvals']['seconds'] / cold:.2f}x the analysis",
        ),
    ]
    rows += [(f"{label}: {what}", a[key]["seconds"], a[key]["peak_mb"], note) for key, what, note in measured]
    if a["weightwatcher"]:
        rows.append(
            (
                f"{label}: weightwatcher 0.7.7 analyze",
                a["weightwatcher"]["seconds"],
                a["weightwatcher"]["peak_mb"],
                f"{a['weightwatcher']['seconds'] / cold:.2f}x the analysis (target >= 2.5x)",
            )
        )
    rows.append(
        (
            f"{label}: mastermerge merge of 3 candidates, warm cache",
            m["merge_warm"]["seconds"],
            m["merge_warm"]["peak_mb"],
            f"peak within largest tensor + 1 GB = {memory_target_mb:.0f} MB",
        )
    )
    if "mergekit" in m:
        rows.append(
            (
                f"{label}: mergekit passthrough, same per-layer selection",
                m["mergekit"]["seconds"],
                m["mergekit"]["peak_mb"],
                f"mastermerge = {m['merge_warm']['seconds'] / m['mergekit']['seconds']:.2f}x this (target <= 0.5x)",
            )
        )
    return rows


def table(results: dict) -> str:
    """The markdown table of one run."""
    rows = []
    for family in results["families"]:
        rows += family_rows(family["label"], family["analysis"], family["merge"], family["memory_target_mb"])
    small = results["small"]
    rows.append(
        (
            f"Gaussian: mastermerge analyze, {small['parameters'] / 1e9:.2f}B checkpoint, cold",
            small["seconds"],
            small["peak_mb"],
            "peak memory for a second size",
        )
    )
    for name, run in results.get("block_7b", {}).items():
        rows.append(
            (
                f"7B-shaped block: {name}" + ("" if name.startswith("mastermerge") else " (work only)"),
                run["seconds"],
                run["peak_mb"],
                "",
            )
        )
    lines = ["| run | wall s | peak MB | comparison |", "|---|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {peak:.0f} | {note} |" for name, seconds, peak, note in rows]
    gemm = results["machine"]["gemm_gflops"]
    for family in results["families"]:
        a = family["analysis"]
        lines.append(
            f"\n{family['label']}: analysis of {family['parameters'] / 1e9:.2f}B parameters "
            f"({a['bare']['matrices']} matrices): {a['gflops']:.1f} GFLOP/s of nominal float64 work "
            f"(2mk^2 + 4/3k^3 per matrix), {a['gflops'] / gemm:.0%} of the machine's float64 GEMM rate "
            f"({gemm:.1f} GFLOP/s); the work executed (mk^2 + 4/3k^3 with the symmetric update) ran at "
            f"{a['executed_gflops']:.1f} GFLOP/s, {a['executed_gflops'] / gemm:.0%}."
        )
    lines.append(
        '\n"work only": the loop\'s own seconds, weights in memory; the other rows are whole processes. '
        "The floor is the faster of the two bare loops."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--7b-block", dest="block", action="store_true", help="also a 7B-shaped block")
    parser.add_argument("--no-reference", action="store_true", help="skip weightwatcher and mergekit")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="where the inputs are built")
    args = parser.parse_args()
    work = args.work.resolve()
    ref = None if args.no_reference else reference_python()
    print("building inputs ...", flush=True)
    built = json.loads(
        measured([sys.executable, str(HERE / "inputs.py"), str(work)] + (["--7b-block"] if args.block else []))[
            "stdout"
        ]
    )
    small = Path(built["small"]["path"])
    print("machine GEMM rate ...", flush=True)
    gemm = baseline("gemm")
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": gemm["torch"],
        "numpy": gemm["numpy"],
        "gemm_gflops": gemm["gflops"],
    }
    results = {"machine": machine, "families": []}
    for label, key, *fine_tunes in (
        ("Gaussian", "base", "ft1", "ft2"),
        ("Trained spectra", "trained", "trained_ft1", "trained_ft2"),
    ):
        base = Path(built[key]["path"])
        models = [base] + [Path(built[name]["path"]) for name in fine_tunes]
        print(
            f"{label}: analysis (mastermerge, bare work, svdvals loop, weightwatcher), merge (mergekit) ...", flush=True
        )
        results["families"].append(
            {
                "label": label,
                "parameters": built[key]["parameters"],
                "analysis": benchmark_analysis(base, work, ref),
                "merge": benchmark_merge(models, work, ref),
                "memory_target_mb": built[key]["largest_tensor_bytes"] / 2**20 + 1024,
            }
        )
    cache = work / "small.sqlite"
    cache.unlink(missing_ok=True)
    results["small"] = analysis(small, work, cache) | {"parameters": built["small"]["parameters"]}
    if args.block:
        print("7B-shaped block ...", flush=True)
        block = Path(built["block_7b"]["path"])
        cache = work / "block.sqlite"
        cache.unlink(missing_ok=True)
        results["block_7b"] = {
            "mastermerge analyze": analysis(block, work, cache),
            "bare (gemm) + eigvalsh": baseline("bare", block),
            "bare (syrk) + eigvalsh": baseline("syrk", block),
            "svdvals loop": baseline("svdvals", block),
        }
    text = table(results)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "benchmark.json").write_text(json.dumps(results | {"table": text}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
