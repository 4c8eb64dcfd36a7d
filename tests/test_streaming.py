"""The fast paths against the plain ones: bf16 widened by its bits, the batched device path (run
on the CPU here), and the engine's read-ahead (same results, bounded, errors surfaced,
nothing read when warm)."""

import threading
import time

import numpy as np
import pytest
import torch

from examples.tiny_models import build_model
from nerd.checkpoint import Checkpoint
from nerd.engine import Engine, LocalExecutor, Work, read_ahead
from nerd.errors import ModelError
from nerd.metrics import every_metric
from nerd.spectra import as_numpy, batched_spectra, float64_rows, spectra_of, spectrum_of
from nerd.store import MetricCache


def test_bf16_widened_by_its_bits_equals_torch():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # every bf16 value, NaN and Inf included
    w = bits.view(torch.bfloat16).reshape(256, 256)
    got = float64_rows(as_numpy(w).T, 0, 256)  # a transposed view, as for a wide matrix
    expected = w.T.to(torch.float64).numpy()
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)  # NaN == NaN here


def matrices() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    ill = u[:, :40] @ torch.diag(torch.logspace(0, -7, 40, dtype=torch.float64)) @ u[:40, :40].T
    nan = torch.randn(30, 20, generator=g)
    nan[3, 4] = float("nan")
    return [
        torch.randn(30, 20, generator=g),
        torch.randn(30, 20, generator=g).to(torch.bfloat16),
        torch.randn(20, 30, generator=g),
        nan,
        torch.zeros(30, 20),
        ill,
        torch.randn(30, 20, generator=g).to(torch.bfloat16),
        torch.randn(64, 64, generator=g),
    ]


def test_batched_device_path_equals_one_at_a_time(monkeypatch):
    import nerd.spectra

    monkeypatch.setattr(nerd.spectra, "BATCH_BYTES", 2 * 30 * 20 * 8)  # two 30 x 20 matrices per batch
    ms = matrices()
    batched = batched_spectra(ms, torch.device("cpu"))
    for m, got in zip(ms, batched):
        one = spectrum_of(m)
        assert got.shape == one.shape and got.problem == one.problem
        if one.values is not None:
            np.testing.assert_allclose(got.values, one.values, rtol=1e-9, atol=1e-12 * one.values[0])
    assert [s.problem for s in spectra_of(ms, "cpu")] == [s.problem for s in batched]


@pytest.fixture()
def model(tmp_path):
    return build_model("llama", tmp_path / "m", seed=0, num_layers=3)


def test_streamed_metrics_equal_one_by_one_and_read_nothing_when_warm(model, tmp_path, monkeypatch):
    with Checkpoint.open(model) as ckpt:
        names = [n for n, i in ckpt.tensors.items() if i.is_matrix]
        alone = {n: every_metric(spectrum_of(ckpt.read(n))) for n in names}
        cache = MetricCache(tmp_path / "c.sqlite")
        engine = Engine(cache, LocalExecutor("cpu"))
        assert {w.tensor: m for w, m in engine.metrics([Work(ckpt, n) for n in names]).items()} == alone
        assert cache.computed == len(names) and cache.reused == 0

    def no_reading(*args):
        raise AssertionError("a warm run read a tensor")

    monkeypatch.setattr(Checkpoint, "read_bytes", no_reading)
    with Checkpoint.open(model) as ckpt:
        assert {w.tensor: m for w, m in engine.metrics([Work(ckpt, n) for n in names]).items()} == alone
    assert cache.reused == len(names)
    cache.close()


def test_read_ahead_stays_a_few_tensors_ahead_and_raises_where_it_failed(model):
    with Checkpoint.open(model) as ckpt:
        names = list(ckpt.tensors)
        read = []
        original = ckpt.read_bytes
        ckpt.read_bytes = lambda name: read.append(name) or original(name)
        items = read_ahead([Work(ckpt, n) for n in names], depth=2)
        first = next(items)
        time.sleep(0.2)  # the reader has had all the time it needs to run ahead
        assert first[0].tensor == names[0] and len(read) <= 1 + 2 + 1  # the one taken, the queue, the one waiting
        assert [w.tensor for w, _, _ in items] == names[1:]

        def broken(name):
            if name == names[2]:
                raise ModelError(f"{name}: cut short")
            return original(name)

        ckpt.read_bytes = broken
        got = []
        with pytest.raises(ModelError, match="cut short"):
            for work, _, _ in read_ahead([Work(ckpt, n) for n in names]):
                got.append(work.tensor)
        assert got == names[:2]
    assert not [t for t in threading.enumerate() if t.name == "mastermerge-read-ahead"]


@pytest.mark.parametrize("kernel_copy", ["works", "refused", "missing"])
def test_shards_are_the_same_with_or_without_kernel_copies(tmp_path, monkeypatch, llama_family, kernel_copy):
    import os

    from helpers import api_merge, tensors_of

    base, ft = llama_family(2)["base"], llama_family(2)["ft"]
    if kernel_copy == "refused":

        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif kernel_copy == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    api_merge([base, ft], tmp_path / "out", shard_size="100KB")
    written, inputs = tensors_of(tmp_path / "out"), {**tensors_of(ft), **tensors_of(base)}
    report = __import__("json").loads((tmp_path / "out" / "merge_report.json").read_text())
    sources = {base.name: tensors_of(base), ft.name: tensors_of(ft)}  # as the report names them
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1 and len(written) == len(inputs)
    for entry in report["plan"]["entries"]:
        assert torch.equal(written[entry["name"]], sources[entry["source"]][entry["tensor"]])


def test_a_warm_merge_does_not_import_torch(tmp_path, llama_family):
    """torch takes over a second to import; a merge whose spectra are all cached never needs it."""
    import subprocess
    import sys

    from helpers import REPO, write_config

    config = write_config(tmp_path / "m.yaml", [llama_family(2)["base"], llama_family(2)["ft"]], tmp_path / "out")
    script = "import sys; from nerd.cli import main; code = main(sys.argv[1:]); print(code, 'torch' in sys.modules)"
    args = [sys.executable, "-c", script, "--config", str(config), "--cache", str(tmp_path / "c.sqlite"), "--quiet"]
    cold = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert cold.stdout.split()[-2:] == ["0", "True"], cold.stderr  # spectra computed: torch was needed
    warm = subprocess.run(args + ["--force"], capture_output=True, text=True, cwd=REPO)
    assert warm.stdout.split()[-2:] == ["0", "False"], warm.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_large_matrices_take_the_other_eigensolver_with_the_same_result(monkeypatch):
    import nerd.spectra

    w = torch.randn(90, 40, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    small = spectrum_of(w)
    monkeypatch.setattr(nerd.spectra, "LARGE_K", 8)  # torch's solver from k = 8 on
    large = spectrum_of(w)
    reference = np.linalg.svd(w.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(large.values, reference, rtol=1e-9)
    np.testing.assert_allclose(small.values, reference, rtol=1e-9)


def test_figures_of_an_earlier_merge_in_the_base_are_not_carried_over(tmp_path):
    from helpers import api_merge

    base = build_model("llama", tmp_path / "base", seed=0)
    ft = build_model("llama", tmp_path / "ft", seed=1, base_dir=base, noise=0.1)
    for name in ("heatmap_ner.png", "heatmap_compatibility.png", "expansion_curve.png"):
        (base / name).write_bytes(b"stale figure of another merge")
    out = tmp_path / "out"
    api_merge([base, ft], out)
    for name in ("heatmap_ner.png", "heatmap_compatibility.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert not (out / "expansion_curve.png").exists()
    assert (out / "tokenizer.json").is_file()
