"""Optional tensors and the base's layout, end to end.

Checkpoints of one model saved by different transformers versions differ in tensors that carry
nothing learned: BERT's position_ids, rotary inv_freq, GPT-2's causal-mask attn.bias and
masked_bias, a head tied to the embedding. A merge takes them from the first candidate that has
them, says so, and writes a model that loads in transformers; a learned weight that is missing,
or a shape that differs, is still refused. A sentence-transformers model keeps the module
folders its modules.json names, so the output loads in sentence-transformers.
"""

import json
from pathlib import Path

import pytest
import sentence_transformers
import torch
import transformers
from helpers import assert_bytes_follow_plan, build_family, by_name, merge, tensors_of
from safetensors.torch import save_file

from examples.tiny_models import build_model
from nerd.cli import main


def edit_weights(model: Path, add: dict | None = None, drop=()) -> None:
    """Rewrite a single-file model with tensors added or removed, as another library version saved it."""
    state = tensors_of(model)
    state.update(add or {})
    for name in drop:
        del state[name]
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})


def entries_of(out: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((out / "merge_report.json").read_text())["plan"]["entries"]}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def verified(out: Path, capsys) -> bool:
    capsys.readouterr()
    return main(["verify", str(out), "--quiet"]) == 0


def merged(tmp_path: Path, models: list[Path], **options) -> tuple[Path, dict, list[str]]:
    """Merge without --quiet (so the notes are printed); the output, its report (every tensor checked
    to be its plan source's bytes) and the stderr lines."""
    run = merge(models, tmp_path, quiet=False, as_json=False, **options)
    assert run.code == 0, run.stderr
    return run.output, assert_bytes_follow_plan(run.output), run.stderr.splitlines()


def runs(out: Path, capsys, auto=None) -> None:
    """The output loads in transformers, runs a forward pass, and passes mastermerge verify."""
    model = (auto or transformers.AutoModelForCausalLM).from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]]))[0]).all()
    assert verified(out, capsys)


def test_bert_base_position_ids_fine_tunes_without(tmp_path, capsys):
    base, ft_a, ft_b = build_family(tmp_path, "bert")
    position_ids = torch.arange(64, dtype=torch.int64)[None]
    edit_weights(base, {"embeddings.position_ids": position_ids})  # as transformers 4 saved it
    assert "embeddings.position_ids" not in tensors_of(ft_a)
    out, report, err = merged(tmp_path, [base, ft_a, ft_b])
    assert same_bytes(tensors_of(out)["embeddings.position_ids"], position_ids)
    entry = entries_of(out)["embeddings.position_ids"]
    assert entry["source"] == base.name and f"missing from '{ft_a.name}', '{ft_b.name}'" in entry["optional"]
    assert {c["winner"] for c in report["plan"]["choices"] if c["depth"] is not None} - {base.name}  # a real merge
    assert all("embeddings.position_ids" not in c["tensors"] for c in report["plan"]["choices"])
    note = [line for line in err if line.startswith("mastermerge: note:")]
    assert len(note) == 1 and "embeddings.position_ids: an integer buffer (nothing learned)" in note[0]
    assert f"taken from '{base}'" in note[0]
    assert report["plan"]["notes"] == [by_name(note[0].split(": ", 3)[3], [base, ft_a, ft_b])]
    assert "embeddings.position_ids" in (out / "README.md").read_text()
    runs(out, capsys, transformers.AutoModel)


def test_llama_inv_freq_in_one_candidate_only_merges_and_expands(tmp_path, capsys):
    base, ft_a, ft_b = build_family(tmp_path, "llama")
    inv_freq = {
        f"model.layers.{d}.self_attn.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8) for d in range(2)
    }
    edit_weights(ft_a, inv_freq)
    out, _, err = merged(tmp_path, [base, ft_a, ft_b], dlec={"add_layers": 1})
    entries, written = entries_of(out), tensors_of(out)
    freqs = [n for n in entries if n.endswith("inv_freq")]
    assert len(freqs) == 3  # two blocks, and the copy of one of them
    assert all(entries[n]["source"] == ft_a.name for n in freqs)  # the first candidate that has them
    assert all(same_bytes(written[n], inv_freq[entries[n]["tensor"]]) for n in freqs)
    assert any("rotary_emb.inv_freq" in line and f"taken from '{ft_a}'" in line for line in err)
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == 3
    runs(out, capsys)


