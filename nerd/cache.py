"""The metric cache: an SQLite file that remembers every spectrum and metric, keyed by content.

Four tables for the weights. `tensors` maps (file, its size, mtime, ctime and inode, tensor name) to a digest of
the tensor's bytes, so an unchanged file is not even read again; a changed or replaced file no
longer matches (ctime cannot be set back by tools that restore mtimes) and is read again.
`spectra` maps that digest to the float64 singular values, so identical
tensors (frozen layers shared by fine-tunes, a copied model) are computed once, and every
metric can be derived again without a new decomposition. `metrics` maps (digest, version of the
metric definitions) to every metric of metrics.py as JSON, so a warm run recomputes nothing.
Both carry a version (spectra.SPECTRUM_VERSION, metrics.METRICS_VERSION, the latter a digest of
metrics.py): rows of another version are deleted when the cache is opened and recomputed on use.

`tether_sums` maps a pair of digests (candidate tensor, base tensor) to the three sums its
compatibility is computed from (tether.py), <c, b>, |c|^2 and |b|^2 (all NULL when either tensor
has a NaN or Inf), so a warm run compares nothing again.

Two more tables hold what DLEC's calibration run measured (importance.py), so a second run with the
same model and text runs nothing: `activation_runs` (model digest, text digest, version -> who and
what, token and window counts, layers, the dtype and device it ran in, seconds) and `layer_stats`
(the same key and a layer -> the sums its importance scores are made of). The model digest covers
config.json and the content digest of every tensor; the text digest covers the token ids and the
window length.

Default location: $MASTERMERGE_CACHE, else $XDG_CACHE_HOME/mastermerge/metrics.sqlite, else
~/.cache/mastermerge/metrics.sqlite. Delete the file to clear it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import Checkpoint, TensorInfo, as_tensor, numel
from .errors import OutputError
from .importance import ACTIVATION_VERSION, LayerStats
from .metrics import METRICS, METRICS_VERSION, metrics_of
from .spectra import BATCH_BYTES, SPECTRUM_VERSION, Spectrum, numpy_matrix, pick_device, spectra_of

if TYPE_CHECKING:
    pass

SCHEMA_VERSION = "4"
TETHER_VERSION = "1"  # bump when tether.sums_of changes: cached sums are then recomputed
META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
SCHEMA = """
CREATE TABLE IF NOT EXISTS tensors (
    file TEXT NOT NULL, stat TEXT NOT NULL, tensor TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (file, tensor));
