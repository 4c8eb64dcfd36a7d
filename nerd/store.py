"""The metric cache's store: what every table holds, keyed by content, with one get and one put per table.

Eight tables in one SQLite file (database.py keeps the connection usable). For the weights:
`tensors` maps (file, its size, mtime, ctime and inode, tensor name) to a digest of the tensor's
bytes (content_key), so an unchanged file is not even read again; a changed or replaced file no
longer matches (ctime cannot be set back by tools that restore mtimes) and is read again.
`spectra` maps that digest to the float64 singular values, so identical tensors (frozen layers
shared by fine-tunes, a copied model) are computed once, and every metric can be derived again
without a new decomposition. `metrics` maps (digest, version of the metric definitions) to
every metric of metrics.py as JSON, so a warm run recomputes nothing. `tether_sums` maps a pair
of digests (candidate tensor, base tensor) to the three sums its compatibility is computed from
(tether.py), <c, b>, |c|^2 and |b|^2 (all NULL when either tensor has a NaN or Inf), so a warm
run compares nothing again.

Two more hold what DLEC's calibration run measured (importance.py), so a second run with the same
model and text runs nothing: `activation_runs` (model digest, text digest, version -> who and
what, token and window counts, layers, the dtype and device it ran in, seconds) and `layer_stats`
(the same key and a layer -> the sums its importance scores are made of). The model digest
covers config.json and the content digest of every tensor; the text digest covers the token ids
and the window length. `evaluations` holds what an evaluation measured (evaluate.py), so an
unchanged model is never run on the same text again: (model digest, digest of the scored token
windows with the dtype and device they ran in, version) -> the summed negative log-likelihood,
the number of scored tokens, the windows, who and what, and the seconds it took.

The eighth, `leases`, holds no result: which run is computing which spectrum or tether pair
right now, so that runs sharing the file compute each once (leases.py, which the engine uses).

Every table but `tensors` and `leases` carries a version: rows of another version are deleted when the cache
is opened and recomputed on use. The store owns the versions of the tables it alone defines
(TETHER_VERSION, ACTIVATION_VERSION, EVALUATION_VERSION, and SCHEMA_VERSION for the table
layout); SPECTRUM_VERSION and METRICS_VERSION stay with the computations they version
(spectra.py; metrics.py, whose version is a digest of its source and marchenko.py's).

Default location: $MASTERMERGE_CACHE, else $XDG_CACHE_HOME/mastermerge/metrics.sqlite, else
~/.cache/mastermerge/metrics.sqlite. Delete the file to clear it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .database import Database, Schema
from .hashing import content_key
from .leases import TABLE as LEASES_TABLE
from .leases import Leases, spectrum_key, tensor_key
from .metrics import METRICS_VERSION
from .spectra import PATHS, SPECTRUM_VERSION, Spectrum

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

SCHEMA_VERSION = "6"  # of the table layout below: a change drops the weights' tables
COMPATIBLE_VERSIONS = ("5",)  # earlier layouts opened as they are: 6 only added `leases`
TETHER_VERSION = "1"  # bump when tether.sums_of changes: cached sums are then recomputed
ACTIVATION_VERSION = "1"  # bump when importance.py measures its LayerStats otherwise: the cache then measures again
EVALUATION_VERSION = "1"  # bump when evaluate.py scores tokens differently: evaluations are then rerun
TABLES = Schema(
    SCHEMA_VERSION,
    """
CREATE TABLE IF NOT EXISTS tensors (
    file TEXT NOT NULL, stat TEXT NOT NULL, tensor TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (file, tensor));
CREATE TABLE IF NOT EXISTS spectra (
    digest TEXT NOT NULL, version TEXT NOT NULL, shape TEXT NOT NULL, problem TEXT, singular_values BLOB,
    path TEXT, created REAL NOT NULL, PRIMARY KEY (digest, version));
CREATE TABLE IF NOT EXISTS metrics (
    digest TEXT NOT NULL, version TEXT NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (digest, version));
CREATE TABLE IF NOT EXISTS tether_sums (
    candidate TEXT NOT NULL, base TEXT NOT NULL, version TEXT NOT NULL, dot REAL, candidate_sq REAL, base_sq REAL,
    PRIMARY KEY (candidate, base, version));
CREATE TABLE IF NOT EXISTS activation_runs (
    model TEXT NOT NULL, text TEXT NOT NULL, version TEXT NOT NULL, model_ref TEXT NOT NULL, text_name TEXT NOT NULL,
    tokens INTEGER NOT NULL, windows INTEGER NOT NULL, layers INTEGER NOT NULL, dtype TEXT NOT NULL,
    device TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (model, text, version));
CREATE TABLE IF NOT EXISTS layer_stats (
    model TEXT NOT NULL, text TEXT NOT NULL, version TEXT NOT NULL, layer INTEGER NOT NULL,
    tokens INTEGER NOT NULL, cos_sum REAL NOT NULL, tail_count INTEGER NOT NULL, entries INTEGER NOT NULL,
    update_sum REAL NOT NULL, PRIMARY KEY (model, text, version, layer));
