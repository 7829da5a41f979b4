"""RFC 7946 GeoJSON for selected features: per-tile files and per-zoom overviews.

Feature text is built column-wise by polars (properties through
``struct.json_encode``, which escapes strings); Python touches one string per
file, never one object per feature.
"""

from __future__ import annotations

import polars as pl

from .snapfolder import SnapshotFolder

METRICS = ("departures", "cancellations", "delays")
COLLECTION_HEAD = '{"type":"FeatureCollection","features":['
COLLECTION_TAIL = "]}"


def properties(features: pl.DataFrame) -> pl.Expr:
    """The flat, MVT-ready properties of each feature, as a JSON object."""
    fields = [
        pl.col("quadkey").alias("cell"),
        pl.col("z"),
        pl.col("report_count").alias("count"),
        pl.col("weight"),
        pl.col("score"),
        pl.col("intensity"),
        pl.col("top_category"),
        pl.col("last_seen").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("last_seen"),
        pl.col("tier"),
        pl.col("healthy"),
        pl.col("coarsened"),  # placed at its stratum's centre: fewer than min_count reports
        *[pl.col(m) for m in METRICS if m in features.columns],
    ]
    return pl.struct(fields).struct.json_encode()


def feature_text(features: pl.DataFrame) -> pl.Expr:
    """Each feature as a GeoJSON Feature string; coordinates to 6 decimals."""
    coord = lambda c: pl.col(c).round(6).cast(pl.String)  # noqa: E731
    return pl.concat_str(
        pl.lit('{"type":"Feature","geometry":{"type":"Point","coordinates":['),
        coord("lng"),
        pl.lit(","),
        coord("lat"),
        pl.lit(']},"properties":'),
        properties(features),
        pl.lit("}"),
    ).alias("feature")


def collection(features: pl.DataFrame) -> str:
    """One FeatureCollection of all ``features`` (in quadkey order)."""
    # quadkeys tie where cells were coarsened into one stratum: then the cells' own (key) order
    body = (
        features.sort("quadkey", maintain_order=True).select(feature_text(features)).get_column("feature").str.join(",")
    )
    return COLLECTION_HEAD + (body[0] if features.height else "") + COLLECTION_TAIL


def write_tiles(features: pl.DataFrame, z: int, folder: SnapshotFolder) -> tuple[int, int]:
    """Write ``tiles/<z>/<x>/<y>.geojson`` for every tile that has features.

    Returns
    -------
    (tiles, bytes)
    """
    if features.height == 0:
        return 0, 0
    per_tile = (
        features.sort(["tile_x", "tile_y", "quadkey"], maintain_order=True)
        .select("tile_x", "tile_y", feature_text(features))
        .group_by(["tile_x", "tile_y"], maintain_order=True)
        .agg(pl.col("feature").str.join(","))
    )
    total = 0
    for x, y, body in per_tile.iter_rows():
        total += folder.put(f"tiles/{z}/{x}/{y}.geojson", (COLLECTION_HEAD + body + COLLECTION_TAIL).encode())
    return per_tile.height, total