CREATE TABLE IF NOT EXISTS spectra (
    digest TEXT NOT NULL, version TEXT NOT NULL, shape TEXT NOT NULL, problem TEXT, singular_values BLOB,
    created REAL NOT NULL, PRIMARY KEY (digest, version));
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
"""


def default_cache_path() -> Path:
    if os.environ.get("MASTERMERGE_CACHE"):
        return Path(os.environ["MASTERMERGE_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mastermerge" / "metrics.sqlite"


class MetricCache:
    """Spectra by content, in SQLite. `path=None` keeps them in memory for this process only."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.computed = 0
        self.reused = 0
        self.pairs_computed = 0
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the metric cache folder ({exc.strerror})") from None
        try:
            self.db = sqlite3.connect(str(self.path) if self.path else ":memory:", timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; only the last commits may be lost
            self.db.execute(META)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                self.db.executescript("DROP TABLE IF EXISTS tensors; DROP TABLE IF EXISTS spectra; "
                                      "DROP TABLE IF EXISTS metrics;")
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self.db.execute("DELETE FROM spectra WHERE version != ?", (SPECTRUM_VERSION,))
            self.db.execute("DELETE FROM metrics WHERE version != ?", (METRICS_VERSION,))
            self.db.execute("DELETE FROM tether_sums WHERE version != ?", (TETHER_VERSION,))
            for table in ("activation_runs", "layer_stats"):
                self.db.execute(f"DELETE FROM {table} WHERE version != ?", (ACTIVATION_VERSION,))
            self.db.commit()
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path}: cannot use this file as the metric cache ({exc}); "
                              f"delete it or pass --cache with another path") from None

    def metrics(self, checkpoint: Checkpoint, name: str, compute) -> dict:
        """Every metric of one tensor (metrics.py) and its `problem`, cached; the spectrum comes
        from `spectrum` (so from the cache, or `compute(tensor)`)."""
        key, data = self.digest(checkpoint, name)
        cached = self.cached_metrics(key)
        if cached is not None:
            self.reused += 1
            if data is not None:
                self.remember(checkpoint, name, key)
                self.db.commit()
            return cached
        return self.store_metrics(key, self.spectrum_by_digest(checkpoint, name, key, data, compute))

    def metrics_of_all(self, checkpoint: Checkpoint, names: list[str], device: str, bar=None) -> dict:
        """Every metric of each named matrix, as `metrics` gives them, streaming: the cached ones
        are looked up without reading; the others are read and hashed by a background thread one
        or two tensors ahead while the spectra are computed (reading overlaps computing, and
        memory holds a few tensors at most); on CUDA equal shapes are computed in batches (of up
        to BATCH_BYTES in float64). `device` is the config's (auto, cpu or cuda), resolved only if
        something is computed, so a warm run does not even import torch."""
        with ExitStack() as stack:
            return self.metrics_streaming(checkpoint, names, device, bar, stack)

    def metrics_streaming(self, checkpoint: Checkpoint, names: list[str], requested: str, bar,
                          stack: ExitStack) -> dict:
        """metrics_of_all's work; `stack` closes the metrics thread on the way out."""
        results: dict[str, dict] = {}

        def done(name: str, metrics: dict) -> None:
            results[name] = metrics
            if bar is not None:
                bar.update()

        unread = []
        for name in names:
            key = self.remembered_digest(checkpoint, name)
            cached = None if key is None else self.known_metrics(key, checkpoint.tensors[name].shape)
            if cached is None:
                unread.append(name)
            else:
                self.reused += 1
                done(name, cached)
        device = pick_device(requested) if unread else None
        if unread and device != "cpu":  # equal shapes next to each other, so they share a batch
            unread.sort(key=lambda n: checkpoint.tensors[n].shape)
        batch: list[tuple[str, str, np.ndarray]] = []
        pending: list[tuple[str, str, Future]] = []  # metrics being derived while the next spectrum is computed
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="mastermerge-metrics"))

        def settle(keep: int) -> None:
            while len(pending) > keep:
                name, key, future = pending.pop(0)
                done(name, self.save_metrics(key, future.result()))

        def flush():
            if not batch:
                return
            for (name, key, _), spectrum in zip(batch, spectra_of([m for _, _, m in batch], device)):
                self.computed += 1
                self.store_spectrum(key, checkpoint.tensors[name], spectrum)
                pending.append((name, key, pool.submit(every_metric, spectrum)))
            batch.clear()
            settle(keep=1)

        for name, key, data in read_ahead(checkpoint, unread):
            self.remember(checkpoint, name, key)
            cached = self.known_metrics(key, checkpoint.tensors[name].shape)  # the same content met before
            if cached is not None:
                self.reused += 1
                self.db.commit()
                done(name, cached)
                continue
            info = checkpoint.tensors[name]
            if batch and (device == "cpu" or info.shape != checkpoint.tensors[batch[0][0]].shape
                          or (len(batch) + 1) * numel(info.shape) * 8 > BATCH_BYTES):
                flush()
            batch.append((name, key, numpy_matrix(data, info.dtype, info.shape)))
            if device == "cpu":
                flush()
        flush()
        settle(keep=0)
        return {name: results[name] for name in names}

    def cached_metrics(self, key: str) -> dict | None:
        """Every metric stored for this content digest, if they are all there."""
        row = self.db.execute("SELECT metrics FROM metrics WHERE digest=? AND version=?",
                              (key, METRICS_VERSION)).fetchone()
        cached = json.loads(row[0]) if row is not None else None
        return cached if cached is not None and set(cached) == set(METRICS) | {"problem"} else None

    def known_metrics(self, key: str, shape: tuple[int, ...]) -> dict | None:
        """The metrics of this content digest, stored or derived from its stored spectrum; None if
        the spectrum was never computed."""
        cached = self.cached_metrics(key)
        if cached is None:
            spectrum = self.stored_spectrum(key, shape)
            cached = None if spectrum is None else self.store_metrics(key, spectrum)
        return cached

    def stored_spectrum(self, key: str, shape: tuple[int, ...]) -> Spectrum | None:
        row = self.db.execute("SELECT problem, singular_values FROM spectra WHERE digest=? AND version=?",
                              (key, SPECTRUM_VERSION)).fetchone()
        return None if row is None else spectrum_from_row(*row, shape)

    def store_metrics(self, key: str, spectrum: Spectrum) -> dict:
        """Derive every metric from a spectrum, store them under the digest (committed), return them."""
        return self.save_metrics(key, every_metric(spectrum))

    def save_metrics(self, key: str, values: dict) -> dict:
        self.db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",
                        (key, METRICS_VERSION, json.dumps(values, allow_nan=False)))
        self.db.commit()
        return values

    def store_spectrum(self, key: str, info: TensorInfo, spectrum: Spectrum) -> None:
        blob = None if spectrum.values is None else spectrum.values.astype("<f8").tobytes()
        self.db.execute("INSERT OR REPLACE INTO spectra VALUES (?, ?, ?, ?, ?, ?)",
                        (key, SPECTRUM_VERSION, str(list(info.shape)), spectrum.problem, blob, time.time()))

    def derived_metrics(self, key: str, compute) -> dict:
        """Every metric of a matrix that no input file holds (a blend), cached under `key`, a digest
        of what it is made from; `compute()` gives them (with `problem`) when they are not cached."""
        row = self.db.execute("SELECT metrics FROM metrics WHERE digest=? AND version=?",
                              (key, METRICS_VERSION)).fetchone()
        if row is not None:
            self.reused += 1
            return json.loads(row[0])
        self.computed += 1
        values = compute()
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",
                            (key, METRICS_VERSION, json.dumps(values, allow_nan=False)))
        return values

    def spectrum(self, checkpoint: Checkpoint, name: str, compute) -> Spectrum:
        """The cached spectrum of one tensor, or `compute(tensor)` stored for next time."""
        key, data = self.digest(checkpoint, name)
        return self.spectrum_by_digest(checkpoint, name, key, data, compute)

    def digest(self, checkpoint: Checkpoint, name: str) -> tuple[str, bytearray | None]:
        """The content digest of a tensor: remembered for an unchanged file, else read and computed
        (then the bytes read come with it, so nothing is read twice)."""
        key = self.remembered_digest(checkpoint, name)
        if key is not None:
            return key, None
        data = checkpoint.read_bytes(name)
        return content_key(checkpoint.tensors[name], data), data

    def spectrum_by_digest(self, checkpoint: Checkpoint, name: str, key: str, data: bytearray | None,
                           compute) -> Spectrum:
        info, read = checkpoint.tensors[name], data is not None
        result = self.stored_spectrum(key, info.shape)
        if result is not None:
            self.reused += 1
        else:
            self.computed += 1
            data = checkpoint.read_bytes(name) if data is None else data
            result = compute(as_tensor(data, info))
            self.store_spectrum(key, info, result)
        if read:
            self.remember(checkpoint, name, key)
        self.db.commit()
        return result

    def pair_sums(self, candidate: Checkpoint, base: Checkpoint, name: str, compute):
        """The tether sums of one tensor of a candidate against the base's (tether.py): cached by the
        two content digests, else `compute(candidate, base, name)` stored for next time."""
        keys = (self.tensor_digest(candidate, name), self.tensor_digest(base, name))
        row = self.db.execute("SELECT dot, candidate_sq, base_sq FROM tether_sums WHERE candidate=? AND base=? "
                              "AND version=?", (*keys, TETHER_VERSION)).fetchone()
        if row is not None:
            return None if row[0] is None else tuple(row)
        self.pairs_computed += 1
        sums = compute(candidate, base, name)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO tether_sums VALUES (?, ?, ?, ?, ?, ?)",
                            (*keys, TETHER_VERSION, *(sums or (None, None, None))))
        return sums

    def remembered_digest(self, checkpoint: Checkpoint, name: str) -> str | None:
        """The digest recorded for this tensor of this file, if the file is unchanged since."""
        file, stat = file_identity(checkpoint.tensors[name])
        row = self.db.execute("SELECT digest FROM tensors WHERE file=? AND tensor=? AND stat=?",
                              (file, name, stat)).fetchone()
        return None if row is None else row[0]

    def tensor_digest(self, checkpoint: Checkpoint, name: str) -> str:
        """The content digest of a tensor, remembered for next time."""
        key, data = self.digest(checkpoint, name)
        if data is not None:
            self.remember(checkpoint, name, key)
            self.db.commit()
        return key

    def layer_stats(self, model: str, text: str) -> list[LayerStats] | None:
        """The statistics of an earlier calibration run of this model on this text, layer by layer."""
        run = self.db.execute("SELECT layers FROM activation_runs WHERE model=? AND text=? AND version=?",
                              (model, text, ACTIVATION_VERSION)).fetchone()
        if run is None:
            return None
        rows = self.db.execute("SELECT tokens, cos_sum, tail_count, entries, update_sum FROM layer_stats "
                               "WHERE model=? AND text=? AND version=? ORDER BY layer",
                               (model, text, ACTIVATION_VERSION)).fetchall()
        return [LayerStats(*row) for row in rows] if len(rows) == run[0] else None

    def store_layer_stats(self, model: str, text: str, stats: list[LayerStats], run: dict) -> None:
        """Record one calibration run: `run` has model_ref, text_name, tokens, windows, dtype, device
        and seconds."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO activation_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (model, text, ACTIVATION_VERSION, run["model_ref"], run["text_name"], run["tokens"],
                             run["windows"], len(stats), run["dtype"], run["device"], run["seconds"], time.time()))
            self.db.executemany("INSERT OR REPLACE INTO layer_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                [(model, text, ACTIVATION_VERSION, layer, s.tokens, s.cos_sum, s.tail_count,
                                  s.entries, s.update_sum) for layer, s in enumerate(stats)])

    def remember(self, checkpoint: Checkpoint, name: str, key: str) -> None:
        """Record which digest this tensor of this (unchanged) file has."""
        file, stat = file_identity(checkpoint.tensors[name])
        self.db.execute("INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?)", (file, stat, name, key))

    def close(self) -> None:
        self.db.close()


def every_metric(spectrum: Spectrum) -> dict:
    """Every metric of metrics.py and the spectrum's `problem`: what the metrics table holds."""
    return metrics_of(spectrum) | {"problem": spectrum.problem}


