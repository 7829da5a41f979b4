"""MVT tiles, the PMTiles archive and TileJSON, read back with readers other than the writer."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import mapbox_vector_tile
import pytest
from pmtiles.reader import MmapSource, Reader, all_tiles
from pmtiles.tile import Compression, TileType

from pipeline.config import load_config
from pipeline.vector import BUFFER, EXTENT, MAX_TILE_BYTES

from .conftest import publish_tileset, run_extraction


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("vector")
    (root / "hotspots.yaml").write_text(json.dumps({
        "sources": {"rail": {"kind": "synthetic", "domain": "rail_disruptions", "count": 6000, "seed": 9,
                             "bbox": [5.9, 47.3, 15.0, 55.0]}},
        "tilesets": {"rail": {"source": "rail", "profile": "rail_disruptions", "maxzoom": 11,
                              "max_features_per_tile": 60}},
    }))  # fmt: skip
    cfg = load_config(root / "hotspots.yaml")
    run_extraction(cfg)
    return publish_tileset(cfg, "rail").path


def _pixel(lng: float, lat: float, z: int, x: int, y: int) -> tuple[float, float]:
    n = 2**z
    px = ((lng + 180) / 360 * n - x) * EXTENT
    sin = math.sin(math.radians(lat))
    py = ((0.5 - math.log((1 + sin) / (1 - sin)) / (4 * math.pi)) * n - y) * EXTENT
    return px, py


def test_every_mvt_tile_decodes_to_its_geojson_twin(snapshot: Path):
    mvt_files = sorted((snapshot / "mvt").rglob("*.mvt"))
    geojson_files = {p.relative_to(snapshot / "tiles").with_suffix("") for p in (snapshot / "tiles").rglob("*.geojson")}
    # every GeoJSON tile has its MVT twin; MVT alone may add tiles holding only neighbours' buffer
    assert geojson_files <= {p.relative_to(snapshot / "mvt").with_suffix("") for p in mvt_files}
    assert len(geojson_files) > 30
    for path in mvt_files:
        z, x, y = int(path.parts[-3]), int(path.parts[-2]), int(path.stem)
        data = path.read_bytes()
        assert data[:2] == b"\x1f\x8b" and len(data) <= MAX_TILE_BYTES  # gzip, not too big
        layer = mapbox_vector_tile.decode(gzip.decompress(data), default_options={"y_coord_down": True})["cells"]
        assert layer["extent"] == EXTENT
        twin_path = snapshot / "tiles" / str(z) / str(x) / f"{y}.geojson"
        twin = json.loads(twin_path.read_text())["features"] if twin_path.exists() else []
        expected = {f["properties"]["cell"]: f for f in twin}
        inside, buffered = {}, 0
        for feature in layer["features"]:
            px, py = feature["geometry"]["coordinates"]
            assert -BUFFER <= px <= EXTENT + BUFFER and -BUFFER <= py <= EXTENT + BUFFER
            cell = feature["properties"]["cell"]
            if cell in expected:
                inside[cell] = feature
            else:
                buffered += 1
                assert not (0 < px < EXTENT and 0 < py < EXTENT), "only buffer features come from neighbours"
        assert inside.keys() == expected.keys()
        for cell, feature in inside.items():
            want = expected[cell]
            assert feature["properties"].keys() == want["properties"].keys()
            for key, value in want["properties"].items():
                got = feature["properties"][key]
                assert type(got) is type(value) or (isinstance(value, float) and isinstance(got, float)), key
                assert got == pytest.approx(value, rel=1e-12) if isinstance(value, float) else got == value, key
            px, py = feature["geometry"]["coordinates"]
            ex, ey = _pixel(*want["geometry"]["coordinates"], z, x, y)
            assert abs(px - ex) <= 1 and abs(py - ey) <= 1


def test_pmtiles_archive_lists_every_tile(snapshot: Path):
    with open(snapshot / "heatmap.pmtiles", "rb") as fh:
        source = MmapSource(fh)
        reader = Reader(source)
        header, metadata = reader.header(), reader.metadata()
        listed = {(z, x, y): data for (z, x, y), data in all_tiles(source)}
    files = {(int(p.parts[-3]), int(p.parts[-2]), int(p.stem)): p.read_bytes() for p in (snapshot / "mvt").rglob("*.mvt")}
    assert listed == files
    assert header["tile_type"] == TileType.MVT and header["tile_compression"] == Compression.GZIP
    assert header["clustered"] and (header["min_zoom"], header["max_zoom"]) == (0, 11)
    assert 5.9e7 <= header["min_lon_e7"] < header["max_lon_e7"] <= 15.0e7
    assert [layer["id"] for layer in metadata["vector_layers"]] == ["cells"]
    assert {"count", "intensity", "delays", "cancellations", "departures"} <= set(metadata["vector_layers"][0]["fields"])


def test_tilejson(snapshot: Path):
    doc = json.loads((snapshot / "tiles.json").read_text())
    assert doc["tilejson"] == "3.0.0" and doc["tiles"] == ["mvt/{z}/{x}/{y}.mvt"]
    assert (doc["minzoom"], doc["maxzoom"]) == (0, 11) and len(doc["bounds"]) == 4 and len(doc["center"]) == 3
    assert doc["vector_layers"][0]["id"] == "cells"
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["layout"]["pmtiles"] == "heatmap.pmtiles"
    assert max(z["mvt_max_tile_bytes"] for z in manifest["zooms"]) <= MAX_TILE_BYTES
