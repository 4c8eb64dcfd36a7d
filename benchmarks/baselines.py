"""The baselines mastermerge's analysis is measured against, each run in a process of its own:

    python benchmarks/baselines.py gemm                 # the machine's float64 GEMM rate (GFLOP/s)
    python benchmarks/baselines.py bare MODEL_DIR       # float64 Gram (general product) + eigvalsh, torch
    python benchmarks/baselines.py syrk MODEL_DIR       # float64 Gram (symmetric update) + eigvalsh, numpy
    python benchmarks/baselines.py svdvals MODEL_DIR    # torch.linalg.svdvals per matrix (float32)

Each prints one JSON line: the seconds of the work itself (weights already in memory, so reading
is not counted), the nominal float64 work of every 2-D matrix, 2 m k^2 for the Gram matrix as a
general product plus 4/3 k^3 for the eigenvalues (k the shorter side), and the work actually
executed with a symmetric rank-k update, m k^2 + 4/3 k^3.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def matrices(directory: Path) -> list[torch.Tensor]:
    """Every 2-D tensor of the model, as stored (bf16), tall (m >= k)."""
    out = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                w = handle.get_tensor(name)
                if w.dim() == 2:
                    out.append(w if w.shape[0] >= w.shape[1] else w.T.contiguous())
    return out


def nominal_flops(shapes: list[tuple[int, int]]) -> float:
    return sum(2 * m * k * k + 4 / 3 * k**3 for m, k in shapes)


def syrk_flops(shapes: list[tuple[int, int]]) -> float:
    return sum(m * k * k + 4 / 3 * k**3 for m, k in shapes)


def gemm_rate() -> float:
    """Best GFLOP/s of a 4096 x 4096 float64 product, torch or numpy, best of three each."""
    a = torch.randn(4096, 4096, dtype=torch.float64)
    rates = []
    for product in (lambda: a @ a, lambda: a.numpy() @ a.numpy()):
        product()
        for _ in range(3):
            start = time.perf_counter()
            product()
            rates.append(2 * 4096**3 / (time.perf_counter() - start) / 1e9)
    return max(rates)


def run(kind: str, directory: Path) -> dict:
    ws = matrices(directory)
    start = time.perf_counter()
    for w in ws:
        if kind == "bare":
            x = w.to(torch.float64)
            torch.linalg.eigvalsh(x.T @ x)
        elif kind == "syrk":
            x = w.to(torch.float32).numpy().astype(np.float64)
            np.linalg.eigvalsh(x.T @ x)
        elif kind == "svdvals":
            torch.linalg.svdvals(w.to(torch.float32))
    seconds = time.perf_counter() - start
    shapes = [tuple(w.shape) for w in ws]
    return {"seconds": seconds, "matrices": len(ws), "flops": nominal_flops(shapes), "syrk_flops": syrk_flops(shapes)}


if __name__ == "__main__":
    what = sys.argv[1]
    result = (
        {"gflops": gemm_rate(), "torch": torch.__version__, "numpy": np.__version__}
        if what == "gemm"
        else run(what, Path(sys.argv[2]))
    )
    print(json.dumps(result))
