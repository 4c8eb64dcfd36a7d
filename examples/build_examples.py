"""Build the example models of mastermerge: a tiny trained Llama and three fine-tunes of it.

    python examples/build_examples.py [--out examples/models] [--texts examples/texts]

Writes four LlamaForCausalLM checkpoints that share one architecture and one tokenizer, so they can
be merged, and the held-out texts to judge a merge by (examples/texts/code.txt, docs.txt, legal.txt):

* ``tiny-base``: 4 layers, hidden 64, MLP 176, 4 heads, a context of 128 tokens, untied lm_head,
  trained for BASE_STEPS steps on a mix of three kinds of text (a third of every batch each);
* ``tiny-code``, ``tiny-docs``, ``tiny-legal``: tiny-base (as saved) trained TUNE_STEPS steps further,
  at a lower learning rate, on one kind of text only.

The text is on every machine with Python and a Debian system: ``code`` is the standard library's
*.py sources as examples/train_tiny.py picks them (the first 2 MB in sorted order); ``docs`` the
English reference documentation pydoc shows (the values of ``pydoc_data.topics.topics``); ``legal``
the license texts of /usr/share/common-licenses (sorted, symbolic links left out). The last
HOLDOUT_CHARS characters of each (from a line start; about 20 KB, 9,400 to 10,600 tokens) are held
out, written to examples/texts/, and never trained on; a training document that contains any
PASSAGE-character passage of them is dropped as well, so that no held-out text is trained on in
another document's copy. That drops two documents, both in docs: the topic "compound", which
repeats the held-out "while" and "with", and the training part of "typesseq", which repeats the
held-out "typesseq-mutable".
The tokenizer is train_tiny.py's byte-level BPE with 512 tokens, trained on the training text of
all three; it starts every text with <s> as a Llama tokenizer does. Everything is seeded and runs
deterministically on 2 threads (train_tiny.deterministic): two builds write byte-identical files.

Built on a 2-core x86-64 machine with Python 3.11.7, torch 2.13.0 (CPU), transformers 5.24.0 and
tokenizers 0.23.3: 210 s of wall time (408 s when another job shared the cores): 9 s of set-up
(reading, tokenizer training, tokenising), 0.22 to 0.24 s a training step, 3 s for the check. The
training loss of tiny-base (first and last batch) fell from 6.25 (ln 512 = 6.24) to 2.66; each
fine-tune's, on its own text, from 2.88 / 2.61 / 2.23 to 2.63 / 2.25 / 1.88 (code / docs / legal). Held-out perplexity (exp of the mean loss over the
text's windows of 128 tokens, each BOS and the next 127 tokens; the models as saved, loaded in
float32), as the check prints it:

    model        code.txt  docs.txt  legal.txt
    tiny-base       30.34     16.33      12.40
    tiny-code       22.79     19.49      19.39
    tiny-docs       47.54     12.83      19.51
    tiny-legal      66.92     27.63      10.44

Each fine-tune is the best of the four on its own text and worse than the base on the others.
The cosine of each fine-tune's block weights with the base's (all 2-D matrices of a block,
flattened and concatenated), depths 0 to 3, stays far above the merge's default gate of 0.5:
tiny-code 0.988 0.988 0.986 0.985, tiny-docs 0.988 0.986 0.984 0.983, tiny-legal 0.987 0.985 0.982
0.980. The four directories hold 2.2 MB (548 KiB each). The script exits with status 1 when a
fine-tune is not the best on its text or a block cosine is below MIN_COSINE.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.train_tiny import (
    CONTEXT,
    build_model,
    deterministic,
    held_out_loss,
    license_files,
    random_windows,
    read_texts,
    save,
    stdlib_files,
    token_stream,
    train,
    train_tokenizer,
)  # noqa: E402

HERE = Path(__file__).resolve().parent
DOMAINS = ("code", "docs", "legal")
BASE = "tiny-base"
NAMES = {domain: f"tiny-{domain}" for domain in DOMAINS}
HOLDOUT_CHARS = 20_000  # the tail of each domain's text, never trained on
PASSAGE, PASSAGE_STEP = 200, 50  # a training document holding a held-out passage of PASSAGE characters is dropped
VOCAB = 512
HIDDEN, INTERMEDIATE = 64, 176
BATCH = 30  # sequences per step (a third from each domain for the base)
BASE_STEPS, BASE_LR, BASE_WARMUP = 400, 3e-3, 30
TUNE_STEPS, TUNE_LR, TUNE_WARMUP = 150, 1e-3, 10
SEED = 0
MIN_COSINE = 0.8  # the fine-tunes' blocks must stay this close to the base's (the merge's gate is 0.5)


def domain_documents() -> dict[str, list[str]]:
    """Each domain's documents, in a fixed order."""
    from pydoc_data.topics import topics

    return {
        "code": read_texts(stdlib_files()),  # the stdlib sources train_tiny.py trains on
        "docs": list(topics.values()),  # the reference manual's topics, as pydoc shows them
        "legal": read_texts(license_files()),
    }


