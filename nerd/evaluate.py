"""Evaluation: the perplexity of models on texts, so a merge is judged by what the models do.

A causal LM (a class transformers lists as a causal LM: LlamaForCausalLM, GPT2LMHeadModel, ...)
gets the perplexity of the text: exp of the mean negative log-likelihood of every token given the
tokens before it, over all tokens of the text's first `max_tokens` tokens. The text is read in
windows of the model's context (at most max_tokens, or `max_length`); each window starts with BOS
when the tokenizer starts a text with one, and each window after the first starts `stride` tokens
after the previous one (half a window by default), so that every token but those of the first
window is predicted from at least half a window of context. A token is scored once, in the first
window that predicts it (the tokens a window shares with the previous one are context only);
without BOS a window's first token has no context and is scored only where an earlier window
predicted it.

A masked LM with its head (BertForMaskedLM, ...) gets the masked-token perplexity: MASK_SHARE of the
text's tokens, chosen once by a generator seeded with MASK_SEED, are replaced by the mask token
(all of them: the 80/10/10 replacement of pre-training would make the score random), the text is
cut into windows of the model's context with the tokenizer's special tokens around each, and the
score is exp of the mean negative log-likelihood of the true tokens at the masked places. Any
other model class is refused by name.

The log-likelihoods are computed from the logits in float64 and summed over tokens. The model
runs in float32 on a CPU when that fits in half the memory (as the DLEC calibration does), and
only one model is in memory at a time; a composite is built in memory from its plan
(composite.py) without being written. Results are cached by the model's content digest and the
digest of the scored token windows with the dtype and device they ran in: evaluating an unchanged
model again computes nothing.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .composite import (
    composite_model,
    directory_digest,
    loaded_model,
    model_classes,
    model_digest,
    plan_dtype,
    plan_parameters,
    run_dtype,
)
from .config import EvaluateOptions, read_text
from .schema import option_key, option_setting
from .errors import ConfigError, ModelError, first_line
from .plan import Perplexity, Plan
from .windows import IGNORE, Windows, text_windows, window_length

if TYPE_CHECKING:
    import torch

    from .store import MetricCache


@dataclass(frozen=True)
class Subject:
    """One model to evaluate: a directory, or the composite of a plan (built in memory)."""

    name: str
    role: str  # "base", "candidate" or "composite"
    directory: Path  # the model's own directory; for a composite, the base's (config, tokenizer)
    plan: Plan | None = None


def model_config(directory: Path) -> dict:
    """config.json, parsed; ModelError when it is missing, not JSON or not a mapping."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{directory}/config.json: cannot be read as JSON ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{directory}/config.json: expected a JSON object, found {type(config).__name__}")
    return config


def lm_kind(config: dict, directory: Path) -> str:
    """'causal' or 'masked', from the class config.json names; ModelError for any other class."""
    from transformers.models.auto import modeling_auto as auto

    named = (config.get("architectures") or [None])[0]
    if named in set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal"
    if named in set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return "masked"
    if named is None:
        raise ModelError(
            f"{directory}/config.json: names no architectures, so it is not known to be a causal or "
            f"masked language model; evaluate measures the perplexity of those only"
        )
    raise ModelError(
        f"{directory}: {named} is neither a causal LM (...ForCausalLM) nor a masked LM with its head "
        f"(...ForMaskedLM); evaluate measures the perplexity of those only"
    )


def lm_classes(transformers, kind: str, config: dict) -> list:
    """The class config.json names, then the auto class of the kind."""
    return model_classes(
        transformers, config, ("AutoModelForCausalLM",) if kind == "causal" else ("AutoModelForMaskedLM",)
    )


def tokenizer_of(transformers, directory: Path, trust_remote_code: bool):
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, KeyError ... for a missing or broken tokenizer
        raise ModelError(
            f"{directory}: no tokenizer that transformers can load ({first_line(exc)}); "
            f"the perplexity of a text needs the model's own tokenizer"
        ) from None


def summed_nll(model: torch.nn.Module, windows: Windows, kind: str, device, bar, where: str) -> float:
    """The negative log-likelihood of every scored token, summed in float64 (NaN or Inf when the
    model's logits hold them); ModelError naming `where` when the model cannot run a window."""
    import torch

    total = 0.0
    with torch.inference_mode():
        for index, (window, label) in enumerate(zip(windows.inputs, windows.labels)):
            try:
                logits = model(input_ids=torch.tensor([window], device=device)).logits[0]
            except (RuntimeError, IndexError, ValueError) as exc:  # out of memory, positions beyond the model's
                raise ModelError(
                    f"{where}: the model cannot run window {index + 1} ({len(window)} tokens): {first_line(exc)}"
                ) from None
            targets = torch.tensor(label, device=device)
            if kind == "causal":  # position i predicts token i + 1
                logits, targets = logits[:-1], targets[1:]
            keep = targets != IGNORE
            log_p = torch.log_softmax(logits[keep].double(), dim=-1)  # only the scored rows in float64
            total -= float(log_p.gather(1, targets[keep].unsqueeze(1)).sum())
            bar.update()
    return total


