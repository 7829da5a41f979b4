"""What 24 hourly snapshots of the demo cost on disk.

The default ``hotspots.yaml`` (four tilesets), extracted once, then published
24 times an hour apart (``as_of`` advancing, as the hourly schedule does;
no new reports). Files identical to the live snapshot's are hard links, so
the disk holds each distinct file once. Printed per tileset and in all: the
apparent bytes of the 24 snapshots (what a copy without links would take) and
the bytes on disk (``du``: each inode once).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import yaml

from pipeline import publish
from pipeline.config import load_config

from .snapshot import AS_OF

HOURS = 24
DEMO = Path(__file__).resolve().parent.parent / "hotspots.yaml"


def usage(root: Path) -> tuple[int, int, int]:
    """Files, apparent bytes, and bytes on disk (each inode once) under ``root``."""
    files = apparent = 0
    seen: dict[tuple[int, int], int] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            files += 1
            apparent += st.st_size
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return files, apparent, sum(seen.values())


def main() -> bool:
    from tests.conftest import publish_tileset, run_extraction  # the calls the jobs make

    with tempfile.TemporaryDirectory(prefix="hotspots-retention-") as tmp:
        tmp = Path(tmp)
        config = yaml.safe_load(DEMO.read_text())
        config.update(home=str(tmp / ".hotspots"), output=str(tmp / "output"))
        (tmp / "hotspots.yaml").write_text(yaml.safe_dump(config))
        cfg = load_config(tmp / "hotspots.yaml")
        run_extraction(cfg, AS_OF)
        started = time.perf_counter()
        shared = dict.fromkeys(cfg.tilesets, 0)
        for hour in range(HOURS):
            for name in cfg.tilesets:
                publish_tileset(cfg, name, AS_OF + timedelta(hours=hour))
                shared[name] += json.loads((cfg.home / "work" / name / "staged.json").read_text())["shared"]["files"]
        seconds = time.perf_counter() - started
        print(
            f"retention: the demo ({', '.join(cfg.tilesets)}), {HOURS} hourly snapshots, no new reports "
            f"({seconds:.0f} s)"
        )
        print(f"  {'tileset':<18}{'snapshots':>10}{'files':>9}{'apparent MB':>13}{'on disk MB':>12}{'linked':>8}")
        total = [0, 0, 0]
        for name in cfg.tilesets:
            snapshots = cfg.output / name / publish.SNAPSHOTS
            files, apparent, disk = usage(snapshots)
            count = sum(1 for p in snapshots.iterdir() if not p.name.startswith("."))
            total = [total[0] + files, total[1] + apparent, total[2] + disk]
            print(
                f"  {name:<18}{count:>10}{files:>9,}{apparent / 1e6:>13.1f}{disk / 1e6:>12.1f}"
                f"{shared[name] / max(files, 1):>8.0%}"
            )
        print(f"  {'all':<18}{'':>10}{total[0]:>9,}{total[1] / 1e6:>13.1f}{total[2] / 1e6:>12.1f}")
        shutil.rmtree(tmp / "output")
    return True


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
