"""What a Ray worker does (raycluster.py sends it the work): open a model as its node sees it, and
compute one matrix's spectrum and metrics (a batch of equal shapes on a GPU), or one tether pair's
sums, on the thread count the driver set (threads.py), with the same code as the driver.

A worker reads the weights itself, never through Ray's object store: a local model at the path the
driver gave, which must be on storage every node shares, and a hub model at the commit the driver
resolved, downloaded into the node's own hub cache by huggingface_hub (HF_HOME, HF_TOKEN and
HF_HUB_OFFLINE work there as anywhere). A PEFT adapter's origin carries the base's, and the node
reads it on that base as the driver does (loraview.py). Before it uses a tensor it checks that its copy has the
file, dtype, shape and byte length the driver planned with. Every failure is a ModelError of one
line naming the model, the tensor, the node and the path. A worker never opens the metric cache: it
returns its results (content digest, float64 singular values, metrics) to the driver, which alone
writes them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .adapters import ADAPTER_CONFIG, AdapterSource
from .checkpoint import Checkpoint, TensorInfo
from .errors import ModelError, first_line
from .hashing import content_key
from .metrics import every_metric
from .spectra import Spectrum, numpy_matrix, spectra_of
from .tethersums import Sums, sums_of
from .threads import limited_threads
from .weightfiles import weight_files


@dataclass(frozen=True)
class Origin:
    """Where a node finds a model: the driver's directory (`path`), which a local model must have on
    every node, or a hub repo at the commit the driver resolved, of which the node downloads `files`."""

    ref: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    files: tuple[str, ...] = ()
    base: "Origin | None" = None  # a PEFT adapter's: the merge's base, which it is read on


@dataclass(frozen=True)
class Expected:
    """A tensor as the driver planned with it: its file (relative to the model directory), dtype,
    shape and byte length."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, info: TensorInfo, directory: Path) -> "Expected":
        return cls(info.file.relative_to(directory).as_posix(), info.dtype, info.shape, info.nbytes)


def origin_of(ref: str, checkpoint: Checkpoint, repo_id: str | None, revision: str | None) -> Origin:
    """The origin of a model the driver opened: a hub model's files are its weight files (and index),
    with config.json (whose quantization_config a node checks as the driver did)."""
    if repo_id is None:
        return Origin(ref, str(checkpoint.directory))
    index, files = weight_files(checkpoint.directory)
    names = [p.relative_to(checkpoint.directory).as_posix() for p in ([index] if index else []) + files]
    names += [name for name in ("config.json", ADAPTER_CONFIG) if (checkpoint.directory / name).is_file()]
    return Origin(ref, str(checkpoint.directory), repo_id, revision, tuple(names))


OPENED: dict[Origin, tuple[tuple, Checkpoint]] = {}  # what this worker process opened, with its files' stat
KEPT_OPEN = 8  # checkpoints a worker keeps open (the least recently used one is closed)


def node_name() -> str:
    """This node, as messages name it: its host name and address."""
    host = socket.gethostname()
    try:
        import ray

        return f"{host} ({ray.util.get_node_ip_address()})"
    except Exception:  # not on a Ray worker (a test calling these functions directly)
        return host


def node_checkpoint(origin: Origin) -> Checkpoint:
    """The model as this node sees it: opened once per worker process, and again when a file of it
    changed since (a worker serves every run of a driver)."""
    if origin in OPENED:
        signature, checkpoint = OPENED.pop(origin)
        if signature == files_signature(checkpoint):
            OPENED[origin] = signature, checkpoint  # the most recently used, last
            return checkpoint
        checkpoint.close()
    directory = node_directory(origin)
    checkpoint = Checkpoint.open(
        directory if origin.base is None else AdapterSource(directory, node_directory(origin.base))
    )
    OPENED[origin] = files_signature(checkpoint), checkpoint
    while len(OPENED) > KEPT_OPEN:
        OPENED.pop(next(iter(OPENED)))[1].close()
    return checkpoint


