"""GeoParquet 1.1 files of point cells: WKB ``geometry`` and ``geo`` metadata.

Points need no ``bbox`` covering column: the plain ``lng`` and ``lat``
columns are the covering's values, with the row-group statistics a reader
filters on (rows are in cell-key order, so a row group is a compact area).
Columns are encoded for what they hold (:func:`column_encodings`): floats
byte-stream-split, times delta-coded, quadkeys prefix-coded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic

GEO_VERSION = "1.1.0"
_WKB_POINT = np.dtype([("order", "u1"), ("type", "<u4"), ("x", "<f8"), ("y", "<f8")])  # 21 bytes, packed


def wkb_points(x: np.ndarray, y: np.ndarray) -> pa.Array:
    """Little-endian WKB points, built in one NumPy pass (no Python object per point)."""
    buf = np.empty(len(x), dtype=_WKB_POINT)
    buf["order"], buf["type"], buf["x"], buf["y"] = 1, 1, x, y
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(21), len(x), [None, pa.py_buffer(buf.tobytes())])
    return fixed.cast(pa.binary())


def plain_strings(table: pa.Table) -> pa.Table:
    """String columns as plain ``string``, readable everywhere (polars exports string views)."""
    return table.cast(
        pa.schema(
            [
                pa.field(
                    f.name,
                    pa.string() if pa.types.is_string_view(f.type) or pa.types.is_large_string(f.type) else f.type,
                )
                for f in table.schema
            ]
        )
    )


ROW_GROUP = 128 * 1024  # rows; a file written in parts cuts its row groups at the same rows
PLAIN = ("quadkey", "tile_feature")  # text that is (nearly) unique: a dictionary costs for nothing
SMALL = (pl.String, pl.Boolean, pl.Int8, pl.Int16, pl.Int32)


def to_table(frame: pl.DataFrame, lng: str = "lng", lat: str = "lat") -> pa.Table:
    """A point table with ``geometry`` (WKB) and no metadata."""
    table = plain_strings(frame.to_arrow())
    x = frame.get_column(lng).to_numpy().astype(np.float64, copy=False)
    y = frame.get_column(lat).to_numpy().astype(np.float64, copy=False)
    return table.append_column("geometry", wkb_points(x, y))


def geo_metadata(extent: list[float]) -> dict[str, str]:
    """The GeoParquet ``geo`` key of point data within ``extent`` (``[]``: none)."""
    geo = {
        "version": GEO_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Point"],
                "bbox": extent,
            }
        },
    }  # CRS omitted: OGC:CRS84 (lng/lat on WGS84), the GeoParquet default
    return {"geo": json.dumps(geo, sort_keys=True)}


def dictionary_columns(schema: pl.Schema) -> list[str]:
    """Text and small-integer columns, which repeat: worth a dictionary (quadkeys are not).

    A rule on the schema, not on the values, so a file written in parts is
    encoded as it would be whole (and pyarrow falls back to plain pages where
    a dictionary grows too large).
    """
    return [c for c, t in schema.items() if c not in PLAIN and (isinstance(t, SMALL) or t in SMALL)]


def column_encodings(schema: pl.Schema) -> dict[str, str]:
    """Floats byte-stream-split, times delta-coded, quadkeys prefix-coded (each shares most digits with
    the one before it, in key order): under zstd, times and quadkeys take about 60% of their plain bytes."""
    encodings = {}
    for name, dtype in schema.items():
        if dtype in (pl.Float32, pl.Float64):
            encodings[name] = "BYTE_STREAM_SPLIT"
        elif isinstance(dtype, pl.Datetime):
            encodings[name] = "DELTA_BINARY_PACKED"
        elif name in PLAIN:
            encodings[name] = "DELTA_BYTE_ARRAY"
    return encodings


def extent(frame: pl.DataFrame | pl.LazyFrame, lng: str = "lng", lat: str = "lat") -> list[float]:
    """``[west, south, east, north]`` of the points, or ``[]`` for none."""
    x, y = pl.col(lng), pl.col(lat)
    box = frame.lazy().select(x.min().alias("w"), y.min().alias("s"), x.max().alias("e"), y.max().alias("n"))
    row = box.collect().row(0)
    return [] if row[0] is None else [float(v) for v in row]


def union(a: list[float], b: list[float]) -> list[float]:
    """The extent around two extents (``[]`` is empty)."""
    if not a or not b:
        return a or b
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


class Writer:
    """One GeoParquet file of point rows, written in parts (in row order).

    Row groups hold :data:`ROW_GROUP` rows whatever the parts' sizes: the
    file has the same bytes as one written whole. The ``extent`` of all the
    rows is needed up front (readers take the ``geo`` key from the schema,
    which is written first). Columns are encoded as :func:`column_encodings` says.
    """

    def __init__(self, path: Path, extent: list[float], lng: str = "lng", lat: str = "lat") -> None:
        self.path, self.extent, self.lng, self.lat = path, extent, lng, lat
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write(self, frame: pl.DataFrame) -> None:
        if self._writer is None:
            schema = to_table(frame.head(0), self.lng, self.lat).schema
            self._writer = pq.ParquetWriter(
                self.path,
                schema.with_metadata(geo_metadata(self.extent)),
                compression="zstd",
                use_dictionary=dictionary_columns(frame.schema),
                column_encoding=column_encodings(frame.schema),
            )
        if frame.height == 0:
            return
        self._pending.append(to_table(frame, self.lng, self.lat))
        self._rows += frame.height
        if self._rows >= ROW_GROUP:
            self._flush(whole=True)

    def _flush(self, whole: bool) -> None:
        table = pa.concat_tables(self._pending)
        cut = (table.num_rows // ROW_GROUP) * ROW_GROUP if whole else table.num_rows
        if cut:
            self._writer.write_table(table.slice(0, cut), row_group_size=ROW_GROUP)
        rest = table.slice(cut)
        self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self._writer is None:
            raise ValueError("a GeoParquet file needs at least one part, even an empty one")
        if self._pending:
            self._flush(whole=False)
        self._writer.close()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()


@contextmanager
def writing(path: Path, extent: list[float], lng: str = "lng", lat: str = "lat") -> Iterator[Writer]:
    """A :class:`Writer` whose file replaces ``path`` when the block ends without error."""
    with atomic.replacing(path) as tmp:
        writer = Writer(tmp, extent, lng, lat)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()


def write(frame: pl.DataFrame, path: Path) -> int:
    """Write a point frame as GeoParquet, atomically; returns the file's size."""
    with writing(path, extent(frame)) as writer:
        writer.write(frame)
    return path.stat().st_size
