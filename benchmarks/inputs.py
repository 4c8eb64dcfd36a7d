"""Benchmark inputs, built offline: Llama-shaped bf16 checkpoints of any size, and fine-tunes of them.

    python benchmarks/inputs.py WORK_DIR [--7b-block]   # builds what run.py needs, prints them as JSON

A checkpoint is a directory with config.json (LlamaForCausalLM) and model.safetensors, its weights
Gaussian with std 0.02 (norms 1), or, with `spectrum`, every matrix with power-law singular values
s_i ~ i^-exponent and random singular vectors (the shape of trained spectra: condition number
about k^exponent, 100 for the 2048-wide matrices of LLAMA_TRAINED at exponent 0.6). A fine-tune
is the base plus Gaussian noise of `noise` times the std of each block matrix, so the candidates
of a merge share one base, as real fine-tunes do. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped architecture."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, in checkpoint order."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (self.hidden,),
                p + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                p + "self_attn.k_proj.weight": (kv, self.hidden),
                p + "self_attn.v_proj.weight": (kv, self.hidden),
                p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                p + "post_attention_layernorm.weight": (self.hidden,),
                p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
            }
        return shapes | {"model.norm.weight": (self.hidden,), "lm_head.weight": (self.vocab, self.hidden)}

    def parameters(self) -> int:
        return sum(torch.Size(s).numel() for s in self.tensors().values())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


# 0.39B parameters: the Llama-shaped checkpoint the issue measured weightwatcher on
LLAMA_390M = Shape(layers=24, hidden=1024, intermediate=2816, vocab=32000, heads=16, kv_heads=16)
# half as deep: the second size of the memory check
LLAMA_200M = Shape(layers=12, hidden=1024, intermediate=2816, vocab=32000, heads=16, kv_heads=16)
# the trained-spectra checkpoint: 0.39B, hidden 2048, MLP 5632, power-law spectra
LLAMA_TRAINED = Shape(layers=5, hidden=2048, intermediate=5632, vocab=32000, heads=16, kv_heads=16)
TRAINED_EXPONENT = 0.6
# one block of a 7B Llama (4096 x 4096 attention, 4096 x 11008 MLP), no embeddings worth the name
LLAMA_7B_BLOCK = Shape(layers=1, hidden=4096, intermediate=11008, vocab=256, heads=32, kv_heads=32)


def power_law_matrix(shape: tuple[int, ...], exponent: float, g: torch.Generator) -> torch.Tensor:
    """A matrix with singular values ~ i^-exponent (scaled to an entry std of 0.02) and random
    orthonormal singular vectors."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -exponent
    s *= 0.02 * (m * n) ** 0.5 / s.norm()  # the Frobenius norm of a Gaussian matrix of std 0.02
    return (u * s) @ v.T


def build(
    directory: Path,
    shape: Shape,
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.0,
    spectrum: float | None = None,
) -> Path:
    """Write the checkpoint (or, with `base`, a fine-tune of it) unless it is already there; with
    `spectrum`, every matrix has power-law singular values of that exponent."""
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        from safetensors.torch import load_file

        state = load_file(str(base / "model.safetensors"))
        for name, w in state.items():
            if ".layers." in name and w.dim() == 2:
                w = w.float()
                state[name] = (w + torch.randn(w.shape, generator=g) * (noise * w.std())).to(torch.bfloat16)
    else:

        def matrix(s):
            return torch.randn(s, generator=g) * 0.02 if spectrum is None else power_law_matrix(s, spectrum, g)

        state = {
            name: (torch.ones(s) if len(s) == 1 else matrix(s)).to(torch.bfloat16)
            for name, s in shape.tensors().items()
        }
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    return directory


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--7b-block", dest="block", action="store_true")
    args = parser.parse_args()
    base = build(args.work / "llama-390m", LLAMA_390M, seed=0)
    built = {
        "base": (base, LLAMA_390M),
        "ft1": (build(args.work / "llama-390m-ft1", LLAMA_390M, seed=1, base=base, noise=0.02), LLAMA_390M),
        "ft2": (build(args.work / "llama-390m-ft2", LLAMA_390M, seed=2, base=base, noise=0.02), LLAMA_390M),
        "small": (build(args.work / "llama-200m", LLAMA_200M, seed=3), LLAMA_200M),
    }
    trained = build(args.work / "llama-trained", LLAMA_TRAINED, seed=5, spectrum=TRAINED_EXPONENT)
    built |= {
        "trained": (trained, LLAMA_TRAINED),
        "trained_ft1": (
            build(args.work / "llama-trained-ft1", LLAMA_TRAINED, seed=6, base=trained, noise=0.02),
            LLAMA_TRAINED,
        ),
        "trained_ft2": (
            build(args.work / "llama-trained-ft2", LLAMA_TRAINED, seed=7, base=trained, noise=0.02),
            LLAMA_TRAINED,
        ),
    }
    if args.block:
        built["block_7b"] = (build(args.work / "llama-7b-block", LLAMA_7B_BLOCK, seed=4), LLAMA_7B_BLOCK)
    json.dump(
        {
            name: {
                "path": str(path),
                "parameters": shape.parameters(),
                "largest_tensor_bytes": 2 * max(torch.Size(s).numel() for s in shape.tensors().values()),
            }
            for name, (path, shape) in built.items()
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
