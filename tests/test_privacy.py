"""min_count: no published coordinate (GeoJSON, Parquet, MVT) gives away a lone report's address."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import mapbox_vector_tile
import numpy as np
import polars as pl
import pytest
import yaml

from pipeline.config import load_config
from pipeline.plan import resolve
from pipeline.vector import EXTENT

from .conftest import publish_tileset, run_extraction

EARTH = 2 * math.pi * 6378137.0  # the Web Mercator world's width, in metres


def _corner_lat(row: int, level: int = 3) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * row / 2**level))))


# Addresses on z3 tile corners: corners of every finer tile too, so no stratum
# centre (a tile centre at z+3 >= 3) falls within half a stratum of them.
LONE = [(-90.0, _corner_lat(3)), (45.0, _corner_lat(3)), (-135.0, _corner_lat(5)), (135.0, _corner_lat(5))]
PAIR = (-45.0, _corner_lat(2))  # two households at one address: still fewer than 3
TRIO = (90.0, _corner_lat(3))  # three at one address: may be shown where they are


def _mercator(lng, lat):
    lng, lat = np.asarray(lng, dtype=float), np.asarray(lat, dtype=float)
    return lng / 360.0 * EARTH, np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) / (2 * np.pi) * EARTH


def _publish(root: Path, min_count: int | None) -> tuple[Path, int]:
    rows = [(lng, lat) for lng, lat in LONE] + [PAIR] * 2 + [TRIO] * 3
    with open(root / "needs.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "lat", "lng", "t", "label", "entity"])
        for i, (lng, lat) in enumerate(rows):
            out.writerow([f"n{i}", repr(lat), repr(lng), "2026-10-30T10:00:00Z", "urgent", f"household-{i}"])
    tileset = {"source": "needs", "profile": "community_needs"}
    if min_count is not None:
        tileset["min_count"] = min_count
    columns = {
        "report_id": "id",
        "lat": "lat",
        "lng": "lng",
        "observed_at": "t",
        "category": "label",
        "entity_id": "entity",
    }
    (root / "hotspots.yaml").write_text(
        yaml.safe_dump(
            {
                "sources": {"needs": {"kind": "file", "path": "needs.csv", "columns": columns}},
                "tilesets": {"needs": tileset},
            }
        )
    )
    cfg = load_config(root / "hotspots.yaml")
    run_extraction(cfg)
    return publish_tileset(cfg, "needs").path, len(rows)


def published_points(snapshot: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every published position per zoom, in Web Mercator metres, from every public file."""
    by_zoom: dict[int, list[tuple[float, float]]] = {}

    def add(z, lng, lat):
        x, y = _mercator(lng, lat)
        by_zoom.setdefault(z, []).extend(zip(np.atleast_1d(x), np.atleast_1d(y)))

    for path in (snapshot / "cells").glob("zoom=*/cells.parquet"):
        z = int(path.parent.name.split("=")[1])
        cells = pl.read_parquet(path)
        add(z, cells["lng"].to_numpy(), cells["lat"].to_numpy())
        points = np.array([np.frombuffer(g[5:21], dtype="<f8") for g in cells["geometry"].to_list()])  # WKB x, y
        add(z, points[:, 0], points[:, 1])
    for path in [*(snapshot / "tiles").rglob("*.geojson"), *(snapshot / "overview").glob("*.geojson")]:
        for feature in json.loads(path.read_text())["features"]:
            lng, lat = feature["geometry"]["coordinates"]
            add(feature["properties"]["z"], lng, lat)
    for path in (snapshot / "mvt").rglob("*.mvt"):
        z, tx, ty = int(path.parts[-3]), int(path.parts[-2]), int(path.stem)
        layer = mapbox_vector_tile.decode(gzip.decompress(path.read_bytes()), default_options={"y_coord_down": True})
        for feature in layer["cells"]["features"]:
            px, py = feature["geometry"]["coordinates"]
            x = ((tx + px / EXTENT) / 2**z - 0.5) * EARTH
            y = (0.5 - (ty + py / EXTENT) / 2**z) * EARTH
            by_zoom.setdefault(z, []).append((x, y))
    return {z: (np.array(p)[:, 0], np.array(p)[:, 1]) for z, p in by_zoom.items()}


def _nearest(points: tuple[np.ndarray, np.ndarray], address: tuple[float, float]) -> float:
    ax, ay = _mercator(*address)
    return float(np.hypot(points[0] - ax, points[1] - ay).min())


def test_community_needs_defaults_to_min_count_3(write_config):
    cfg = load_config(
        write_config(
            {
                "sources": {"s": {"kind": "synthetic", "domain": "community_needs"}},
                "tilesets": {
                    "s": {"source": "s", "profile": "community_needs"},
                    "g": {"source": "s"},
                    "m": {"source": "s", "min_count": 5},
                },
            }
        )
    )
    assert [resolve(cfg.tilesets[t])[0].min_count for t in ("s", "g", "m")] == [3, 1, 5]


@pytest.fixture(scope="module")
def coarsened(tmp_path_factory):
    return _publish(tmp_path_factory.mktemp("private"), None)


def test_no_published_coordinate_is_within_a_cell_of_a_lone_report(coarsened):
    snapshot, reports = coarsened
    points = published_points(snapshot)
    assert sorted(points) == list(range(15))  # z0-z14, from every kind of file
    for z, xy in points.items():
        cell = EARTH / 2 ** (z + 6)
        for address in [*LONE, PAIR]:
            assert _nearest(xy, address) > cell, (z, address)
        # the three reports at one address are shown there: coarsening only touches sparse cells
        assert _nearest(xy, TRIO) < cell / 100, z


def test_coarsened_cells_keep_their_counts_and_hide_their_cell(coarsened):
    snapshot, reports = coarsened
    for path in (snapshot / "cells").glob("zoom=*/cells.parquet"):
        z = int(path.parent.name.split("=")[1])
        cells = pl.read_parquet(path)
        assert "cell_key" not in cells.columns
        assert cells["report_count"].sum() == reports  # counts and weights are kept
        sparse = cells.filter(pl.col("report_count") < 3)
        assert sparse["coarsened"].all() and sparse.height == len(LONE) + 1
        assert (sparse["quadkey"].str.len_chars() == z + 3).all()  # the stratum's quadkey, not the cell's
        assert not cells.filter(pl.col("report_count") >= 3)["coarsened"].any()
    tiles = [f for p in (snapshot / "tiles").rglob("*.geojson") for f in json.loads(p.read_text())["features"]]
    assert sum(f["properties"]["count"] for f in tiles) == reports * 15
    assert [f["properties"]["coarsened"] for f in tiles] == [f["properties"]["count"] < 3 for f in tiles]


def test_without_min_count_the_addresses_would_be_published(tmp_path):
    snapshot, _ = _publish(tmp_path, 1)  # the control: the check above can fail
    points = published_points(snapshot)
    for address in [*LONE, PAIR]:
        assert _nearest(points[14], address) < 1.0