def read_ahead(checkpoint: Checkpoint, names: list[str], depth: int = 2):
    """Yield (name, content digest, bytes) of each tensor, read and hashed by a background thread
    up to `depth` tensors ahead (file reads and hashing release the GIL, so they overlap the
    caller's computing). An error in the thread is raised here, at the tensor it happened on."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader():
        for name in names:
            if stop.is_set():
                return
            try:
                data = checkpoint.read_bytes(name)
                item = (name, content_key(checkpoint.tensors[name], data), data)
            except BaseException as exc:  # handed to the caller, which raises it
                item = (name, exc, None)
            ahead.put(item)
            if item[2] is None:
                return

    thread = threading.Thread(target=reader, name="mastermerge-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in names:
            name, key, data = ahead.get()
            if data is None:
                raise key
            yield name, key, data
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue, then let it end
            try:
                ahead.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def spectrum_from_row(problem: str | None, blob: bytes | None, shape: tuple[int, ...]) -> Spectrum:
    return Spectrum(None if blob is None else np.frombuffer(blob, dtype="<f8").copy(), tuple(shape), problem)


def file_identity(info: TensorInfo) -> tuple[str, str]:
    """The file's resolved path and its size, mtime, ctime and inode: any rewrite changes them."""
    file = str(info.file.resolve())
    st = os.stat(file)
    return file, f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def content_key(info: TensorInfo, data: bytearray) -> str:
    """A digest of a tensor's dtype, shape and bytes."""
    digest = hashlib.blake2b(f"{info.dtype}{list(info.shape)}\0".encode(), digest_size=20)
    digest.update(data)
    return digest.hexdigest()
