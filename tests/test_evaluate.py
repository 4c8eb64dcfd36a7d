"""Evaluation: perplexities against transformers' own loss, the windows, the cache, the files and
every refusal of `mastermerge evaluate`."""

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from examples.tiny_models import build_model
from nerd.config import EvaluateOptions
from nerd.windows import IGNORE, MASK_SHARE, text_windows
from helpers import REPO, TRAINED, run_cli, transformers_perplexity

TEXT = REPO / "nerd" / "calibration.txt"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The trained Llama as is (its tokenizer adds no BOS), a copy whose tokenizer starts every text
    with <s> (as Llama's does), a tiny masked LM with a WordPiece tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("evaluate")
    bos = root / "llama-bos"
    shutil.copytree(TRAINED, bos)
    tokenizer = Tokenizer.from_file(str(bos / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(bos / "tokenizer.json"))
    return {"root": root, "plain": TRAINED, "bos": bos, "mlm": masked_lm(root / "bert-mlm")}


def masked_lm(directory: Path) -> Path:
    """A randomly initialised 2-layer BertForMaskedLM with a 300-token WordPiece tokenizer."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(
        [TEXT.read_text()],
        trainer=trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
        ),
    )
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def options(**kwargs) -> EvaluateOptions:
    return EvaluateOptions((TEXT,), (str(TEXT),), where="test", cli=True, **kwargs)


def windows_of(directory: Path, kind: str, length: int, **kwargs):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer, text_windows(tokenizer, kind, TEXT.read_text(), "text", length, options(**kwargs), directory)


def evaluated(family, *models, extra=(), cache=None) -> dict:
    out = family["root"] / f"out-{len(list(family['root'].iterdir()))}"
    code, printed, err = run_cli(
        "evaluate",
        *models,
        "--text",
        TEXT,
        "--out",
        out,
        "--json",
        "--quiet",
        *(["--cache", cache] if cache else ["--no-cache"]),
        *extra,
    )
    assert code == 0, err
    return json.loads(printed)


@pytest.mark.parametrize("model, stride", [("bos", None), ("plain", None), ("bos", 127), ("plain", 40)])
def test_causal_perplexity_equals_transformers_loss(family, model, stride):
    directory = family[model]
    extra = ("--stride", stride) if stride else ()
    result = evaluated(family, directory, extra=extra)
    _, windows = windows_of(directory, "causal", 128, stride=stride)
    [row] = result["rows"]
    assert row["kind"] == "causal" and row["window"] == 128 and row["tokens"] == windows.tokens
    assert row["perplexity"] == pytest.approx(transformers_perplexity(directory, windows, "causal"), rel=1e-6)


@pytest.mark.parametrize("model", ["bos", "plain"])
def test_causal_windows_score_every_token_once_with_context(family, model):
    tokenizer, windows = windows_of(family[model], "causal", 128)
    ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    bos = model == "bos"
    assert len(windows.inputs) > 3 and all(len(w) <= 128 for w in windows.inputs)
    assert all((w[0] == tokenizer.bos_token_id) == bos for w in windows.inputs)
    scored = [t for labels in windows.labels for t in labels if t != IGNORE]
    assert scored == (ids if bos else ids[1:])  # each token once, in order; without BOS the first has no context
    for inputs, labels in zip(windows.inputs[1:], windows.labels[1:]):  # later windows: half a window of context
        first = next(i for i, t in enumerate(labels) if t != IGNORE)
        assert first >= (128 - bos) // 2 and labels[first:] == inputs[first:]


def test_masked_perplexity_equals_transformers_loss(family):
    directory = family["mlm"]
    result = evaluated(family, directory)
    tokenizer, windows = windows_of(directory, "masked", 64)
    [row] = result["rows"]
    assert row["kind"] == "masked" and row["stride"] is None
    assert row["perplexity"] == pytest.approx(transformers_perplexity(directory, windows, "masked"), rel=1e-6)
    ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    assert row["tokens"] == windows.tokens == round(MASK_SHARE * len(ids))
    for inputs, labels in zip(windows.inputs, windows.labels):  # [CLS] text [SEP], the scored places masked
        assert inputs[0] == tokenizer.cls_token_id and inputs[-1] == tokenizer.sep_token_id and len(inputs) <= 64
        assert all(i == tokenizer.mask_token_id for i, t in zip(inputs, labels) if t != IGNORE)
    assert windows_of(directory, "masked", 64)[1] == windows  # the seeded mask is the same every time


def test_table_files_cache_and_figure(family, tmp_path):
    cache = tmp_path / "c.sqlite"
    first = evaluated(family, family["bos"], family["plain"], cache=cache)
    assert [r["reused"] for r in first["rows"]] == [False, False]
    again = evaluated(family, family["bos"], family["plain"], cache=cache)  # unchanged models: nothing computed
    assert [r["reused"] for r in again["rows"]] == [True, True]
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in first["rows"]]
    out = Path(first["out"])
    document = json.loads((out / "evaluation.json").read_text())
    rows = {(r["model"], r["text"]): r for r in document["rows"]}
    base, other = str(family["bos"]), str(family["plain"])
    assert len(rows) == 4 and rows[base, "mean"]["diff_from_base"] == 0
    assert rows[other, str(TEXT)]["diff_from_base"] == pytest.approx(
        rows[other, str(TEXT)]["perplexity"] - rows[base, str(TEXT)]["perplexity"]
    )
    csv_lines = (out / "evaluation.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,role,text,perplexity,diff_from_base") and len(csv_lines) == 5
    image = plt.imread(out / "perplexity.png")
    assert image.shape[0] > 200 and image[..., :3].std() > 0.05
    code, printed, _ = run_cli(
        "evaluate", family["bos"], family["plain"], "--text", TEXT, "--out", tmp_path / "t", "--cache", cache
    )
    assert code == 0 and "vs base" in printed and "llama-bos (base)" in printed


def broken_copies(family) -> dict[str, Path]:
    root = family["root"] / "broken"
    if root.exists():
        return {p.name: p for p in root.iterdir()}
    root.mkdir()
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(TRAINED, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    big_vocabulary = build_model("llama", root / "big-vocabulary", seed=1, vocab_size=256)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a 1024-token tokenizer on a 256-row embedding
        shutil.copy(TRAINED / name, big_vocabulary / name)
    build_model("bert", root / "bert-model", seed=1)  # BertModel: no language-model head
    headless = root / "no-head"  # lm_head.weight missing: transformers would draw it at random
    shutil.copytree(TRAINED, headless)
    from safetensors.torch import load_file, save_file

    weights = load_file(headless / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if k != "lm_head.weight"},
        headless / "model.safetensors",
        metadata={"format": "pt"},
    )
    broken_config = root / "broken-config"
    shutil.copytree(TRAINED, broken_config)
    (broken_config / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "short.txt").write_text("def f():\n    return 1\n")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize(
    "model, text, exit_code, message",
    [
        ("plain", "missing.txt", 2, "missing.txt' not found (looked at "),
        ("plain", "empty.txt", 2, "empty.txt is empty"),
        ("plain", "latin1.txt", 2, "latin1.txt is not UTF-8 text (byte 3)"),
        ("plain", "short.txt", 2, "fewer than one window of 128 tokens"),
        ("no-tokenizer", None, 3, "no tokenizer that transformers can load"),
        ("big-vocabulary", None, 3, "the tokenizer has 1024 tokens but the input embedding has 256 rows"),
        ("bert-model", None, 3, "BertModel is neither a causal LM (...ForCausalLM) nor a masked LM"),
        ("no-head", None, 3, "the checkpoint has no weights for 1 tensor(s) of LlamaForCausalLM (lm_head.weight)"),
        ("broken-config", None, 3, "config.json: cannot be read as JSON"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(family, tmp_path, model, text, exit_code, message):
    broken = broken_copies(family)
    directory = family.get(model) or broken[model]
    text_path = TEXT if text is None else broken.get(text, tmp_path / text)
    code, printed, err = run_cli(
        "evaluate", directory, "--text", text_path, "--out", tmp_path / "out", "--no-cache", "--quiet"
    )
    assert code == exit_code and message in err, err
    assert len(err.strip().splitlines()) == 1 and printed == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--stride", 128),
            "--stride: 128 would leave tokens unscored; at most 127 with windows of 128 tokens (the "
            "tokenizer adds no BOS",
        ),
        (("--max-length", 200), "--max-length: 200 is longer than the context of"),
        (
            ("--max-tokens", 100, "--max-length", 128),
            "--max-length: 128 is longer than the 100 tokens used of each text",
        ),
    ],
)
def test_bad_windows_are_refused(family, tmp_path, extra, message):
    code, printed, err = run_cli(
        "evaluate", family["plain"], "--text", TEXT, "--out", tmp_path / "out", "--no-cache", *extra
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_model_with_nan_logits_has_no_perplexity_and_a_warning(family, tmp_path):
    broken = tmp_path / "nan-llama"
    shutil.copytree(TRAINED, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    code, printed, err = run_cli(
        "evaluate",
        family["plain"],
        broken,
        "--text",
        TEXT,
        "--out",
        tmp_path / "out",
        "--cache",
        tmp_path / "c.sqlite",
        "--json",
    )
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(printed)["rows"]}
    assert rows[str(broken)]["perplexity"] is None and rows[str(family["plain"])]["perplexity"] > 1
    assert f"mastermerge: warning: {broken} on {TEXT}: NaN or Inf in the model's logits, so no perplexity" in err
    document = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert [r["diff_from_base"] for r in document["rows"] if r["model"] == str(broken)] == [None, None]