def test_gpt2_causal_mask_buffers_in_the_base_only(tmp_path, capsys):
    base, ft = build_family(tmp_path, "gpt2", fine_tunes=1)
    buffers = {}
    for d in range(2):
        buffers[f"transformer.h.{d}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        buffers[f"transformer.h.{d}.attn.masked_bias"] = torch.tensor(-1e4)
    edit_weights(base, buffers)
    out, _, err = merged(tmp_path, [base, ft], selection={"granularity": "tensor"})
    entries = entries_of(out)
    assert all(entries[n]["source"] == base.name and entries[n]["optional"] for n in buffers)
    assert any("transformer.h.0.attn.bias" in line and "and 1 more" in line for line in err)
    runs(out, capsys)


@pytest.mark.parametrize("says_tied", [True, False])
def test_tied_head_present_in_one_absent_in_another(tmp_path, capsys, says_tied):
    base, ft = build_family(tmp_path, "llama", fine_tunes=1, tie_word_embeddings=True)
    base_embedding = tensors_of(base)["model.embed_tokens.weight"]
    edit_weights(base, {"lm_head.weight": base_embedding.clone()})  # the base's file holds its tied head
    # the fine-tune (saved without its tied head) trained its embeddings too: it wins the non-layer group
    embedding = tensors_of(ft)["model.embed_tokens.weight"]
    noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(4))
    edit_weights(ft, {"model.embed_tokens.weight": embedding + embedding.std() * noise})
    if not says_tied:  # then the head is optional because it equals the embedding
        for model in (base, ft):
            config = json.loads((model / "config.json").read_text())
            del config["tie_word_embeddings"]
            (model / "config.json").write_text(json.dumps(config))
    out, report, err = merged(tmp_path, [base, ft], selection={"non_layer": "compete"})
    non_layer = report["plan"]["choices"][0]
    assert non_layer["winner"] == ft.name and "lm_head.weight" not in non_layer["tensors"]  # never scored
    # the head is a copy of the output's embedding (the fine-tune's), not the base's stale head
    head = entries_of(out)["lm_head.weight"]
    assert (head["source"], head["tensor"]) == (ft.name, "model.embed_tokens.weight")
    written = tensors_of(out)
    assert same_bytes(written["lm_head.weight"], written["model.embed_tokens.weight"])
    assert any(
        "lm_head.weight: a head tied to model.embed_tokens.weight" in line and f"(from '{ft}')" in line for line in err
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, tensors_of(ft)["model.embed_tokens.weight"])
    assert verified(out, capsys)


