"""Reference helpers shared by the end-to-end tests: read what was written with the safetensors
library, and compute NER with numpy's float64 SVD, independently of mastermerge's code."""

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory, read with the safetensors library."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def reference_ner(w: torch.Tensor) -> float:
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(s)))