CREATE TABLE IF NOT EXISTS evaluations (
    model TEXT NOT NULL, text TEXT NOT NULL, version TEXT NOT NULL, model_ref TEXT NOT NULL, text_name TEXT NOT NULL,
    kind TEXT NOT NULL, nll REAL NOT NULL, tokens INTEGER NOT NULL, windows INTEGER NOT NULL, dtype TEXT NOT NULL,
    device TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (model, text, version));
"""
    + LEASES_TABLE,
    dropped=("tensors", "spectra", "metrics"),
    versions=(
        ("spectra", SPECTRUM_VERSION),
        ("metrics", METRICS_VERSION),
        ("tether_sums", TETHER_VERSION),
        ("activation_runs", ACTIVATION_VERSION),
        ("layer_stats", ACTIVATION_VERSION),
        ("evaluations", EVALUATION_VERSION),
    ),
    compatible=COMPATIBLE_VERSIONS,
)


def default_cache_path() -> Path:
    if os.environ.get("MASTERMERGE_CACHE"):
        return Path(os.environ["MASTERMERGE_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mastermerge" / "metrics.sqlite"


class MetricCache:
    """Spectra, metrics and measurements by content, in SQLite. `path=None` keeps them in memory for
    this process only.

    The counters say what the scoring engine (engine.py) did with this cache since it was opened:
    spectra (and a blend's metrics) `computed`, results found here and `reused`, tether pairs
    compared (`pairs_computed`). They live with the cache because a batch of runs shares it."""

    def __init__(self, path: str | Path | None = None):
        self.database = Database(path, TABLES)
        self.leases = Leases(self.database)
        self.computed = 0
        self.reused = 0
        self.pairs_computed = 0

    @property
    def in_memory(self) -> bool:
        """Whether this cache lives in memory only (asked for, or since the file could not be used)."""
        return self.database.in_memory

    def close(self) -> None:
        """Release this process's leases and close the file."""
        try:
            self.leases.close()
        finally:
            self.database.close()

    # tensors: the content digest of each tensor of an unchanged file

    def digest_of(self, checkpoint: Checkpoint, name: str) -> str | None:
        """The digest recorded for this tensor of this file, if the file is unchanged since."""
        file, stat = file_identity(checkpoint, name)
        row = self.database.read_one(
            "SELECT digest FROM tensors WHERE file=? AND tensor=? AND stat=?", (file, name, stat)
        )
        return None if row is None else row[0]

    def remember_digest(self, checkpoint: Checkpoint, name: str, key: str) -> None:
        """Record which digest this tensor of this (unchanged) file has (committed)."""
        file, stat = file_identity(checkpoint, name)
        self.database.write("INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?)", (file, stat, name, key))

    def content_digest(self, checkpoint: Checkpoint, name: str) -> str:
        """The content digest of a tensor: the one recorded for an unchanged file, else read, hashed and
        recorded for next time."""
        key = self.digest_of(checkpoint, name)
        if key is None:
            key = content_key(checkpoint.tensors[name], checkpoint.read_bytes(name))
            self.remember_digest(checkpoint, name, key)
        return key

    def claim_keys(self, checkpoint: Checkpoint, name: str, digest: str | None) -> list[str]:
        """What a run claims (leases.py) before it computes the spectrum of a tensor: the tensor of
        its unchanged file, and its content digest when that is known."""
        keys = [tensor_key(*file_identity(checkpoint, name), name)]
        return keys if digest is None else [*keys, spectrum_key(digest)]

    # spectra and metrics, by content digest

    def spectrum(self, key: str, shape: tuple[int, ...]) -> Spectrum | None:
        """The stored spectrum of a content digest (of a matrix of `shape`); None if there is none, or
        its row is damaged."""
        row = self.database.read_one(
            "SELECT problem, singular_values, path FROM spectra WHERE digest=? AND version=?", (key, SPECTRUM_VERSION)
        )
        return None if row is None else spectrum_from_row(*row, shape)

    def put_spectrum(self, key: str, shape: tuple[int, ...], spectrum: Spectrum) -> None:
        """Store the spectrum of a content digest (committed)."""
        blob = None if spectrum.values is None else spectrum.values.astype("<f8").tobytes()
        self.database.write(
            "INSERT OR REPLACE INTO spectra VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, SPECTRUM_VERSION, str(list(shape)), spectrum.problem, blob, spectrum.path, time.time()),
        )

    def metrics(self, key: str) -> dict | None:
        """The metrics stored under a content digest (or a blend's key) as they were put, with their
        `problem`; None if there are none, or their row is damaged."""
        row = self.database.read_one("SELECT metrics FROM metrics WHERE digest=? AND version=?", (key, METRICS_VERSION))
        return None if row is None else parsed(row[0])

    def put_metrics(self, key: str, values: dict) -> None:
        """Store the metrics of a content digest or a blend's key (committed)."""
        self.database.write(
            "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",
            (key, METRICS_VERSION, json.dumps(values, allow_nan=False)),
        )

    # tether sums, by the content digests of a candidate's tensor and the base's

    def tether_sums(self, candidate: str, base: str) -> tuple | None:
        """The stored row of a pair (dot, candidate_sq, base_sq), all None for a pair with a NaN or Inf;
        None if the pair was never compared."""
        return self.database.read_one(
            "SELECT dot, candidate_sq, base_sq FROM tether_sums WHERE candidate=? AND base=? AND version=?",
            (candidate, base, TETHER_VERSION),
        )

    def put_tether_sums(self, candidate: str, base: str, sums: tuple[float, float, float] | None) -> None:
        """Store the sums of a pair, None for a pair with a NaN or Inf (committed)."""
        self.database.write(
            "INSERT OR REPLACE INTO tether_sums VALUES (?, ?, ?, ?, ?, ?)",
            (candidate, base, TETHER_VERSION, *(sums or (None, None, None))),
        )

    # calibration runs (importance.py), by model digest and text digest

    def calibration(self, model: str, text: str) -> list[tuple] | None:
        """The statistics of an earlier calibration run of this model on this text, one row per layer
        (tokens, cos_sum, tail_count, entries, update_sum); None if there was none (or it is incomplete)."""
        run = self.database.read_one(
            "SELECT layers FROM activation_runs WHERE model=? AND text=? AND version=?",
            (model, text, ACTIVATION_VERSION),
        )
        if run is None:
            return None
        rows = self.database.read(
            "SELECT tokens, cos_sum, tail_count, entries, update_sum FROM layer_stats "
            "WHERE model=? AND text=? AND version=? ORDER BY layer",
            (model, text, ACTIVATION_VERSION),
        )
        return rows if len(rows) == run[0] else None

    def put_calibration(self, model: str, text: str, layers: list[tuple], run: dict) -> None:
        """Record one calibration run, its rows (as `calibration` gives them) together: `run` has
        model_ref, text_name, tokens, windows, dtype, device and seconds."""
        self.database.write_together(
            [
                (
                    "INSERT OR REPLACE INTO activation_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            model,
                            text,
                            ACTIVATION_VERSION,
                            run["model_ref"],
                            run["text_name"],
                            run["tokens"],
                            run["windows"],
                            len(layers),
                            run["dtype"],
                            run["device"],
                            run["seconds"],
                            time.time(),
                        )
                    ],
                ),
                (
                    "INSERT OR REPLACE INTO layer_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(model, text, ACTIVATION_VERSION, layer, *row) for layer, row in enumerate(layers)],
                ),
            ]
        )

    # evaluations (evaluate.py), by model digest and the digest of the scored windows

    def evaluation(self, model: str, text: str) -> dict | None:
        """An earlier evaluation of this model on these token windows: nll, tokens, windows, seconds."""
        row = self.database.read_one(
            "SELECT nll, tokens, windows, seconds FROM evaluations WHERE model=? AND text=? AND version=?",
            (model, text, EVALUATION_VERSION),
        )
        return None if row is None else dict(zip(("nll", "tokens", "windows", "seconds"), row))

    def put_evaluation(self, model: str, text: str, run: dict) -> None:
        """Record one evaluation: `run` has model_ref, text_name, kind, nll, tokens, windows, dtype,
        device and seconds."""
        self.database.write(
            "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model,
                text,
                EVALUATION_VERSION,
                run["model_ref"],
                run["text_name"],
                run["kind"],
                run["nll"],
                run["tokens"],
                run["windows"],
                run["dtype"],
                run["device"],
                run["seconds"],
                time.time(),
            ),
        )


def parsed(text: str) -> dict | None:
    """The metrics stored as JSON, or None if the text is not a JSON object (a damaged row)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def spectrum_from_row(
    problem: str | None, blob: bytes | None, path: str | None, shape: tuple[int, ...]
) -> Spectrum | None:
    """The stored spectrum; None if the row is damaged (not a whole number of float64 values, or an
    unknown path)."""
    if blob is not None and (not isinstance(blob, bytes) or len(blob) % 8) or path not in (*PATHS, None):
        return None
    return Spectrum(None if blob is None else np.frombuffer(blob, dtype="<f8").copy(), tuple(shape), problem, path)


def file_identity(checkpoint: Checkpoint, name: str) -> tuple[str, str]:
    """The resolved path of the file a tensor is read from and its size, mtime, ctime and inode: any
    rewrite changes them. An adapter's tensor depends on several files (the base's and the
    adapter's): their paths and stats joined by '|'."""
    files = [str(file.resolve()) for file in checkpoint.sources_of(name)]
    stats = []
    for file in files:
        st = os.stat(file)
        stats.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    return "|".join(files), "|".join(stats)
