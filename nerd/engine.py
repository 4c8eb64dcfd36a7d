"""The scoring engine: the spectra, metrics and tether sums of work items, from the store first.

A work item is one tensor of one checkpoint (Work) to score, or one tensor of a candidate and of
the base (Pair) to compare (tether.py). The engine looks each one up in the store (store.py)
first, by the digest it remembers for an unchanged file, so a warm run reads no tensor and does
not even import torch; the work the store cannot answer goes to an executor, and every result is
written through the store as soon as it is there (an interrupted run keeps what it computed).

The executor is where spectra and tether sums are computed (`executor_of` picks it from the
config's `compute:` section). Its `spectra(works, cached, claimed)` yields (work, content digest,
Spectrum, metrics or None) for the works it computes, in any order; it calls `cached(work, digest)`,
in the engine's thread, as soon as it knows a tensor's digest, and drops its own result for a work
whose answer is true (the store had that content: a frozen layer met before, a copied model); and
`claimed(unit)`, also in the engine's thread, right before it computes (or sends) a unit of works,
computing only the works it gives back: the engine has claimed those (leases.py), and waits for the
others, which another live run on the same cache file is computing, after the rest of its work
(and computes them itself if that run's claim is lost). Its `tether_sums(pairs)` yields (pair, sums) for the pairs the store does not have. LocalExecutor is
this process: a read-ahead thread reads and hashes the tensors one or two ahead while the spectra
are computed (reading overlaps computing, and memory holds a few tensors at most), equal shapes
are computed in batches on CUDA (of up to BATCH_BYTES in float64), and the device is resolved
only when something is computed. RayExecutor (raycluster.py) sends the same work to a Ray
cluster, whose workers read the weights themselves and also derive the metrics. Both run every
computation on the same explicit number of threads (threads.py), so their results are
bit-identical. Metrics the executor does not give are derived from each new spectrum by a metrics
thread of the engine while the next one is computed. Only the engine's thread uses the store:
the other threads, and the workers of a cluster, never touch it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from .checkpoint import Checkpoint, TensorInfo, numel
from . import tethersums
from .hashing import content_key
from .leases import Claims, pair_key
from .metrics import METRICS, every_metric
from .spectra import BATCH_BYTES, Spectrum, numpy_matrix, pick_device, spectra_of
from .store import MetricCache
from .tethersums import Sums
from .threads import every_core, limited_threads

if TYPE_CHECKING:
    from .sections import Compute
    from .sources import ResolvedModel

EVERY_METRIC = set(METRICS) | {"problem", "path"}  # what every_metric gives: a stored row with less is recomputed
Computed = tuple["Work", str, Spectrum, "dict | None"]  # what an executor yields: work, digest, spectrum, metrics
Claimed = Callable[[list["Work"]], list["Work"]]  # the works of a unit the engine keeps, claimed (leases.py)


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
    """Where spectra and tether sums are computed (see the module docstring), on `threads` threads
    (None: as the libraries would by themselves)."""

    threads: int | None

    def spectra(
        self, works: list[Work], cached: Callable[[Work, str], bool], claimed: Claimed | None = None
    ) -> Iterator[Computed]:
        """The spectrum (and metrics, or None) of every work whose content is not `cached` and that
        `claimed` keeps, with its content digest, in any order."""

    def tether_sums(self, pairs: list[Pair]) -> Iterator[tuple[Pair, Sums | None]]:
        """The sums of every pair (tethersums.py), in any order."""


def executor_of(compute: Compute, device: str, models: dict[str, ResolvedModel]) -> Executor:
    """The executor a `compute:` section asks for, for these resolved models: a Ray cluster's when
    it says ray (or auto, with RAY_ADDRESS set), this process's otherwise."""
    threads = compute.threads or every_core()
    if uses_ray(compute):
        from .raycluster import RayExecutor

        return RayExecutor(models, device, threads, compute.address)
    return LocalExecutor(device, threads)


def uses_ray(compute: Compute) -> bool:
    """Whether a `compute:` section sends the work to a Ray cluster (Ray is imported only then)."""
    return compute.executor == "ray" or (compute.executor == "auto" and bool(os.environ.get("RAY_ADDRESS")))


def reachable(compute: Compute) -> None:
    """Connect to the Ray cluster a `compute:` section asks for, if any (a ClusterError if it
    cannot be reached), so that a run fails before it downloads anything."""
    if uses_ray(compute):
        from .raycluster import connected

        connected(compute.address)


class LocalExecutor:
    """Computes spectra and tether sums in this process on `threads` threads (None: as the
    libraries choose): reads ahead in a thread, batches equal shapes on CUDA. `device` is the
    config's (auto, cpu or cuda), resolved when something is computed."""

    def __init__(self, device: str = "auto", threads: int | None = None):
        self.device = device
        self.threads = threads

    def spectra(
        self, works: list[Work], cached: Callable[[Work, str], bool], claimed: Claimed | None = None
    ) -> Iterator[Computed]:
        """The spectrum of every work whose content is not `cached` and that `claimed` keeps, with
        its content digest."""
        device = pick_device(self.device)
        if device != "cpu":  # equal shapes next to each other, so they share a batch
            works = sorted(works, key=lambda work: work.info.shape)
        batch: list[tuple[Work, str, np.ndarray]] = []
        with limited_threads(self.threads):
            for work, key, data in read_ahead(works):
                if cached(work, key) or (claimed is not None and not claimed([work])):
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

    def tether_sums(self, pairs: list[Pair]) -> Iterator[tuple[Pair, Sums | None]]:
        """The sums of each pair, one at a time."""
        with limited_threads(self.threads):
            for pair in pairs:
                yield pair, tethersums.sums_of(pair.candidate, pair.base, pair.tensor)


