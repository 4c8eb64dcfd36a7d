"""Layer importance for DLEC: how much each transformer block matters, from activations or weights.

Activation importance runs a calibration text (the user's file, or the built-in calibration.txt)
through the model with transformers, in windows of up to 512 tokens (fewer if the model's context
is shorter), each starting like a document (with BOS when the tokenizer adds one), and hooks
every block to see its input and output hidden states at every token position. Per block it
keeps a few sums (LayerStats), stored in the metric cache's SQLite file so a second run with the
same model and text runs nothing. The scores, higher meaning more important:

- block_influence: 1 - the mean over token positions of cos(block input, block output), the
  Block Influence of ShortGPT (Men et al., 2024): a block that barely turns the hidden state
  contributes little.
- heavy_tail: the share of the block's output activations more than 3 standard deviations from
  their token's mean (z-scores over the hidden dimensions of each position): the original DLEC
  statistic, over every position instead of position 0 and with a fixed cut instead of a
  histogram-derived one.
- ner: the mean NER of the block's 2-D matrices, from the weights alone (no transformers needed).
- none: nothing is measured; the default when the blocks to copy are named (`layers`).

The model runs from the base's directory with transformers (trust_remote_code only when the
options say so); tensors a merge takes from other candidates are copied into it first
(composite.py), so the scores are those of the composite that will be written. Only the backbone
runs (the LM head's logits are not needed). On a CPU it runs in float32 when that fits in half the
available memory: CPUs multiply bf16/fp16 several times slower (6.4 s against 1.0 s per 512-token
window of a 160M-parameter bf16 Llama on 2 cores); on a GPU, and on a CPU short of memory, in the
stored dtype.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .architecture import family_of
from .checkpoint import opened_checkpoints, torch_dtype
from .composite import blend_key, composite_model, model_classes, model_digest, plan_parameters, run_dtype
from .config import DlecOptions, read_text
from .engine import Engine, Executor, LocalExecutor, Work
from .schema import option_key, option_setting
from .errors import ConfigError, ModelError, first_line
from .layout import Layout
from .metrics import every_metric
from .plan import Plan
from .spectra import spectrum_of
from .tether import blended_tensor
from .threads import limited_threads

if TYPE_CHECKING:
    import torch

    from .store import MetricCache

TAIL_Z = 3.0
WINDOW = 512
BUILT_IN_TEXT = Path(__file__).with_name("calibration.txt")
IMPORTANCE_LABELS = {
    "block_influence": "block influence (1 - mean cos(block input, output))",
    "heavy_tail": "heavy-tail share (|z| > 3 in the block output)",
    "ner": "mean NER of the block's matrices",
    "none": "not measured (the blocks to copy were named)",
}
FEW_TOKENS = 64  # a calibration text shorter than this gets a warning with its scores (README: Layer expansion)


@dataclass(frozen=True)
class LayerStats:
    """What the calibration run measured at one block, as sums over every token position (a change
    to what they measure bumps store.ACTIVATION_VERSION)."""

    tokens: int
    cos_sum: float  # sum of cos(input, output)
    tail_count: int  # output entries with |z| > TAIL_Z
    entries: int  # output entries seen (tokens x hidden size)
    update_sum: float  # sum of |output - input| / |input|

    def score(self, kind: str) -> float | None:
        if not self.tokens:
            return None
        if kind == "block_influence":
            return 1.0 - self.cos_sum / self.tokens
        return self.tail_count / self.entries


@dataclass(frozen=True)
class Importance:
    """One score per block (by depth), what they were computed from, and whether the cache had them."""

    kind: str
    scores: list[float | None]
    basis: str
    note: str | None = None
    reused: bool = False


def layer_importance(
    plan: Plan,
    layout: Layout,
    options: DlecOptions,
    cache: MetricCache,
    device: torch.device | str,
    quiet: bool,
    executor: Executor | None = None,
) -> Importance:
    """Every block's importance, by the kind the options ask for (see the module docstring)."""
    kind, note = importance_kind(options)
    if kind == "none":
        return Importance("none", [None] * layout.num_layers, "the layers option")
    if kind == "ner":
        return Importance("ner", weight_scores(plan, layout, cache, device, quiet, executor), "weights", note)
    stats, basis, reused = activation_stats(plan, layout, options, cache, device, quiet)
    return Importance(kind, [s.score(kind) for s in stats], basis, note, reused)


