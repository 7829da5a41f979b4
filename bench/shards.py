"""Sharded builds: peak memory per process against the shard count, on a world-spread input.

``python -m bench shards [ROWS]`` (default 10M reports, z0-z14, generic
profile) extracts a world-spread synthetic source once, then builds the
tileset with 1, 8 and 64 shards. Every step runs in a process of its own
(shards two at a time, one per core), so each figure is that step's own:

* plan: the split (one GROUP BY over the tile keys);
* shard: read its reports, score them, cells down to the shard zoom (the
  largest shard's peak RSS and the shards' total time);
* merge: the scoring sums and every zoom's cells file (coarse zooms rolled up);
* publish: selection, tiles and the snapshot (not sharded yet: it holds a
  zoom at a time).

Printed per shard count: wall time of each step, peak RSS of each, and the
target of the issue: a shard's peak RSS <= 3 GB at 8 shards. The snapshot
must be the same bytes for every shard count (checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from .snapshot import measure

ROWS = 10_000_000
COUNTS = (1, 8, 64)
TARGET_SHARD_RSS_GB = 3.0
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)


def step(config: str, name: str, arg: str | None = None) -> None:
    """One step, in this process (``python -m bench.shards --step CONFIG NAME [I]``)."""
    from pipeline import build, plan, publish
    from pipeline.config import load_config

    cfg = load_config(config)
    if name == "plan":
        frozen = build.split(plan.make(cfg, "bench", AS_OF))
        plan.write(frozen)
        build.start(frozen)
        print(json.dumps({"shards": len(frozen.shards), "shard_zoom": frozen.shard_zoom}))
        return
    frozen = plan.read(cfg.work("bench").plan)
    if name == "shard":
        print(json.dumps({"scored": build.run_shard(frozen, int(arg)).scored}))
    elif name == "merge":
        build.merge_scoring(frozen)
        print(json.dumps({"cells": sum(z.cells for z in build.merge_cells(frozen))}))
    elif name == "publish":
        publish.select_tileset(frozen)
        publish.stage_snapshot(frozen)
        print(json.dumps({"path": str(publish.finalize_snapshot(frozen).path)}))


def _step_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.shards", "--step", str(config), *args]


def shards_side_by_side(config: Path, n: int, workers: int) -> tuple[float, float, float]:
    """Every shard in a process of its own, ``workers`` at a time: (wall, sum of shard times, peak RSS)."""
    started, pending, running, peak, total = time.perf_counter(), list(range(n)), {}, 0, 0.0
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            proc = subprocess.Popen(_step_cmd(config, "shard", str(i)), stdout=subprocess.DEVNULL)
            running[proc.pid] = (proc, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        proc, began = running.pop(pid)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"shard step failed ({proc.args})")
        total += time.perf_counter() - began
        peak = max(peak, usage.ru_maxrss * 1024)
    return time.perf_counter() - started, total, peak


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def main(rows: int = ROWS) -> bool:
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="hotspots-bench-shards-") as tmp:
        tmp = Path(tmp)
        source = {"kind": "synthetic", "count": rows, "seed": 3, "domain": "road_conditions", "days": 60}
        doc = {
            "home": str(tmp / ".hotspots"),
            "output": str(tmp / "output"),
            "sources": {"bench": {**source, "spread": "world"}},
            "tilesets": {"bench": {"source": "bench", "profile": "generic", "minzoom": 0, "maxzoom": 14}},
        }
        base = tmp / "hotspots.yaml"
        base.write_text(yaml.safe_dump(doc))
        hotspots = str(Path(sys.executable).parent / "hotspots")
        extraction = measure([hotspots, "run", "--config", str(base), "--as-of", AS_OF.isoformat()])
        print(f"shards: {rows:,} world-spread reports, z0-z14, generic profile, {workers} cores")
        print(f"  extraction + a whole 1-shard run: {extraction.wall:.1f} s, peak RSS {extraction.rss / 1e9:.2f} GB")
        print(
            f"  {'shards':>6} {'zoom':>5} {'plan s':>7} {'shards s':>9} {'(sum)':>7} {'shard RSS':>10} "
            f"{'merge s':>8} {'merge RSS':>10} {'publish s':>10} {'publish RSS':>12}"
        )
        ok, digests = True, set()
        for n in COUNTS:
            config = tmp / f"shards-{n}.yaml"
            ts = doc["tilesets"]["bench"]
            config.write_text(yaml.safe_dump({**doc, "tilesets": {"bench": {**ts, "shards": n}}}))
            planned = measure(_step_cmd(config, "plan"))
            info = json.loads(planned.stdout.strip().splitlines()[-1])
            wall, total, shard_rss = shards_side_by_side(config, info["shards"], workers)
            merged = measure(_step_cmd(config, "merge"))
            published = measure(_step_cmd(config, "publish"))
            digests.add(digest(Path(json.loads(published.stdout.strip().splitlines()[-1])["path"])))
            print(
                f"  {n:>6} {info['shard_zoom']:>5} {planned.wall:7.1f} {wall:9.1f} {total:7.1f} "
                f"{shard_rss / 1e9:9.2f}G {merged.wall:8.1f} {merged.rss / 1e9:9.2f}G "
                f"{published.wall:10.1f} {published.rss / 1e9:11.2f}G"
            )
            if n == 8:
                ok &= shard_rss / 1e9 <= TARGET_SHARD_RSS_GB
        same = len(digests) == 1
        print(f"  the same snapshot for every shard count: {'yes' if same else 'NO'}")
        print(f"  8 shards: a shard's peak RSS <= {TARGET_SHARD_RSS_GB} GB: {'ok' if ok else 'MISSED'}")
        print(f"  {'PASS' if ok and same else 'FAIL'}")
        return ok and same


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step"]:
        step(*sys.argv[2:])
        sys.exit(0)
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS) else 1)
