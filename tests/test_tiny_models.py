"""Tests for the tiny model builder in examples/tiny_models.py (no network needed)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from examples.tiny_models import FAMILIES, build_hub_cache, build_model, layer_index, tiny_config


LAYER_COUNT_KEY = {"gpt2": "n_layer"}  # all other families: num_hidden_layers
HEAD_KEY = {"gpt2": "lm_head.weight", "gpt_neox": "embed_out.weight"}  # else lm_head.weight (bert: none)


def _tensor_names(model_dir: Path) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    names = set()
    for name in files:
        with safe_open(str(model_dir / name), "pt") as f:
            names.update(f.keys())
    return names


def _load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_reloads_and_runs(tmp_path, family):
    out = build_model(family, tmp_path / family, num_layers=2)
    assert out == tmp_path / family and isinstance(out, Path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "generation_config.json").is_file() == (family != "bert")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    assert config[LAYER_COUNT_KEY.get(family, "num_hidden_layers")] == 2
    if family == "qwen3":
        assert config["layer_types"] == ["full_attention", "full_attention"]

    names = _tensor_names(out)
    assert {layer_index(n) for n in names} == {None, 0, 1}
    head = HEAD_KEY.get(family, "lm_head.weight")
    if family == "bert":
        assert not any(n.startswith(("bert.", "cls.")) for n in names)
    else:
        # tied heads are not written to the safetensors file
        assert (head in names) == (not config["tie_word_embeddings"])

    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 128 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    enc = tok(["hello world, the model", "merge"], return_tensors="pt", padding=True)
    assert int(enc["input_ids"].max()) < 128
    with torch.no_grad():
        res = model(**enc)
    if family == "bert":
        assert res.last_hidden_state.shape == (*enc["input_ids"].shape, 32)
    else:
        assert res.logits.shape == (*enc["input_ids"].shape, 128)
        assert torch.isfinite(res.logits).all()


def test_tie_override(tmp_path):
    tied = build_model("llama", tmp_path / "tied", tie_word_embeddings=True, tokenizer=False)
    untied = build_model("gpt2", tmp_path / "untied", tie_word_embeddings=False, tokenizer=False)
    assert "lm_head.weight" not in _tensor_names(tied)
    assert "lm_head.weight" in _tensor_names(untied)
    assert tiny_config("qwen3", num_layers=3).layer_types == ["full_attention"] * 3


def test_finetune_is_deterministic_and_local(tmp_path):
    base = build_model("llama", tmp_path / "base", seed=0, num_layers=3, tokenizer=False)
    kwargs = dict(base_dir=base, seed=7, noise=0.5, noise_rank=2, layers=[1], dtype="bfloat16", tokenizer=False)
    ft1 = build_model("llama", tmp_path / "ft1", **kwargs)
    ft2 = build_model("llama", tmp_path / "ft2", **kwargs)
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (ft1, ft2)]
    assert digest[0] == digest[1]

    b, f = _load_tensors(base), _load_tensors(ft1)
    assert b.keys() == f.keys()
    assert all(t.dtype == torch.bfloat16 for t in f.values())
    for name in b:
        delta = f[name].float() - b[name].bfloat16().float()
        if layer_index(name) == 1 and b[name].dim() == 2:
            rel = float(delta.std() / b[name].std())
            assert 0.3 < rel < 0.7, (name, rel)
            sv = torch.linalg.svdvals(delta)
            assert sv[2] < 0.05 * sv[0], name  # rank 2 up to bf16 rounding
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name


def test_sharded_output(tmp_path):
    out = build_model("qwen2", tmp_path / "sharded", max_shard_size="50KB", tokenizer=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == _tensor_names(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    # a sharded checkpoint also works as the base of a fine-tune
    ft = build_model("qwen2", tmp_path / "ft", base_dir=out, noise=0.1, seed=3, tokenizer=False)
    assert _tensor_names(ft) == _tensor_names(out)


def test_hub_cache_offline(tmp_path):
    model_dir = build_model("llama", tmp_path / "model")
    (model_dir / "extra" / "deep").mkdir(parents=True)
    (model_dir / "extra" / "deep" / "notes.txt").write_text("nested file\n")
    hf_home = tmp_path / "hf_home"
    repo_id = "tiny-org/tiny-llama"
    commit = build_hub_cache(hf_home, repo_id, model_dir)
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert build_hub_cache(hf_home, repo_id, model_dir) == commit  # deterministic, idempotent

    storage = hf_home / "hub" / "models--tiny-org--tiny-llama"
    assert (storage / "refs" / "main").read_text() == commit
    snap = storage / "snapshots" / commit
    link = snap / "model.safetensors"
    assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
    assert os.readlink(snap / "extra" / "deep" / "notes.txt").startswith("../../../../blobs/")
    data = (model_dir / "model.safetensors").read_bytes()
    assert Path(os.readlink(link)).name == hashlib.sha256(data).hexdigest()
    cfg = (model_dir / "config.json").read_bytes()
    git_sha = hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()
    assert os.readlink(snap / "config.json") == f"../../blobs/{git_sha}"

    script = textwrap.dedent(
        f"""
        import json, os
        from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
        repo, commit = {repo_id!r}, {commit!r}
        a = snapshot_download(repo, revision="main", allow_patterns=["*.safetensors", "*.json"])
        b = snapshot_download(repo, revision=commit)
        nested = hf_hub_download(repo, "extra/deep/notes.txt")
        info = scan_cache_dir()
        repos = [(r.repo_id, r.repo_type, sorted(x.commit_hash for x in r.revisions),
                  sorted(ref for x in r.revisions for ref in x.refs), r.nb_files) for r in info.repos]
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(repo)
        tok = transformers.AutoTokenizer.from_pretrained(repo)
        print(json.dumps(dict(a=a, b=b, nested=open(nested).read(), repos=repos,
                              warnings=[str(w) for w in info.warnings],
                              arch=type(model).__name__, vocab=len(tok))))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["a"] == res["b"] == str(snap)
    assert res["nested"] == "nested file\n"
    assert res["warnings"] == []
    n_files = sum(1 for p in model_dir.rglob("*") if p.is_file())
    assert res["repos"] == [[repo_id, "model", [commit], ["main"], n_files]]
    assert res["arch"] == "LlamaForCausalLM" and res["vocab"] == 128
