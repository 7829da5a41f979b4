"""Golden tile output: a small fixed input must publish exactly the committed tiles.

Any change to selection, folding, coarsening, properties or coordinates shows
up here as a diff. After an intended change, regenerate and review the diff:

    HOTSPOTS_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from pathlib import Path

import mapbox_vector_tile
import yaml

from pipeline.config import load_config

from .conftest import publish_tileset, run_extraction

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "tiles.json"


def _reports(root: Path) -> None:
    """Sixty reports: two clusters in London, a scatter around them, three lone ones."""
    rng = random.Random(20261101)
    rows = []
    for i in range(60):
        if i < 25:
            lng, lat = -0.1276 + rng.gauss(0, 0.004), 51.5072 + rng.gauss(0, 0.003)
        elif i < 45:
            lng, lat = -0.0553 + rng.gauss(0, 0.002), 51.5218 + rng.gauss(0, 0.002)
        elif i < 57:
            lng, lat = rng.uniform(-0.4, 0.2), rng.uniform(51.3, 51.7)
        else:
            lng, lat = (-3.1883, 55.9533) if i == 57 else (-2.2426, 53.4808) if i == 58 else (-1.8904, 52.4862)
        day = 1 + i % 28
        rows.append(
            [
                f"r{i}",
                f"{lat:.6f}",
                f"{lng:.6f}",
                f"2026-10-{day:02d}T{i % 24:02d}:00:00Z",
                rng.choice(["pothole", "ice", "debris"]),
                rng.choice(["1", "2", "3"]),
            ]
        )
    with open(root / "reports.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "lat", "lng", "t", "kind", "severity"])
        out.writerows(rows)


def _tiles(snapshot: Path) -> dict[str, object]:
    """Every GeoJSON file as parsed, every MVT tile decoded (gzip bytes vary with zlib)."""
    out: dict[str, object] = {}
    for path in sorted(snapshot.rglob("*.geojson")):
        out[path.relative_to(snapshot).as_posix()] = json.loads(path.read_text())
    for path in sorted(snapshot.rglob("*.mvt")):
        layer = mapbox_vector_tile.decode(gzip.decompress(path.read_bytes()), default_options={"y_coord_down": True})
        features = sorted(
            ({"xy": f["geometry"]["coordinates"], **f["properties"]} for f in layer["cells"]["features"]),
            key=lambda f: json.dumps(f, sort_keys=True),
        )
        out[path.relative_to(snapshot).as_posix()] = features
    return out


def test_tiles_match_the_golden_fixture(tmp_path):
    _reports(tmp_path)
    columns = {
        "report_id": "id",
        "lat": "lat",
        "lng": "lng",
        "observed_at": "t",
        "category": "kind",
        "severity": "severity",
    }
    (tmp_path / "hotspots.yaml").write_text(
        yaml.safe_dump(
            {
                "sources": {"g": {"kind": "file", "path": "reports.csv", "columns": columns}},
                "tilesets": {"g": {"source": "g", "maxzoom": 9, "max_features_per_tile": 6, "min_count": 2}},
            }
        )
    )
    cfg = load_config(tmp_path / "hotspots.yaml")
    run_extraction(cfg)
    got = _tiles(publish_tileset(cfg, "g").path)
    if os.environ.get("HOTSPOTS_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)  # the same tiles...
    for name in want:
        assert got[name] == want[name], name  # ...with the same features, properties and positions
    # the fixture is not trivial: several zooms, folds, coarsened lone reports
    features = [f for name, v in want.items() if name.startswith("tiles/") for f in v["features"]]
    assert {f["properties"]["z"] for f in features} == set(range(10))
    assert any(f["properties"]["coarsened"] for f in features) and not all(
        f["properties"]["coarsened"] for f in features
    )
    assert any(f["properties"]["count"] > 1 for f in features)
