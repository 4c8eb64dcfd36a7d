"""`mastermerge verify` on any checkpoint directory, checking what a loader checks (issue 19, item
3): config.json's sizes against the tensors' shapes, the tokenizer files, the tokenizer's ids
against the embedding. Each broken directory is first shown to be one transformers itself cannot
load (or cannot run), then verify names the file, the key and the tensor in one line and exits 5;
a good checkpoint that mastermerge did not write verifies (exit 0), with no hashes to check."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers

from examples.tiny_models import build_hub_cache, build_model
from nerd.architecture import families, family_of
from nerd.checkpoint import TensorInfo
from nerd.cli import main
from nerd.loadchecks import check_sizes

ROWS = 1024  # the Llama's vocabulary: its embedding's rows, and its tokenizer's tokens
NO_REPORT = "no merge_report.json, so the files' sizes and SHA-256 were not checked"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints as transformers saves them, each with its tokenizer (tokenizer.json and
    tokenizer_config.json): a Llama of 1024 tokens, the same sharded, a GPT-2, a BERT, and a
    Llama saved without a tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "llama": build_model("llama", root / "llama", vocab_size=ROWS),
        "sharded": build_model("llama", root / "sharded", vocab_size=ROWS, max_shard_size="40KB"),
        "gpt2": build_model("gpt2", root / "gpt2"),
        "bert": build_model("bert", root / "bert"),
        "bare": build_model("llama", root / "bare", tokenizer=False),
    }


def verify(directory: Path, capsys, *flags) -> tuple[int, str, list[str]]:
    """Exit code, stdout, and stderr's lines of `mastermerge verify DIR --quiet`."""
    capsys.readouterr()
    code = main(["verify", str(directory), "--quiet", *flags])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.splitlines()


def load_model(directory: Path):
    """The model transformers loads from the directory (AutoModel for BERT, else a causal LM)."""
    bert = json.loads((directory / "config.json").read_text())["model_type"] == "bert"
    return (transformers.AutoModel if bert else transformers.AutoModelForCausalLM).from_pretrained(directory)


def run_on_every_token(directory: Path):
    """The model run on the ids its own tokenizer gives for its whole vocabulary."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = sorted(tokenizer.get_vocab().values())
    return load_model(directory)(input_ids=torch.tensor([ids]))


def load_tokenizer_and_encode(directory: Path) -> list[int]:
    """What the tokenizer transformers loads from the directory makes of a text: an error, or ids."""
    ids = transformers.AutoTokenizer.from_pretrained(directory)("hello world").input_ids
    if not ids:
        raise LookupError(f"the tokenizer of {directory} encodes 'hello world' as no tokens: not the model's")
    return ids


@pytest.mark.parametrize("name", ["llama", "sharded", "gpt2", "bert"])
def test_a_checkpoint_mastermerge_did_not_write_verifies(checkpoints, capsys, name):
    directory = checkpoints[name]
    assert not (directory / "merge_report.json").exists()
    load_model(directory)
    assert load_tokenizer_and_encode(directory)
    code, stdout, err = verify(directory, capsys, "--json")
    result = json.loads(stdout)
    rows = ROWS if name in ("llama", "sharded") else 128
    assert code == 0 and err == [] and result["ok"] and result["problems"] == []
    assert result["report"] is False and result["files_hashed"] == 0 and result["layers"] == 2
    assert result["tokenizer"] == {
        "files": ["tokenizer.json", "tokenizer_config.json"],
        "largest_id": rows - 1,
        "embedding_rows": rows,
    }
    capsys.readouterr()
    assert main(["verify", str(directory)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{directory}: ok: {len(result['shards'])} shard(s), {result['tensors']} tensors, 2 layers; "
        f"tokenizer files (tokenizer.json, tokenizer_config.json) parse, largest token id {rows - 1} < "
        f"{rows} embedding rows; {NO_REPORT}"
    )
    if name == "sharded":
        assert len(result["shards"]) > 1


def test_a_checkpoint_without_a_tokenizer_verifies_and_says_so(checkpoints, capsys):
    directory = checkpoints["bare"]
    load_model(directory)
    code, stdout, _ = verify(directory, capsys, "--json")
    assert code == 0 and json.loads(stdout)["tokenizer"] == {"files": [], "largest_id": None, "embedding_rows": 128}
    capsys.readouterr()
    assert main(["verify", str(directory)]) == 0
    assert "2 layers; no tokenizer files; " + NO_REPORT in capsys.readouterr().out


def test_a_hub_cache_snapshot_of_links_verifies(checkpoints, tmp_path, capsys):
    commit = build_hub_cache(tmp_path, "org/tiny", checkpoints["sharded"])
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    assert (snapshot / "config.json").is_symlink()
    code, stdout, err = verify(snapshot, capsys, "--json")
    assert code == 0 and err == [] and json.loads(stdout)["ok"]


def edit_json(name: str, **changes):
    """A damage: set (value) or remove (None) keys of a JSON file of the directory."""

    def damage(directory: Path) -> None:
        data = json.loads((directory / name).read_text())
        for key, value in changes.items():
            if value is None:
                data.pop(key)
            else:
                data[key] = value
        (directory / name).write_text(json.dumps(data, indent=2))

    return damage


def add_tokens(directory: Path) -> None:
    """Two tokens added to the tokenizer, as transformers adds them, and the embedding not resized."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(directory)


