"""The cell pyramid: tile-aligned cells for every zoom, from one pass over the reports.

A cell at zoom ``z`` is the Web-Mercator tile at level ``z + d`` (``d`` =
cell detail). Its key is the Morton code of that tile (x and y bits
interleaved, y's above x's), which is its quadkey read as a base-4 number;
so a cell's parent is ``key // 4``, and its zoom-``z`` tile is
``(x >> d, y >> d)``. The finest zoom is aggregated from the reports once;
every coarser zoom is the roll-up of the one below, with additive aggregates
only (counts, sums, min, max, per-category counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from .profiles import Profile

EPSILON = 1e-14  # mercantile's: a point this close to a tile's right/bottom edge is in the next tile
INSIDE = 1e-9  # degrees (0.1 mm) a centroid keeps from its cell's edges
METRIC_COLUMNS = ("departures", "cancellations", "delays")
CELL_COLUMNS = (
    "z",
    "quadkey",
    "tile_x",
    "tile_y",
    "report_count",
    "weight",
    "score",
    "intensity",
    "lng",
    "lat",
    "max_weight",
    "top_category",
    "first_seen",
    "last_seen",
)


def tile_x(lng: pl.Expr, level: int) -> pl.Expr:
    """Tile column at ``level`` of a longitude, exactly as ``mercantile.tile``."""
    x = lng / 360.0 + 0.5
    return _tile_index(x, level)


def tile_y(lat: pl.Expr, level: int) -> pl.Expr:
    """Tile row at ``level`` of a latitude, exactly as ``mercantile.tile``."""
    sinlat = (lat * (math.pi / 180.0)).sin()
    y = 0.5 - 0.25 * ((1.0 + sinlat) / (1.0 - sinlat)).log() / math.pi
    return _tile_index(y, level)


def _tile_index(v: pl.Expr, level: int) -> pl.Expr:
    z2 = float(2**level)
    inside = ((v + EPSILON) * z2).floor()
    return pl.when(v <= 0).then(0.0).when(v >= 1).then(z2 - 1).otherwise(inside).cast(pl.UInt64)


def _spread16(v: np.ndarray) -> np.ndarray:
    # bit i of v to bit 2i (v < 2**16)
    v = v.astype(np.uint64)
    for shift, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


_SPREAD = pl.Series("spread", _spread16(np.arange(1 << 16)))  # a 16-bit lookup table


def _spread_bits(v: pl.Expr) -> pl.Expr:
    # bit i of v to bit 2i (v < 2**32), by table: each input referenced once,
    # so the expression does not grow with every step
    table = pl.lit(_SPREAD)
    return table.gather(v & 0xFFFF) | (table.gather(v // (1 << 16)) * (1 << 32))


def morton(x: pl.Expr, y: pl.Expr) -> pl.Expr:
    """Cell key: x and y bits interleaved, y above x (the quadkey as a number)."""
    return _spread_bits(x) | (_spread_bits(y) * 2)


def score(profile: Profile) -> pl.Expr:
    """A cell's score from its additive aggregates."""
    n = pl.col("report_count").cast(pl.Float64)
    if profile.score == "mean":  # seed 001's AVG(decay_score)
        return pl.col("weight") / n
    if profile.score == "boosted_count":  # seed 002
        mean_boost = pl.col("severity_boost_sum") / n
        return n * (1.0 + mean_boost * profile.severity_weight_multiplier) * (pl.col("decay_sum") / n)
    return pl.col("weight")


def intensity(profile: Profile) -> pl.Expr:
    """Score normalised to 0..1 over one zoom: ``score / max`` or seed 002's min–max."""
    s = pl.col("score")
    lo, hi = s.min(), s.max()
    if profile.normalize == "minmax":
        flat = pl.when(hi > 0).then(1.0).otherwise(0.0)
        scaled = pl.when(hi > lo).then((s - lo) / (hi - lo)).otherwise(flat)
    else:
        scaled = pl.when(hi > 0).then(s / hi).otherwise(0.0)
    # a denormal divisor overflows polars' reciprocal: keep 0..1 all the same
    return scaled.fill_nan(0.0).clip(0.0, 1.0)


