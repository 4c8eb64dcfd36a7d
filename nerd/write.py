"""Execute a Plan: the composite checkpoint, written atomically and streaming.

Everything is built in a temporary sibling of the output directory and renamed into place at
the end (staging.py), so an error or Ctrl-C leaves nothing half-written at the destination. Shards are
written tensor by tensor (header first, then each tensor's bytes), so memory holds one tensor
at a time (a blended tensor a slice at a time); an unconverted tensor is copied byte for byte
from its source, inside the kernel where it can be, and every entry is written as data of its
own (a duplicated block's copy included: no shared storage). The figures are drawn in a second
thread while the shards are written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .checkpoint import (
    FLOAT_DTYPES,
    ITEMSIZES,
    SAFETENSORS_DTYPES,
    Checkpoint,
    numel,
    opened_checkpoints,
    tensor_bytes,
    torch_dtype,
)
from .card import model_card
from .config import MergeConfig
from .errors import ModelError, OutputError
from .hashing import HASH_CHUNK
from .heatmaps import compatibility_heatmap, merge_heatmap
from .plan import Plan, PlanEntry
from .plots import evaluation_chart, expansion_curve
from .public import public_names
from .recipe import RECIPE, recipe_or_problem
from .report import report_of
from .sidefiles import copy_side_files
from .staging import staged_dir
from .tether import blended_slices
from .weightfiles import INDEX

HASH_BATCH = 2**20  # new bytes handed to the hasher at once, at least (not every layer norm)


def write_merge(plan: Plan, config: MergeConfig, quiet: bool = False) -> Path:
    """Write the plan's output directory; return its path."""
    needed = sum(map(entry_bytes, plan.entries))
    with (
        staged_dir(plan.output_dir, needed) as tmp,
        ThreadPoolExecutor(1, thread_name_prefix="mastermerge-figures") as pool,
    ):
        write_config(plan, tmp)
        copy_side_files(plan.sources[plan.base], tmp)
        figures = pool.submit(draw_figures, plan, tmp)  # drawn while the shards are written (I/O-bound)
        files = write_shards(plan, tmp, quiet)
        heatmaps, curve, perplexities = figures.result()
        card = public_names(plan, config).text(model_card(plan, heatmaps, curve, perplexities))  # no local path
        (tmp / "README.md").write_text(card, encoding="utf-8")
        recipe, _ = recipe_or_problem(plan)  # without one, commands.py noted why
        if recipe is not None:
            (tmp / RECIPE).write_text(recipe, encoding="utf-8")
        report = report_of(plan, config, files)
        (tmp / "merge_report.json").write_text(
            json.dumps(report, indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8"
        )
    return plan.output_dir


def draw_figures(plan: Plan, tmp: Path) -> tuple[list[str], str | None, str | None]:
    """The heatmaps (score, then compatibility), the expansion curve and the evaluation's chart
    that could be drawn."""
    heatmaps = [h for h in (merge_heatmap(plan, tmp), compatibility_heatmap(plan, tmp)) if h]
    return heatmaps, expansion_curve(plan, tmp), evaluation_chart(plan, tmp)


def shard_groups(entries: list[PlanEntry], shard_size: int) -> list[list[PlanEntry]]:
    """Consecutive runs of entries, each under shard_size bytes unless one tensor alone is larger."""
    groups: list[list[PlanEntry]] = [[]]
    size = 0
    for entry in entries:
        n = entry_bytes(entry)
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def write_shards(plan: Plan, tmp: Path, quiet: bool) -> dict[str, dict]:
    """The weight files plus, when there is more than one, the standard index json; returns each
    file's name -> {"bytes": its size, "sha256": its SHA-256 in hex}, the shards in order, then the index."""
    groups = shard_groups(plan.entries, plan.shard_size)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    files = {}
    with opened_checkpoints(plan.used_sources()) as checkpoints:
        with tqdm(
            total=sum(entry_bytes(e) for e in plan.entries), desc="write", unit="B", unit_scale=True, disable=quiet
        ) as bar:
            for name, group in zip(names, groups):
                try:
                    files[name] = write_shard(tmp / name, group, checkpoints, bar)
                except OSError as exc:  # a failed write() names no file: name the shard
                    raise OSError(exc.errno, exc.strerror, exc.filename or str(plan.output_dir / name)) from None
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(entry_bytes(e) for e in plan.entries)},
            "weight_map": {e.name: name for name, group in zip(names, groups) for e in group},
        }
        data = (json.dumps(index, indent=2) + "\n").encode()
        (tmp / INDEX).write_bytes(data)
        files[INDEX] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def write_shard(path: Path, entries: list[PlanEntry], checkpoints: dict[str, Checkpoint], bar) -> dict:
    """One safetensors file, written header first and then tensor by tensor; returns its size and
    SHA-256 (hashed from the file itself while it is written, see ShardHasher)."""
    header, offset = {}, 0
    for entry in entries:
        n = entry_bytes(entry)
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle, ShardHasher(path) as hasher:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry in entries:
            written = copied_in_kernel(handle, entry, checkpoints[entry.source]) if entry.transform is None else None
            if written is not None:
                bar.update(written)
            else:
                written = 0
                for data in entry_data(entry, checkpoints):
                    handle.write(data)
                    written += len(data)
                    bar.update(len(data))
            if written != entry_bytes(entry):
                raise OutputError(f"{path}: tensor '{entry.name}' has {written} bytes, expected {entry_bytes(entry)}")
            start_writeback(handle, hasher)
        handle.flush()
        size = handle.tell()
        if size != 8 + len(encoded) + offset:
            raise OutputError(f"{path}: {size} bytes written, expected {8 + len(encoded) + offset}")
        hasher.hash_to(size, last=True)
        os.fsync(handle.fileno())
        return {"bytes": size, "sha256": hasher.hexdigest()}