def delete_second_shard(directory: Path) -> None:
    (directory / "model-00002-of-00006.safetensors").unlink()


LLAMA_MLP = "'model.layers.0.mlp.gate_proj.weight', 'model.layers.0.mlp.up_proj.weight', "
# name: (the checkpoint, the damage, what transformers does with it and the error it raises, the file
# verify names, the line it prints after the file)
BROKEN = {
    "vocab_size": (
        "llama",
        edit_json("config.json", vocab_size=999),
        (load_model, RuntimeError),
        "config.json",
        "vocab_size is 999, but 2 tensors have 1024 rows: 'lm_head.weight', 'model.embed_tokens.weight'",
    ),
    "intermediate_size": (
        "llama",
        edit_json("config.json", intermediate_size=100),
        (load_model, RuntimeError),
        "config.json",
        f"intermediate_size is 100, but 4 tensors have 128 rows: {LLAMA_MLP}"
        "'model.layers.1.mlp.gate_proj.weight' and 1 more",
    ),
    "hidden_size": (
        "llama",
        edit_json("config.json", hidden_size=48),
        (load_model, RuntimeError),
        "config.json",
        "hidden_size is 48, the embedding matrix 'model.embed_tokens.weight' is [1024, 32] (width 32)",
    ),
    "num_key_value_heads": (
        "llama",
        edit_json("config.json", num_key_value_heads=4),
        (load_model, RuntimeError),
        "config.json",
        "num_key_value_heads * head_dim = 4 * 8 = 32, but 4 tensors have 16 rows: "
        "'model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight', "
        "'model.layers.1.self_attn.k_proj.weight' and 1 more",
    ),
    "num_attention_heads without head_dim": (
        "llama",
        edit_json("config.json", num_attention_heads=8, head_dim=None),
        (load_model, RuntimeError),
        "config.json",
        "num_key_value_heads * head_dim = 2 * 4 = 8 (head_dim not set: hidden_size // num_attention_heads), "
        "but 4 tensors have 16 rows: 'model.layers.0.self_attn.k_proj.weight', "
        "'model.layers.0.self_attn.v_proj.weight', 'model.layers.1.self_attn.k_proj.weight' and 1 more",
    ),
    "n_inner": (
        "gpt2",
        edit_json("config.json", n_inner=100),
        (load_model, RuntimeError),
        "config.json",
        "n_inner is 100, but 2 tensors have 128 columns: 'transformer.h.0.mlp.c_fc.weight', "
        "'transformer.h.1.mlp.c_fc.weight'",
    ),
    "n_positions": (
        "gpt2",
        edit_json("config.json", n_positions=32),
        (load_model, RuntimeError),
        "config.json",
        "n_positions is 32, but 'transformer.wpe.weight' has 64 rows ([64, 32])",
    ),
    "max_position_embeddings": (
        "bert",
        edit_json("config.json", max_position_embeddings=32),
        (load_model, RuntimeError),
        "config.json",
        "max_position_embeddings is 32, but 'embeddings.position_embeddings.weight' has 64 rows ([64, 32])",
    ),
    "type_vocab_size": (
        "bert",
        edit_json("config.json", type_vocab_size=3),
        (load_model, RuntimeError),
        "config.json",
        "type_vocab_size is 3, but 'embeddings.token_type_embeddings.weight' has 2 rows ([2, 32])",
    ),
    "truncated tokenizer.json": (
        "llama",
        lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500]),
        (load_tokenizer_and_encode, ValueError),
        "tokenizer.json",
        "not valid JSON (Expecting ':' delimiter: line 27 column 20 (char 500))",
    ),
    "tokenizer.json of no tokenizer": (
        "llama",
        lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}'),
        (load_tokenizer_and_encode, KeyError),
        "tokenizer.json",
        "not a tokenizer the tokenizers library can load (",
    ),
    "token ids past the embedding": (
        "llama",
        add_tokens,
        (run_on_every_token, IndexError),
        "tokenizer.json",
        "token id 1025 ('<extra_b>') is past the 1024 rows of 'model.embed_tokens.weight' "
        "(2 token id(s) of 1024 or more)",
    ),
    "tokenizer.json missing": (
        "llama",
        lambda d: (d / "tokenizer.json").unlink(),
        (load_tokenizer_and_encode, ValueError),
        "tokenizer_config.json",
        "tokenizer_class is 'TokenizersBackend', which loads from tokenizer.json, and there is none",
    ),
    "tokenizer.json missing, a slow class named": (
        "llama",
        lambda d: (
            (d / "tokenizer.json").unlink(),
            edit_json("tokenizer_config.json", tokenizer_class="LlamaTokenizer")(d),
        ),
        (load_tokenizer_and_encode, LookupError),  # transformers 5 makes an empty tokenizer of it
        "tokenizer_config.json",
        "tokenizer_class is 'LlamaTokenizer', but the directory has no tokenizer.json nor a vocabulary "
        "to build one from (vocab.txt, vocab.json and merges.txt, tokenizer.model, ...)",
    ),
    "a shard missing": (
        "sharded",
        delete_second_shard,
        (load_model, OSError),
        "model-00002-of-00006.safetensors",
        "missing (model.safetensors.index.json names it)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_checkpoint_transformers_cannot_load_is_named_in_one_line(checkpoints, tmp_path, capsys, case):
    source, damage, (load, error), name, message = BROKEN[case]
    directory = tmp_path / source
    shutil.copytree(checkpoints[source], directory)
    damage(directory)
    with pytest.raises(error):
        load(directory)
    code, stdout, err = verify(directory, capsys)
    expected = f"mastermerge: verify: {directory / name}: {message}"
    assert code == 5 and stdout == ""
    assert any(line.startswith(expected) for line in err), (expected, err)
    assert err[-1] == f"mastermerge: error: {directory}: verification failed: {len(err) - 1} problem(s)"


def test_intermediate_size_names_the_rows_and_the_columns(checkpoints, tmp_path, capsys):
    directory = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"], directory)
    edit_json("config.json", intermediate_size=100)(directory)
    code, _, err = verify(directory, capsys)
    config = directory / "config.json"
    assert code == 5 and err[:-1] == [
        f"mastermerge: verify: {config}: intermediate_size is 100, but 2 tensors have 128 columns: "
        "'model.layers.0.mlp.down_proj.weight', 'model.layers.1.mlp.down_proj.weight'",
        f"mastermerge: verify: {config}: intermediate_size is 100, but 4 tensors have 128 rows: {LLAMA_MLP}"
        "'model.layers.1.mlp.gate_proj.weight' and 1 more",
    ]


@pytest.mark.parametrize("case", ["good", "token ids past the embedding"])
def test_tokenizer_json_read_without_the_tokenizers_library(checkpoints, tmp_path, monkeypatch, capsys, case):
    """Where `tokenizers` is not installed, tokenizer.json's ids are read from its JSON: the same answers."""
    directory = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"], directory)
    if case != "good":
        add_tokens(directory)
    with_library = verify(directory, capsys, "--json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises ImportError
    monkeypatch.setitem(sys.modules, "tokenizers.models", None)
    with pytest.raises(ImportError):
        import tokenizers  # noqa: F401
    assert verify(directory, capsys, "--json") == with_library
    assert with_library[0] == (0 if case == "good" else 5)


def test_a_slow_tokenizer_vocabulary_counts_and_parses(checkpoints, tmp_path, capsys):
    """vocab.txt (BERT's slow tokenizer): its lines are the ids, so one line past the embedding is named."""
    directory = tmp_path / "bert"
    shutil.copytree(checkpoints["bert"], directory)
    (directory / "tokenizer.json").unlink()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]  # config's, BERT's
    vocab = specials + [f"[t{i}]" for i in range(len(specials), 128)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    edit_json("tokenizer_config.json", tokenizer_class="BertTokenizer")(directory)
    assert len(transformers.AutoTokenizer.from_pretrained(directory)) == 128
    assert verify(directory, capsys)[0] == 0
    (directory / "vocab.txt").write_text("\n".join([*vocab, "[t128]"]) + "\n")
    assert len(transformers.AutoTokenizer.from_pretrained(directory)) == 129
    code, _, err = verify(directory, capsys)
    assert code == 5 and err[0] == (
        f"mastermerge: verify: {directory / 'vocab.txt'}: token id 128 ('[t128]') is past the 128 rows of "
        "'embeddings.word_embeddings.weight' (1 token id(s) of 128 or more)"
    )
    (directory / "vocab.txt").write_text("\n".join([*vocab[1:], "[t128]"]) + "\n")  # no <pad>, the config names it
    assert transformers.AutoTokenizer.from_pretrained(directory).pad_token_id == 128
    code, _, err = verify(directory, capsys)
    assert code == 5 and err[0] == (
        f"mastermerge: verify: {directory / 'tokenizer_config.json'}: names special token(s) '<pad>' that the "
        "vocabulary lacks: transformers adds them as token id 128, past the 128 rows of "
        "'embeddings.word_embeddings.weight'"
    )
    (directory / "vocab.txt").write_bytes(b"[t0]\n\xff\xfe\n")
    code, _, err = verify(directory, capsys)
    assert code == 5 and err[0].startswith(f"mastermerge: verify: {directory / 'vocab.txt'}: not UTF-8 text (")


MODEL_TYPES = [t for family in families().values() for t in family.model_types]
TWO_LAYERS = {"gpt_neo": {"attention_types": [[["global", "local"], 1]]}}  # besides the layer count


def meta_model(model_type: str):
    """The config (as save_pretrained writes it) and the state dict of a model of each type with
    the defaults of its config class and 2 layers, built on the meta device (no memory)."""
    import torch

    family = families()[family_of({"model_type": model_type}).name]
    config_class = transformers.CONFIG_MAPPING[model_type]
    key = next(k for k in family.layer_count_keys if k in config_class().to_dict())
    config = config_class(**{key: 2}, **TWO_LAYERS.get(model_type, {}))
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
            break
        except (ValueError, KeyError):  # a class this model type has no model for
            continue
    return json.loads(config.to_json_string(use_diff=True)), model.state_dict()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_model_type_of_the_table_agrees_with_its_shapes(tmp_path, model_type):
    """No false alarm: the shapes of each family are those transformers builds for each of its model
    types; and a vocab_size one too large is found in each."""
    config, state = meta_model(model_type)
    infos = [TensorInfo(name, "F32", tuple(t.shape), tmp_path / "model.safetensors") for name, t in state.items()]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert check_sizes(tmp_path, {"model.safetensors": infos}) == []
    family = families()[family_of(config).name]
    matched = [i.name for i in infos if any(s.tensors.search(i.name) for s in family.shapes_of(model_type))]
    assert len(matched) >= 2, matched
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    problems = check_sizes(tmp_path, {"model.safetensors": infos})
    assert problems and all(p.message.startswith(f"vocab_size is {config['vocab_size'] + 1}, but ") for p in problems)


def test_a_size_that_is_not_an_integer_is_named(checkpoints, tmp_path, capsys):
    directory = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"], directory)
    edit_json("config.json", intermediate_size="128")(directory)
    with pytest.raises(Exception, match="intermediate_size"):  # huggingface_hub's validation error, or a TypeError
        load_model(directory)
    code, _, err = verify(directory, capsys)
    assert code == 5 and err[:-1] == [
        f"mastermerge: verify: {directory / 'config.json'}: intermediate_size is '128', expected an integer "
        "(a size of tensor 'model.layers.0.mlp.down_proj.weight')"
    ]


def test_quantized_tensors_are_not_compared(tmp_path):
    """A packed 4-bit weight (uint8, half the elements in one column) has its packing's shape, not the config's."""
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 128, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    file = tmp_path / "model.safetensors"
    packed = TensorInfo("model.layers.0.mlp.gate_proj.weight", "U8", (2048, 1), file)
    assert check_sizes(tmp_path, {"model.safetensors": [packed]}) == []
    float_weight = TensorInfo("model.layers.0.mlp.gate_proj.weight", "BF16", (2048, 1), file)
    assert [p.message for p in check_sizes(tmp_path, {"model.safetensors": [float_weight]})] == [
        "intermediate_size is 128, but 'model.layers.0.mlp.gate_proj.weight' has 2048 rows ([2048, 1])",
        "hidden_size is 32, but 'model.layers.0.mlp.gate_proj.weight' has 1 columns ([2048, 1])",
    ]
