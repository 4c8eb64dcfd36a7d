"""Digests: the content digest of a tensor (its dtype, shape and bytes), under which the metric
cache stores what is computed from it; and the SHA-256 of the files a merge writes, as
merge_report.json records it and verify checks it: the chunk a file is read back in (by the
writer's background hash, write.py, and by verify), and the digests of files read with the kernel
asked to read ahead of the hash, under a progress bar.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from .checkpoint import TensorInfo

HASH_CHUNK = 8 * 2**20  # bytes read back and hashed at a time


def content_key(info: TensorInfo, data: bytearray) -> str:
    """A digest of a tensor's dtype, shape and bytes."""
    digest = hashlib.blake2b(f"{info.dtype}{list(info.shape)}\0".encode(), digest_size=20)
    digest.update(data)
    return digest.hexdigest()


def file_digests(files: list[tuple[Path, int]], quiet: bool, desc: str = "verify") -> list[str | OSError]:
    """The SHA-256 of each (file, its size in bytes), or the OSError that reading it raised, under
    one progress bar over all their bytes."""
    digests = []
    with tqdm(total=sum(size for _, size in files), desc=desc, unit="B", unit_scale=True, disable=quiet) as bar:
        for path, _ in files:
            try:
                digests.append(sha256_of(path, bar))
            except OSError as exc:
                digests.append(exc)
    return digests


def sha256_of(path: Path, bar) -> str:
    """The SHA-256 of a file, read in large chunks; the kernel is asked to read each next chunk
    ahead (POSIX_FADV_WILLNEED) while this one is hashed, so a file not in the page cache costs
    about the longer of its read and its hash, not their sum."""
    sha, view = hashlib.sha256(), memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as handle:
        position = 0
        while True:
            read_ahead(handle.fileno(), position + HASH_CHUNK, HASH_CHUNK)
            count = handle.readinto(view)
            if not count:
                return sha.hexdigest()
            sha.update(view[:count])
            bar.update(count)
            position += count


def read_ahead(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start reading bytes offset..offset + size into the page cache (only a hint)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
