"""Tiny, offline-buildable Hugging Face models for mastermerge tests and examples.

Model merging needs *several* checkpoints that share an architecture: a base model
and a few "fine-tunes" of it.  Downloading real checkpoints is slow and needs a
network, so this module fabricates miniature ones from ``transformers`` config
classes alone (no internet, no hub access):

* :func:`tiny_config` returns a tiny config (hidden size 32 by default, 4 heads,
  2 key/value heads where the family supports GQA, 64 positions) for one of
  :data:`FAMILIES`.
* :func:`build_model` instantiates the model with a fixed seed, optionally starts
  from the weights of a previously built base model and perturbs the 2-D weights
  of its transformer blocks (full-rank Gaussian noise or a random low-rank
  update, optionally on selected layers only) to imitate a fine-tune, then saves
  it with ``save_pretrained`` (safetensors, optionally sharded) together with a
  tiny tokenizer built with the ``tokenizers`` library.
* :func:`build_hub_cache` copies a model directory into a real
  ``huggingface_hub`` cache layout (``blobs/``, ``snapshots/<commit>/`` symlinks,
  ``refs/<revision>``) so that code resolving ``org/name`` repo ids can be tested
  with ``HF_HUB_OFFLINE=1``.

Everything is deterministic: the same arguments give byte-identical
``*.safetensors`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "bert")

# Families whose attention supports grouped-query attention (num_key_value_heads).
GPT2_NAMES = {  # GPT2Config's names for the keys of the other families' configs
    "hidden_size": "n_embd",
    "intermediate_size": "n_inner",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
}
_GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Matches the block index in parameter names of all supported families:
# model.layers.N. (llama/mistral/qwen), transformer.h.N. (gpt2),
# gpt_neox.layers.N. (gpt_neox), encoder.layer.N. (bert).
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")

# Files stored as Git LFS objects on the Hub (blob named by sha256 in the cache).
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_config(
    family: str,
    num_layers: int = 2,
    vocab_size: int = 128,
    *,
    hidden_size: int = 32,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool | None = None,
):
    """Return a tiny ``transformers`` config for ``family``.

    Sizes: ``hidden_size`` (32 by default, must be divisible by 4),
    ``intermediate_size`` (default 4x hidden, 2x for qwen3), 4 attention heads
    (head_dim = hidden_size / 4), 2 key/value heads for the GQA families (llama,
    mistral, qwen2, qwen3), 64 max positions.  qwen2/qwen3 configs get an
    explicit per-layer ``layer_types`` list.  Token ids match
    the tokenizer written by :func:`build_model`: pad=0, bos=1, eos=2 (unk=3).
    ``tie_word_embeddings=None`` keeps the family's default (tied for gpt2 and
    bert, untied for the others).
    """
    _check_family(family)
    import transformers

    if hidden_size % 4:
        raise ValueError("hidden_size must be divisible by the 4 attention heads")
    heads = 4
    head_dim = hidden_size // heads
    positions = 64
    ffn = intermediate_size or hidden_size * (2 if family == "qwen3" else 4)
    extra = {}
    if tie_word_embeddings is not None:
        extra["tie_word_embeddings"] = bool(tie_word_embeddings)

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        pad_token_id=PAD_ID,
        **extra,
    )
    if family == "gpt2":  # the one family with its own key names
        named = {GPT2_NAMES.get(key, key): value for key, value in kwargs.items()}
        return transformers.GPT2Config(**named, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "bert":
        return transformers.BertConfig(**kwargs)
    kwargs.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**kwargs)
    kwargs["num_key_value_heads"] = 2
    if family in ("mistral", "qwen3"):
        kwargs["head_dim"] = head_dim  # Qwen3Config defaults to head_dim=128
    if family in ("qwen2", "qwen3"):
        kwargs["max_window_layers"] = num_layers
        kwargs["layer_types"] = ["full_attention"] * num_layers  # explicit per-layer list in config.json
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    return cls(**kwargs)


# --------------------------------------------------------------------------- tokenizer

_WORDS = (
    "the of and to in is it that for you was with on as have be at not this but from or by "
    "one all we can her there an they his which if will do up so what my out about who get "
    "model merge layer weight base chat code hello world yes no def return print import"
).split()

# GPT-2 byte-level alphabet: printable ASCII maps to itself, space -> "\u0120" ("Ġ"), newline -> "\u010a" ("Ċ").
_SPACE, _NEWLINE = "\u0120", "\u010a"


def _byte_alphabet() -> list[str]:
    lower = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [chr(c) for c in range(ord("0"), ord("9") + 1)]
    punct = list(".,!?:;'\"()[]{}+-*/=<>_#@")
    upper = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    rest = [chr(c) for c in range(33, 127)]
    out: list[str] = []
    for ch in [_SPACE, _NEWLINE, *lower, *digits, *punct, *upper, *rest]:
        if ch not in out:
            out.append(ch)
    return out  # 96 symbols: printable ASCII + space + newline


def tokenizer_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic byte-level BPE vocabulary of exactly ``vocab_size`` entries and its merges.

    Ids 0-3 are ``<pad> <s> </s> <unk>``, then the byte-level symbols of printable
    ASCII, space (``Ġ``) and newline (``Ċ``) (truncated if ``vocab_size`` is small),
    then merged tokens built by merge chains for a few common words
    (``Ġ t`` -> ``Ġt``, ``Ġt h`` -> ``Ġth``, ...) and letter pairs.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}")
    tokens: list[str] = list(SPECIAL_TOKENS)
    tokens += _byte_alphabet()[: vocab_size - len(tokens)]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    candidates = [_SPACE + w for w in _WORDS] + _WORDS + [a + b for a in letters for b in letters]
    for word in candidates:
        if len(tokens) >= vocab_size:
            break
        if not all(ch in known for ch in word):
            continue
        prefix = word[0]
        for ch in word[1:]:
            if len(tokens) >= vocab_size:
                break
            merged = prefix + ch
            if merged not in known:
                merges.append((prefix, ch))
                tokens.append(merged)
                known.add(merged)
            prefix = merged
    if len(tokens) < vocab_size:  # only for absurdly large vocabularies
        tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    return {tok: idx for idx, tok in enumerate(tokens)}, merges


def build_tokenizer(vocab_size: int):
    """Build a tiny byte-level BPE ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` tokens.

    Byte-level BPE (GPT-2 / Qwen2 style) is used rather than WordLevel because
    ``AutoTokenizer`` in transformers 5 rebuilds the tokenizer pipeline for some
    model types (e.g. qwen2 -> ``Qwen2Tokenizer`` = byte-level BPE from the
    vocab and merges); with a byte-level BPE the result is the same either way.
    Characters outside printable ASCII map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = tokenizer_vocab(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=64,
    )


# --------------------------------------------------------------------------- weights


def layer_index(name: str) -> int | None:
    """Block index encoded in a parameter name (``model.layers.3.mlp...`` -> 3), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seed: the perturbation of one tensor does not depend on which
    # other tensors exist or are perturbed (zlib.crc32 is stable across runs,
    # unlike hash()).
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def perturbation(
    name: str, shape: tuple[int, int], scale: float, *, seed: int, rank: int | None = None
) -> torch.Tensor:
    """Deterministic float32 perturbation with element std ~``scale``.

    Full-rank: i.i.d. Gaussian.  ``rank=r``: ``A @ B / sqrt(r)`` with Gaussian
    ``A`` (rows x r) and ``B`` (r x cols), whose entries also have std 1 before
    scaling, but whose matrix rank is ``r``.
    """
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    rows, cols = shape
    if rank is None:
        delta = torch.randn(rows, cols, generator=g, dtype=torch.float32)
    else:
        if rank < 1:
            raise ValueError("noise_rank must be >= 1")
        a = torch.randn(rows, rank, generator=g, dtype=torch.float32)
        b = torch.randn(rank, cols, generator=g, dtype=torch.float32)
        delta = (a @ b) / rank**0.5
    return delta * scale


def perturb_(
    model: torch.nn.Module,
    *,
    seed: int,
    noise: float,
    noise_rank: int | None = None,
    layers: list[int] | None = None,
) -> list[str]:
    """In place: add a perturbation to every 2-D block weight of ``model``.

    The std of the perturbation is ``noise * tensor.std()``.  Only block weights
    (names with a layer index) are touched, optionally only those whose index is
    in ``layers``.  Returns the names of the perturbed parameters.
    """
    wanted = None if layers is None else {int(i) for i in layers}
    touched = []
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            idx = layer_index(name)
            if idx is None or param.dim() != 2 or (wanted is not None and idx not in wanted):
                continue
            std = float(param.detach().float().std())
            if std == 0.0:
                std = 0.02
            delta = perturbation(name, tuple(param.shape), noise * std, seed=seed, rank=noise_rank)
            param.add_(delta.to(param.dtype))
            touched.append(name)
    return touched


def _auto_class(family: str):
    import transformers

    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


def build_model(
    family: str,
    out_dir,
    *,
    seed: int = 0,
    num_layers: int = 2,
    base_dir=None,
    noise: float = 0.0,
    noise_rank: int | None = None,
    layers: list[int] | None = None,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    tokenizer: bool = True,
    tie_word_embeddings: bool | None = None,
    hidden_size: int = 32,
    intermediate_size: int | None = None,
    vocab_size: int = 128,
) -> Path:
    """Build, save and return the directory of a tiny ``family`` model.

    * Without ``base_dir``: ``torch.manual_seed(seed)`` then
      ``AutoModelForCausalLM.from_config`` (``AutoModel`` -> ``BertModel`` for
      bert) on :func:`tiny_config` (``num_layers``, ``hidden_size``,
      ``intermediate_size``, ``vocab_size``, ``tie_word_embeddings``).
    * With ``base_dir``: the architecture comes from ``base_dir/config.json``
      (the size arguments and ``tie_word_embeddings`` are ignored) and the
      weights from its (possibly sharded) safetensors: the "fine-tune" case.
    * If ``noise > 0`` (with or without ``base_dir``) every 2-D weight of the transformer blocks (optionally only
      blocks in ``layers``) gets a perturbation with std ``noise * tensor.std()``,
      full-rank Gaussian or of rank ``noise_rank``, generated from ``seed``.

    The model is cast to ``dtype`` and saved with ``save_pretrained`` (always
    safetensors; sharded with ``model.safetensors.index.json`` when
    ``max_shard_size`` is given, e.g. ``"50KB"``).  Causal LMs also get a
    ``generation_config.json``.  With ``tokenizer=True`` a byte-level BPE tokenizer
    of exactly ``config.vocab_size`` tokens is saved too (:func:`build_tokenizer`).
    """
    _check_family(family)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    import transformers

    out_dir = Path(out_dir)
    auto = _auto_class(family)

    if base_dir is not None:
        base_dir = Path(base_dir)
        config = transformers.AutoConfig.from_pretrained(base_dir)
        if config.model_type != family:
            raise ValueError(f"base model {base_dir} is a {config.model_type!r}, not {family!r}")
    else:
        config = tiny_config(
            family,
            num_layers,
            vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            tie_word_embeddings=tie_word_embeddings,
        )
    torch.manual_seed(seed)
    if base_dir is not None:
        # from_pretrained applies the family's checkpoint key renames (gpt_neox saves its head as embed_out)
        model = auto.from_pretrained(base_dir, dtype=torch.float32)
    else:
        model = auto.from_config(config)
    model = model.to(torch.float32).eval()  # perturb in float32, cast to `dtype` at the end

    if noise:
        perturb_(model, seed=seed, noise=noise, noise_rank=noise_rank, layers=layers)

    model = model.to(_DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_kwargs = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)

    if family != "bert" and not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)

    if tokenizer:
        build_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- hub cache


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(_LFS_SUFFIXES)


def build_hub_cache(hf_home, repo_id: str, model_dir, *, revision: str = "main", write_tree_cache: bool = True) -> str:
    """Copy ``model_dir`` into a real ``huggingface_hub`` cache under ``hf_home/hub``.

    Layout (as written by ``hf_hub_download``)::

        hf_home/hub/models--{org}--{name}/
            blobs/<sha256 for LFS files (*.safetensors, *.bin, ...) | git blob sha1 otherwise>
            snapshots/<commit>/<relative path>  -> relative symlink ../../blobs/<hash>
            refs/<revision>                      (contains <commit>, no newline)
            trees/<commit>.json                  (tree listing, huggingface_hub >= 1.x style; optional)

    The commit hash is deterministic: sha1 of the repo id, the revision and the
    (path, blob hash) list, so different contents get different commits and
    rebuilding the same contents is idempotent.  Point ``HF_HOME`` (or
    ``HF_HUB_CACHE``=``hf_home/hub``) at it and use ``HF_HUB_OFFLINE=1``.
    Returns the commit hash.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NotADirectoryError(model_dir)
    storage = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    blobs = storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    entries: dict[str, dict] = {}
    blob_of: dict[str, str] = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        data = path.read_bytes()
        if _is_lfs(rel):
            digest = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {len(data)}\n"
            entry = {
                "size": len(data),
                "blob_id": _git_blob_sha1(pointer.encode()),
                "lfs_sha256": digest,
                "lfs_size": len(data),
            }
        else:
            digest = _git_blob_sha1(data)
            entry = {"size": len(data), "blob_id": digest}
        blob_path = blobs / digest
        if not blob_path.exists():
            tmp = blob_path.with_suffix(".incomplete")
            tmp.write_bytes(data)
            os.replace(tmp, blob_path)
        entries[rel] = entry
        blob_of[rel] = digest

    manifest = "\n".join(f"{rel} {blob_of[rel]}" for rel in sorted(blob_of))
    commit = hashlib.sha1(f"{repo_id}\n{revision}\n{manifest}".encode()).hexdigest()

    snapshot = storage / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for rel, digest in blob_of.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blobs / digest, link.parent)  # ../../blobs/<hash> (deeper for nested files)
        try:
            os.symlink(target, link)
        except OSError:  # e.g. Windows without symlink privilege: huggingface_hub copies too
            shutil.copyfile(blobs / digest, link)

    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # huggingface_hub writes the hash without a trailing newline

    if write_tree_cache:
        tree = storage / "trees" / f"{commit}.json"
        tree.parent.mkdir(parents=True, exist_ok=True)
        tree.write_text(json.dumps({"format_version": 1, "files": entries}, indent=1, sort_keys=True))
    return commit