class _Level(NamedTuple):
    """One zoom's cells as NumPy arrays, sorted by key: the roll-up's working form."""

    key: np.ndarray  # uint64 Morton keys
    x: np.ndarray  # tile column and row at this level (int64)
    y: np.ndarray
    digits: np.ndarray  # quadkeys as a cells x level matrix of ASCII digits
    sums: dict[str, np.ndarray]  # counts, weights, coordinate sums, metrics
    max_weight: np.ndarray
    first_seen: np.ndarray  # int64 microseconds since the epoch
    last_seen: np.ndarray
    category_counts: np.ndarray  # categories x cells (a row per category: fast to roll up)

    @classmethod
    def finest(
        cls,
        reports: pl.DataFrame,
        key: np.ndarray,
        code: np.ndarray,
        n_categories: int,
        level: int,
        columns: list[tuple[str, str]],
    ) -> _Level:
        """Finest cells from reports sorted (stably) by cell key, then category code.

        Sums run left to right over each cell's reports in that fixed order,
        so the same input gives the same bits, whatever the thread count.
        """
        new_cell, new_pair = _changes(key), _changes(code)
        new_pair |= new_cell
        starts, pair_starts = np.flatnonzero(new_cell), np.flatnonzero(new_pair)
        # (cell, category) pairs are runs too: their lengths are the category counts
        pair_cell = np.cumsum(new_cell[pair_starts]) - 1
        dtype = np.int32 if len(key) < 2**31 else np.int64
        counts = np.zeros((n_categories + 1) * len(starts), dtype=dtype)  # + a row for "none"
        counts[code[pair_starts].astype(np.int64) * len(starts) + pair_cell] = np.diff(pair_starts, append=len(key))
        weight = reports.get_column("weight").to_numpy()
        times = reports.get_column("observed_at").dt.epoch("us").to_numpy()
        sums = {"report_count": np.diff(starts, append=len(key)).astype(np.int64)}
        sums.update({name: np.add.reduceat(reports.get_column(c).to_numpy(), starts) for name, c in columns})
        cell_key = key[starts]
        x, y = cell_xy(cell_key)
        return cls(
            cell_key,
            x,
            y,
            _quadkey_digits(cell_key, level),
            sums,
            np.maximum.reduceat(weight, starts),
            np.minimum.reduceat(times, starts),
            np.maximum.reduceat(times, starts),
            counts.reshape(n_categories + 1, -1)[:n_categories],
        )

    def parent(self) -> _Level:
        """The level above: siblings share ``key // 4`` and are adjacent (sorted keys)."""
        key = self.key >> np.uint64(2)
        starts = _run_starts(key)
        counts = np.empty((len(self.category_counts), len(starts)), dtype=self.category_counts.dtype)
        for row, out in zip(self.category_counts, counts):
            np.add.reduceat(row, starts, out=out)
        return _Level(
            key[starts],
            self.x[starts] >> 1,
            self.y[starts] >> 1,
            self.digits[starts, :-1],  # a parent's quadkey is its child's less the last digit
            {name: np.add.reduceat(v, starts) for name, v in self.sums.items()},
            np.maximum.reduceat(self.max_weight, starts),
            np.minimum.reduceat(self.first_seen, starts),
            np.maximum.reduceat(self.last_seen, starts),
            counts,
        )


def _changes(values: np.ndarray) -> np.ndarray:
    """True where a value differs from the one before it (and at 0)."""
    out = np.empty(len(values), dtype=bool)
    out[:1] = True
    np.not_equal(values[1:], values[:-1], out=out[1:])
    return out


def _run_starts(key: np.ndarray) -> np.ndarray:
    """Where each run of equal (sorted) keys starts."""
    return np.flatnonzero(_changes(key))


def build(
    scored: pl.DataFrame,
    profile: Profile,
    minzoom: int,
    maxzoom: int,
    cell_detail: int,
) -> Iterator[pl.DataFrame]:
    """Cells of every zoom, finest first.

    Parameters
    ----------
    scored : DataFrame
        Scored reports: lat, lng, observed_at, category, weight,
        severity_boost, decay and the profile's metric columns.
    profile : Profile
        For the cell score and the intensity normalisation.
    minzoom, maxzoom, cell_detail : int
        Zoom range; cells at zoom z are tiles at z + cell_detail.

    Yields
    ------
    DataFrame
        One per zoom from ``maxzoom`` down to ``minzoom``, sorted by
        ``cell_key``, with :data:`CELL_COLUMNS`, the metrics, and for a
        ``boosted_count`` profile ``severity_boost_sum`` and ``decay_sum``.
    """
    if scored.height == 0:
        return
    metrics = tuple(m for m in METRIC_COLUMNS if m in scored.columns)
    categories = scored.get_column("category").drop_nulls().unique().sort().to_list()
    level = maxzoom + cell_detail
    # The one pass over the reports: key them, sort them once by (cell,
    # category), and every coarser cell is a contiguous run of finer ones.
    summed = [("weight", "weight"), ("lng_sum", "lng"), ("lat_sum", "lat"), *[(m, m) for m in metrics]]
    if profile.score == "boosted_count":  # what seed 002's score needs beyond the count
        summed += [("severity_boost_sum", "severity_boost"), ("decay_sum", "decay")]
    code_bits = len(categories).bit_length()
    keyed = (
        scored.lazy()
        .select(
            *{c for _, c in summed},
            "observed_at",
            tile_x(pl.col("lng"), level).alias("_x"),
            tile_y(pl.col("lat"), level).alias("_y"),
            pl.col("category")
            .cast(pl.Enum(categories))
            .to_physical()
            .cast(pl.UInt64)
            .fill_null(len(categories))
            .alias("code"),  # the last code: no category
        )
        .with_columns(morton(pl.col("_x"), pl.col("_y")).alias("key"))
        .drop("_x", "_y")
    )
    if 2 * level + code_bits <= 64:  # one packed sort column is faster than two
        packed = (pl.col("key") * (1 << code_bits) + pl.col("code")).alias("packed")
        reports = keyed.select(pl.all().exclude("key", "code"), packed).sort("packed", maintain_order=True).collect()
        packed_values = reports.get_column("packed").to_numpy()
        key, code = packed_values >> np.uint64(code_bits), packed_values & np.uint64((1 << code_bits) - 1)
    else:
        reports = keyed.sort(["key", "code"], maintain_order=True).collect()
        key, code = reports.get_column("key").to_numpy(), reports.get_column("code").to_numpy()
    current = _Level.finest(reports, key, code, len(categories), level, summed)
    del reports, key, code
    for z in range(maxzoom, minzoom - 1, -1):
        if z < maxzoom:
            current = current.parent()
        yield _frame(current, z, cell_detail, profile, metrics, categories)


