"""The scoring engine: the spectra, metrics and tether sums of work items, from the store first.

A work item is one tensor of one checkpoint (Work) to score, or one tensor of a candidate and of
the base (Pair) to compare (tether.py). The engine looks each one up in the store (store.py)
first, by the digest it remembers for an unchanged file, so a warm run reads no tensor and does
not even import torch; the work the store cannot answer goes to an executor, and every result is
written through the store as soon as it is there (an interrupted run keeps what it computed).

The executor is where spectra are computed. It has one method, `spectra(works, cached)`, which
yields (work, content digest, Spectrum) for the works it computes, in any order; it calls
`cached(work, digest)`, in the engine's thread, as soon as it knows a tensor's digest, and
computes nothing for a work whose answer is true (the store had that content: a frozen layer met
before, a copied model). LocalExecutor is this process: a read-ahead thread reads and hashes the
tensors one or two ahead while the spectra are computed (reading overlaps computing, and memory
holds a few tensors at most), equal shapes are computed in batches on CUDA (of up to BATCH_BYTES
in float64), and the device is resolved only when something is computed. Metrics are derived from
each new spectrum by a metrics thread of the engine while the next one is computed. Only the
engine's thread uses the store: the other threads never touch its connection.

Tether sums are computed one pair at a time in the engine's thread, by the function tether.py gives.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .checkpoint import Checkpoint, TensorInfo, numel
from .metrics import METRICS, every_metric
from .spectra import BATCH_BYTES, Spectrum, numpy_matrix, pick_device, spectra_of
from .store import MetricCache, content_key

EVERY_METRIC = set(METRICS) | {"problem", "path"}  # what every_metric gives: a stored row with less is recomputed
Sums = tuple[float, float, float]  # of a pair (tether.py): <c, b>, |c|^2, |b|^2


@dataclass(frozen=True)
class Work:
    """One tensor of one checkpoint, to be scored."""

    checkpoint: Checkpoint
    tensor: str

    @property
    def info(self) -> TensorInfo:
        return self.checkpoint.tensors[self.tensor]


@dataclass(frozen=True)
class Pair:
    """One tensor of a candidate and the same tensor of the base, to be compared."""

    candidate: Checkpoint
    base: Checkpoint
    tensor: str


class Executor(Protocol):
    """Where spectra are computed (see the module docstring)."""

    def spectra(self, works: list[Work], cached: Callable[[Work, str], bool]) -> Iterator[tuple[Work, str, Spectrum]]:
        """The spectrum of every work whose content is not `cached`, with its content digest, in any order."""


class LocalExecutor:
    """Computes spectra in this process: reads ahead in a thread, batches equal shapes on CUDA.
    `device` is the config's (auto, cpu or cuda), resolved when something is computed."""

    def __init__(self, device: str = "auto"):
        self.device = device

    def spectra(self, works: list[Work], cached: Callable[[Work, str], bool]) -> Iterator[tuple[Work, str, Spectrum]]:
        """The spectrum of every work whose content is not `cached`, with its content digest."""
        device = pick_device(self.device)
        if device != "cpu":  # equal shapes next to each other, so they share a batch
            works = sorted(works, key=lambda work: work.info.shape)
        batch: list[tuple[Work, str, np.ndarray]] = []
        for work, key, data in read_ahead(works):
            if cached(work, key):
                continue
            info = work.info
            if batch and (
                device == "cpu"
                or info.shape != batch[0][0].info.shape
                or (len(batch) + 1) * numel(info.shape) * 8 > BATCH_BYTES
            ):
                yield from flushed(batch, device)
            batch.append((work, key, numpy_matrix(data, info.dtype, info.shape)))
            if device == "cpu":
                yield from flushed(batch, device)
        yield from flushed(batch, device)


def flushed(batch: list[tuple[Work, str, np.ndarray]], device: str) -> Iterator[tuple[Work, str, Spectrum]]:
    """The spectra of a batch, which is emptied (its matrices let go) before they are yielded."""
    if not batch:
        return
    spectra = spectra_of([matrix for _, _, matrix in batch], device)
    done = [(work, key) for work, key, _ in batch]
    batch.clear()
    for (work, key), spectrum in zip(done, spectra):
        yield work, key, spectrum