def importance_kind(options: DlecOptions) -> tuple[str, str | None]:
    """The kind asked for; without one, none when the layers are named, else block_influence, or ner
    (with a note) without transformers."""
    if options.importance is None and options.layers is not None:
        return "none", None
    if options.importance == "ner":
        return "ner", None
    try:
        import transformers  # noqa: F401
    except ImportError:
        if options.importance is None:
            return "ner", "transformers is not installed, so importance is measured on the weights (NER)"
        raise ConfigError(
            f"{options.where}: {option_key(options, 'importance')}: {options.importance} runs the model "
            f"with transformers, which is not installed (pip install 'mastermerge[transformers]'); "
            f"or use {option_setting(options, 'importance', 'ner')}"
        ) from None
    return options.importance or "block_influence", None


def weight_scores(
    plan: Plan, layout: Layout, cache: MetricCache, device: torch.device, quiet: bool, executor: Executor | None = None
) -> list[float | None]:
    """Mean NER of each block's 2-D matrices in the plan (None if any has none), reusing the plan's
    metrics and computing (and caching) those it lacks, with `executor` (default: this process)."""
    executor = executor or LocalExecutor(str(device))
    engine = Engine(cache, executor)
    blocks = [
        [e for e in plan.entries if layout.depths[e.name] == d and len(e.shape) == 2] for d in range(layout.num_layers)
    ]
    scores = []
    with (
        opened_checkpoints(plan.used_sources()) as checkpoints,
        tqdm(total=sum(map(len, blocks)), desc="importance", unit="matrix", disable=quiet) as bar,
    ):
        missing = [  # the matrices read as they are whose metrics the plan lacks: computed together
            Work(checkpoints[e.source], e.tensor)
            for block in blocks
            for e in block
            if e.transform != "blend"
            and plan.metrics.get(e.source, {}).get(e.tensor) is None
            and checkpoints[e.source].tensors[e.tensor].is_matrix
        ]
        computed = {(w.checkpoint.directory, w.tensor): m for w, m in engine.metrics(missing, bar).items()}
        for entries in blocks:
            values = []
            for entry in entries:
                metrics = plan.metrics.get(entry.source, {}).get(entry.tensor)
                if entry.transform == "blend":  # a matrix no input file holds: cached under its blend key
                    opened = checkpoints

                    def compute(entry=entry, opened=opened):  # here, on the run's threads
                        with limited_threads(executor.threads):
                            spectrum = spectrum_of(blended_tensor(entry, opened, torch_dtype(entry.dtype)), device)
                            return every_metric(spectrum)

                    metrics = engine.derived_metrics(blend_key(entry, opened, cache), compute)
                elif metrics is None:
                    metrics = computed.get((checkpoints[entry.source].directory, entry.tensor))
                    if metrics is None:  # not a matrix with a spectrum (an integer tensor)
                        bar.update()
                        continue
                    values.append(metrics["ner"])
                    continue  # counted by engine.metrics
                values.append(metrics["ner"])
                bar.update()
            scores.append(None if not values or None in values else sum(values) / len(values))
    return scores


def activation_stats(
    plan: Plan, layout: Layout, options: DlecOptions, cache: MetricCache, device: torch.device, quiet: bool
) -> tuple[list[LayerStats], str, bool]:
    """The LayerStats of every block on the calibration text, from the cache or from a run; with a
    sentence saying what they were computed from, and whether they came from the cache."""
    import torch
    import transformers

    if quiet:
        transformers.utils.logging.disable_progress_bar()
    base_dir = plan.sources[plan.base]
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if "auto_map" in config and not options.trust_remote_code:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'trust_remote_code')}: {base_dir}/config.json "
            f"asks for the model's own code (auto_map), which runs only with "
            f"{option_setting(options, 'trust_remote_code', 'true')} (if you trust it), or use "
            f"{option_setting(options, 'importance', 'ner')}"
        )
    text, text_name = calibration_text(options)
    window = min(
        [WINDOW]
        + [config[k] for k in family_of(config).context_keys if isinstance(config.get(k), int) and config[k] > 0]
    )
    windows = token_windows(transformers, base_dir, text, options, window)
    tokens = sum(map(len, windows))
    basis = f"{text_name}, {tokens} tokens in {len(windows)} windows of up to {window}"
    if tokens < FEW_TOKENS:
        basis += f" (fewer than {FEW_TOKENS} tokens: scores from so few are mostly noise; give a longer text)"
    dtype = run_dtype(plan_parameters(plan), device)
    # what the numbers depend on besides the weights: the windows, and the precision they ran in
    text_key = hashlib.sha256(json.dumps([windows, str(dtype), torch.device(device).type]).encode()).hexdigest()
    model_key = model_digest(plan, cache)
    rows = cache.calibration(model_key, text_key)
    if rows is not None:
        return [LayerStats(*row) for row in rows], basis, True
    started = time.perf_counter()
    model = composite_model(
        transformers,
        plan,
        config,
        model_classes(transformers, config, ("AutoModelForCausalLM", "AutoModel")),
        device,
        dtype,
        options.trust_remote_code,
        "to run the calibration text",
        f"; use {option_setting(options, 'importance', 'ner')}",
    )
    backbone = getattr(model, "base_model", model)  # the blocks without the LM head
    blocks = block_modules(backbone, layout.stack, layout.num_layers, f"{base_dir}: transformers model")
    stats = run_calibration(backbone, blocks, windows, device, quiet)
    cache.put_calibration(
        model_key,
        text_key,
        [astuple(s) for s in stats],
        {
            "model_ref": plan.base if len(plan.candidates) == 1 else f"merge of {plan.candidates}",
            "text_name": text_name,
            "tokens": tokens,
            "windows": len(windows),
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(device),
            "seconds": time.perf_counter() - started,
        },
    )
    return stats, basis, False


