"""Crash safety: a kill during extraction, a full disk and a read-only output folder.

The kill test of publishing (30 SIGKILLs mid-snapshot) is in test_publish.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import atomic, publish, warehouse
from pipeline.config import load_config

from .conftest import AS_OF, IN_CI, REPO

BIN = Path(sys.executable).parent

EXTRACT = """
import sys
from datetime import datetime
from pipeline import extract
from pipeline.config import load_config
cfg = load_config(sys.argv[1])
sources = list(cfg.sources)
extract.stage(cfg, sources, datetime.fromisoformat(sys.argv[2]))
print("staged", flush=True)
extract.validate(cfg, sources, datetime.fromisoformat(sys.argv[2]))
print("validated", flush=True)
"""


def _config(root: Path, count: int, seed: int, **tileset) -> Path:
    path = root / "hotspots.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "sources": {"roads": {"kind": "synthetic", "domain": "road_conditions", "count": count, "seed": seed}},
                "tilesets": {"roads": {"source": "roads", "profile": "road_conditions", "maxzoom": 10, **tileset}},
            }
        )
    )
    return path


def _extract(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EXTRACT, str(config), AS_OF.isoformat()],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _timed(config: Path) -> dict[str, float]:
    """Seconds from start until each step of an uninterrupted extraction was done."""
    started, marks = time.monotonic(), {}
    proc = _extract(config)
    for line in proc.stdout:
        marks[line.strip()] = time.monotonic() - started
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return marks


def _state(db: Path) -> tuple[tuple, tuple]:
    """What the staged and the validated tables hold: (rows, an order-free checksum of the ids)."""
    with warehouse.reader(db) as con:
        staged = con.execute("SELECT count(*), sum(hash(file, row_number)) FROM raw_reports").fetchone()
        validated = con.execute(
            "SELECT count(*), sum(hash(file, row_number)) FROM (SELECT file, row_number "
            "FROM reports UNION ALL SELECT file, row_number FROM rejected_reports)"
        ).fetchone()
    return staged, validated


def test_a_kill_during_extraction_leaves_each_table_as_it_was_or_as_it_will_be(tmp_path):
    old = _config(tmp_path, 20_000, 1)
    assert _extract(old).wait(timeout=300) == 0
    before = _state(tmp_path / ".hotspots" / "warehouse.duckdb")
    # the same warehouse, a different source: the after state, computed aside
    aside = tmp_path / "aside"
    aside.mkdir()
    assert _extract(_config(aside, 300_000, 2)).wait(timeout=300) == 0
    after = _state(aside / ".hotspots" / "warehouse.duckdb")
    assert before[0] != after[0] and before[1] != after[1]

    new = _config(tmp_path, 300_000, 2)
    marks = _timed(new)  # when each step of an uninterrupted run committed
    _config(tmp_path, 20_000, 1)
    assert _extract(old).wait(timeout=300) == 0  # back to the before state
    assert _state(tmp_path / ".hotspots" / "warehouse.duckdb") == before

    _config(tmp_path, 300_000, 2)
    rng = random.Random(7)
    seen = set()
    for i in range(10):
        proc = _extract(new)
        if i < 5:  # while staging...
            time.sleep(rng.uniform(0.2, 0.8 * marks["staged"]))
        else:  # ...then once staged, while validating
            assert proc.stdout.readline().strip() == "staged"
            time.sleep(rng.uniform(0.0, marks["validated"] - marks["staged"]))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        staged, validated = _state(tmp_path / ".hotspots" / "warehouse.duckdb")  # DuckDB opens: not corrupted
        assert staged in (before[0], after[0]), i
        assert validated in (before[1], after[1]), i
        seen.add((staged == after[0], validated == after[1]))
    assert (False, False) in seen and (True, False) in seen, seen  # kills landed in both steps
    # a run after the crashes completes: read = valid + rejected, the after state
    assert _extract(new).wait(timeout=300) == 0
    assert _state(tmp_path / ".hotspots" / "warehouse.duckdb") == after


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/output`` on a 6 MB tmpfs (root and CAP_SYS_ADMIN needed: CI has both)."""
    mount = tmp_path / "output"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _hotspots_run(config: Path, as_of: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "hotspots"), "run", "--config", str(config), "--as-of", as_of],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _served(cfg) -> tuple[str, list[str]]:
    latest = publish.read_latest(cfg.published("roads"))
    assert publish.verify_latest(cfg.published("roads")) is None
    return latest["snapshot_id"], sorted(p.name for p in (cfg.output / "roads" / "snapshots").iterdir())


def test_a_full_disk_fails_the_run_clearly_and_keeps_the_previous_snapshot(tmp_path, small_disk):
    config = _config(tmp_path, 2_000, 3)
    first = _hotspots_run(config, AS_OF.isoformat())
    assert first.returncode == 0, first.stderr
    cfg = load_config(config)
    served = _served(cfg)
    # ten times the reports, four zooms more: the snapshot cannot fit in what is left
    _config(tmp_path, 200_000, 4, maxzoom=14)
    failed = _hotspots_run(config, AS_OF.replace(hour=13).isoformat())
    assert failed.returncode == 1
    [line] = failed.stderr.strip().splitlines()
    assert "step tiles failed: cannot write in" in line and "No space left on device" in line, line
    assert "the previous snapshot stays published" in line
    assert _served(cfg) == served  # the same snapshot, whole, and no half-written folder beside it
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".")]


def test_a_read_only_output_fails_the_run_clearly_and_keeps_the_previous_snapshot(tmp_path, small_disk):
    config = _config(tmp_path, 2_000, 3)
    assert _hotspots_run(config, AS_OF.isoformat()).returncode == 0
    cfg = load_config(config)
    served = _served(cfg)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    failed = _hotspots_run(config, AS_OF.replace(hour=13).isoformat())
    assert failed.returncode == 1
    [line] = failed.stderr.strip().splitlines()
    assert "cannot write in" in line and "Read-only file system" in line, line
    assert _served(cfg) == served
    manifest = json.loads((cfg.output / "roads" / "snapshots" / served[0] / "manifest.json").read_text())
    assert manifest["as_of"] == AS_OF.isoformat()


def test_a_snapshot_is_made_durable_file_by_file_not_the_whole_disk(tmp_path, monkeypatch):
    tree, outside = tmp_path / "snapshot", tmp_path / "work.arrow"
    (tree / "tiles" / "3").mkdir(parents=True)
    for name in ("manifest.json", "tiles/3/4.geojson", "heatmap.pmtiles"):
        (tree / name).write_text(name)
    outside.write_text("work state, not published")
    (tree / "linked").symlink_to(outside)
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "sync", lambda: pytest.fail("the whole file system was synced"))
    assert atomic.fsync_tree(tree) == 6
    expected = {
        tree,
        tree / "tiles",
        tree / "tiles" / "3",
        *(tree / n for n in ("manifest.json", "tiles/3/4.geojson", "heatmap.pmtiles")),
    }
    assert set(synced) == expected and len(synced) == 6
