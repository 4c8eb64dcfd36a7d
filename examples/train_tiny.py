"""Train a tiny Llama on text every Linux machine with Python has, for real trained spectra.

    python examples/train_tiny.py OUT_DIR [--steps 300] [--seed 0] [--licenses]

Random and synthetic weights make poor test inputs for a tool that scores singular-value
spectra: trained matrices are ill-conditioned, with power-law spectra, and a Gaussian matrix is
not. This script trains a small LlamaForCausalLM (4 layers, hidden 128, MLP 352, 4 heads, a
byte-level BPE vocabulary of 1024 tokens trained with the `tokenizers` library on the same text)
on the Python standard library's own sources: the first CORPUS_BYTES of its *.py files in sorted
order (`sysconfig.get_paths()["stdlib"]`, site-packages left out). With `--licenses` the license
texts of /usr/share/common-licenses are added when the directory exists; they are never needed.
The last HOLDOUT_FILES files are held out: the losses printed before and after training are
measured on them. Everything is seeded and runs on TORCH_THREADS threads with
`torch.use_deterministic_algorithms(True)`, so a second run with the same Python, torch and
arguments writes the same weights. OUT_DIR gets a complete model directory written by
`save_pretrained` (config.json, model.safetensors in bfloat16, generation_config.json,
tokenizer.json, tokenizer_config.json) that loads with AutoModelForCausalLM and AutoTokenizer.

The copy shipped in tests/data/trained-llama/ (2.2 MB) was built on a 2-core x86-64 machine with
Python 3.11.7, torch 2.13.0 (CPU), transformers 5.24.0 and tokenizers 0.23.3 by

    python examples/train_tiny.py tests/data/trained-llama --steps 300 --seed 0

Its held-out loss fell from 6.937 (ln 1024 = 6.931: a uniform guess) to 3.214 nats per token
(training loss 3.06 at the last step). That run took 734 s of wall time because the machine was
shared (load average 4 to 5 on its 2 cores); on free cores a step takes 0.34 s and the set-up
(tokenizer training, tokenising 2 MB) about 15 s, so a run takes about 2 minutes. Three runs of it, each under
another load, wrote byte-identical model.safetensors files.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

CORPUS_BYTES = 2_000_000  # of stdlib sources: the first files in sorted order up to this size
HOLDOUT_FILES = 8  # the last files of the corpus, held out to measure the loss
LICENSE_DIR = Path("/usr/share/common-licenses")
VOCAB = 1024
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3
CONTEXT = 128  # tokens per training sequence
BATCH = 32  # sequences per step
LEARNING_RATE = 3e-3
WARMUP = 30  # steps of linear warm-up before the cosine decay
TORCH_THREADS = 2
EVAL_BATCHES = 4  # held-out batches of BATCH sequences for the printed losses


def stdlib_files(limit: int = CORPUS_BYTES) -> list[Path]:
    """The standard library's *.py files, sorted by their path inside it, up to `limit` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.parts), key=lambda p: p.relative_to(root).as_posix()
    ):
        if total >= limit:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def license_files() -> list[Path]:
    """The license texts of LICENSE_DIR, sorted; its symbolic links (GPL -> GPL-3, ...) are left out, so
    no text comes twice. None without the directory."""
    if not LICENSE_DIR.is_dir():
        return []
    return [p for p in sorted(LICENSE_DIR.iterdir()) if p.is_file() and not p.is_symlink()]


def read_texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def corpus(licenses: bool) -> tuple[list[str], list[str]]:
    """The training texts and the held-out ones (the last HOLDOUT_FILES stdlib files)."""
    texts = read_texts(stdlib_files())
    train, held_out = texts[:-HOLDOUT_FILES], texts[-HOLDOUT_FILES:]
    if licenses:
        train += read_texts(license_files())
    return train, held_out


