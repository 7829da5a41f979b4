"""Sharded builds: peak memory per process against the shard count, on a world-spread input.

``python -m bench shards [ROWS]`` (default 10M reports, z0-z14, generic
profile) extracts a world-spread synthetic source once, then builds the
tileset with 1, 8 and 64 shards. ``python -m bench large`` (``make
bench-large``) does it once, for 100M reports in ``auto`` shards. Every step
runs in a process of its own (shards two at a time, one per core), so each
figure is that step's own:

* extract: the synthetic source staged a batch at a time, then validated
  (DuckDB spills beyond its memory limit);
* plan: the split (one GROUP BY over the tile keys);
* shard: read its reports, score them, cells down to the pivot zoom, and
  the features of the tiles it holds whole (the largest shard's peak RSS
  and the shards' total time);
* merge: the scoring sums and every zoom's cells file, a shard's part at a
  time (the zooms above the pivot rolled up), and the selection (the
  shards' zooms put together, the others chosen);
* shard tiles: each shard encodes the MVT tiles of its range (the largest
  peak RSS and the total time, as for the shards);
* publish: the overview zooms' tiles, the archive and the snapshot, a zoom
  at a time, each in parts of whole tiles.

Printed per shard count: wall time of each step, peak RSS of each, the
snapshot's files and bytes, and the targets of the issue: every build
process's peak RSS (plan, shards, merge, shard tiles, publish) <= 3 GB at 8 shards (10M),
<= 8 GB at 100M; the extraction's is printed (its DuckDB memory is capped). The snapshot must be
the same bytes for every shard count (checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from .snapshot import folder_size, measure

ROWS = 10_000_000
COUNTS = (1, 8, 64)
TARGET_RSS_GB = 3.0  # every build process of the 8-shard build of 10M reports
LARGE_ROWS = 100_000_000
LARGE_TARGET_RSS_GB = 8.0  # every build process of the 100M build
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)


def step(config: str, name: str, arg: str | None = None) -> None:
    """One step, in this process (``python -m bench.shards --step CONFIG NAME [I]``).

    Prints a line of JSON; the last line is the process's own peak RSS (bytes).
    """
    try:
        _step(config, name, arg)
    finally:
        print(json.dumps({"rss": _own_peak()}))


def _own_peak() -> int:
    """This process's peak RSS since it started (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _step(config: str, name: str, arg: str | None) -> None:
    from pipeline import build, plan, publish
    from pipeline.config import load_config

    cfg = load_config(config)
    if name == "extract":
        from pipeline import extract

        extract.stage(cfg, list(cfg.sources), AS_OF)
        done = extract.validate(cfg, list(cfg.sources), AS_OF)
        print(json.dumps({"valid": sum(r.valid for r in done.values())}))
        return
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
        cells = sum(z.cells for z in build.merge_cells(frozen))
        publish.select_tileset(frozen)
        print(json.dumps({"cells": cells}))
    elif name == "tiles":
        print(json.dumps({"zooms": publish.encode_shard(frozen, int(arg))["zooms"]}))
    elif name == "publish":
        publish.stage_snapshot(frozen)
        print(json.dumps({"path": str(publish.finalize_snapshot(frozen).path)}))


def _step_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.shards", "--step", str(config), *args]


