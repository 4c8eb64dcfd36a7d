"""weightwatcher's log_alpha_norm, mp_softrank and num_spikes against weightwatcher 0.7.7 itself,
on the same matrices: its lower-level `mp_fit` on our eigenvalues, and its whole
`analyze(mp_fit=True, svd_method="accurate")` on the repo's trained Llama."""

import contextlib
import io
import json
import logging
import re
import sqlite3

import numpy as np
import pytest
import torch
from helpers import TRAINED

from nerd import marchenko
from nerd.checkpoint import Checkpoint
from nerd.cli import main
from nerd.metrics import metrics_of
from nerd.spectra import spectrum_of

NEW_COLUMNS = ("log_alpha_norm", "mp_softrank", "num_spikes")


def weightwatcher():
    """weightwatcher 0.7.7, its logging quiet."""
    import weightwatcher as ww

    assert ww.__version__ == "0.7.7"
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return ww


def their_mp_fit(eigenvalues: np.ndarray, shape: tuple[int, int]) -> dict:
    """weightwatcher's own MP fit (WeightWatcher.mp_fit, as analyze(mp_fit=True) calls it) of
    these eigenvalues, ascending as it keeps them."""
    ww = weightwatcher()
    evals = np.sort(eigenvalues)
    n, m = max(shape), min(shape)
    with contextlib.redirect_stdout(io.StringIO()):
        spikes, sigma, softrank, _, bulk_max, scale = ww.WeightWatcher().mp_fit(
            evals, n, m, 1, "W", 0, 0, False, False, "", "blue", 0.6, True, evals, randomize=False
        )
    return {"num_spikes": spikes, "sigma": sigma, "mp_softrank": softrank, "bulk_max": bulk_max * scale**2}


def heavy_tailed(rng, m: int, n: int, tail: float) -> np.ndarray:
    """A Gaussian matrix whose columns are scaled by Pareto draws: a power-law ESD tail."""
    return rng.standard_normal((m, n)) * (rng.pareto(tail, n) + 0.1)


def planted(rng, m: int, n: int, spikes: int) -> np.ndarray:
    """Gaussian noise (the MP bulk) plus `spikes` strong rank-one directions far above its edge."""
    w = rng.standard_normal((m, n))
    for i in range(spikes):
        u, v = rng.standard_normal(m), rng.standard_normal(n)
        w += (3.0 + i) * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)) * np.sqrt(m)
    return w


def random_matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    return {
        "heavy 300x120": heavy_tailed(rng, 300, 120, 1.5),
        "heavy 120x500": heavy_tailed(rng, 120, 500, 2.5),
        "heavy 256x256": heavy_tailed(rng, 256, 256, 2.0),
        "gaussian 400x100": rng.standard_normal((400, 100)),
        "gaussian 200x200": rng.standard_normal((200, 200)),
        "planted 1000x250": planted(rng, 1000, 250, 3),
    }


def trained_matrices() -> dict[str, np.ndarray]:
    """Every 2-D tensor of the trained Llama, widened exactly from bf16 to float64."""
    with Checkpoint.open(TRAINED) as ckpt:
        names = [name for name, info in ckpt.tensors.items() if len(info.shape) == 2]
        return {name: ckpt.read(name).double().numpy() for name in names}


RANDOM = random_matrices()


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_mp_fit_equals_weightwatchers_on_the_same_eigenvalues(name):
    w = RANDOM[name]
    eigenvalues = spectrum_of(w).values ** 2
    fit, theirs = marchenko.bulk_fit(eigenvalues, w.shape), their_mp_fit(eigenvalues, w.shape)
    assert fit.q == max(w.shape) / min(w.shape)
    assert fit.sigma == pytest.approx(theirs["sigma"], rel=1e-12)
    assert fit.bulk_max == pytest.approx(theirs["bulk_max"], rel=1e-12)
    assert fit.mp_softrank == pytest.approx(theirs["mp_softrank"], rel=1e-12)
    assert fit.num_spikes == theirs["num_spikes"]
    mine = metrics_of(spectrum_of(w))
    assert (mine["mp_softrank"], mine["num_spikes"]) == (fit.mp_softrank, fit.num_spikes)


def test_planted_spikes_are_counted_and_a_gaussian_has_none():
    assert metrics_of(spectrum_of(RANDOM["planted 1000x250"]))["num_spikes"] == 3
    gaussian = metrics_of(spectrum_of(RANDOM["gaussian 400x100"]))
    assert gaussian["num_spikes"] == 0
    assert gaussian["mp_softrank"] == pytest.approx(1.0, abs=0.1)  # the largest eigenvalue is the bulk edge