def split(documents: list[str]) -> tuple[list[str], str, int]:
    """The training documents, the held-out text (the last HOLDOUT_CHARS characters and the rest of
    the line they start in) and how many documents were dropped because they hold a passage of the held-out text."""
    documents, tail, need = list(documents), [], HOLDOUT_CHARS
    while need > 0:
        document = documents.pop()
        if len(document) > need:
            cut = document.rfind("\n", 0, len(document) - need) + 1  # a line start
            documents.append(document[:cut])
            document = document[cut:]
        tail.insert(0, document)
        need -= len(document)
    held_out = "".join(tail)
    passages = {held_out[i : i + PASSAGE] for i in range(0, len(held_out) - PASSAGE + 1, PASSAGE_STEP)}
    kept = [d for d in documents if d and not any(p in d for p in passages)]
    return kept, held_out, sum(1 for d in documents if d) - len(kept)


def eval_windows(tokenizer, text: str) -> torch.Tensor:
    """The text's tokens as consecutive windows of CONTEXT tokens, each BOS and the next CONTEXT - 1
    tokens (the tail that fills no window is left out)."""
    ids = tokenizer.backend_tokenizer.encode(text).ids
    assert ids[0] == tokenizer.bos_token_id, "the tokenizer adds BOS"
    body, n = ids[1:], CONTEXT - 1
    return torch.tensor([[ids[0], *body[i : i + n]] for i in range(0, len(body) - n + 1, n)])


def block_cosines(model: Path, base: Path) -> list[float]:
    """Per depth: the cosine of the model's 2-D block weights with the base's, all flattened and
    concatenated (the merge's compatibility measure)."""
    from safetensors.torch import load_file

    tensors, reference = load_file(model / "model.safetensors"), load_file(base / "model.safetensors")
    cosines, depth = [], 0
    while names := sorted(k for k in tensors if k.startswith(f"model.layers.{depth}.") and tensors[k].dim() == 2):
        a = torch.cat([tensors[k].double().flatten() for k in names])
        b = torch.cat([reference[k].double().flatten() for k in names])
        cosines.append(float(a @ b / (a.norm() * b.norm())))
        depth += 1
    return cosines


