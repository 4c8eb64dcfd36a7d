"""Check mastermerge's CUDA spectra against its CPU path, and time both.

    python benchmarks/gpu.py                            # the benchmark's 0.39B trained-spectra base and two fine-tunes
    python benchmarks/gpu.py --model A --model B ...    # these checkpoints instead (directories)
    python benchmarks/gpu.py --model A --device cpu     # the torch batched path on the CPU (no GPU needed)

Every 2-D matrix of every model is read with safetensors and its spectrum computed twice: by the
CPU path (numpy's float64 Gram matrix and LAPACK, one matrix at a time: `spectra_of(..., "cpu")`)
and by the device path (`spectra_of(..., "cuda")`: equal shapes stacked into batches, one batched
product and one batched eigensolver call each; with `--device cpu`, the same torch code,
`batched_spectra`, run on the CPU). Checks: every matrix's NER (nerd.metrics.metrics_of) agrees
within 1e-12 between the paths, and with several models the per-depth winner (the highest mean NER
of a block's matrices, nerd.select's rule) is the same. Reports the wall time of each path (the
spectra only, the weights already in memory, the device synchronised around its timing, after an
untimed warm-up on one matrix of each shape), matrices per second, how many matrices took each
path (gram, refined, svd) and the device's name; prints a markdown table and writes
benchmarks/results/gpu.json (or --out). Exits 2 if CUDA is asked for and is not available, if a
model has no safetensors file, or if the models differ in their 2-D tensors; 1 if a check fails.
Without --model it builds (once, in benchmarks/work/, with benchmarks/inputs.py) the checkpoints
benchmarks/run.py uses. Meant to finish in under 5 minutes on one GPU; it has not run on one yet.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from inputs import LLAMA_TRAINED, TRAINED_EXPONENT, build  # noqa: E402

from nerd.layout import layout_of  # noqa: E402
from nerd.metrics import metrics_of, path_counts  # noqa: E402
from nerd.select import group_score, winner_of  # noqa: E402
from nerd.spectra import batched_spectra, spectra_of  # noqa: E402

NER_AGREEMENT = 1e-12


def default_models(work: Path) -> list[Path]:
    """The 0.39B trained-spectra base and two fine-tunes of it that benchmarks/run.py builds."""
    base = build(work / "llama-trained", LLAMA_TRAINED, seed=5, spectrum=TRAINED_EXPONENT)
    return [
        base,
        build(work / "llama-trained-ft1", LLAMA_TRAINED, seed=6, base=base, noise=0.02),
        build(work / "llama-trained-ft2", LLAMA_TRAINED, seed=7, base=base, noise=0.02),
    ]


def matrices_of(model: Path) -> dict[str, torch.Tensor]:
    """Every 2-D tensor of a model directory's safetensors files, by name, in file order."""
    files = sorted(model.glob("*.safetensors"))
    if not files:
        print(f"gpu.py: {model}: no *.safetensors file", file=sys.stderr)
        sys.exit(2)
    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dim() == 2:
                    found[name] = tensor
    return found


def timed(fn, device: str):
    """fn()'s result and its wall seconds, the device synchronised before and after."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def device_spectra(matrices: list[torch.Tensor], device: str):
    """The device path: spectra_of on CUDA; its torch code (batched_spectra) on the CPU otherwise."""
    if device == "cuda":
        return spectra_of(matrices, device="cuda")
    return batched_spectra(matrices, torch.device("cpu"))


def winners(ner: dict[str, dict[str, float | None]], names: list[str]) -> list[str | None]:
    """The candidate with the highest mean NER of each depth's 2-D matrices (the first on ties)."""
    layout = layout_of(names)
    order = list(ner)
    result = []
    for depth in range(layout.num_layers):
        block = [t for t in layout.block(depth) if t in ner[order[0]]]
        result.append(winner_of({c: group_score(ner, c, block) for c in order}, order))
    return result


