"""Token windows: how a text is cut into the windows a model is scored on (evaluate.py).

A causal LM's windows have the model's context (at most max_tokens, or `max_length`), each
starting with BOS when the tokenizer starts a text with one, each after the first starting
`stride` tokens after the previous one (half a window by default); a token is scored once, in the
first window that predicts it. A masked LM's windows carry the tokenizer's special tokens around
the text, with a share MASK_SHARE of the text's tokens, chosen once by a generator seeded with
MASK_SEED, replaced by the mask token and scored. `labels` mark what is scored as transformers'
`labels` do (IGNORE elsewhere).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .architecture import family_of
from .errors import ConfigError, ModelError
from .config import EvaluateOptions
from .schema import option_key

MASK_SHARE = 0.15
MASK_SEED = 0
IGNORE = -100  # transformers' label for a position that is not scored


@dataclass(frozen=True)
class Windows:
    """Token windows of one text for one model: the inputs and, per position, the token it is scored
    on (IGNORE where nothing is scored), as transformers' `labels` are."""

    inputs: list[list[int]]
    labels: list[list[int]]
    length: int  # the window length
    stride: int | None  # tokens from one window's start to the next (None for a masked LM: no overlap)

    @property
    def tokens(self) -> int:
        return sum(label != IGNORE for window in self.labels for label in window)

    def key(self, kind: str, dtype, device) -> str:
        """What a cached result depends on besides the weights: the windows and how they ran."""
        import torch
        import transformers

        return hashlib.sha256(
            json.dumps(
                [kind, self.inputs, self.labels, str(dtype), torch.device(device).type, transformers.__version__]
            ).encode()
        ).hexdigest()


def window_length(config: dict, tokenizer, options: EvaluateOptions, directory: Path) -> int:
    """The model's context (config.json, or the tokenizer's model_max_length when shorter: RoBERTa's
    514 positions hold 512 tokens), at most max_tokens; or max_length, which must fit the context."""
    section = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    keys = family_of(config).context_keys
    contexts = [section[k] for k in keys if isinstance(section.get(k), int) and section[k] > 1][:1]
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 1 < limit < 10**6:  # transformers' "no limit" is about 1e30
        contexts = [min(contexts + [limit])]
    if options.max_length is not None:
        if contexts and options.max_length > contexts[0]:
            raise ConfigError(
                f"{options.where}: {option_key(options, 'max_length')}: {options.max_length} is longer "
                f"than the context of {directory} ({contexts[0]} tokens)"
            )
        return options.max_length
    if not contexts:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'max_length')}: {directory}/config.json gives no "
            f"context length ({', '.join(keys)}); give the window length"
        )
    return min(contexts[0], options.max_tokens)


def causal_windows(ids: list[int], bos: int | None, length: int, stride: int | None) -> Windows:
    """Windows of `length` tokens over `ids` (the text without BOS), each starting with `bos` when
    it is not None, advancing by `stride` (default half the window's text); every token scored once."""
    prefix = [] if bos is None else [bos]
    span = length - len(prefix)
    step = stride or max(1, span // 2)
    inputs, labels, scored = [], [], 0 if prefix else 1  # without BOS the first token has no context
    for begin in range(0, len(ids), step):
        end = min(begin + span, len(ids))
        window = prefix + ids[begin:end]
        first = len(prefix) + max(scored - begin, 0)  # the window's first position not scored before
        first = max(first, 1)
        inputs.append(window)
        labels.append([IGNORE] * first + window[first:])
        scored = end
        if end == len(ids):
            break
    return Windows(inputs, labels, length, step)


def masked_windows(ids: list[int], mask: int, wrapping: tuple[list[int], list[int]], length: int) -> Windows:
    """Windows of the text (the tokenizer's special tokens around each, `length` in all, no overlap)
    with a seeded MASK_SHARE of its tokens masked and scored."""
    positions = np.random.default_rng(MASK_SEED).choice(
        len(ids), size=max(1, round(MASK_SHARE * len(ids))), replace=False
    )
    masked = np.zeros(len(ids), dtype=bool)
    masked[positions] = True
    prefix, suffix = wrapping
    span = length - len(prefix) - len(suffix)
    inputs, labels = [], []
    for begin in range(0, len(ids), span):
        chunk = range(begin, min(begin + span, len(ids)))
        inputs.append(prefix + [mask if masked[j] else ids[j] for j in chunk] + suffix)
        labels.append(
            [IGNORE] * len(prefix) + [ids[j] if masked[j] else IGNORE for j in chunk] + [IGNORE] * len(suffix)
        )
    return Windows(inputs, labels, length, None)


def text_windows(
    tokenizer, kind: str, text: str, text_name: str, length: int, options: EvaluateOptions, directory: Path
) -> Windows:
    """The text's first max_tokens tokens in windows for this model; ConfigError for a text shorter
    than one window, a stride longer than a window's text; ModelError for a masked LM's tokenizer
    without a mask token."""
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])[: options.max_tokens]
    prefix, suffix = special_wrapping(tokenizer)
    if kind == "causal":  # a causal window is [BOS] + text when the tokenizer starts texts with BOS
        bos = getattr(tokenizer, "bos_token_id", None)
        prefix, suffix = ([bos] if bos is not None and prefix[-1:] == [bos] else []), []
    needed = length - len(prefix) - len(suffix)
    if len(ids) < needed:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'texts')}: {text_name} gives {len(ids)} tokens "
            f"with the tokenizer of {directory}, fewer than one window of {length} tokens; give a "
            f"longer text or a shorter {option_key(options, 'max_length')}"
        )
    if kind == "masked":
        if tokenizer.mask_token_id is None:
            raise ModelError(f"{directory}: the tokenizer has no mask token, which a masked LM's perplexity needs")
        return masked_windows(ids, tokenizer.mask_token_id, (prefix, suffix), length)
    longest = needed if prefix else needed - 1  # without BOS a window's first token is scored only as context
    if options.stride is not None and options.stride > longest:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'stride')}: {options.stride} would leave tokens "
            f"unscored; at most {longest} with windows of {length} tokens"
            + ("" if prefix else " (the tokenizer adds no BOS, so windows must overlap)")
        )
    return causal_windows(ids, prefix[0] if prefix else None, length, options.stride)


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([BOS], or [CLS] and [SEP])."""
    sample = "a b"
    body = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(sample, verbose=False)["input_ids"]
    for i in range(len(full) - len(body) + 1):
        if full[i : i + len(body)] == body:
            return full[:i], full[i + len(body) :]
    return [], []
