"""Vector tiles of the selected features: MVT 2.1 (layer ``cells``), a PMTiles v3 archive, TileJSON 3.0.0.

Each MVT tile holds exactly the features of its GeoJSON twin, plus those of
its neighbours that lie within ``buffer`` (64 of 4096) of its edges, so a
heatmap drawn tile by tile has no seams. Tiles are encoded by DuckDB
spatial's ``ST_AsMVT`` in one query per zoom (no Python object per feature)
and gzip-compressed deterministically.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
from pmtiles.tile import Compression, TileType, zxy_to_tileid
from pmtiles.writer import Writer

from . import strictjson, warehouse
from .geojson import METRICS
from .geoparquet import plain_strings

LAYER = "cells"
EXTENT = 4096
BUFFER = 64
MAX_TILE_BYTES = 500_000
EMPTY_TILE = gzip.compress(b"", compresslevel=4, mtime=0)  # a tile without layers

# MVT property -> (DuckDB type, the feature column): the GeoJSON properties, same types
PROPERTIES = {
    "cell": ("VARCHAR", "quadkey"),
    "z": ("INTEGER", "z"),
    "count": ("BIGINT", "report_count"),
    "weight": ("DOUBLE", "weight"),
    "score": ("DOUBLE", "score"),
    "intensity": ("DOUBLE", "intensity"),
    "top_category": ("VARCHAR", "top_category"),
    "last_seen": ("VARCHAR", "last_seen_text"),
    "tier": ("VARCHAR", "tier"),
    "healthy": ("BOOLEAN", "healthy"),
    "coarsened": ("BOOLEAN", "coarsened"),
    **{m: ("DOUBLE", m) for m in METRICS},
}


def with_buffer(features: pl.DataFrame, z: int, buffer: int = BUFFER, extent: int = EXTENT) -> pl.DataFrame:
    """Each feature once per tile it shows in: its own, and neighbours within the buffer."""
    n = 2**z
    margin = buffer / extent
    px = (pl.col("lng") + 180.0) / 360.0 * n
    sin = (pl.col("lat") * (math.pi / 180)).sin()
    py = (0.5 - ((1 + sin) / (1 - sin)).log() / (4 * math.pi)) * n
    offsets = pl.DataFrame({"dx": [-1, -1, -1, 0, 0, 0, 1, 1, 1], "dy": [-1, 0, 1] * 3})
    return (
        features.lazy()
        .with_columns(px.alias("_px"), py.alias("_py"))
        .join(offsets.lazy(), how="cross")
        .with_columns((pl.col("tile_x") + pl.col("dx")).alias("tx"), (pl.col("tile_y") + pl.col("dy")).alias("ty"))
        .filter(
            pl.col("tx").is_between(0, n - 1) & pl.col("ty").is_between(0, n - 1)
            & (pl.col("_px") - pl.col("tx")).is_between(-margin, 1 + margin)
            & (pl.col("_py") - pl.col("ty")).is_between(-margin, 1 + margin)
        )
        .with_columns(
            # the position in tile coordinates (0..extent, y down), as MVT stores it
            ((pl.col("_px") - pl.col("tx")) * extent).round().cast(pl.Int32).alias("gx"),
            ((pl.col("_py") - pl.col("ty")) * extent).round().cast(pl.Int32).alias("gy"),
            pl.col("last_seen").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("last_seen_text"),
        )
        .collect()
    )  # fmt: skip


def encode(features_by_zoom: dict[int, pl.DataFrame]) -> list[tuple[int, int, int, bytes]]:
    """MVT tiles (gzip) of every zoom: ``[(z, x, y, data)]`` in (z, x, y) order.

    One ``ST_AsMVT`` query for all zooms (one query parallelises better than
    one per zoom). Positions are already in tile coordinates
    (:func:`with_buffer`), so it only encodes; features are ordered by
    quadkey, so tiles are byte-identical run to run.
    """
    frames = [with_buffer(f, z).with_columns(pl.lit(z, pl.Int32).alias("tz")) for z, f in features_by_zoom.items() if f.height]
    if not frames:
        return []
    rows = pl.concat(frames, how="diagonal_relaxed")
    props = ", ".join(
        f"'{name}': CAST({column} AS {typ})" for name, (typ, column) in PROPERTIES.items() if column in rows.columns
    )
    columns = [c for _, c in PROPERTIES.values() if c in rows.columns]
    table = plain_strings(rows.select("tz", "tx", "ty", "gx", "gy", *columns).to_arrow())
    con = warehouse.connect()
    try:
        con.register("features", table)
        encoded = con.execute(
            f"""
            SELECT tz, tx, ty, ST_AsMVT({{'geometry': ST_Point(gx, gy), {props}}},
                                        '{LAYER}', {EXTENT}, 'geometry' ORDER BY quadkey) AS mvt
            FROM features GROUP BY tz, tx, ty ORDER BY tz, tx, ty
            """
        ).fetchall()
    finally:
        con.close()
    # zlib releases the GIL: compress tiles in parallel; level 4 is 3x faster than 6 for 1% more bytes
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        data = list(pool.map(lambda row: gzip.compress(bytes(row[3]), compresslevel=4, mtime=0), encoded))
    return [(int(z), int(x), int(y), d) for (z, x, y, _), d in zip(encoded, data)]


def write_pmtiles(tiles: list[tuple[int, int, int, bytes]], path: Path, metadata: dict, bounds: list[float]) -> int:
    """A clustered PMTiles v3 archive of gzip MVT tiles ``[(z, x, y, data)]``; returns its size."""
    # No tiles: one empty tile 0/0/0 (an MVT with no layer), since an archive needs an entry
    ordered = sorted(tiles, key=lambda t: zxy_to_tileid(t[0], t[1], t[2])) or [(0, 0, 0, EMPTY_TILE)]
    west, south, east, north = bounds
    zooms = [t[0] for t in ordered]
    with open(path, "wb") as fh:
        writer = Writer(fh)
        for z, x, y, data in ordered:
            writer.write_tile(zxy_to_tileid(z, x, y), data)
        writer.finalize(
            {
                "tile_type": TileType.MVT,
                "tile_compression": Compression.GZIP,
                "min_lon_e7": int(west * 1e7), "min_lat_e7": int(south * 1e7),
                "max_lon_e7": int(east * 1e7), "max_lat_e7": int(north * 1e7),
                "center_zoom": min(max(zooms), max(min(zooms), 10)),
                "center_lon_e7": int((west + east) / 2 * 1e7), "center_lat_e7": int((south + north) / 2 * 1e7),
            },
            metadata,
        )  # fmt: skip
    return path.stat().st_size


def vector_layers(metrics: list[str], minzoom: int, maxzoom: int) -> list[dict]:
    """TileJSON / PMTiles ``vector_layers``: the one layer and its fields."""
    kinds = {"VARCHAR": "String", "BOOLEAN": "Boolean"}
    fields = {name: kinds.get(typ, "Number") for name, (typ, _) in PROPERTIES.items() if name not in METRICS or name in metrics}
    return [{"id": LAYER, "fields": fields, "minzoom": minzoom, "maxzoom": maxzoom,
             "description": "heatmap cells: the selected features of each tile"}]  # fmt: skip


def tilejson(name: str, layers: list[dict], bounds: list[float], minzoom: int, maxzoom: int) -> dict:
    """TileJSON 3.0.0 for the snapshot's MVT tiles (URLs relative to the snapshot folder)."""
    west, south, east, north = bounds
    return {
        "tilejson": "3.0.0",
        "name": name,
        "scheme": "xyz",
        "tiles": ["mvt/{z}/{x}/{y}.mvt"],
        "vector_layers": layers,
        "minzoom": minzoom,
        "maxzoom": maxzoom,
        "bounds": bounds,
        "center": [(west + east) / 2, (south + north) / 2, min(maxzoom, max(minzoom, 10))],
    }


def write_file(path: Path, data: bytes, digests: dict[str, str], root: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digests[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return len(data)


def write_json(path: Path, value: dict, digests: dict[str, str], root: Path) -> int:
    return write_file(path, (strictjson.dumps(value, indent=2, sort_keys=True) + "\n").encode(), digests, root)