def _frame(
    cells: _Level, z: int, detail: int, profile: Profile, metrics: tuple[str, ...], categories: list[str]
) -> pl.DataFrame:
    level = z + detail
    n = cells.sums["report_count"]
    x, y = cells.x, cells.y
    west, south, east, north = cell_bounds(x, y, level)
    top_code = _top_category(cells.category_counts)
    top = pl.Series([*categories, None], dtype=pl.String).gather(np.where(top_code < 0, len(categories), top_code))
    boosted = {c: cells.sums[c] for c in ("severity_boost_sum", "decay_sum") if c in cells.sums}
    frame = pl.DataFrame(
        {
            "z": pl.Series(np.full(len(n), z, np.int32)),
            "quadkey": _digits_to_strings(cells.digits),
            "tile_x": x >> detail,
            "tile_y": y >> detail,
            "report_count": n,
            "weight": cells.sums["weight"],
            # the mean of member positions, held inside the cell against rounding
            # (and against the last-ulp differences between math libraries' sinh)
            "lng": np.clip(cells.sums["lng_sum"] / n, west + INSIDE, east - INSIDE),
            "lat": np.clip(cells.sums["lat_sum"] / n, south + INSIDE, north - INSIDE),
            "max_weight": cells.max_weight,
            "top_category": top,
            "first_seen": pl.Series(cells.first_seen).cast(pl.Datetime("us", "UTC")),
            "last_seen": pl.Series(cells.last_seen).cast(pl.Datetime("us", "UTC")),
            **{m: cells.sums[m] for m in metrics},
            **boosted,
            "cell_key": cells.key,
        }
    )
    frame = frame.with_columns(score(profile).alias("score")).with_columns(intensity(profile).alias("intensity"))
    return frame.select(*CELL_COLUMNS, *metrics, *boosted, "cell_key")


def _top_category(counts: np.ndarray) -> np.ndarray:
    """Per cell, the category with most reports, ties to the first name; -1 for none."""
    top = np.full(counts.shape[1], -1, dtype=np.int64)
    best = np.zeros(counts.shape[1], dtype=counts.dtype)
    for code, row in enumerate(counts):  # a strict > keeps the first of equals
        np.copyto(top, code, where=row > best)
        np.maximum(best, row, out=best)
    return top


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


def cell_bounds(x: np.ndarray, y: np.ndarray, level: int) -> tuple[np.ndarray, ...]:
    """West, south, east, north of tiles, computed as ``mercantile.bounds`` does."""
    z2 = 2.0**level

    def lat(row: np.ndarray) -> np.ndarray:
        return np.degrees(np.arctan(np.sinh(math.pi * (1 - 2 * row / z2))))

    return x / z2 * 360.0 - 180.0, lat(y + 1), (x + 1) / z2 * 360.0 - 180.0, lat(y)


# Four quadkey digits at a time: byte b -> the 4 ASCII digits of b in base 4.
_QUAD_DIGITS = np.array(
    [int.from_bytes("".join(str((b >> (6 - 2 * j)) & 3) for j in range(4)).encode(), "little") for b in range(256)],
    dtype=np.uint32,
)


def _quadkey_digits(key: np.ndarray, level: int) -> np.ndarray:
    """Quadkeys of cell keys as a cells x level matrix of ASCII digits."""
    pad = -level % 4  # leading zero digits, cut off below
    width = level + pad
    words = np.empty((len(key), width // 4), dtype=np.uint32)
    for i in range(width // 4):
        byte = (key >> np.uint64(2 * (width - 4 * (i + 1)))) & np.uint64(0xFF)
        words[:, i] = _QUAD_DIGITS[byte.astype(np.intp)]
    return words.view(np.uint8).reshape(len(key), width)[:, pad:]


def _digits_to_strings(digits: np.ndarray) -> pl.Series:
    """A string per row of a digit matrix (no Python object per cell)."""
    n, width = digits.shape
    data = np.ascontiguousarray(digits)
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pl.from_arrow(pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data)))


def quadkeys(key: np.ndarray, level: int) -> pl.Series:
    """Quadkey strings of cell keys at ``level``."""
    return _digits_to_strings(_quadkey_digits(np.asarray(key, dtype=np.uint64), level))
