"""Benchmark: mastermerge's exact spectrum paths against a float64 SVD, on LLM-shaped matrices.

    python benchmarks/spectrum_paths.py [--shapes 2048x2048 4096x4096 11008x4096] [--exponents 0 0.6 1.2]

Each shape is measured with Gaussian entries (exponent 0) and with power-law singular values
s_i ~ i^-exponent (the shape of trained spectra, benchmarks/inputs.py's power_law_matrix); the
table says which path (gram, refined, svd) mastermerge took.

Each time is the best of two runs. Prints a markdown table and writes
benchmarks/results/spectrum_paths.json. Not part of the tests.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nerd.metrics import metrics_of  # noqa: E402
from inputs import power_law_matrix  # noqa: E402
from nerd.spectra import spectrum_of  # noqa: E402


def seconds(fn, repeat: int = 2) -> float:
    """Best wall time of `repeat` runs (the first run of a size pays LAPACK's workspace set-up)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x2048", "4096x4096", "11008x4096"])
    parser.add_argument("--exponents", nargs="+", type=float, default=[0.0, 0.6, 1.2])
    args = parser.parse_args()
    rows = []
    for text in args.shapes:
        for exponent in args.exponents:
            shape = tuple(int(x) for x in text.split("x"))
            g = torch.Generator().manual_seed(0)
            w = torch.randn(shape, generator=g) if exponent == 0 else power_law_matrix(shape, exponent, g)
            w = w.to(torch.bfloat16)
            ours = seconds(lambda: spectrum_of(w))
            svd = seconds(lambda: np.linalg.svd(w.double().numpy(), compute_uv=False))
            s = np.linalg.svd(w.double().numpy(), compute_uv=False)
            p = s / s.sum()
            spectrum = spectrum_of(w)
            error = abs(metrics_of(spectrum)["ner"] - float(-(p * np.log(p)).sum() / np.log(len(s))))
            rows.append(
                {
                    "shape": text,
                    "spectrum": "Gaussian" if exponent == 0 else f"i^-{exponent:g}",
                    "condition": float(s[0] / s[-1]),
                    "path": spectrum.path,
                    "mastermerge_s": round(ours, 2),
                    "numpy_svd_float64_s": round(svd, 2),
                    "speedup": round(svd / ours, 2),
                    "ner_abs_error": error,
                }
            )
    machine = f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"
    print(f"Machine: {machine}\n")
    print(
        "| matrix (bf16) | spectrum | condition | path | mastermerge | numpy float64 SVD | speed-up | NER difference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['spectrum']} | {r['condition']:.3g} | {r['path']} | {r['mastermerge_s']} s "
            f"| {r['numpy_svd_float64_s']} s | {r['speedup']}x | {r['ner_abs_error']:.1e} |"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "spectrum_paths.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
