"""`mastermerge analyze` end to end: tables checked against independent references, figures
decoded, output directory rules, cache reuse."""

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import powerlaw
import pytest
from helpers import EXAMPLES
from safetensors import safe_open

from examples.tiny_models import build_model
from nerd.cli import main
from nerd.metrics import METRICS


def matrices_of(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.dim() == 2:
                    out[name] = tensor.double().numpy()
    return out


def analyze(*args) -> int:
    return main(["analyze", *map(str, args)])


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """The repo's example models and a tiny Qwen3 built here, analyzed once."""
    root = tmp_path_factory.mktemp("analyze")
    qwen3 = build_model("qwen3", root / "qwen3-tiny", seed=5)
    models = [EXAMPLES / "tiny-base", EXAMPLES / "tiny-docs", qwen3]
    out = root / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert analyze(*models, "--out", out, "--cache", root / "c.sqlite", "--esd", r"layers\.1\.|embed") == 0
    return {"root": root, "models": models, "out": out, "printed": printed.getvalue()}


def test_tables_hold_one_row_per_matrix_with_every_metric(analyzed):
    out = analyzed["out"]
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    document = json.loads((out / "metrics.json").read_text())
    assert list(rows[0]) == ["model", "tensor", "depth", "shape", *METRICS, "problem", "path"]
    assert len(rows) == len(document["rows"]) == sum(len(matrices_of(m)) for m in analyzed["models"])
    for model in analyzed["models"]:  # every matrix's path is in the rows, and counted in the summary
        paths = [r["path"] for r in rows if r["model"] == str(model)]
        assert set(paths) <= {"gram", "refined", "svd"}
        assert document["summary"][str(model)]["spectrum_paths"] == {
            p: paths.count(p) for p in ("gram", "refined", "svd")
        }
    assert "spectra: " in analyzed["printed"] and " gram, " in analyzed["printed"]
    for model in analyzed["models"]:
        mine = {r["tensor"]: r for r in rows if r["model"] == str(model)}
        matrices = matrices_of(model)
        assert set(mine) == set(matrices)
        for name, w in matrices.items():
            row = mine[name]
            assert row["shape"] == "x".join(map(str, w.shape))
            assert row["depth"] == (name.split(".")[2] if name.startswith("model.layers.") else "")
            s = np.linalg.svd(w, compute_uv=False)
            p = s / s.sum()
            assert float(row["ner"]) == pytest.approx(float(-(p * np.log(p)).sum() / math.log(len(s))), abs=1e-9)
            assert int(row["rank_numpy"]) == np.linalg.matrix_rank(w)
            assert float(row["log_spectral_norm"]) == pytest.approx(math.log10(s[0] ** 2), rel=1e-9)
        # one matrix per model against the powerlaw package on an independent spectrum
        name = "model.layers.1.mlp.down_proj.weight"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fit = powerlaw.Fit(np.linalg.svd(matrices[name], compute_uv=False) ** 2, verbose=False)
        assert float(mine[name]["alpha"]) == pytest.approx(fit.alpha, rel=1e-6)
        assert float(mine[name]["alpha_xmin"]) == pytest.approx(fit.xmin, rel=1e-6)
    json_rows = {(r["model"], r["tensor"]): r for r in document["rows"]}
    for row in rows:
        assert float(row["ner"]) == json_rows[(row["model"], row["tensor"])]["ner"]


def test_summary_lists_alpha_outliers_and_rank_loss(analyzed):
    document = json.loads((analyzed["out"] / "metrics.json").read_text())
    for model in map(str, analyzed["models"]):
        rows = [r for r in document["rows"] if r["model"] == model]
        summary = document["summary"][model]
        assert summary["alpha_below_2"] == [r["tensor"] for r in rows if r["alpha"] is not None and r["alpha"] < 2]
        assert summary["alpha_above_6"] == [r["tensor"] for r in rows if r["alpha"] is not None and r["alpha"] > 6]
        assert summary["rank_loss"] == {r["tensor"]: r["rank_loss"] for r in rows if r["rank_loss"]}
        assert summary["metrics"]["ner"]["mean"] == pytest.approx(np.mean([r["ner"] for r in rows]))
    printed = analyzed["printed"]
    assert "tiny-docs: 30 matrices, 4 layers" in printed
    assert printed.count("alpha > 6") == 3 and "rank loss:" in printed


def test_figures_are_real_pngs(analyzed):
    out = analyzed["out"]
    for name in ("heatmap_ner.png", "smin_histogram.png"):
        image = plt.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not blank
    esd = sorted((out / "esd").rglob("*.png"))
    chosen = [
        (m.name, t)
        for m in analyzed["models"]
        for t in matrices_of(m)
        if t.startswith("model.layers.1.") or "embed" in t
    ]
    assert sorted(esd) == sorted(out / "esd" / m / f"{t}.png" for m, t in chosen)
    assert (out / "esd" / "qwen3-tiny" / "model.layers.1.mlp.up_proj.weight.png") in esd
    assert plt.imread(esd[0]).shape[0] > 200


def test_second_run_reuses_the_cache_and_needs_force(analyzed, capsys):
    out, root = analyzed["out"], analyzed["root"]
    models = analyzed["models"]
    assert analyze(*models, "--out", out, "--cache", root / "c.sqlite", "--no-plots") == 2
    assert "exists and is not empty (use --force" in capsys.readouterr().err
    other = root / "second"
    assert (
        analyze(*models[:2], "--out", other, "--cache", root / "c.sqlite", "--json", "--quiet", "--esd", "embed") == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["spectra_computed"] == 0 and result["spectra_reused"] == 60
    assert sorted(p.name for p in (other / "esd").rglob("*.png")) == ["model.embed_tokens.weight.png"] * 2
    assert analyze(*models[:1], "--out", other, "--no-cache", "--force", "--no-plots", "--quiet") == 0
    assert sorted(p.name for p in other.iterdir()) == ["metrics.csv", "metrics.json"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["./missing-dir", "--out", "{root}/x"], "MODEL 1: local model directory './missing-dir' does not exist"),
        (["gpt2", "--out", "{root}/x"], "MODEL 1: 'gpt2' is neither an existing directory nor a hub id"),
        ([str(EXAMPLES / "tiny-base"), str(EXAMPLES / "tiny-base"), "--out", "{root}/x"], "' repeats MODEL 1"),
        ([str(EXAMPLES / "tiny-base"), "--out", str(EXAMPLES / "tiny-base")], "--out: "),
        (
            [str(EXAMPLES / "tiny-base"), "--out", "{root}/x", "--esd", "("],
            "--esd: '(' is not a valid regular expression",
        ),
    ],
)
def test_bad_arguments_get_one_line(tmp_path, capsys, args, message):
    assert analyze(*[a.format(root=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    assert analyze(EXAMPLES / "tiny-base", "--out", tmp_path / "x", "--force", "--no-cache") == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_weights_without_config_json_and_no_esd_by_default(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(EXAMPLES / "tiny-code" / "model.safetensors", bare / "model.safetensors")
    assert analyze(bare, "--out", tmp_path / "x", "--no-cache", "--quiet") == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "heatmap_ner.png",
        "metrics.csv",
        "metrics.json",
        "smin_histogram.png",
    ]
    with pytest.raises(SystemExit) as exited:  # a command comes first: otherwise it is a merge, wanting --config
        main(["--quiet", "analyze", str(bare), "--out", str(tmp_path / "y")])
    assert exited.value.code == 2
    assert "mastermerge [merge]: error: the following arguments are required: --config" in capsys.readouterr().err


def test_stale_cached_metrics_are_recomputed(tmp_path):
    import sqlite3

    from nerd.checkpoint import Checkpoint
    from nerd.engine import Engine, LocalExecutor, Work
    from nerd.store import MetricCache

    path = tmp_path / "c.sqlite"
    name = "model.layers.0.mlp.up_proj.weight"
    with Checkpoint.open(EXAMPLES / "tiny-base") as ckpt:
        work = Work(ckpt, name)
        cache = MetricCache(path)
        fresh = Engine(cache, LocalExecutor("cpu")).metrics([work])[work]
        cache.close()
        db = sqlite3.connect(path)  # a row written by a version that lacked a metric
        stored = json.loads(db.execute("SELECT metrics FROM metrics").fetchone()[0])
        del stored["rank_loss"]
        db.execute("UPDATE metrics SET metrics=?", (json.dumps(stored),))
        db.commit()
        db.close()
        cache = MetricCache(path)
        again = Engine(cache, LocalExecutor("cpu")).metrics([work])[work]
        cache.close()
    assert again == fresh and cache.computed == 0  # the spectrum is cached