def check_vocabulary(tokenizer, model: torch.nn.Module, directory: Path) -> None:
    """The tokenizer's ids must all have a row in the input embedding."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(
            f"{directory}: the tokenizer has {len(tokenizer)} tokens but the input embedding has "
            f"{rows} rows; this tokenizer does not belong to these weights"
        )


def evaluate_subjects(
    subjects: list[Subject], texts: list[Path], options: EvaluateOptions, cache: MetricCache, device, quiet: bool
) -> list[Perplexity]:
    """The perplexity of every subject on every text, one model in memory at a time, from the cache
    where it has them."""
    import transformers

    if quiet:
        transformers.utils.logging.disable_progress_bar()
    names = dict(zip(options.texts, options.names))  # each text as the user wrote it
    contents = [(names[path], read_text(path, options.where, option_key(options, "texts"))) for path in texts]
    rows = []
    for subject in subjects:
        rows += subject_perplexities(transformers, subject, contents, options, cache, device, quiet)
    return rows


def subject_perplexities(
    transformers,
    subject: Subject,
    texts: list[tuple[str, str]],
    options: EvaluateOptions,
    cache: MetricCache,
    device,
    quiet: bool,
) -> list[Perplexity]:
    """One subject's perplexity on every text: its windows, then the cached results or one run."""
    import torch

    directory = subject.directory
    config = model_config(directory)
    if "auto_map" in config and not options.trust_remote_code:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'trust_remote_code')}: {directory}/config.json "
            f"asks for the model's own code (auto_map), which runs only with "
            f"{option_setting(options, 'trust_remote_code', 'true')} (if you trust it)"
        )
    kind = lm_kind(config, directory)
    tokenizer = tokenizer_of(transformers, directory, options.trust_remote_code)
    length = window_length(
        subject.plan.config if subject.plan and subject.plan.config else config, tokenizer, options, directory
    )
    windows = {name: text_windows(tokenizer, kind, text, name, length, options, directory) for name, text in texts}
    model_key = model_digest(subject.plan, cache) if subject.plan else directory_digest(directory, cache)
    dtype = run_dtype(plan_parameters(subject.plan) if subject.plan else checkpoint_parameters(directory), device)
    if dtype == "auto" and subject.plan is not None:  # as written: the output dtype (dtype: float16 ...)
        dtype = plan_dtype(subject.plan)
    keys = {name: w.key(kind, dtype, device) for name, w in windows.items()}
    found = {name: cache.evaluation(model_key, keys[name]) for name in windows}
    model = None
    try:
        for name, w in windows.items():
            if found[name] is not None:
                continue
            if model is None:
                model = subject_model(transformers, subject, config, kind, device, dtype, options)
                check_vocabulary(tokenizer, model, directory)
            started = time.perf_counter()
            label = subject.name if subject.plan else Path(subject.name.split("@")[0].rstrip("/")).name
            with tqdm(total=len(w.inputs), desc=f"{label} | {Path(name).name}", unit="window", disable=quiet) as bar:
                nll = summed_nll(model, w, kind, device, bar, f"{subject.name} on {name}")
            if not math.isfinite(nll):  # NaN or Inf in the logits: no perplexity, and nothing cached
                found[name] = {"nll": None, "tokens": w.tokens, "windows": len(w.inputs), "computed": True}
                continue
            run = {
                "model_ref": subject.name,
                "text_name": name,
                "kind": kind,
                "nll": nll,
                "tokens": w.tokens,
                "windows": len(w.inputs),
                "dtype": str(model.dtype).removeprefix("torch."),
                "device": str(device),
                "seconds": time.perf_counter() - started,
            }
            cache.put_evaluation(model_key, keys[name], run)
            found[name] = run | {"computed": True}
    finally:
        del model
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return [
        Perplexity(
            model=subject.name,
            role=subject.role,
            text=name,
            kind=kind,
            perplexity=perplexity_of(found[name]["nll"], found[name]["tokens"]),
            nll=found[name]["nll"],
            tokens=found[name]["tokens"],
            windows=found[name]["windows"],
            window=w.length,
            stride=w.stride,
            reused="computed" not in found[name],
        )
        for name, w in windows.items()
    ]


def perplexity_of(nll: float | None, tokens: int) -> float | None:
    """exp of the mean NLL; None when there is none or it is beyond a float."""
    try:
        return None if nll is None else math.exp(nll / tokens)
    except OverflowError:
        return None


def subject_model(
    transformers, subject: Subject, config: dict, kind: str, device, dtype, options: EvaluateOptions
) -> torch.nn.Module:
    classes = lm_classes(transformers, kind, config)
    if subject.plan is not None:
        return composite_model(
            transformers,
            subject.plan,
            config,
            classes,
            device,
            dtype,
            options.trust_remote_code,
            "to evaluate its composite",
        )
    model = loaded_model(
        transformers, subject.directory, classes, dtype, options.trust_remote_code, "to evaluate it", complete=True
    )
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model.to(device).eval()


def checkpoint_parameters(directory: Path) -> int:
    from .checkpoint import Checkpoint, numel

    with Checkpoint.open(directory) as checkpoint:
        return sum(numel(info.shape) for info in checkpoint.tensors.values())


def tokenization_notes(rows: list[Perplexity]) -> list[str]:
    """A note per text that the models tokenize differently: their perplexities are per token of
    different vocabularies, so not comparable with each other."""
    notes = []
    for text in dict.fromkeys(r.text for r in rows):
        counts = {r.model: r.tokens for r in rows if r.text == text and r.kind == "causal"}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{Path(m).name} {n}" for m, n in counts.items())
            notes.append(
                f"{Path(text).name}: the models score different numbers of tokens ({shown}); perplexities "
                f"of different tokenizers are not comparable"
            )
    return notes