def shards_side_by_side(config: Path, n: int, workers: int, name: str = "shard") -> tuple[float, float, float]:
    """Step ``name`` of every shard in a process of its own, ``workers`` at a time: (wall, sum of shard times,
    peak RSS)."""
    started, pending, running, peak, total = time.perf_counter(), list(range(n)), {}, 0, 0.0
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            proc = subprocess.Popen(_step_cmd(config, name, str(i)), stdout=subprocess.DEVNULL)
            running[proc.pid] = (proc, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        proc, began = running.pop(pid)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{name} step failed ({proc.args})")
        total += time.perf_counter() - began
        peak = max(peak, usage.ru_maxrss * 1024)
    return time.perf_counter() - started, total, peak


def digest(folder: Path) -> str:
    """The snapshot's content, read a MiB at a time: this process stays small, and the steps it
    starts later do not inherit a high-water mark (Linux copies it into a forked child's RSS peak)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            h.update(str(path.relative_to(folder)).encode())
            with path.open("rb") as file:
                while chunk := file.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def main(rows: int = ROWS, counts: tuple = COUNTS, target_gb: float = TARGET_RSS_GB, judged: object = 8) -> bool:
    """Extract ``rows`` once, then build with each shard count; ``judged``: the count the target applies to."""
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
        started = time.perf_counter()
        extracted = measure(_step_cmd(base, "extract"))
        valid = json.loads(extracted.stdout.strip().splitlines()[-2])["valid"]
        print(f"shards: {rows:,} world-spread reports, z0-z14, generic profile, {workers} cores")
        print(
            f"  extract (staged a batch at a time, validated): {extracted.wall:.1f} s, peak RSS "
            f"{extracted.rss / 1e9:.2f} GB, {valid:,} valid"
        )
        print(
            f"  {'shards':>6} {'zoom':>5} {'plan s':>7} {'shards s':>9} {'(sum)':>7} {'shard RSS':>10} "
            f"{'merge s':>8} {'merge RSS':>10} {'tiles s':>8} {'(sum)':>7} {'tiles RSS':>10} "
            f"{'publish s':>10} {'publish RSS':>12} {'files':>7} {'GB':>6}"
        )
        ok, digests = True, set()
        for n in counts:
            config = tmp / f"shards-{n}.yaml"
            ts = doc["tilesets"]["bench"]
            config.write_text(yaml.safe_dump({**doc, "tilesets": {"bench": {**ts, "shards": n}}}))
            planned = measure(_step_cmd(config, "plan"))
            info = json.loads(planned.stdout.strip().splitlines()[-2])
            wall, total, shard_rss = shards_side_by_side(config, info["shards"], workers)
            merged = measure(_step_cmd(config, "merge"))
            tiles_wall, tiles_total, tiles_rss = shards_side_by_side(config, info["shards"], workers, "tiles")
            published = measure(_step_cmd(config, "publish"))
            snapshot = Path(json.loads(published.stdout.strip().splitlines()[-2])["path"])
            digests.add(digest(snapshot))
            files, size = folder_size(snapshot)
            print(
                f"  {info['shards']:>6} {info['shard_zoom']:>5} {planned.wall:7.1f} {wall:9.1f} {total:7.1f} "
                f"{shard_rss / 1e9:9.2f}G {merged.wall:8.1f} {merged.rss / 1e9:9.2f}G "
                f"{tiles_wall:8.1f} {tiles_total:7.1f} {tiles_rss / 1e9:9.2f}G "
                f"{published.wall:10.1f} {published.rss / 1e9:11.2f}G {files:7,} {size / 1e9:6.2f}"
            )
            own = [json.loads(m.stdout.strip().splitlines()[-1])["rss"] / 1e9 for m in (merged, published)]
            print(f"         (merge and publish, as each process saw its own peak: {own[0]:.2f}G, {own[1]:.2f}G)")
            if n == judged:  # the build's processes; extraction's DuckDB has its own cap (HOTSPOTS_DUCKDB_MEMORY)
                peak = max(planned.rss, shard_rss, merged.rss, tiles_rss, published.rss)
                ok &= peak / 1e9 <= target_gb
                print(f"  {n} shards: every build process's peak RSS {peak / 1e9:.2f} GB (target <= {target_gb} GB)")
        print(f"  whole run (every step, one after another): {time.perf_counter() - started:.0f} s")
        same = len(digests) == 1
        if len(counts) > 1:
            print(f"  the same snapshot for every shard count: {'yes' if same else 'NO'}")
        print(f"  {'PASS' if ok and same else 'FAIL'}")
        return ok and same


def large() -> bool:
    """``make bench-large``: 100M world-spread reports in ``auto`` shards, every build process within 8 GB."""
    return main(LARGE_ROWS, ("auto",), LARGE_TARGET_RSS_GB, "auto")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step"]:
        step(*sys.argv[2:])
        sys.exit(0)
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS) else 1)
