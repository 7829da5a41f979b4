"""The files of a snapshot being staged, each recorded with its SHA-256.

Successive snapshots share most of their files (a tile far from any new
report does not change), so a file byte-identical to the same path in the
live snapshot is hard-linked to it instead of being written again; where
links are impossible (another file system, a host that forbids them) it is
written. Snapshots are never changed after publication, so a shared inode is
as safe as a copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


class SnapshotFolder:
    """A staging folder: ``put`` writes (or links) a file and records its digest.

    Parameters
    ----------
    root : Path
        The staging folder (``.tmp-<token>``).
    live : Path or None
        The live snapshot's folder, to share identical files with.
    """

    def __init__(self, root: Path, live: Path | None = None) -> None:
        self.root = root
        self.live = live if live is not None and live.is_dir() else None
        self.digests: dict[str, str] = {}
        self.shared = 0  # files linked to the live snapshot's
        self.shared_bytes = 0
        self._made: set[Path] = set()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def put(self, rel: str, data: bytes) -> int:
        """Write ``data`` at ``rel`` (or link the live snapshot's identical file); returns its size."""
        target = self.root / rel
        if target.parent not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)
        if not self._link_if_same(rel, lambda live: live.read_bytes() == data, len(data)):
            target.write_bytes(data)
        self.digests[rel] = hashlib.sha256(data).hexdigest()
        return len(data)

    def adopt(self, rel: str) -> int:
        """Record a file already at ``rel``; swap it for a link if the live snapshot's is identical."""
        target = self.root / rel
        digest = sha256(target)
        size = target.stat().st_size
        self._link_if_same(rel, lambda live: sha256(live) == digest, size)
        self.digests[rel] = digest
        return size

    def _link_if_same(self, rel: str, same, size: int) -> bool:
        if self.live is None:
            return False
        live, target = self.live / rel, self.root / rel
        spare = target.with_name(f".{target.name}.link")
        try:
            if live.stat().st_size != size or not same(live):
                return False
            os.link(live, spare)
            os.replace(spare, target)
        except OSError:
            spare.unlink(missing_ok=True)
            return False  # no live file, or no links here: write it
        self.shared += 1
        self.shared_bytes += size
        return True


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst``, or copy it where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
