"""PEFT LoRA adapters as candidates, checked against peft itself: adapters made and saved with peft
on tiny bases, our view of each (the base with the adapter merged in) compared with peft's own
merge_and_unload to within one unit in the last place, merges through the command line, the
refusals, an adapter from an offline hub cache, the metric cache's keys and a Ray node's view."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import cli_command, merge, run_cli, run_process, tensors_of
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from examples.tiny_models import build_hub_cache, build_model
from nerd import MetricCache, loraview
from nerd.adapters import AdapterSource
from nerd.checkpoint import Checkpoint
from nerd.nodes import Expected, Origin, checked_info, node_checkpoint

INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two tensors of one float dtype, in units in the last place."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = INT_OF[a.dtype]
    sign = torch.iinfo(bits).max

    def ordered(t):
        i = t.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & sign), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def make_adapter(base: Path, out: Path, *, seed=0, dtype=torch.float32, b_scale=1.0, safe=True, **options) -> Path:
    """An adapter of `base` made and saved by peft (B not zero: init_lora_weights=False), its
    modules_to_save and LoRA biases moved off their starting values so that they matter."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.mul_(b_scale)
            if "modules_to_save" in name or (name.endswith("bias") and parameter.requires_grad):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(out, safe_serialization=safe)
    return out


def peft_merged(base: Path, adapter: Path, dtype) -> dict[str, torch.Tensor]:
    """peft's own merge of the adapter into the base (merge_and_unload), as a state dict."""
    return peft_references(base, adapter, dtype)[0]


def peft_references(base: Path, adapter: Path, dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """peft's merge_and_unload, and for each embedding with lora_embedding_A/B the base's weight plus
    peft's own update (get_delta_weight) rounded once: peft's Embedding.merge rounds the update to
    the base's dtype before adding it, so in bfloat16 its merge is rounded twice."""
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    once = {}
    for name, module in model.base_model.model.named_modules():
        if getattr(module, "lora_embedding_A", None):
            weight = module.base_layer.weight
            once[f"{name}.weight"] = (weight.float() + module.get_delta_weight("default").float()).to(weight.dtype)
    return model.merge_and_unload().state_dict(), once


def set_config(adapter: Path, **values) -> Path:
    """Change keys of an adapter's adapter_config.json."""
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | values))
    return adapter


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-bases")
    return {
        "llama": build_model("llama", root / "llama", seed=0),
        "llama-bf16": build_model("llama", root / "llama-bf16", seed=0, dtype="bfloat16"),
        "gpt2": build_model("gpt2", root / "gpt2", seed=0),
        "qwen2": build_model("qwen2", root / "qwen2", seed=0),
        "wide": build_model("llama", root / "wide", seed=0, hidden_size=48),
    }


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # base, LoraConfig options, the kinds of update the view must find (loraview.Update)
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), {"lora"}),
    "patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=16,
            target_modules=LLAMA_ALL + ["embed_tokens"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
            alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.up_proj": 5},
            modules_to_save=["lm_head", "norm"],
        ),
        {"lora", "whole", "replaced"},
    ),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=LLAMA_ALL), {"lora"}),
    "bf16": (
        "llama-bf16",
        dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL + ["embed_tokens"], modules_to_save=["lm_head"]),
        {"lora", "whole", "replaced"},
    ),
    "fan-in-fan-out": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        {"lora"},
    ),
    "lora-bias": (
        "qwen2",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
        {"lora", "bias"},
    ),
    "bias-all": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all"), {"lora", "whole"}),
}


@pytest.mark.parametrize("block", [None, 100], ids=["one-block", "blocks-of-100"])
@pytest.mark.parametrize("case", list(CASES))
def test_view_equals_peft_merge(bases, tmp_path, monkeypatch, case, block):
    """Every tensor of the view is peft's merge_and_unload to within one unit in the last place
    (measured: equal, where a tensor is one block), also computed in blocks of about 100 elements
    (loraview.BLOCK); read_flat gives the elements of read, across blocks too."""
    if block is not None:
        monkeypatch.setattr(loraview, "BLOCK", block)
    base_name, options, kinds = CASES[case]
    dtype = torch.bfloat16 if base_name.endswith("bf16") else torch.float32
    adapter = make_adapter(bases[base_name], tmp_path / "adapter", **options)
    expected, once = peft_references(bases[base_name], adapter, dtype)
    worst, changed = 0, 0
    with Checkpoint.open(AdapterSource(adapter, bases[base_name])) as view, Checkpoint.open(bases[base_name]) as base:
        assert set(view.tensors) == set(base.tensors)
        assert kinds <= {u.kind for u in view.updates.values()} | {
            "replaced" for u in view.updates.values() if u.replaced
        }
        for name, info in view.tensors.items():
            assert (info.dtype, info.shape) == (base.tensors[name].dtype, base.tensors[name].shape)
            ours = view.read(name)
            reference = expected[name] if name in expected else base.read(name)  # a tied head
            if name in once:  # peft rounds twice there; we round once, as peft's own update added once is
                assert ulps(ours, once[name]) <= 1 and ulps(ours, reference) <= 2, name
                reference = once[name]
            worst = max(worst, ulps(ours, reference.to(ours.dtype)))
            changed += not torch.equal(ours, base.read(name))
            flat = ours.reshape(-1)
            start, stop = flat.numel() // 3, min(flat.numel(), flat.numel() // 3 + 250)
            assert torch.equal(view.read_flat(name, start, stop), flat[start:stop])
            assert bytes(view.read_bytes(name)) == ours.contiguous().view(torch.uint8).numpy().tobytes()
    assert changed >= 2
    assert worst <= 1, f"{case}: {worst} ulp from peft's merge"