def refusal(tmp_path: Path, models: list[Path]) -> str:
    """The one error line of a merge (without --quiet) that is refused with exit code 3 and writes nothing."""
    run = merge(models, tmp_path, quiet=False, as_json=False)
    assert run.code == 3 and not run.output.exists()
    errors = [line for line in run.messages if line.startswith("mastermerge: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr
    return errors[0]


def test_learned_weight_missing_still_refuses(tmp_path):
    base, ft = build_family(tmp_path, "llama", fine_tunes=1)
    edit_weights(ft, drop=["model.layers.1.mlp.up_proj.weight"])
    assert refusal(tmp_path, [base, ft]) == (
        f"mastermerge: error: models '{base}' and '{ft}' differ in 1 "
        f"tensor(s): model.layers.1.mlp.up_proj.weight missing from '{ft}'"
    )


def test_untied_head_missing_still_refuses(tmp_path):
    base, ft = build_family(tmp_path, "llama", fine_tunes=1, tie_word_embeddings=False)  # a head of its own
    edit_weights(ft, drop=["lm_head.weight"])
    assert refusal(tmp_path, [base, ft]).endswith(f"lm_head.weight missing from '{ft}'")


@pytest.mark.parametrize("in_base", [True, False])
def test_optional_tensor_shape_mismatch_still_refuses(tmp_path, in_base):
    base, ft_a, ft_b = build_family(tmp_path, "bert")
    edit_weights(base if in_base else ft_a, {"embeddings.position_ids": torch.arange(64)[None]})
    edit_weights(ft_b, {"embeddings.position_ids": torch.arange(32)[None]})
    where = "" if in_base else f" in '{ft_a}'"
    assert refusal(tmp_path, [base, ft_a, ft_b]) == (
        f"mastermerge: error: models '{base}' and '{ft_b}' differ in 1 tensor(s): "
        f"embeddings.position_ids [1, 64]{where} vs [1, 32]"
    )


def sentence_transformer(bert: Path, out: Path, dense: bool = False) -> Path:
    """A MiniLM-style sentence-transformers model saved by sentence-transformers itself: the BERT
    at the top, 1_Pooling/ (mean pooling), optionally a Dense layer with weights of its own, and a
    Normalize module."""
    from sentence_transformers import SentenceTransformer

    try:  # where sentence-transformers 6 has them
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    torch.manual_seed(0)
    modules = [models.Transformer(str(bert)), models.Pooling(32)]
    modules += [models.Dense(32, 16)] * dense + [models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def encoded(model: Path):
    return sentence_transformers.SentenceTransformer(str(model), device="cpu").encode(["the model is a merge"])


def st_family(tmp_path: Path, dense: bool = False) -> tuple[Path, Path]:
    """A sentence-transformers base and a fine-tune whose every block has a rank-1 update, which
    lowers its NER at every depth, so the base wins them all."""
    bert = build_model("bert", tmp_path / "bert", seed=0)
    tuned = build_model("bert", tmp_path / "bert-ft", seed=1, base_dir=bert, noise=1.0, noise_rank=1)
    return (
        sentence_transformer(bert, tmp_path / "st-base", dense),
        sentence_transformer(tuned, tmp_path / "st-ft", dense),
    )


def test_sentence_transformers_merge_keeps_module_folders(tmp_path, capsys):
    base, ft = st_family(tmp_path)
    assert (base / "1_Pooling" / "config.json").is_file() and (base / "modules.json").is_file()
    out, report, _ = merged(tmp_path, [base, ft])
    assert all(c["winner"] == base.name for c in report["plan"]["choices"])
    for name in (
        "modules.json",
        "1_Pooling/config.json",
        "2_Normalize/config.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    vectors = encoded(out)
    assert vectors.shape == (1, 32)
    assert (vectors == encoded(base)).all()  # the base won every depth: the same model
    assert verified(out, capsys)


def test_sentence_transformers_dense_module_copied_as_is_with_a_note(tmp_path, capsys):
    base, ft = st_family(tmp_path, dense=True)
    out, _, err = merged(tmp_path, [base, ft])
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == (base / "2_Dense" / "model.safetensors").read_bytes()
    assert any(
        "'2_Dense'" in line and "2_Dense/model.safetensors" in line and "not merged" in line
        for line in err
        if line.startswith("mastermerge: note:")
    )
    assert "2_Dense" in (out / "README.md").read_text()
    vectors = encoded(out)
    assert vectors.shape == (1, 16) and (vectors == encoded(base)).all()
    assert verified(out, capsys)


def test_sentence_transformers_expand_keeps_module_folders(tmp_path, capsys):
    base, _ = st_family(tmp_path)
    out = tmp_path / "grown"
    assert main(["expand", str(base), "--out", str(out), "--add-layers", "1", "--quiet", "--no-cache"]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / "1_Pooling" / "config.json").read_bytes() == (base / "1_Pooling" / "config.json").read_bytes()
    vectors = encoded(out)
    assert vectors.shape == (1, 32) and torch.isfinite(torch.from_numpy(vectors)).all()
    assert verified(out, capsys)


@pytest.mark.parametrize("path", ["../outside", "/etc", "1_Pooling/../../x"])
def test_modules_json_path_outside_the_model_is_refused(tmp_path, path):
    base, ft = st_family(tmp_path)
    modules = json.loads((base / "modules.json").read_text())
    modules[1]["path"] = path
    (base / "modules.json").write_text(json.dumps(modules))
    assert refusal(tmp_path, [base, ft]) == (
        f"mastermerge: error: {base / 'modules.json'}: module 1: path '{path}' points outside the model "
        f"directory; refused (expected a folder inside {base})"
    )