def paths(spectra) -> dict[str, int]:
    """How many spectra took each path (gram, refined, svd: nerd.spectra's Spectrum.path)."""
    return path_counts([{"path": s.path} for s in spectra])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{path} {n}" for path, n in counts.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="a model directory (repeat for several)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="where the default models are built")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu.py: CUDA was asked for (--device cuda) but torch sees no CUDA device; "
            "use --device cpu to exercise the script",
            file=sys.stderr,
        )
        return 2
    models = args.model or default_models(args.work)
    labels = [m.name for m in models]
    if len(set(labels)) < len(labels):
        labels = [str(m) for m in models]

    rows, ner = [], {"cpu": {}, "device": {}}
    names: list[str] = []
    for label, model in zip(labels, models):
        matrices = matrices_of(model)
        names = names or list(matrices)
        if list(matrices) != names:
            print(
                f"gpu.py: {model} has other 2-D tensors than {models[0]}: give models of one architecture",
                file=sys.stderr,
            )
            return 2
        tensors = list(matrices.values())
        if label == labels[0]:  # untimed: one matrix of each shape sets up CUDA, the solvers and LAPACK
            warm_up = list({t.shape: t for t in tensors}.values())
            spectra_of(warm_up, device="cpu")
            device_spectra(warm_up, args.device)
        cpu, cpu_s = timed(lambda t=tensors: spectra_of(t, device="cpu"), "cpu")
        dev, dev_s = timed(lambda t=tensors: device_spectra(t, args.device), args.device)
        for path, spectra in (("cpu", cpu), ("device", dev)):
            ner[path][label] = {n: metrics_of(s)["ner"] for n, s in zip(matrices, spectra)}
        differences = [
            abs(a - b) if a is not None and b is not None else (0.0 if a is b else float("inf"))
            for a, b in zip(ner["cpu"][label].values(), ner["device"][label].values())
        ]
        rows.append(
            {
                "model": label,
                "matrices": len(tensors),
                "parameters": sum(t.numel() for t in tensors),
                "cpu_seconds": round(cpu_s, 3),
                "device_seconds": round(dev_s, 3),
                "cpu_matrices_per_s": round(len(tensors) / cpu_s, 1),
                "device_matrices_per_s": round(len(tensors) / dev_s, 1),
                "speedup": round(cpu_s / dev_s, 2),
                "max_ner_difference": max(differences),
                "ner_within_1e-12": sum(d <= NER_AGREEMENT for d in differences),
                "cpu_paths": paths(cpu),
                "device_paths": paths(dev),
            }
        )

    same_winners = None
    if len(models) > 1:
        cpu_winners, dev_winners = winners(ner["cpu"], names), winners(ner["device"], names)
        same_winners = cpu_winners == dev_winners
    ner_ok = all(r["ner_within_1e-12"] == r["matrices"] for r in rows)
    result = {
        "device": device_name(args.device),
        "device_path": args.device,
        "torch": torch.__version__,
        "cpu": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
        "same_winners": same_winners,
        "winners": None if same_winners is None else cpu_winners,
        "passed": ner_ok and same_winners is not False,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    path = "CUDA (spectra_of)" if args.device == "cuda" else "torch batched on the CPU (batched_spectra)"
    print(f"Device: {result['device']}; torch {torch.__version__}; device path: {path}\n")
    print(
        "| model | matrices | CPU path | device path | speed-up | CPU matrices/s | device matrices/s "
        "| max NER difference | NER within 1e-12 | paths (CPU; device) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['matrices']} | {r['cpu_seconds']:.2f} s | {r['device_seconds']:.2f} s "
            f"| {r['speedup']}x | {r['cpu_matrices_per_s']} | {r['device_matrices_per_s']} "
            f"| {r['max_ner_difference']:.1e} | {r['ner_within_1e-12']}/{r['matrices']} "
            f"| {listed(r['cpu_paths'])}; {listed(r['device_paths'])} |"
        )
    if same_winners is not None:
        print(
            f"\nPer-depth winners (highest block mean NER): "
            f"{'the same on both paths' if same_winners else 'DIFFER'}: CPU {cpu_winners}, device {dev_winners}"
        )
    print(f"\n{'PASSED' if result['passed'] else 'FAILED'}; wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