def test_bin_adapter_equals_safetensors(bases, tmp_path):
    options = CASES["plain"][1]
    safe = make_adapter(bases["llama"], tmp_path / "safe", **options)
    pickled = make_adapter(bases["llama"], tmp_path / "bin", safe=False, **options)
    assert (pickled / "adapter_model.bin").is_file() and not (pickled / "adapter_model.safetensors").exists()
    with (
        Checkpoint.open(AdapterSource(safe, bases["llama"])) as a,
        Checkpoint.open(AdapterSource(pickled, bases["llama"])) as b,
    ):
        for name in a.tensors:
            assert torch.equal(a.read(name), b.read(name)), name


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, a full fine-tune of it and a LoRA adapter of it (small updates: both stay tethered)."""
    root = tmp_path_factory.mktemp("adapter-family")
    base = build_model("llama", root / "base", seed=0, num_layers=4)
    ft = build_model("llama", root / "ft", seed=1, base_dir=base, noise=0.1)
    options = dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL)
    lora = make_adapter(base, root / "lora", seed=3, b_scale=0.02, **options)
    return {"base": base, "ft": ft, "lora": lora}


@pytest.mark.parametrize("options", [{}, {"dlec": {"add_layers": 1}}], ids=["select", "dlec"])
def test_merge_of_a_fine_tune_and_an_adapter(family, tmp_path, options):
    """The written tensors are peft's merge where the adapter won (and its copies, with DLEC: the
    calibration run builds the composite from the adapter's view too), the fine-tune's where it
    did; the output loads in transformers and verifies; a second run finds every spectrum cached."""
    models = [family["base"], family["ft"], family["lora"]]
    run = merge(models, tmp_path, **options)
    run.ok()
    plan = json.loads((run.output / "merge_report.json").read_text())["plan"]
    lora_ref, ft_ref = family["lora"].name, family["ft"].name  # as the report names them
    assert {lora_ref, ft_ref} <= {c["winner"] for c in plan["choices"]}, plan["choices"]
    assert bool(options) == any(e["name"] != e["tensor"] for e in plan["entries"])  # DLEC copies renumbered
    written = tensors_of(run.output)
    expected = peft_merged(family["base"], family["lora"], torch.float32)
    fine_tune = tensors_of(family["ft"])
    from_lora = [e for e in plan["entries"] if e["source"] == lora_ref and e["transform"] is None]
    assert any(e["tensor"].endswith("q_proj.weight") for e in from_lora)
    for entry in plan["entries"]:
        if entry["transform"] is None and entry["source"] == lora_ref:
            assert ulps(written[entry["name"]], expected[entry["tensor"]]) <= 1, entry
        elif entry["transform"] is None and entry["source"] == ft_ref:
            assert torch.equal(written[entry["name"]], fine_tune[entry["tensor"]]), entry
    model = transformers.AutoModelForCausalLM.from_pretrained(run.output)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert run_cli("verify", run.output, "--quiet")[0] == 0
    again = merge(models, tmp_path, "--force", **options)
    assert again.ok()["spectra_computed"] == 0 and again.result["spectra_reused"] > 0


def test_merge_on_ray_reads_the_adapter_on_its_base(family, tmp_path, ray_session):
    """Ray workers open the adapter on the base as the driver does: the same shards, bit for bit."""
    models, options = [family["base"], family["ft"], family["lora"]], dict(tether={"mode": "blend"})
    (tmp_path / "local").mkdir(), (tmp_path / "ray").mkdir()
    local = merge(models, tmp_path / "local", "--threads", "2", **options)
    remote = merge(models, tmp_path / "ray", "--ray", "--threads", "2", **options)
    assert remote.ok()["spectra_computed"] == local.ok()["spectra_computed"] > 0
    shards = sorted(p.name for p in local.output.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in remote.output.glob("*.safetensors"))
    for name in shards:
        assert (remote.output / name).read_bytes() == (local.output / name).read_bytes(), name


def test_evaluation_scores_the_adapter_as_peft_merged_it(family, tmp_path):
    """With evaluate:, the adapter (no model of its own) is run as its view on the base: the same
    perplexity as peft's merged model saved and read as a directory."""
    import shutil

    merged = tmp_path / "peft-merged"
    base = transformers.AutoModelForCausalLM.from_pretrained(family["base"])
    PeftModel.from_pretrained(base, family["lora"]).merge_and_unload().save_pretrained(merged)
    for tokenizer in family["base"].glob("tokenizer*"):
        shutil.copy(tokenizer, merged)
    text = Path(__file__).parents[1] / "examples" / "texts" / "legal.txt"
    run = merge([family["base"], family["lora"], merged], tmp_path, evaluate={"texts": [str(text)]})
    rows = {row["model"]: row for row in run.ok()["evaluation"]["rows"]}
    assert rows[str(family["lora"])]["role"] == "candidate"
    assert rows[str(family["lora"])]["nll"] == rows[str(merged)]["nll"] != rows[str(family["base"])]["nll"]