def flushed(batch: list[tuple[Work, str, np.ndarray]], device: str) -> Iterator[Computed]:
    """The spectra of a batch, which is emptied (its matrices let go) before they are yielded."""
    if not batch:
        return
    spectra = spectra_of([matrix for _, _, matrix in batch], device)
    done = [(work, key) for work, key, _ in batch]
    batch.clear()
    for (work, key), spectrum in zip(done, spectra):
        yield work, key, spectrum, None


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
            closing(self.new_spectra(works, cached, bar)) as spectra,
        ):
            for work, key, spectrum, values in spectra:
                if values is not None:  # the executor derived them
                    self.store.put_metrics(key, values)
                    done(work, values)
                    continue
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

        fresh = [spectrum for _, _, spectrum, _ in self.new_spectra([work], cached)]
        return fresh[0] if fresh else stored[work]

    def new_spectra(self, works: list[Work], cached: Callable[[Work, str], bool], bar=None) -> Iterator[Computed]:
        """The works whose results the store has, as `cached(work, digest)` takes them, counted as
        reused; the spectra of the others computed by the executor, each counted, stored and yielded
        with its digest. The store is asked with the digest it remembers for an unchanged file before
        anything is read, else with the one the executor read (which the store then remembers).
        A spectrum another live run is computing (leases.py) is waited for after the others, and
        taken as that run stores it; computed here if that run's claim is lost."""
        digests: dict[Work, str] = {}

        def found(work: Work, key: str) -> bool:
            if not cached(work, key):
                return False
            self.store.reused += 1
            return True

        def read(work: Work, key: str) -> bool:
            digests[work] = key
            self.store.remember_digest(work.checkpoint, work.tensor, key)
            if not found(work, key):
                return False
            claims.release(work)  # claimed before it was sent (Ray), then found stored
            return True

        def arrived(work: Work) -> bool:
            key = digests.get(work) or self.store.digest_of(work.checkpoint, work.tensor)
            if key is not None:
                digests[work] = key
            return key is not None and found(work, key)

        claims = Claims(
            self.store.leases,
            lambda work: self.store.claim_keys(work.checkpoint, work.tensor, digests.get(work)),
            arrived,
            ("spectrum", "spectra"),
        )
        missed = [work for work in works if not arrived(work) and not claims.deferred(work)]
        try:
            while missed or claims.waiting:
                if missed:
                    with closing(self.executor.spectra(missed, read, claims.taken)) as spectra:
                        for work, key, spectrum, values in spectra:
                            self.store.computed += 1
                            self.store.put_spectrum(key, work.info.shape, spectrum)
                            claims.release(work)
                            yield work, key, spectrum, values
                missed = claims.lost(bar)
        finally:
            claims.release_all()

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

    def tether_sums(self, pairs: list[Pair], bar=None) -> dict[Pair, Sums | None]:
        """The tether sums of each pair (tethersums.py), None where either tensor has a NaN or Inf:
        stored by the two content digests, else computed by the executor (once per pair of
        contents: the norms of a block often share theirs) and stored for next time. `bar` counts
        them done."""
        sums: dict[tuple[str, str], Sums | None] = {}
        keys: dict[Pair, tuple[str, str]] = {}
        missed: dict[tuple[str, str], list[Pair]] = {}
        for pair in pairs:
            keys[pair] = key = (
                self.store.content_digest(pair.candidate, pair.tensor),
                self.store.content_digest(pair.base, pair.tensor),
            )
            if key in missed:
                missed[key].append(pair)
                continue
            if key not in sums:
                row = self.store.tether_sums(*key)
                if row is None:
                    missed[key] = [pair]
                    continue
                sums[key] = None if row[0] is None else tuple(row)
            if bar is not None:
                bar.update()

        def arrived(key: tuple[str, str]) -> bool:
            row = self.store.tether_sums(*key)
            if row is not None:
                sums[key] = None if row[0] is None else tuple(row)
                if bar is not None:
                    bar.update(len(missed[key]))
            return row is not None

        claims = Claims(self.store.leases, lambda key: [pair_key(*key)], arrived, ("tether pair", "tether pairs"))
        try:
            todo = claims.taken(list(missed))
            while todo or claims.waiting:
                with closing(self.executor.tether_sums([missed[key][0] for key in todo])) as computed:
                    for pair, values in computed:
                        self.store.pairs_computed += 1
                        sums[keys[pair]] = values
                        self.store.put_tether_sums(*keys[pair], values)
                        claims.release(keys[pair])
                        if bar is not None:
                            bar.update(len(missed[keys[pair]]))
                todo = claims.taken(claims.lost(bar))
        finally:
            claims.release_all()
        return {pair: sums[keys[pair]] for pair in pairs}


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