def perplexities(paths: dict[str, Path], texts: dict[str, str]) -> dict[str, dict[str, float]]:
    """exp of the mean loss over each text's windows, for each model as saved (loaded in float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = {}
    for name, path in paths.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer("text")["input_ids"][0] == tokenizer.bos_token_id
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        table[name] = {d: math.exp(held_out_loss(model, [eval_windows(tokenizer, t)])) for d, t in texts.items()}
    return table


def build_examples(out: Path, texts_dir: Path = HERE / "texts") -> dict[str, Path]:
    """Write the held-out texts and build tiny-base and its fine-tunes under `out`; return their paths."""
    started = time.perf_counter()
    out, texts_dir = Path(out), Path(texts_dir)
    paths = {name: out / name for name in (BASE, *NAMES.values())}
    for path in paths.values():
        if path.exists():
            shutil.rmtree(path)
    texts_dir.mkdir(parents=True, exist_ok=True)
    deterministic(SEED)

    training = {}
    for domain, documents in domain_documents().items():
        training[domain], held_out, dropped = split(documents)
        (texts_dir / f"{domain}.txt").write_text(held_out, encoding="utf-8")
        print(
            f"{domain}: {len(training[domain])} training documents ({sum(map(len, training[domain])):,} "
            f"characters; {dropped} dropped for holding held-out text), {len(held_out):,} held out"
        )
    tokenizer = train_tokenizer([t for domain in DOMAINS for t in training[domain]], VOCAB, CONTEXT, add_bos=True)
    streams = {domain: token_stream(tokenizer, training[domain]) for domain in DOMAINS}
    bos = tokenizer.bos_token_id
    print(f"tokens: {', '.join(f'{d} {len(s):,}' for d, s in streams.items())} ({time.perf_counter() - started:.0f} s)")

    base = build_model(tokenizer, HIDDEN, INTERMEDIATE)
    g = torch.Generator().manual_seed(SEED)
    train(
        base,
        lambda: torch.cat([random_windows(streams[d], BATCH // len(DOMAINS), g, bos=bos) for d in DOMAINS]),
        BASE_STEPS,
        BASE_LR,
        BASE_WARMUP,
        started,
        f"{BASE} ",
    )
    save(base, tokenizer, paths[BASE])
    for index, domain in enumerate(DOMAINS, start=1):
        tuned = copy.deepcopy(base).float()  # from the base as saved
        g = torch.Generator().manual_seed(SEED + index)
        train(
            tuned,
            lambda: random_windows(streams[domain], BATCH, g, bos=bos),
            TUNE_STEPS,
            TUNE_LR,
            TUNE_WARMUP,
            started,
            f"{NAMES[domain]} ",
        )
        save(tuned, tokenizer, paths[NAMES[domain]])
    print(f"trained in {time.perf_counter() - started:.0f} s")
    return paths


def check(paths: dict[str, Path], texts_dir: Path) -> list[str]:
    """Print the held-out perplexities and the block cosines; return what falls short of the aims."""
    texts = {domain: (texts_dir / f"{domain}.txt").read_text(encoding="utf-8") for domain in DOMAINS}
    table = perplexities(paths, texts)
    problems = []
    print("held-out perplexity " + "".join(f"{d:>9s}" for d in DOMAINS))
    for name, row in table.items():
        print(f"{name:20s}" + "".join(f"{row[d]:9.2f}" for d in DOMAINS))
    for domain, name in NAMES.items():
        best = min(table, key=lambda m: table[m][domain])
        if best != name:
            problems.append(f"{best}, not {name}, has the lowest perplexity on {domain}.txt")
        cosines = block_cosines(paths[name], paths[BASE])
        print(f"cosine with {BASE} per depth, {name}: " + " ".join(f"{c:.3f}" for c in cosines))
        if min(cosines) < MIN_COSINE:
            problems.append(f"{name} drifted: a block cosine of {min(cosines):.3f} < {MIN_COSINE}")
    return problems


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "models",
        help="output directory (default: examples/models next to this script)",
    )
    parser.add_argument(
        "--texts",
        type=Path,
        default=HERE / "texts",
        help="where the held-out texts go (default: examples/texts next to this script)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = build_examples(args.out, args.texts)
    problems = check(paths, args.texts)
    total = 0
    for name, path in paths.items():
        size = _dir_size(path)
        total += size
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        print(f"{name:10s} {size / 1024:8.1f} KiB  model.safetensors sha256={digest[:16]}  {path}")
    print(f"{'total':10s} {total / 1024:8.1f} KiB; built and checked in {time.perf_counter() - started:.0f} s")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