def node_directory(origin: Origin) -> Path:
    """The model's directory on this node: the driver's path, or the node's download of it."""
    directory = Path(origin.path) if origin.repo_id is None else downloaded(origin)
    if not directory.is_dir():
        raise ModelError(
            f"cannot see {directory}: a local model must be on storage every node shares, at the same "
            f"path (or give the model by its hub id)"
        )
    return directory


def files_signature(checkpoint: Checkpoint) -> tuple:
    """The size, mtime and inode of each weight file of an opened checkpoint (None for one gone)."""
    signature = []
    for file in sorted({file for name in checkpoint.tensors for file in checkpoint.sources_of(name)}):
        try:
            st = file.stat()
            signature.append((str(file), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            signature.append((str(file), None))
    return tuple(signature)


def downloaded(origin: Origin) -> Path:
    """The node's own copy of a hub model's files at the pinned commit (its hub cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(origin.repo_id, revision=origin.revision, allow_patterns=list(origin.files)))
    except Exception as exc:
        raise ModelError(f"cannot download {origin.repo_id} at {origin.revision}: {first_line(exc)}") from None


def checked_info(checkpoint: Checkpoint, tensor: str, expected: Expected) -> TensorInfo:
    """The node's TensorInfo of a tensor, which must be what the driver planned with."""
    info = checkpoint.tensors.get(tensor)
    found = None if info is None else Expected.of(info, checkpoint.directory)
    if found != expected:
        what = "no such tensor" if found is None else f"{found.file}, {found.dtype} {list(found.shape)}"
        raise ModelError(
            f"another copy in {checkpoint.directory}: expected {expected.file}, "
            f"{expected.dtype} {list(expected.shape)}, found {what}"
        )
    return info


@contextmanager
def reported(origin: Origin, tensor: str) -> Iterator[None]:
    """Any failure inside as one ModelError naming the model, the tensor and the node."""
    try:
        yield
    except Exception as exc:
        why = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {first_line(exc)}"
        raise ModelError(f"model '{origin.ref}', tensor '{tensor}' on node {node_name()}: {why}") from None


def matrix_results(
    origin: Origin, items: list[tuple[str, Expected]], device: str, threads: int
) -> list[tuple[str, Spectrum, dict]]:
    """The content digest, spectrum and metrics of each (tensor, expected) of one model: one matrix
    on a CPU, a batch of equal shapes on a GPU (`device` cuda). Each tensor's digest is computed in
    a thread while its Gram matrix is (both release the GIL). The metrics are derived here, not on
    the driver: their KS scan grows with the square of a matrix's width, too much for one driver
    thread serving a cluster."""
    with limited_threads(threads), ThreadPoolExecutor(1, thread_name_prefix="mastermerge-hash") as hasher:
        matrices, keys = [], []
        for tensor, expected in items:
            with reported(origin, tensor):
                checkpoint = node_checkpoint(origin)
                info = checked_info(checkpoint, tensor, expected)
                data = checkpoint.read_bytes(tensor)
                keys.append(hasher.submit(content_key, info, data))
                matrices.append(numpy_matrix(data, info.dtype, info.shape))
        with reported(origin, items[0][0]):
            spectra = spectra_of(matrices, device)
            return [(key.result(), spectrum, every_metric(spectrum)) for key, spectrum in zip(keys, spectra)]


def pair_sums(
    candidate: Origin, base: Origin, tensor: str, expected: tuple[Expected, Expected], threads: int
) -> Sums | None:
    """The tether sums of one tensor of a candidate and of the base (tethersums.py)."""
    with limited_threads(threads):
        checkpoints = []
        for origin, planned in zip((candidate, base), expected):
            with reported(origin, tensor):
                checkpoints.append(node_checkpoint(origin))
                checked_info(checkpoints[-1], tensor, planned)
        with reported(candidate, tensor):
            return sums_of(*checkpoints, tensor)