def one_line_refusal(run, *words) -> str:
    """The one error line of a refused merge (exit code 3, a ModelError), which names `words`."""
    assert run.code == 3, run.stderr
    lines = run.messages
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def test_adapter_of_another_base_is_one_line(bases, tmp_path):
    adapter = make_adapter(bases["wide"], tmp_path / "wide-lora", **CASES["plain"][1])
    line = one_line_refusal(
        merge([bases["llama"], adapter], tmp_path), "adapter_model.safetensors", "q_proj.lora_A.weight", "expected"
    )
    assert "[4, 48]" in line and "[4, 32]" in line  # found (for the 48-wide base) vs expected


def test_dora_is_refused_by_name(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "dora", use_dora=True, **CASES["plain"][1])
    one_line_refusal(merge([bases["llama"], adapter], tmp_path), "adapter_config.json", "use_dora", "DoRA")


def test_other_peft_types_are_refused_by_name(bases, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(bases["llama"])
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path / "ia3")
    run = merge([bases["llama"], tmp_path / "ia3"], tmp_path)
    one_line_refusal(run, "adapter_config.json", "peft_type", "'IA3'", "LORA")


def test_modified_and_quantized_bases_are_refused_by_name(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "lora", **CASES["plain"][1])
    set_config(adapter, init_lora_weights="pissa")
    one_line_refusal(merge([bases["llama"], adapter], tmp_path), "init_lora_weights", "PiSSA")
    set_config(adapter, init_lora_weights="loftq")
    one_line_refusal(merge([bases["llama"], adapter], tmp_path), "init_lora_weights", "quantized")
    set_config(adapter, init_lora_weights=True)
    quantized = build_model("llama", tmp_path / "quantized", seed=0)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    one_line_refusal(merge([quantized, adapter], tmp_path), "quantized", "bitsandbytes")


def test_adapter_as_base_is_refused(bases, tmp_path):
    adapter = make_adapter(bases["llama"], tmp_path / "lora", **CASES["plain"][1])
    run = merge([adapter, bases["llama"]], tmp_path)
    one_line_refusal(run, "base_model", "PEFT adapter")


