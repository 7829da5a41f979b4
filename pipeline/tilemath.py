"""Tile, cell and projection maths (Web Mercator), in one place; cross-checked against mercantile.

A tile is ``(z, x, y)`` as in mercantile and the XYZ scheme. A cell key is
the Morton code of a tile (x and y bits interleaved, y's above x's), which
is its quadkey read as a base-4 number: a parent's key is ``key // 4``. A
PMTiles tile id numbers tiles by zoom, then along a Hilbert curve.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

EPSILON = 1e-14  # mercantile's: a point this close to a tile's right/bottom edge is in the next tile
MERCATOR_MAX_LAT = 85.0511287798066  # atan(sinh(pi)) in degrees: the edge of the square world
WORLD = (-180.0, -85.051129, 180.0, 85.051129)  # west, south, east, north (six decimals, as TileJSON shows)


def mercator_x(lng: pl.Expr) -> pl.Expr:
    """Web Mercator x of a longitude, 0 (west) to 1 (east), as ``mercantile.tile``."""
    # products with reciprocals, not divisions: what Polars computes for a
    # column, also for a one-row frame (where it would divide) and in SQL
    return lng * (1.0 / 360.0) + 0.5


def mercator_y(lat: pl.Expr) -> pl.Expr:
    """Web Mercator y of a latitude, 0 (north) to 1 (south), as ``mercantile.tile``."""
    sinlat = (lat * (math.pi / 180.0)).sin()
    return 0.5 - 0.25 * ((1.0 + sinlat) / (1.0 - sinlat)).log() * (1.0 / math.pi)


def tile_x(lng: pl.Expr, level: int) -> pl.Expr:
    """Tile column at ``level`` of a longitude, exactly as ``mercantile.tile``."""
    return _tile_index(mercator_x(lng), level)


def tile_y(lat: pl.Expr, level: int) -> pl.Expr:
    """Tile row at ``level`` of a latitude, exactly as ``mercantile.tile``."""
    return _tile_index(mercator_y(lat), level)


def _tile_index(v: pl.Expr, level: int) -> pl.Expr:
    z2 = float(2**level)
    inside = ((v + EPSILON) * z2).floor()
    return pl.when(v <= 0).then(0.0).when(v >= 1).then(z2 - 1).otherwise(inside).cast(pl.UInt64)


# bit i to bit 2i, by shifts and masks (the 64-bit masks also serve narrower values)
_SPREAD_STEPS = (
    (16, 0x0000FFFF0000FFFF),
    (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F),
    (2, 0x3333333333333333),
    (1, 0x5555555555555555),
)


def _spread(v: np.ndarray) -> np.ndarray:
    # bit i of v to bit 2i (v < 2**32)
    v = np.asarray(v).astype(np.uint64)
    for shift, mask in _SPREAD_STEPS:
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


_SPREAD = pl.Series("spread", _spread(np.arange(1 << 16)))  # a 16-bit lookup table


def _spread_bits(v: pl.Expr) -> pl.Expr:
    # bit i of v to bit 2i (v < 2**32), by table: each input referenced once,
    # so the expression does not grow with every step
    table = pl.lit(_SPREAD)
    return table.gather(v & 0xFFFF) | (table.gather(v // (1 << 16)) * (1 << 32))


def morton(x: pl.Expr, y: pl.Expr) -> pl.Expr:
    """Cell key: x and y bits interleaved, y above x (the quadkey as a number)."""
    return _spread_bits(x) | (_spread_bits(y) * 2)


def morton_of(x: str, y: str) -> pl.Expr:
    """:func:`morton` of two integer columns (a tile's column and row), as UInt64."""
    return morton(pl.col(x).cast(pl.UInt64), pl.col(y).cast(pl.UInt64))


KEY_LEVEL = 30  # a report's tile key: its Morton key at this level; any coarser level's is a shift


def tile_key(lng: pl.Expr, lat: pl.Expr) -> pl.Expr:
    """A position's Morton key at :data:`KEY_LEVEL` (UInt64); ``key >> 2 * (KEY_LEVEL - z)`` is its key at ``z``.

    Scaling by a power of two is exact, so the shifted key is the key
    :func:`tile_x` and :func:`tile_y` give at the coarser level.
    """
    return morton(tile_x(lng, KEY_LEVEL), tile_y(lat, KEY_LEVEL))


def _sql_double(value: float) -> str:
    return f"'{value!r}'::DOUBLE"  # a numeric literal would be a DECIMAL first: not the same bits


def _sql_index(v: str, level: int) -> str:
    z2 = _sql_double(float(2**level))
    return (
        f"(CASE WHEN {v} <= 0 THEN 0 WHEN {v} >= 1 THEN {2**level - 1} "
        f"ELSE CAST(floor(({v} + {_sql_double(EPSILON)}) * {z2}) AS UBIGINT) END)::UBIGINT"
    )


def _sql_spread(column: str) -> str:
    # bit i of a column (< 2**32) to bit 2i; each step names the one before twice,
    # so this takes a column, not an expression
    v = column
    for shift, mask in _SPREAD_STEPS:
        v = f"(({v} | ({v} << {shift})) & {mask}::UBIGINT)"
    return v


def tile_key_sql(lng: str, lat: str) -> tuple[str, str, str]:
    """DuckDB SQL for :func:`tile_key`: the same operations in the same order, so the same bits.

    Returns the tile column and row at :data:`KEY_LEVEL` (select them as
    ``_x`` and ``_y``) and the key over those two columns.
    """
    x = f"({lng} * {_sql_double(1.0 / 360.0)} + {_sql_double(0.5)})"
    sinlat = f"sin({lat} * {_sql_double(math.pi / 180.0)})"
    ratio = f"(({_sql_double(1.0)} + {sinlat}) / ({_sql_double(1.0)} - {sinlat}))"
    y = f"({_sql_double(0.5)} - {_sql_double(0.25)} * ln({ratio}) * {_sql_double(1.0 / math.pi)})"
    return _sql_index(x, KEY_LEVEL), _sql_index(y, KEY_LEVEL), f"({_sql_spread('_x')} | ({_sql_spread('_y')} << 1))"


def _compact(v: np.ndarray) -> np.ndarray:
    # bits 0, 2, 4, ... of v packed together (the inverse of _spread_bits)
    v = v & np.uint64(0x5555555555555555)
    for shift, mask in (
        (1, 0x3333333333333333),
        (2, 0x0F0F0F0F0F0F0F0F),
        (4, 0x00FF00FF00FF00FF),
        (8, 0x0000FFFF0000FFFF),
        (16, 0x00000000FFFFFFFF),
    ):
        v = (v | (v >> np.uint64(shift))) & np.uint64(mask)
    return v.astype(np.int64)


def cell_xy(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tile column and row of cell keys (at the keys' level)."""
    key = np.asarray(key, dtype=np.uint64)
    return _compact(key), _compact(key >> np.uint64(1))


def morton_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cell keys (uint64) of tile columns and rows below 2**32: the inverse of :func:`cell_xy`."""
    return _spread(x) | (_spread(y) << np.uint64(1))


def neighbourhood(keys: np.ndarray, z: int) -> np.ndarray:
    """The tiles at zoom ``z`` of ``keys`` (cell keys) and their eight neighbours inside the world,
    as sorted unique cell keys."""
    x, y = cell_xy(keys)
    n = 1 << z
    around = [(x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    ax, ay = np.concatenate([a for a, _ in around]), np.concatenate([b for _, b in around])
    inside = (ax >= 0) & (ax < n) & (ay >= 0) & (ay < n)
    return np.unique(morton_keys(ax[inside], ay[inside]))


def cell_bounds(x: np.ndarray, y: np.ndarray, level: int) -> tuple[np.ndarray, ...]:
    """West, south, east, north of tiles, computed as ``mercantile.bounds`` does."""
    z2 = 2.0**level
    west, east = x / z2 * 360.0 - 180.0, (x + 1) / z2 * 360.0 - 180.0
    shared = row_edges(y, level)
    if shared is not None:  # each row's edge once, then looked up
        edges, lo = shared
        return west, edges[y - lo + 1], east, edges[y - lo]
    return west, _north_edge(y + 1, level), east, _north_edge(y, level)


def row_edges(y: np.ndarray, level: int) -> tuple[np.ndarray, int] | None:
    """The north edges of rows ``lo .. hi + 1`` of tiles in rows ``y`` (``lo``, ``hi``: their
    least and greatest), and ``lo``; ``None`` where the tiles are fewer than those rows."""
    lo, hi = (int(y.min()), int(y.max())) if len(y) else (0, 0)
    if hi - lo >= len(y):
        return None
    return _north_edge(np.arange(lo, hi + 2, dtype=np.int64), level), lo


def _north_edge(row: np.ndarray, level: int) -> np.ndarray:
    # mercantile.bounds' latitude of a row's north edge
    return np.degrees(np.arctan(np.sinh(math.pi * (1 - 2 * row / 2.0**level))))


# Four quadkey digits at a time: byte b -> the 4 ASCII digits of b in base 4.
_QUAD_DIGITS = np.array(
    [int.from_bytes("".join(str((b >> (6 - 2 * j)) & 3) for j in range(4)).encode(), "little") for b in range(256)],
    dtype=np.uint32,
)


def quadkey_digits(key: np.ndarray, level: int) -> np.ndarray:
    """Quadkeys of cell keys as a cells x level matrix of ASCII digits."""
    pad = -level % 4  # leading zero digits, cut off below
    width = level + pad
    words = np.empty((len(key), width // 4), dtype=np.uint32)
    for i in range(width // 4):
        byte = (key >> np.uint64(2 * (width - 4 * (i + 1)))) & np.uint64(0xFF)
        words[:, i] = _QUAD_DIGITS[byte.astype(np.intp)]
    return words.view(np.uint8).reshape(len(key), width)[:, pad:]


def digits_to_strings(digits: np.ndarray) -> pl.Series:
    """A string per row of a digit matrix (no Python object per cell)."""
    n, width = digits.shape
    data = np.ascontiguousarray(digits)
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pl.from_arrow(pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data)))


def quadkeys(key: np.ndarray, level: int) -> pl.Series:
    """Quadkey strings of cell keys at ``level``."""
    return digits_to_strings(quadkey_digits(np.asarray(key, dtype=np.uint64), level))


def tile_ids(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PMTiles tile ids (zoom, then Hilbert order) of tiles at zoom ``z``, vectorised.

    The same numbers as ``pmtiles.tile.zxy_to_tileid``, one NumPy pass per bit.
    """
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    acc = np.full(len(x), ((1 << (2 * z)) - 1) // 3, np.int64)  # the tiles of all coarser zooms
    for a in range(z - 1, -1, -1):
        s = 1 << a
        rx, ry = x & s, y & s
        acc += ((3 * rx) ^ ry) << a
        # rotate the quadrant (pmtiles' rotate with n = s; only the low bits matter below)
        flip = (ry == 0) & (rx != 0)
        x, y = np.where(flip, s - 1 - x, x), np.where(flip, s - 1 - y, y)
        swap = ry == 0
        x, y = np.where(swap, y, x), np.where(swap, x, y)
    return acc