def start_writeback(handle, hasher: ShardHasher) -> None:
    """The tensor just written is complete: flush it to the kernel and hand it to the hasher, which
    reads it back, hashes it and then asks the kernel to start writing it to disk."""
    handle.flush()
    hasher.hash_to(handle.tell())


def writeback_hint(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing bytes offset..offset + size of the file to disk now (Linux
    starts the writeback of dirty pages on POSIX_FADV_DONTNEED without waiting), so the disk works
    while the next tensors are copied and the final fsync has little left to wait for."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        except OSError:  # only a hint: without it the final fsync waits longer
            pass


class ShardHasher:
    """The SHA-256 of a file being written, computed in a background thread from the file itself.

    The writer calls hash_to(end) once the bytes up to `end` are in the file (flushed to the
    kernel, by write() or by copy_file_range); the thread reads the new bytes back in order, from
    the page cache where they were just written, hashes them, and only then gives the writeback
    hint for them (given earlier, it could drop pages the thread has yet to read). Reads and
    hashlib release the GIL on large buffers, so the hash runs on another core while the next
    tensors are copied, and what is hashed is exactly what the file holds, whether the bytes went
    through memory or were copied inside the kernel. Fewer than HASH_BATCH new bytes wait for
    the next tensors; an error of the thread is raised in the writer's at its next call.
    """

    def __init__(self, path: Path):
        self.path = path
        self.sha = hashlib.sha256()
        self.queued = 0  # bytes handed to the thread so far
        self.reader = open(path, "rb", buffering=0)
        self.buffer = bytearray(HASH_CHUNK)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mastermerge-hash")
        self.pending: list[Future] = []
        self.stopped = False

    def hash_to(self, end: int, last: bool = False) -> None:
        """Hash the file's bytes up to `end`: now if `last`, else once HASH_BATCH new bytes wait."""
        for future in [f for f in self.pending if f.done()]:
            future.result()  # the thread's error, raised here
            self.pending.remove(future)
        if end - self.queued >= (1 if last else HASH_BATCH):
            self.pending.append(self.pool.submit(self.hash_range, self.queued, end))
            self.queued = end

    def hash_range(self, begin: int, end: int) -> None:
        """In the thread: read bytes begin..end back (from the page cache), hash them, and give the
        writeback hint for them."""
        view = memoryview(self.buffer)
        self.reader.seek(begin)
        position = begin
        while position < end and not self.stopped:
            count = self.reader.readinto(view[: min(len(view), end - position)])
            if not count:
                raise OutputError(f"{self.path}: ends at byte {position} while being hashed, expected {end}")
            self.sha.update(view[:count])
            writeback_hint(self.reader.fileno(), position, count)
            position += count

    def hexdigest(self) -> str:
        """The SHA-256 of every byte handed to hash_to, once the thread has hashed them."""
        for future in self.pending:
            future.result()
        self.pending.clear()
        return self.sha.hexdigest()

    def __enter__(self) -> "ShardHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = True  # after hexdigest() nothing is left; after an error or Ctrl-C, stop at once
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


def copied_in_kernel(handle, entry: PlanEntry, checkpoint: Checkpoint) -> int | None:
    """Copy an unconverted safetensors tensor from its file to the output file inside the kernel
    (copy_file_range: no trip through user memory) and return the bytes copied; None when that
    cannot be done here (a conversion, a pickled source, or a system without it)."""
    info = checkpoint.tensors[entry.tensor]
    if info.dtype != entry.dtype or info.file.suffix != ".safetensors" or not hasattr(os, "copy_file_range"):
        return None
    handle.flush()
    with open(info.file, "rb") as source:
        copied = 0
        while copied < info.end - info.begin:
            try:
                n = os.copy_file_range(
                    source.fileno(), handle.fileno(), info.end - info.begin - copied, info.begin + copied
                )
            except OSError:  # not supported between these files: the caller copies through memory
                if copied:
                    raise
                return None
            if n == 0:
                if not copied:  # some file systems copy nothing this way: copy through memory instead
                    return None
                raise ModelError(f"{info.file}: tensor '{entry.tensor}' is cut short (file truncated?)")
            copied += n
    return copied


def entry_data(entry: PlanEntry, checkpoints: dict[str, Checkpoint]) -> Iterator[bytes | bytearray | memoryview]:
    """The bytes to write, in one or more pieces: the source's own bytes, the tensor converted to
    the output dtype, the blend of several candidates' tensors, or zeros (an identity-initialised
    copy's residual writers)."""
    if entry.transform == "zero":
        yield bytes(entry_bytes(entry))
    elif entry.transform == "blend":
        for piece in blended_slices(entry, checkpoints, torch_dtype(entry.dtype)):
            yield tensor_bytes(piece)
    elif checkpoints[entry.source].tensors[entry.tensor].dtype == entry.dtype:
        yield checkpoints[entry.source].read_bytes(entry.tensor)
    else:
        yield tensor_bytes(checkpoints[entry.source].read(entry.tensor).to(torch_dtype(entry.dtype)))


def entry_bytes(entry: PlanEntry) -> int:
    return numel(entry.shape) * ITEMSIZES[entry.dtype]


def write_config(plan: Plan, tmp: Path) -> None:
    """config.json of the base (or the plan's, after an expansion), with the dtype updated if the
    plan converts every tensor."""
    if plan.config is not None:
        config = copy.deepcopy(plan.config)
    else:
        config = json.loads((plan.sources[plan.base] / "config.json").read_text(encoding="utf-8"))
    dtypes = {e.dtype for e in plan.entries if e.dtype in FLOAT_DTYPES}
    if len(dtypes) == 1:
        dtype = SAFETENSORS_DTYPES[dtypes.pop()]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
