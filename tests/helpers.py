"""Reference helpers shared by the end-to-end tests: read what was written with the safetensors
library, compute NER with numpy's float64 SVD and perplexity with transformers' own loss,
independently of mastermerge's code."""

import math
from pathlib import Path

import numpy as np
import torch
import transformers
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


def transformers_perplexity(directory: Path, windows, kind: str) -> float:
    """exp of the mean loss per scored token, from the loss transformers itself computes for each
    window (labels -100 where nothing is scored; a causal LM shifts them itself)."""
    cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForMaskedLM
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in zip(windows.inputs, windows.labels):
            scored = sum(label != -100 for label in (labels[1:] if kind == "causal" else labels))
            loss = model(input_ids=torch.tensor([inputs]), labels=torch.tensor([labels])).loss
            total += float(loss) * scored
            count += scored
    return math.exp(total / count)
