"""Build the tiny example models used by mastermerge's examples and docs.

    python examples/build_examples.py [--out examples/models]

Creates three tiny Llama checkpoints (hidden size 64, 4 layers, vocab 256,
bfloat16, ~0.4 MB each) that share one architecture, so they can be merged:

* ``tiny-base``: the "pretrained" model (seed 0).
* ``tiny-chat``: a fine-tune of tiny-base: full-rank Gaussian noise with std
  0.05 x each tensor's std on every 2-D block weight of all layers (seed 1).
* ``tiny-code``: a fine-tune of tiny-base: a larger rank-2 update (std 0.3 x the
  tensor's std) on layers 1 and 3 and small full-rank noise (0.02) on layers 0
  and 2 (seed 2).

Embeddings, lm_head and norms are identical in all three.  The build is
deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.tiny_models import build_model  # noqa: E402

FAMILY = "llama"
COMMON = dict(num_layers=4, hidden_size=64, intermediate_size=128, vocab_size=256)
DTYPE = "bfloat16"


def build_examples(out: Path) -> dict[str, Path]:
    """Build tiny-base, tiny-chat and tiny-code under ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("tiny-base", "tiny-chat", "tiny-code")}
    for path in paths.values():
        if path.exists():
            shutil.rmtree(path)

    base = build_model(FAMILY, paths["tiny-base"], seed=0, dtype=DTYPE, **COMMON)

    build_model(FAMILY, paths["tiny-chat"], base_dir=base, seed=1, noise=0.05, dtype=DTYPE)

    # tiny-code in two steps: small full-rank noise on layers 0 and 2 (kept in
    # float32 in a scratch dir), then the rank-2 update on layers 1 and 3.
    with tempfile.TemporaryDirectory() as tmp:
        step = build_model(
            FAMILY, Path(tmp) / "step1", base_dir=base, seed=2, noise=0.02, layers=[0, 2], tokenizer=False
        )
        build_model(
            FAMILY, paths["tiny-code"], base_dir=step, seed=2, noise=0.3, noise_rank=2, layers=[1, 3], dtype=DTYPE
        )
    return paths


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "models",
        help="output directory (default: examples/models next to this script)",
    )
    args = parser.parse_args(argv)
    paths = build_examples(args.out)
    total = 0
    for name, path in paths.items():
        size = _dir_size(path)
        total += size
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        print(f"{name:10s} {size / 1024:8.1f} KiB  model.safetensors sha256={digest[:16]}  {path}")
    print(f"{'total':10s} {total / 1024:8.1f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
