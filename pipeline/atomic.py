"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it replaces ``path``.

    On failure the temporary file is removed and ``path`` is untouched.
    ``durable``: the file and its folder are fsync'd, so the replacement
    survives a power cut (``latest.json``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`replacing`)."""
    with replacing(path, durable) as tmp:
        tmp.write_bytes(data)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, workers: int = 8) -> int:
    """Make a folder's files, subfolders and their entries durable; returns how many were synced.

    Only this tree's data is written out, not every dirty page of the file
    system as ``os.sync()`` would (a build's work files are hundreds of MB).
    A file linked from an earlier, already durable one costs next to nothing.
    Each fsync waits on the disk, not the CPU: several run at once.
    """
    paths = [root, *(p for p in root.rglob("*") if not p.is_symlink())]  # (a link's target is not the tree's)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fsync_dir, paths):  # opening read-only and fsync works for files too
            pass
    return len(paths)
