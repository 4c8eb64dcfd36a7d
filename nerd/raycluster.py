"""Spectra and tether sums on a Ray cluster (`--ray [ADDRESS]`, or `compute: {executor: ray}`):
the connection to the cluster, and the engine's RayExecutor.

The engine (engine.py) resolves every cache hit on this machine (the driver) before anything is
scheduled, so a warm run sends nothing. What is left goes out as Ray tasks: one matrix each (its
spectrum and metrics; on GPU workers a batch of equal shapes, with `num_gpus`), one tether pair
each, every task with `num_cpus` = the run's thread count (threads.py), which the worker applies
(a GPU task also holds one GPU: its reading, hashing and metrics run on those CPUs).
Workers read the weights themselves (nodes.py); only small descriptions go out and only results
come back (content digest, float64 singular values, metrics), which the engine stores: the driver
alone writes SQLite, leases included (a unit is claimed, leases.py, by the driver right before it is
sent, by its tensors and the content digests the store remembers for them). At most IN_FLIGHT tasks per slot of the cluster are outstanding, so the
driver's memory stays flat, and results are yielded as they arrive (the progress bar moves with
them). A task whose worker or node died is retried (RETRIES, Ray's own task retries); an error
inside a task is the ModelError it raised, naming the model, the tensor and the node. An error or
an early stop cancels every outstanding task; Ctrl-C ends the driver, and Ray ends the tasks of a
driver that goes. The results already stored stay for the next run.

Connecting: `--ray ADDRESS`, else `compute.address`, else RAY_ADDRESS, else `auto` (Ray's own
meaning: RAY_ADDRESS when it is set, else the cluster `ray start` runs on this machine); `local`
starts a cluster of this machine for the run. One process connects to one cluster: a later config
of a batch that names another is refused (ClusterError) rather than run on the first. When this
process connects, mastermerge's own code is shipped to the workers (runtime_env py_modules), so
they run what the driver runs; the libraries (numpy, torch, ...) must be the same versions on every
node for bit-identical results. A caller that has connected already (ray.init) is used as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from . import nodes
from .engine import Claimed, Computed, Pair, Work
from .errors import ClusterError, MergeError, ModelError, first_line
from .nodes import Expected, Origin
from .checkpoint import Checkpoint, numel
from .loraview import AdapterCheckpoint
from .spectra import BATCH_BYTES
from .tethersums import Sums

if TYPE_CHECKING:
    from .sources import ResolvedModel

RETRIES = 3  # times a task is run again when its worker or node dies
LOST = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "ActorDiedError")
CONNECTED: list[str] = []  # the address this process connected to (empty: not by connected())
IN_FLIGHT = 2  # outstanding tasks per slot (a slot: `threads` CPUs of a node, or one GPU)
REACH_TIMEOUT = 10.0  # seconds to wait for a cluster's port to answer
WAIT_STEP = 1.0  # seconds between checks for Ctrl-C while results are awaited
CANCEL_TRIES = 10  # times an outstanding task is cancelled, WAIT_STEP / 2 apart, until it ends


def address_of(address: str | None) -> str:
    """The cluster to connect to: the one given, else RAY_ADDRESS, else auto."""
    return address or os.environ.get("RAY_ADDRESS") or "auto"


def connected(address: str | None) -> None:
    """Connect this process to the cluster (once; a connection already made is used as it is)."""
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed: pip install 'mastermerge[ray]'") from None
    target = address_of(address)
    if ray.is_initialized():
        if CONNECTED and target not in (CONNECTED[0], ray.get_runtime_context().gcs_address):
            raise ClusterError(
                f"ray: this run is connected to the cluster at '{CONNECTED[0]}' already and cannot also "
                f"use '{target}': run the configs of each cluster separately"
            )
        return
    check_reachable(target)
    options = dict(include_dashboard=False) if target == "local" else {}
    try:
        ray.init(
            address=target,
            runtime_env={"py_modules": [str(Path(__file__).parent)]},
            logging_level=logging.WARNING,
            log_to_driver=False,
            **options,
        )
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        raise ClusterError(f"ray: cannot reach a cluster at '{target}': {first_line(exc)}") from None
    CONNECTED.append(target)


def check_reachable(target: str) -> None:
    """A host:port address (also ray://host:port) must answer within REACH_TIMEOUT: Ray itself
    would wait for minutes."""
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # auto, local: Ray finds (or starts) the cluster and says so at once
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT).close()
    except OSError as exc:
        raise ClusterError(f"ray: cannot reach a cluster at '{target}': {exc.strerror or exc}") from None


@cache
def remote(function: Callable):
    """The Ray remote function of one of nodes.py's functions (made once per process)."""
    import ray

    return ray.remote(function)


class RayExecutor:
    """The engine's executor on a Ray cluster (see the module docstring), for the resolved `models`;
    `device` auto means cuda when the cluster has GPUs."""

    def __init__(self, models: dict[str, ResolvedModel], device: str, threads: int, address: str | None):
        connected(address)
        import ray

        self.ray = ray
        self.models = {Path(r.path): (ref, r) for ref, r in models.items()}
        self.origins: dict[Path, Origin] = {}
        self.threads = threads
        try:
            resources = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"ray: the cluster does not answer: {first_line(exc)}") from None
        gpus = sum(int(r.get("GPU", 0)) for r in resources)
        self.device = "cuda" if device == "cuda" or (device == "auto" and gpus) else "cpu"
        self.options = dict(num_cpus=threads)
        slots = sum(int(r.get("CPU", 0) // threads) for r in resources)
        if self.device == "cuda":
            slots = sum(min(int(r.get("GPU", 0)), int(r.get("CPU", 0) // threads)) for r in resources)
            self.options = dict(num_cpus=threads, num_gpus=1)
        if slots == 0 and self.device == "cuda":
            raise ClusterError(
                f"ray: device cuda was asked for, and no node of the cluster has a GPU and {threads} CPUs "
                "(compute.threads)"
            )
        if slots == 0:
            most = max((r.get("CPU", 0) for r in resources), default=0)
            raise ClusterError(
                f"ray: no node of the cluster can run a task on {threads} threads (compute.threads); "
                f"the largest node has {most:g} CPUs"
            )
        self.in_flight = IN_FLIGHT * slots

    def origin(self, checkpoint: Checkpoint) -> Origin:
        """Where the nodes find a checkpoint the driver opened."""
        directory = checkpoint.directory
        if directory not in self.origins:
            ref, resolved = self.models.get(directory, (str(directory), None))
            repo_id = None if resolved is None or resolved.spec.path is not None else resolved.spec.repo_id
            revision = None if resolved is None else resolved.revision
            origin = nodes.origin_of(ref, checkpoint, repo_id, revision)
            if isinstance(checkpoint, AdapterCheckpoint):  # read on its base, which the node opens too
                origin = dataclasses.replace(origin, base=self.origin(checkpoint.base))
            self.origins[directory] = origin
        return self.origins[directory]

    def spectra(
        self, works: list[Work], cached: Callable[[Work, str], bool], claimed: Claimed | None = None
    ) -> Iterator[Computed]:
        """The spectrum and metrics of every work whose content is not `cached`, as they arrive; each
        unit is offered to `claimed` right before it is sent, and only the works it keeps are sent."""
        task = remote(nodes.matrix_results).options(max_retries=RETRIES, retry_exceptions=False, **self.options)

        def submit(unit: list[Work]):
            items = [(w.tensor, Expected.of(w.info, w.checkpoint.directory)) for w in unit]
            return task.remote(self.origin(unit[0].checkpoint), items, self.device, self.threads)

        units = self.units(works)
        if claimed is not None:  # claimed lazily, as the units are sent
            units = (kept for kept in map(claimed, units) if kept)
        for unit, results in self.completed(units, submit):
            for work, (key, spectrum, metrics) in zip(unit, results):
                if not cached(work, key):  # the store may have this content under another file
                    yield work, key, spectrum, metrics

    def tether_sums(self, pairs: list[Pair]) -> Iterator[tuple[Pair, Sums | None]]:
        """The sums of every pair, as they arrive."""
        task = remote(nodes.pair_sums).options(max_retries=RETRIES, retry_exceptions=False, num_cpus=self.threads)

        def submit(unit: list[Pair]):
            pair = unit[0]
            planned = tuple(Expected.of(c.tensors[pair.tensor], c.directory) for c in (pair.candidate, pair.base))
            return task.remote(self.origin(pair.candidate), self.origin(pair.base), pair.tensor, planned, self.threads)

        for unit, sums in self.completed([[pair] for pair in pairs], submit):
            yield unit[0], sums

    def units(self, works: list[Work]) -> list[list[Work]]:
        """The works as tasks: one matrix each on CPUs; on GPUs, one model's equal shapes together,
        up to BATCH_BYTES in float64."""
        if self.device == "cpu":
            return [[work] for work in works]
        units: list[list[Work]] = []
        for work in sorted(works, key=lambda w: (str(w.checkpoint.directory), w.info.shape)):
            last = units[-1][-1] if units else None
            if (
                last is None
                or last.checkpoint is not work.checkpoint
                or last.info.shape != work.info.shape
                or (len(units[-1]) + 1) * numel(work.info.shape) * 8 > BATCH_BYTES
            ):
                units.append([])
            units[-1].append(work)
        return units

    def completed(self, units: Iterable, submit: Callable) -> Iterator[tuple[list, object]]:
        """(unit, its task's result) as the tasks finish, at most `in_flight` outstanding; every
        outstanding task is cancelled when the caller stops (an error, or leaving the loop) before
        the end, and ends with this process on Ctrl-C."""
        ray = self.ray
        waiting = iter(units)
        pending: dict = {}
        try:
            while True:
                while len(pending) < self.in_flight and (unit := next(waiting, None)) is not None:
                    pending[submit(unit)] = unit
                if not pending:
                    return
                try:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_STEP)
                except ray.exceptions.RayError as exc:
                    raise ClusterError(f"ray: the cluster does not answer: {first_line(exc)}") from None
                for ref in ready:
                    unit = pending.pop(ref)
                    yield unit, self.result(ref, unit)
        except KeyboardInterrupt:
            # The driver is ending, and Ray ends the tasks of a driver that goes. A cancel now, with
            # the interrupted wait behind it, aborted the driver inside Ray's core worker about
            # one time in eight (Ray 2.60: "Tried to complete task that was not pending").
            pending.clear()
            raise
        finally:
            self.cancelled(list(pending))

    def cancelled(self, refs: list) -> None:
        """Cancel the tasks of `refs`, again while any still runs: a cancel that reaches a worker
        between being handed a task and starting it is lost (ray-project/ray#24359)."""
        ray = self.ray
        for _ in range(CANCEL_TRIES):
            for ref in refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # finished meanwhile, or the cluster is gone
                    pass
            try:
                _, refs = ray.wait(refs, num_returns=len(refs), timeout=WAIT_STEP / 2)
            except Exception:  # the cluster is gone: nothing runs for us any more
                return
            if not refs:
                return

    def result(self, ref, unit: list):
        """A finished task's result; its failure as one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MergeError):
                raise type(cause)(str(cause)) from None
            why = f"{type(cause).__name__}: {first_line(cause)}" if cause is not None else first_line(exc)
            raise ModelError(f"{self.described(unit[0])}: the task failed: {why}") from None
        except ray.exceptions.RayError as exc:
            retried = f", also on its {RETRIES} retries" if type(exc).__name__ in LOST else ""
            raise ClusterError(
                f"{self.described(unit[0])}: the cluster lost the task{retried} ({type(exc).__name__}: {first_line(exc)})"
            ) from None

    def described(self, item: Work | Pair) -> str:
        """How an error names a task's work: the model and the tensor."""
        checkpoint = item.checkpoint if isinstance(item, Work) else item.candidate
        return f"model '{self.origin(checkpoint).ref}', tensor '{item.tensor}'"