def train_tokenizer(texts: list[str], vocab: int = VOCAB, context: int = CONTEXT, add_bos: bool = False):
    """A byte-level BPE tokenizer of `vocab` tokens trained on the texts, as a transformers tokenizer.
    With `add_bos` it starts every encoded text with <s>, as a Llama tokenizer does ("<s> $A", a pair
    "<s> $A <s> $B")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    pad, bos, eos, unk = SPECIAL_TOKENS
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk, model_max_length=context
    )


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one stream of token ids, each text ended by </s>."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += encoding.ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build_model(tokenizer, hidden_size: int = 128, intermediate_size: int = 352, context: int = CONTEXT):
    """A freshly initialised tiny LlamaForCausalLM of 4 layers and 4 heads (the global torch seed decides
    its weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def windows(stream: torch.Tensor, starts: torch.Tensor, context: int = CONTEXT, bos: int | None = None) -> torch.Tensor:
    """Sequences of `context` tokens of the stream from each start; with `bos`, each is that token and
    the stream's next context - 1 tokens."""
    if bos is None:
        return torch.stack([stream[s : s + context] for s in starts.tolist()])
    head = torch.tensor([bos], dtype=stream.dtype)
    return torch.stack([torch.cat([head, stream[s : s + context - 1]]) for s in starts.tolist()])


def random_windows(
    stream: torch.Tensor, count: int, generator: torch.Generator, context: int = CONTEXT, bos: int | None = None
) -> torch.Tensor:
    """`count` windows of the stream at starts drawn uniformly by the generator."""
    return windows(stream, torch.randint(0, len(stream) - context, (count,), generator=generator), context, bos)


@torch.no_grad()
def held_out_loss(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over the held-out batches."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def learning_rate(step: int, steps: int, peak: float = LEARNING_RATE, warmup: int = WARMUP) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to a tenth of `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def deterministic(seed: int) -> None:
    """Seed torch and make it repeatable: TORCH_THREADS threads, deterministic algorithms."""
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def train(
    model,
    next_batch,
    steps: int,
    peak: float = LEARNING_RATE,
    warmup: int = WARMUP,
    started: float | None = None,
    label: str = "",
) -> float:
    """`steps` steps of AdamW (betas 0.9, 0.95, weight decay 0.1, gradients clipped to norm 1) on the
    batches `next_batch()` returns, at the learning_rate schedule; returns the last training loss."""
    started = time.perf_counter() if started is None else started
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak, warmup)
        batch = next_batch()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"{label}step {step:4d}  training loss {loss.item():.4f}  ({time.perf_counter() - started:.0f} s)")
    return loss.item()


def save(model, tokenizer, out: Path) -> None:
    """The model in bfloat16 (converted in place) and the tokenizer, by save_pretrained."""
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model directory to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--licenses", action="store_true", help="also train on /usr/share/common-licenses")
    args = parser.parse_args()
    started = time.perf_counter()
    deterministic(args.seed)

    train_texts, held_out_texts = corpus(args.licenses)
    tokenizer = train_tokenizer(train_texts)
    train_stream, held_out = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_out_texts)
    print(
        f"corpus: {sum(map(len, train_texts)):,} characters, {len(train_stream):,} training tokens, "
        f"{len(held_out):,} held-out tokens, vocabulary {len(tokenizer)}"
    )

    model = build_model(tokenizer)
    g = torch.Generator().manual_seed(args.seed)
    eval_batches = [random_windows(held_out, BATCH, g) for _ in range(EVAL_BATCHES)]
    before = held_out_loss(model, eval_batches)
    print(f"held-out loss before training: {before:.4f} (ln {len(tokenizer)} = {math.log(len(tokenizer)):.4f})")

    train(model, lambda: random_windows(train_stream, BATCH, g), args.steps, started=started)

    after = held_out_loss(model, eval_batches)
    print(f"held-out loss after {args.steps} steps: {after:.4f} (before: {before:.4f})")
    save(model, tokenizer, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
