"""The architecture table (nerd/architectures/*.yaml, nerd.architecture): every file loads, a
config.json finds its family, each family reads the tensor names of its models exactly as the
name-based inference does, and merge_report.json records which family a merge used."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from nerd.architecture import (
    DATA,
    INFERRED,
    architecture_of,
    claims,
    families,
    family_of,
    inferred,
    paired_matrix,
    quantization_of,
)
from nerd.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
MODEL_TYPES = [t for family in families().values() for t in family.model_types]
TWO_LAYERS = {"gpt_neo": {"attention_types": [[["global", "local"], 1]]}}  # besides the layer count


def test_every_data_file_is_a_family_or_the_fallback():
    assert {p.name for p in DATA.glob("*.yaml")} == {f"{name}.yaml" for name in families()} | {
        "_inferred.yaml",
        "_quantization.yaml",
    }
    assert {"llama", "gpt2", "gpt_neox", "bert"} <= set(families())
    by_type, by_class = claims()  # no model type or class claimed twice
    assert len(by_type) == len(MODEL_TYPES) and by_type["qwen3"].name == "llama"
    assert by_class["GPT2LMHeadModel"].name == "gpt2"
    assert inferred().name == INFERRED


@pytest.mark.parametrize(
    "config, family",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "llama"),
        ({"model_type": "qwen2_moe"}, "llama"),
        ({"model_type": "gpt2"}, "gpt2"),
        ({"model_type": "gpt_neox"}, "gpt_neox"),
        ({"model_type": "bert"}, "bert"),
        ({"architectures": ["BertForMaskedLM"]}, "bert"),  # no model_type: by class
        ({"model_type": "mystery", "architectures": ["MysteryForCausalLM"]}, INFERRED),
        ({"model_type": "llava", "text_config": {"model_type": "llama"}}, INFERRED),  # a multimodal wrapper
        ({"model_type": ["llama"], "architectures": "LlamaForCausalLM"}, INFERRED),  # malformed
        ([], INFERRED),
        (None, INFERRED),
    ],
)
def test_family_of_config(config, family):
    assert family_of(config).name == family


def test_architecture_of_directory(tmp_path):
    assert architecture_of(EXAMPLES / "tiny-base").name == "llama"
    assert architecture_of(tmp_path).name == INFERRED  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert architecture_of(tmp_path).name == INFERRED


def test_post_norm():
    assert family_of({"model_type": "roberta"}).post_norm({"model_type": "roberta"})
    assert not family_of({"model_type": "opt"}).post_norm({"model_type": "opt"})
    assert family_of({"model_type": "opt"}).post_norm({"model_type": "opt", "do_layer_norm_before": False})
    assert inferred().post_norm({"apply_residual_connection_post_layernorm": True})
    assert not inferred().post_norm({"apply_residual_connection_post_layernorm": False})


def test_quantization_markers_and_pairing():
    assert quantization_of("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4") == "bitsandbytes 4-bit"
    assert quantization_of("model.layers.0.self_attn.q_proj.qweight") == "GPTQ/AWQ"
    assert quantization_of("model.layers.0.self_attn.q_proj.SCB") == "bitsandbytes int8"
    assert quantization_of("model.layers.0.self_attn.q_proj.weight") is None
    matrices = ["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"]
    assert paired_matrix("h.0.attn.c_attn.bias", matrices) == "h.0.attn.c_attn.weight"
    assert paired_matrix("h.0.ln_1.weight", matrices) is None


def answers(architecture, names: list[str]) -> dict:
    """Every answer an architecture gives about a list of tensor names."""
    blocks = {name: architecture.block_of(name) for name in names}
    return {
        name: (
            blocks[name],
            architecture.is_input_embedding(name),
            architecture.is_word_embedding(name),
            architecture.is_tied_head(name),
            architecture.is_buffer(name),
        )
        for name in names
    }


def found(keys, config: dict) -> list[str]:
    return [k for k in keys if k in config]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_reads_its_models_as_the_inference_does(model_type):
    """A model of each type, built on the meta device (no memory): its family gives the answers the
    name-based inference gives on every tensor name (so choosing the family changes nothing), finds
    the same config.json keys, and for a pre-norm family finds both residual writers of every block."""
    import torch
    import transformers

    assert model_type in transformers.CONFIG_MAPPING, f"transformers {transformers.__version__} lacks {model_type}"
    family = families()[family_of({"model_type": model_type}).name]
    config_class = transformers.CONFIG_MAPPING[model_type]
    key = next(k for k in family.layer_count_keys if k in config_class().to_dict())
    config = config_class(**{key: 2}, **TWO_LAYERS.get(model_type, {}))
    with torch.device("meta"):
        model = next(
            model
            for model in (
                auto_model(cls, config)
                for cls in (
                    transformers.AutoModelForCausalLM,
                    transformers.AutoModelForMaskedLM,
                    transformers.AutoModel,
                )
            )
            if model
        )
    names = list(dict.fromkeys([*model.state_dict(), *(name for name, _ in model.named_buffers())]))
    assert answers(family, names) == answers(inferred(), names)
    saved = config.to_dict()
    for keys in ("layer_count_keys", "width_keys", "context_keys"):
        assert found(getattr(family, keys), saved) == found(getattr(inferred(), keys), saved), keys
    if model_type == "albert":  # one layer shared by every depth: no blocks, refused as before
        assert not any(family.block_of(name) for name in names)
        return
    assert {family.block_of(n)[1] for n in names if family.block_of(n)} == {0, 1}
    if family.norm == "pre":
        assert [family.residual_writer(n) for n in names] == [inferred().residual_writer(n) for n in names]
        for depth in (0, 1):
            parts = {family.residual_writer(n) for n in names if (family.block_of(n) or (0, -1))[1] == depth}
            assert {"attention", "mlp"} <= parts, depth


def auto_model(cls, config):
    try:
        return cls.from_config(config)
    except (ValueError, KeyError):  # a class this model type has no model for
        return None


@pytest.mark.parametrize(
    "family, name",
    [  # names as older checkpoints on the hub hold them
        ("llama", "model.layers.0.block_sparse_moe.experts.3.w2.weight"),  # Mixtral
        ("llama", "model.layers.0.mlp.experts.3.down_proj.weight"),  # Qwen-MoE
        ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq"),
        ("gpt2", "h.0.attn.bias"),
        ("gpt2", "h.0.attn.masked_bias"),
        ("gpt2", "wte.weight"),
        ("gpt2", "h.3.mlp.c_proj.bias"),
        ("gpt_neox", "gpt_neox.layers.0.attention.rotary_emb.inv_freq"),
        ("gpt_neox", "gpt_neox.layers.0.attention.bias"),
        ("gpt_neox", "embed_out.weight"),
        ("gptj", "transformer.h.0.attn.masked_bias"),
        ("bert", "embeddings.position_ids"),
        ("bert", "encoder.layer.1.output.dense.weight"),  # sentence-transformers
    ],
)
def test_family_reads_saved_names_as_the_inference_does(family, name):
    assert answers(families()[family], [name]) == answers(inferred(), [name])
    if families()[family].norm == "pre":
        assert families()[family].residual_writer(name) == inferred().residual_writer(name)


def merge(models: list[Path], out: Path) -> dict:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        yaml.safe_dump({"models": [str(m) for m in models], "base_model": str(models[0]), "output_dir": str(out)})
    )
    assert main(["--config", str(config), "--no-cache", "--quiet"]) == 0
    return json.loads((out / "merge_report.json").read_text())


def test_report_records_the_family_and_the_fallback_merges_the_same(tmp_path):
    """merge_report.json says a Llama merge read its names as the llama family; the same models
    with a model type no family claims are read by inference, and give the same shards."""
    models = [EXAMPLES / "tiny-base", EXAMPLES / "tiny-code"]
    llama = merge(models, tmp_path / "llama")
    assert llama["plan"]["architecture"] == "llama"
    unknown = []
    for model in models:
        copy = shutil.copytree(model, tmp_path / "mystery" / model.name)
        config = json.loads((copy / "config.json").read_text())
        config.update(model_type="mystery", architectures=["MysteryForCausalLM"])
        (copy / "config.json").write_text(json.dumps(config))
        unknown.append(copy)
    inferred_report = merge(unknown, tmp_path / "inferred")
    assert inferred_report["plan"]["architecture"] == INFERRED
    assert inferred_report["files"] == llama["files"]  # the same tensors, in the same order, byte for byte
    assert [c["winner"] for c in inferred_report["plan"]["choices"]] == [c["winner"] for c in llama["plan"]["choices"]]