def calibration_text(options: DlecOptions) -> tuple[str, str]:
    """The text and how to name it: the user's file, or the built-in one."""
    text = read_text(options.calibration or BUILT_IN_TEXT, options.where, option_key(options, "calibration"))
    return text, ("the built-in calibration text" if options.calibration is None else str(options.calibration))


def token_windows(transformers, base_dir: Path, text: str, options: DlecOptions, window: int) -> list[list[int]]:
    """The text's first `max_tokens` token ids by the base model's own tokenizer, cut into windows of
    at most `window` tokens, each starting with BOS when the tokenizer starts a text with one (so
    every window reads like the start of a document, not a fragment)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir, trust_remote_code=options.trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a missing tokenizer
        raise ModelError(
            f"{base_dir}: no tokenizer that transformers can load ({first_line(exc)}); the calibration "
            f"text needs one, or use {option_setting(options, 'importance', 'ner')}"
        ) from None
    ids = list(tokenizer(text, verbose=False)["input_ids"])[: options.max_tokens]
    if len(ids) < 2:
        raise ConfigError(
            f"{options.where}: {option_key(options, 'calibration')}: the calibration text gives "
            f"{len(ids)} token(s); at least 2 are needed"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or ids[0] != bos or window < 3:
        return [ids[i : i + window] for i in range(0, len(ids), window)]
    body = ids[1:]
    return [[bos] + body[i : i + window - 1] for i in range(0, len(body), window - 1)]


def block_modules(model: torch.nn.Module, stack: str, count: int, where: str) -> torch.nn.ModuleList:
    """The model's list of `count` transformer blocks: the module list named like the checkpoint's
    block stack (model.layers, transformer.h, ...), or that name with a prefix added or removed (a
    model class with or without a task head around the same blocks)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            if name == stack:
                return module
            if name.endswith("." + stack) or stack.endswith("." + name):
                found.append(module)
    if len(found) == 1:
        return found[0]
    raise ModelError(f"{where} {type(model).__name__} has no single list of {count} blocks named like '{stack}'")


def run_calibration(
    model: torch.nn.Module, blocks: torch.nn.ModuleList, windows: list[list[int]], device: torch.device, quiet: bool
) -> list[LayerStats]:
    """Run every window through the model and sum each block's statistics over every token position."""
    import torch

    sums = [[0, 0.0, 0, 0, 0.0] for _ in blocks]
    problems: list[str] = []

    def recorder(depth: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape):
                problems.append(f"block {depth} does not map hidden states to hidden states")
                return
            add_block_sums(sums[depth], x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1]))

        return hook

    handles = [block.register_forward_hook(recorder(depth), with_kwargs=True) for depth, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc="calibration", unit="window", disable=quiet):
                model(input_ids=torch.tensor([window], device=device))
                if problems:
                    raise ModelError(f"cannot measure the activations: {problems[0]}; use importance ner")
    finally:
        for handle in handles:
            handle.remove()
    return [LayerStats(*s) for s in sums]


def add_block_sums(sums: list, x: torch.Tensor, y: torch.Tensor) -> None:
    """Add one window's positions (rows of x: block input, y: block output) to a block's sums."""
    import torch

    x, y = x.double(), y.double()
    centred = y - y.mean(dim=1, keepdim=True)
    spread = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    tail = (centred.abs() > TAIL_Z * spread) & (spread > 0)
    sums[0] += x.shape[0]
    sums[1] += float(torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-30).sum())
    sums[2] += int(tail.sum())
    sums[3] += y.numel()
    sums[4] += float(((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)).sum())