def test_malicious_bin_adapter_is_refused_and_nothing_runs(bases, tmp_path):
    """adapter_model.bin loads only with weights_only=True, as any pickled checkpoint does."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    adapter = make_adapter(bases["llama"], tmp_path / "lora", safe=False, **CASES["plain"][1])
    torch.save({"base_model.model.lm_head.weight": Exploit()}, adapter / "adapter_model.bin")
    one_line_refusal(merge([bases["llama"], adapter], tmp_path), "adapter_model.bin", "weights_only=True")
    assert not marker.exists()


def test_an_adapter_alone_is_refused(bases, tmp_path):
    """An adapter has no weights of its own: read without a base (analyze), it is one line."""
    adapter = make_adapter(bases["llama"], tmp_path / "lora", **CASES["plain"][1])
    code, _, stderr = run_cli("analyze", adapter, "--out", tmp_path / "analysis", "--quiet")
    assert code == 3 and "PEFT adapter" in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_cache_key_follows_base_and_adapter(bases, tmp_path):
    """A merged tensor's content digest (the metric cache's key) changes with the adapter's A, B and
    scaling and with the base's tensor; the digest remembered for its files is not reused after any
    of them changed."""
    import shutil

    base = Path(shutil.copytree(bases["llama"], tmp_path / "base"))
    adapter = make_adapter(base, tmp_path / "lora", **CASES["plain"][1])
    name = "model.layers.0.self_attn.q_proj.weight"
    weights = adapter / "adapter_model.safetensors"
    cache = MetricCache()

    def key():
        with Checkpoint.open(AdapterSource(adapter, base)) as view:
            assert weights in view.sources_of(name) and base / "model.safetensors" in view.sources_of(name)
            return cache.content_digest(view, name)

    seen = [key()]
    assert key() == seen[0]
    for part in ("lora_A", "lora_B"):
        tensors = load_file(weights)
        tensors[f"base_model.model.{name.removesuffix('.weight')}.{part}.weight"] *= 1.5
        save_file(tensors, weights, metadata={"format": "pt"})
        seen.append(key())
    set_config(adapter, lora_alpha=9)
    seen.append(key())
    tensors = load_file(base / "model.safetensors")
    tensors[name] += 0.01
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    seen.append(key())
    assert len(set(seen)) == len(seen), seen


def test_ray_node_reads_the_adapter_on_its_base(bases, tmp_path):
    """What a Ray worker does with the origin the driver sends (nodes.py, called here directly)."""
    adapter = make_adapter(bases["llama"], tmp_path / "lora", **CASES["plain"][1])
    name = "model.layers.1.self_attn.v_proj.weight"
    with Checkpoint.open(AdapterSource(adapter, bases["llama"])) as view:
        expected, data = Expected.of(view.tensors[name], view.directory), view.read_bytes(name)
    origin = Origin(str(adapter), str(adapter), base=Origin(str(bases["llama"]), str(bases["llama"])))
    node = node_checkpoint(origin)
    assert checked_info(node, name, expected) and node.read_bytes(name) == data


@pytest.fixture(scope="module")
def hub(bases, tmp_path_factory):
    """An offline huggingface_hub cache holding the base and two adapters of it: one whose
    base_model_name_or_path is the base's hub id, one naming another repo."""
    root = tmp_path_factory.mktemp("adapter-hub")
    hf_home = root / "hf"
    build_hub_cache(hf_home, "testorg/tiny-base", bases["llama"])
    lora = make_adapter(bases["llama"], root / "lora", b_scale=0.02, **CASES["patterns"][1])
    build_hub_cache(hf_home, "testorg/tiny-lora", set_config(lora, base_model_name_or_path="testorg/tiny-base"))
    other = make_adapter(bases["llama"], root / "other", **CASES["plain"][1])
    build_hub_cache(hf_home, "testorg/other-lora", set_config(other, base_model_name_or_path="testorg/other-base"))
    return {"hf_home": hf_home, "lora": lora}


def run_offline(hub, config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(hub["hf_home"]), "HF_HUB_OFFLINE": "1", "MASTERMERGE_CACHE": str(tmp_path / "c.sqlite")}
    return run_process(cli_command("--config", path, "--quiet", "--json"), env=env)


def test_hub_adapter_from_offline_cache(bases, hub, tmp_path):
    out = tmp_path / "out"
    config = {"models": ["testorg/tiny-base", "testorg/tiny-lora"], "base_model": "testorg/tiny-base"}
    selection = {"non_layer": "compete", "goal": "min"}  # the adapter's low-rank update lowers NER: let it win
    run = run_offline(hub, config | {"output_dir": str(out), "selection": selection}, tmp_path)
    assert run.returncode == 0, run.stderr
    plan = json.loads((out / "merge_report.json").read_text())["plan"]
    expected = peft_merged(bases["llama"], hub["lora"], torch.float32)
    written = tensors_of(out)
    from_lora = [e["name"] for e in plan["entries"] if e["source"] == "testorg/tiny-lora"]
    assert from_lora, plan["choices"]
    for name in from_lora:
        assert ulps(written[name], expected[name]) <= 1, name

    refused = run_offline(
        hub,
        {
            "models": ["testorg/tiny-base", "testorg/other-lora"],
            "base_model": "testorg/tiny-base",
            "output_dir": str(tmp_path / "o2"),
        },
        tmp_path,
    )
    assert refused.returncode == 3, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.startswith("mastermerge:")]
    assert len(lines) == 1 and "base_model_name_or_path" in lines[0], refused.stderr
    assert "'testorg/tiny-base'" in lines[0] and "'testorg/other-base'" in lines[0]