def test_log_alpha_norm_is_the_log_of_the_alpha_norm_without_overflow():
    rng = np.random.default_rng(3)
    w = heavy_tailed(rng, 300, 120, 1.5)
    m = metrics_of(spectrum_of(w))
    lam = np.linalg.svd(w, compute_uv=False) ** 2
    assert m["log_alpha_norm"] == pytest.approx(np.log10(np.sum(lam ** m["alpha"])), rel=1e-12)
    big = metrics_of(spectrum_of(w * 1e30))  # lambda^alpha overflows float64: the sum in the log domain does not
    assert big["log_alpha_norm"] == pytest.approx(m["log_alpha_norm"] + 60 * m["alpha"], rel=1e-12)


def test_a_small_matrix_has_no_mp_fit():
    m = metrics_of(spectrum_of(np.random.default_rng(0).standard_normal((50, 9))))
    assert m["mp_softrank"] is None and m["num_spikes"] is None and m["ner"] is not None


COMPARED = r"model\.embed_tokens|model\.layers\.1\.|lm_head"  # one block, the embeddings and the head


@pytest.fixture(scope="module")
def analyzed_by_weightwatcher():
    """weightwatcher's analyze of the trained Llama's COMPARED matrices (float32 weights: bf16
    widened exactly), by tensor name, with the option that gives its MP columns (mp_fit) and its
    float64 SVD; its fit takes about 2 s a matrix here, so not all 30 are run."""
    import transformers

    ww = weightwatcher()
    model = transformers.AutoModelForCausalLM.from_pretrained(TRAINED, dtype=torch.float32)
    watcher = ww.WeightWatcher(model=model)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        layers = watcher.describe()
        ids = [int(i) for i, name in zip(layers["layer_id"], layers["longname"]) if re.match(COMPARED, name)]
        details = watcher.analyze(layers=ids, mp_fit=True, svd_method="accurate")
    return {f"{row['longname']}.weight": row for row in details.to_dict("records")}


def test_trained_model_columns_equal_weightwatchers_analyze(analyzed_by_weightwatcher):
    theirs = analyzed_by_weightwatcher
    matrices = {name: w for name, w in trained_matrices().items() if re.match(COMPARED, name)}
    assert set(theirs) == set(matrices) and len(matrices) == 9  # square, 352 x 128 and 1024 x 128
    for name, w in matrices.items():
        mine, row = metrics_of(spectrum_of(w)), theirs[name]
        assert mine["alpha"] == pytest.approx(row["alpha"], rel=1e-12), name
        assert mine["log_alpha_norm"] == pytest.approx(row["log_alpha_norm"], rel=1e-12), name
        assert mine["mp_softrank"] == pytest.approx(row["mp_softrank"], rel=1e-12), name
        assert mine["num_spikes"] == row["num_spikes"], name
    assert len({row["num_spikes"] for row in theirs.values()}) > 3  # the counts differ from matrix to matrix


def rows_of(out) -> dict[str, dict]:
    return {row["tensor"]: row for row in json.loads((out / "metrics.json").read_text())["rows"]}


@pytest.mark.parametrize("old", ["lacking the new keys", "of an older metrics version"])
def test_an_old_cache_row_gets_the_new_columns(tmp_path, old):
    cache = tmp_path / "c.sqlite"
    quiet = ["--cache", cache, "--no-plots", "--quiet"]
    assert main(["analyze", str(TRAINED), "--out", str(tmp_path / "first"), *map(str, quiet)]) == 0
    db = sqlite3.connect(cache)  # rows as a version without these columns wrote them
    for digest, version, stored in db.execute("SELECT digest, version, metrics FROM metrics").fetchall():
        values = {k: v for k, v in json.loads(stored).items() if k not in NEW_COLUMNS}
        new_version = version if old == "lacking the new keys" else "0123456789abcdef"
        db.execute(
            "UPDATE metrics SET version=?, metrics=? WHERE digest=? AND version=?",
            (new_version, json.dumps(values), digest, version),
        )
    db.commit()
    db.close()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        second = ["analyze", str(TRAINED), "--out", str(tmp_path / "second"), "--json", *map(str, quiet)]
        assert main(second) == 0
    assert json.loads(printed.getvalue())["spectra_computed"] == 0  # derived again from the cached spectra
    first, again = rows_of(tmp_path / "first"), rows_of(tmp_path / "second")
    assert again == first
    assert all(row[c] is not None for row in again.values() for c in NEW_COLUMNS)