class Engine:
    """The metrics, spectra and tether sums of work items: from `store`, else computed (by
    `executor` for spectra) and stored."""

    def __init__(self, store: MetricCache, executor: Executor):
        self.store = store
        self.executor = executor

    def metrics(self, works: list[Work], bar=None) -> dict[Work, dict]:
        """Every metric of each work's matrix (metrics.py) and its `problem`, in the order of `works`:
        stored, derived from a stored spectrum, or from the spectrum the executor computes (each
        derived in the metrics thread while the next spectrum is computed). `bar` counts them done."""
        results: dict[Work, dict] = {}

        def done(work: Work, values: dict) -> None:
            results[work] = values
            if bar is not None:
                bar.update()

        def cached(work: Work, key: str) -> bool:
            values = self.known_metrics(key, work.info.shape)
            if values is not None:
                done(work, values)
            return values is not None

        pending = []  # metrics being derived while the next spectrum is computed

        def settle(keep: int) -> None:
            while len(pending) > keep:
                work, key, future = pending.pop(0)
                values = future.result()
                self.store.put_metrics(key, values)
                done(work, values)

        with (
            ThreadPoolExecutor(1, thread_name_prefix="mastermerge-metrics") as pool,
            closing(self.new_spectra(works, cached)) as spectra,
        ):
            for work, key, spectrum in spectra:
                pending.append((work, key, pool.submit(every_metric, spectrum)))
                settle(keep=1)
            settle(keep=0)
        return {work: results[work] for work in works}

    def spectrum(self, work: Work) -> Spectrum:
        """The spectrum of one work's matrix: stored, else computed by the executor (and stored)."""
        stored: dict[Work, Spectrum | None] = {}

        def cached(work: Work, key: str) -> bool:
            stored[work] = self.store.spectrum(key, work.info.shape)
            return stored[work] is not None

        fresh = [spectrum for _, _, spectrum in self.new_spectra([work], cached)]
        return fresh[0] if fresh else stored[work]

    def new_spectra(
        self, works: list[Work], cached: Callable[[Work, str], bool]
    ) -> Iterator[tuple[Work, str, Spectrum]]:
        """The works whose results the store has, as `cached(work, digest)` takes them, counted as
        reused; the spectra of the others computed by the executor, each counted, stored and yielded
        with its digest. The store is asked with the digest it remembers for an unchanged file before
        anything is read, else with the one the executor read (which the store then remembers)."""
        missed = []
        for work in works:
            key = self.store.digest_of(work.checkpoint, work.tensor)
            if key is not None and cached(work, key):
                self.store.reused += 1
            else:
                missed.append(work)
        if not missed:
            return

        def read(work: Work, key: str) -> bool:
            self.store.remember_digest(work.checkpoint, work.tensor, key)
            if not cached(work, key):
                return False
            self.store.reused += 1
            return True

        with closing(self.executor.spectra(missed, read)) as spectra:
            for work, key, spectrum in spectra:
                self.store.computed += 1
                self.store.put_spectrum(key, work.info.shape, spectrum)
                yield work, key, spectrum

    def known_metrics(self, key: str, shape: tuple[int, ...]) -> dict | None:
        """The metrics of this content digest, all of them stored, or derived from its stored
        spectrum (and stored); None if the spectrum was never computed."""
        values = self.store.metrics(key)
        if values is not None and set(values) == EVERY_METRIC:
            return values
        spectrum = self.store.spectrum(key, shape)
        if spectrum is None:
            return None
        values = every_metric(spectrum)
        self.store.put_metrics(key, values)
        return values

    def derived_metrics(self, key: str, compute: Callable[[], dict]) -> dict:
        """Every metric of a matrix that no input file holds (a blend), stored under `key`, a digest
        of what it is made from; `compute()` gives them (with `problem`) when they are not stored."""
        values = self.store.metrics(key)
        if values is not None:
            self.store.reused += 1
            return values
        self.store.computed += 1
        values = compute()
        self.store.put_metrics(key, values)
        return values

    def tether_sums(
        self, pairs: list[Pair], compute: Callable[[Checkpoint, Checkpoint, str], Sums | None], bar=None
    ) -> dict[Pair, Sums | None]:
        """The tether sums of each pair (tether.py), None where either tensor has a NaN or Inf: stored
        by the two content digests, else `compute(candidate, base, tensor)`, stored for next time.
        `bar` counts them done."""
        sums: dict[Pair, Sums | None] = {}
        for pair in pairs:
            keys = (
                self.store.content_digest(pair.candidate, pair.tensor),
                self.store.content_digest(pair.base, pair.tensor),
            )
            row = self.store.tether_sums(*keys)
            if row is not None:
                sums[pair] = None if row[0] is None else tuple(row)
            else:
                self.store.pairs_computed += 1
                sums[pair] = compute(pair.candidate, pair.base, pair.tensor)
                self.store.put_tether_sums(*keys, sums[pair])
            if bar is not None:
                bar.update()
        return sums


def read_ahead(works: list[Work], depth: int = 2) -> Iterator[tuple[Work, str, bytearray]]:
    """Yield (work, content digest, bytes) of each work's tensor, read and hashed by a background
    thread up to `depth` tensors ahead (file reads and hashing release the GIL, so they overlap the
    caller's computing). An error in the thread is raised here, at the tensor it happened on."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader():
        for work in works:
            if stop.is_set():
                return
            try:
                data = work.checkpoint.read_bytes(work.tensor)
                item = (work, content_key(work.info, data), data)
            except BaseException as exc:  # handed to the caller, which raises it
                item = (work, exc, None)
            ahead.put(item)
            if item[2] is None:
                return

    thread = threading.Thread(target=reader, name="mastermerge-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in works:
            work, key, data = ahead.get()
            if data is None:
                raise key
            yield work, key, data
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue, then let it end
            try:
                ahead.get_nowait()
            except queue.Empty:
                thread.join(0.01)
