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

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from .profiles import Profile
from .tilemath import KEY_LEVEL, cell_bounds, row_edges, tile_key

INSIDE = 1e-9  # degrees (0.1 mm) a centroid keeps from its cell's edges
# Centroids lie on a grid of 2**-24 degrees (under 7 mm), times on whole
# seconds (as GeoJSON and MVT show them): a double on a binary grid has zero
# low bytes, which the published GeoParquet's byte-stream-split columns store
# in next to nothing (positions and times take half the bytes they did).
GRID = 2.0**24
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


def score(profile: Profile) -> pl.Expr:
    """A cell's score from its additive aggregates."""
    n = pl.col("report_count").cast(pl.Float64)
    if profile.score == "mean":  # seed 001's AVG(decay_score)
        return pl.col("weight") / n
    if profile.score == "boosted_count":  # seed 002
        mean_boost = pl.col("severity_boost_sum") / n
        return n * (1.0 + mean_boost * profile.severity_weight_multiplier) * (pl.col("decay_sum") / n)
    return pl.col("weight")


class Span(NamedTuple):
    """The lowest and highest score of a zoom's cells (or features): what intensity is scaled by.

    Known from summaries (:meth:`of` each part, :meth:`join` them), so a zoom
    read in parts gets the intensity it would get whole.
    """

    lo: float
    hi: float

    @classmethod
    def of(cls, score: pl.Series) -> Span | None:
        return cls(float(score.min()), float(score.max())) if len(score) else None

    def join(self, other: Span | None) -> Span:
        return self if other is None else Span(min(self.lo, other.lo), max(self.hi, other.hi))


def intensity(profile: Profile, span: Span | None) -> pl.Expr:
    """Score normalised to 0..1 over a zoom's ``span``: ``score / max`` or seed 002's min–max."""
    s = pl.col("score")
    if span is None:  # no cells
        return pl.lit(0.0)
    lo, hi = span
    # a product with the reciprocal, as polars divides a long column by a number;
    # written out, the bits do not depend on how many rows a part has
    if profile.normalize == "minmax":
        scaled = (s - lo) * (1.0 / (hi - lo)) if hi > lo else pl.lit(1.0 if hi > 0 else 0.0)
    else:
        scaled = s * (1.0 / hi) if hi > 0 else pl.lit(0.0)
    # a denormal divisor overflows the reciprocal: keep 0..1 all the same
    return scaled.fill_nan(0.0).clip(0.0, 1.0)


def intensity_scale(profile: Profile, span: Span | None) -> list[float] | None:
    """What of a zoom's ``span`` :func:`intensity` reads: the highest score, or both ends (min–max)."""
    if span is None:
        return None
    return [float(span[0]), float(span[1])] if profile.normalize == "minmax" else [float(span[1])]


class Level(NamedTuple):
    """One zoom's cells as NumPy arrays, sorted by key: the roll-up's working form."""

    key: np.ndarray  # uint64 Morton keys (a cell's tile column and row: kernels.cell_xy)
    sums: dict[str, np.ndarray]  # counts, weights, coordinate sums, metrics
    max_weight: np.ndarray
    first_seen: np.ndarray  # int64 milliseconds since the epoch, whole seconds (as published)
    last_seen: np.ndarray
    category_counts: np.ndarray  # cells x lanes, unsigned, a lane per category (see _lanes)
    categories: tuple[str, ...]  # the names of category_counts' first lanes, sorted

    @classmethod
    def finest(
        cls,
        reports: pl.DataFrame,
        keys: np.ndarray,
        shift: int,
        codes: np.ndarray,
        categories: tuple[str, ...],
        columns: list[tuple[str, str]],
        order: np.ndarray | None = None,
    ) -> Level:
        """Finest cells from reports sorted (stably) by cell.

        ``keys >> shift`` is each report's cell key, ``codes`` its category
        code, both in the sorted order. ``order``: the reports are
        ``reports[order]`` (sorted without making that frame). Sums take
        each cell's reports in that fixed order (NumPy's pairwise sum,
        :mod:`pipeline.kernels`), so the same input gives the same bits,
        whatever the thread count.
        """
        k = _kernels()
        starts, report_count = k.run_starts(keys, shift)
        counts = _lanes(len(starts), len(categories), _lane_type(report_count))
        k.count_codes(codes, starts, counts)
        sums = {"report_count": report_count}

        def runs(reduce, values: np.ndarray) -> np.ndarray:
            return reduce(values, starts) if order is None else reduce(values, starts, order)

        sums.update({name: runs(k.segment_sum, _column(reports, c)) for name, c in columns})
        micros = np.ascontiguousarray(reports.get_column("observed_at").dt.epoch("us").to_numpy())
        return cls(
            keys[starts] >> np.uint64(shift),
            sums,
            runs(k.segment_max, _column(reports, "weight")),
            # whole seconds of the extremes: the floor of a minimum is the minimum of the floors
            k.whole_seconds(runs(k.segment_min, micros)),
            k.whole_seconds(runs(k.segment_max, micros)),
            counts,
            categories,
        )

    def parent(self) -> Level:
        """The level above: siblings share ``key // 4`` and are adjacent (sorted keys)."""
        k = _kernels()
        starts = k.parent_runs(self.key)
        key = self.key[starts] >> np.uint64(2)
        sums = {name: k.segment_sum(v, starts) for name, v in self.sums.items()}
        counts = self.category_counts.astype(_lane_type(sums["report_count"], self.category_counts.dtype), copy=False)
        # a cell's lanes are whole 64-bit words: adding the words adds every lane
        # at once, and no lane carries into the next, as none exceeds the cell's count
        words = k.segment_rows(counts.view(np.uint64), starts)
        return Level(
            key,
            sums,
            k.segment_max(self.max_weight, starts),
            k.segment_min(self.first_seen, starts),
            k.segment_max(self.last_seen, starts),
            words.view(counts.dtype),
            self.categories,
        )

    def save(self, path: Path) -> None:
        """Write this level (private work state: the shard's cells at the pivot zoom)."""
        with path.open("wb") as file:  # a file, so that NumPy does not add ".npz" to the name
            np.savez(
                file,
                key=self.key,
                max_weight=self.max_weight,
                first_seen=self.first_seen,
                last_seen=self.last_seen,
                category_counts=self.category_counts,
                categories=np.array(self.categories, dtype=np.str_),
                sum_names=np.array(list(self.sums), dtype=np.str_),
                **{f"sum_{name}": v for name, v in self.sums.items()},
            )

    @classmethod
    def load(cls, path: Path) -> Level:
        with np.load(path) as f:
            names = [str(n) for n in f["sum_names"]]
            return cls(
                f["key"],
                {n: f[f"sum_{n}"] for n in names},
                f["max_weight"],
                f["first_seen"],
                f["last_seen"],
                f["category_counts"],
                tuple(str(c) for c in f["categories"]),
            )

    @classmethod
    def concat(cls, parts: list[Level]) -> Level:
        """Levels of disjoint, ascending key ranges as one (categories united)."""
        categories = tuple(sorted({c for p in parts for c in p.categories}))
        lane = {c: i for i, c in enumerate(categories)}
        dtype = np.result_type(*(p.category_counts.dtype for p in parts))
        counts = _lanes(sum(len(p.key) for p in parts), len(categories), dtype)
        at = 0
        for p in parts:
            for i, name in enumerate((*p.categories, None)):  # None: the lane of "no category"
                counts[at : at + len(p.key), lane.get(name, len(categories))] = p.category_counts[:, i]
            at += len(p.key)
        key = np.concatenate([p.key for p in parts])
        if len(key) > 1 and not np.all(key[1:] > key[:-1]):
            raise ValueError("shards overlap or are out of order")
        join = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(
            key,
            {n: np.concatenate([p.sums[n] for p in parts]) for n in parts[0].sums},
            join("max_weight"),
            join("first_seen"),
            join("last_seen"),
            counts,
            categories,
        )


@functools.cache
def warm_up() -> threading.Thread:
    """Load the compiled roll-up loops (:mod:`pipeline.kernels`) in a background thread, once a process.

    A process's first call into them costs about half a second (Numba's
    import, LLVM, their machine code read from the cache); a step that will
    build cells starts this before it reads and scores its reports.
    """
    thread = threading.Thread(target=_warm, name="hotspots-warm-up", daemon=True)
    thread.start()
    return thread


def _warm() -> None:
    _kernels().warm()
    # and a first Arrow string view array each way, which costs pyarrow a fifth of a second
    key = np.zeros(1, np.uint64)
    _quadkeys(key, 1)
    _quadkeys(key, 13)
    _top_categories(_lanes(1, 1, np.dtype(np.uint8)), ["a"], np.ones(1, np.int64))


@contextmanager
def reusing_memory() -> Iterator[None]:
    """While the pyramid is built, have glibc's allocator keep the memory the process frees.

    By default an array over 32 MB is a fresh mapping of the kernel's, whose
    every 4 KiB page faults when first written (here about 2.6 GB/s, a third
    of what writing the memory costs); each zoom's arrays (NumPy's, and the
    compiled loops') are hundreds of MB, freed when the next zoom's are made.
    Served from the heap, never trimmed, the next zoom writes pages the
    process already has: a world shard's pyramid took a sixth less time.
    Afterwards the kept memory is given back (``malloc_trim``), so the steps
    that follow in the same process start from what is live, and glibc is
    left where its sliding threshold would be (:data:`_AFTER`). Not glibc:
    nothing changes.
    """
    global _reusing
    libc = _libc()
    with _reusing_lock:
        if libc is not None and _reusing == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _reusing += 1
    try:
        yield
    finally:
        with _reusing_lock:
            _reusing -= 1
            if libc is not None and _reusing == 0:
                for option, value in _AFTER:
                    libc.mallopt(option, value)
                libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
# Once mallopt has set any of these, glibc's mmap threshold no longer slides up as large blocks
# are freed: its static defaults (128 KiB) left every array over 128 KiB a fresh mapping, faulted
# page by page and unmapped when freed, for the rest of the process (the selection that follows
# the pyramid in a world shard took 5.9-6.7 s instead of 4.2-4.4 s). Arrays under 8 MiB (a million
# 8-byte values) come from the heap, as the sliding threshold would have them, and the trim
# threshold is twice that, as it would be: as fast as glibc's ceiling (32 MiB), with 0.1 GB less
# peak RSS.
_AFTER = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 8 << 20), (_M_TRIM_THRESHOLD, 16 << 20))
_reusing, _reusing_lock = 0, threading.Lock()  # how many callers are inside reusing_memory()


@functools.cache
def _libc():
    """The C library, if it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _kernels():
    """The compiled roll-up loops, imported when first needed (loading Numba takes half a second)."""
    from . import kernels

    return kernels


def _column(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A column as a contiguous NumPy array (what the compiled loops take)."""
    return np.ascontiguousarray(frame.get_column(name).to_numpy())


def _nondecreasing(values: np.ndarray, shift: int = 0) -> bool:
    """True when ``values >> shift`` are in ascending order (equal neighbours allowed)."""
    return bool(_kernels().nondecreasing(values, shift))


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
        Scored reports: lat, lng, tile_key (computed when absent),
        observed_at, category, weight, severity_boost, decay and the
        profile's metric columns.
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
    with reusing_memory():
        for frame, _ in roll_up(finest(scored, profile, maxzoom + cell_detail), maxzoom, minzoom, cell_detail, profile):
            yield with_intensity(frame, profile)


def finest(scored: pl.DataFrame, profile: Profile, level: int) -> Level:
    """The finest cells (tiles at ``level``) of scored reports: the one pass over the reports."""
    metrics = [m for m in METRIC_COLUMNS if m in scored.columns]
    if profile.categories is not None:  # scoring left no other (a lane for each known one: none has to be found)
        categories = tuple(sorted(set(profile.categories)))
    else:
        categories = tuple(scored.get_column("category").drop_nulls().unique().sort().to_list())
    summed = [("weight", "weight"), ("lng_sum", "lng"), ("lat_sum", "lat"), *[(m, m) for m in metrics]]
    if profile.score == "boosted_count":  # what seed 002's score needs beyond the count
        summed += [("severity_boost_sum", "severity_boost"), ("decay_sum", "decay")]
    if "tile_key" not in scored.columns:
        scored = scored.with_columns(tile_key(pl.col("lng"), pl.col("lat")).alias("tile_key"))
    shift = 2 * (KEY_LEVEL - level)  # a report's cell key: its tile key's first 2 * level bits
    reports = scored.select(
        *{c for _, c in summed},
        "observed_at",
        pl.col("tile_key").cast(pl.UInt64),
        pl.col("category")
        .cast(pl.Enum(categories))
        .to_physical()
        .cast(pl.UInt32)
        .fill_null(len(categories))
        .alias("code"),  # the last code: no category
    )
    keys, codes = _column(reports, "tile_key"), _column(reports, "code")
    # Sorted once by cell, every coarser cell is a contiguous run of finer ones. In
    # the warehouse's order (by tile key) the reports are sorted where they lie;
    # otherwise a stable sort by cell keeps each cell's reports in the order given.
    order = None
    if not _nondecreasing(keys, shift):
        by_cell = pl.arg_sort_by(pl.col("tile_key") // (1 << shift), maintain_order=True)
        order = reports.select(by_cell).to_series().to_numpy().astype(np.int64)
        keys, codes = keys[order], codes[order]
    return Level.finest(reports, keys, shift, codes, categories, summed, order)


def roll_up(
    cells: Level, top: int, bottom: int, detail: int, profile: Profile, overlap: bool = True
) -> Iterator[tuple[pl.DataFrame, Level | None]]:
    """Zooms ``top`` (``cells``' own) down to ``bottom``: each zoom's frame (no intensity yet), and with
    the last, its level (what a shard keeps for the merge).

    Intensity is normalised over a whole zoom, which a shard does not hold:
    :func:`with_intensity` adds it once a zoom's frames are together.
    A level is dropped as soon as the next is made from it and its frame is
    built, so that the next levels reuse its memory (a caller should not keep
    ``cells`` either, nor a frame past its turn): a world shard's roll-up
    then faults in less than half the fresh pages it did, and each costs
    this machine's kernel about 1.3 µs.

    ``overlap``: build each zoom's frame in a second thread while the level
    above is made (NumPy and the compiled loops release the GIL), for a
    process with a core to spare (:func:`core_to_spare`). Shards side by side,
    one per core, were 10% faster without: two threads each only added page
    faults and switches.
    """
    if not overlap:
        for z in range(top, bottom - 1, -1):
            cells = cells if z == top else cells.parent()
            yield _frame(cells, z, detail, profile), (cells if z == bottom else None)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        building = None
        for z in range(top, bottom - 1, -1):
            if z < top:
                cells = cells.parent()
            if building is not None:
                yield building.result(), None
            building = pool.submit(_frame, cells, z, detail, profile)
        if building is not None:
            yield building.result(), cells


def core_to_spare(side_by_side: int) -> bool:
    """True when ``side_by_side`` processes (a plan's shards, as many at once as there are cores)
    leave each a second core of this machine: :func:`roll_up`'s ``overlap``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores >= 2 * min(side_by_side, cores)


def with_intensity(frame: pl.DataFrame, profile: Profile, span: Span | None = None) -> pl.DataFrame:
    """A zoom's cells with ``intensity``, in the published column order.

    ``span`` is the whole zoom's (:class:`Span`); by default the frame's own.
    """
    span = span if span is not None else Span.of(frame.get_column("score"))
    return in_published_order(frame.with_columns(intensity(profile, span).alias("intensity")))


def in_published_order(frame: pl.DataFrame) -> pl.DataFrame:
    """A zoom's cells with their columns in the published order: :data:`CELL_COLUMNS` (those it has), then the rest."""
    first = [c for c in CELL_COLUMNS if c in frame.columns]
    return frame.select(*first, *(c for c in frame.columns if c not in CELL_COLUMNS))


def _frame(cells: Level, z: int, detail: int, profile: Profile) -> pl.DataFrame:
    level = z + detail
    metrics = [m for m in METRIC_COLUMNS if m in cells.sums]
    categories = list(cells.categories)
    n = cells.sums["report_count"]
    x, y = _kernels().cell_xy(cells.key)
    # the mean of member positions, held inside the cell against rounding
    # (and against the last-ulp differences between math libraries' sinh)
    lng = _kernels().mean_lng_on_grid(cells.sums["lng_sum"], n, x, 2.0**level, INSIDE, GRID)
    lat = _mean_lat(cells.sums["lat_sum"], n, x, y, level)
    boosted = {c: cells.sums[c] for c in ("severity_boost_sum", "decay_sum") if c in cells.sums}
    frame = pl.DataFrame(
        {
            "z": pl.Series(np.full(len(n), z, np.int32)),
            "quadkey": _quadkeys(cells.key, level),
            "tile_x": np.right_shift(x, detail, out=x),  # in place: each fresh array costs page faults
            "tile_y": np.right_shift(y, detail, out=y),
            "report_count": n,
            "weight": cells.sums["weight"],
            "lng": lng,
            "lat": lat,
            "max_weight": cells.max_weight,
            "top_category": _top_categories(cells.category_counts, categories, n),
            "first_seen": _times(cells.first_seen),
            "last_seen": _times(cells.last_seen),
            **{m: cells.sums[m] for m in metrics},
            **boosted,
            "cell_key": cells.key,
        }
    )
    if profile.score == "mean":  # score()'s division in NumPy: the same IEEE operation, in one pass
        frame = frame.with_columns(pl.Series("score", np.divide(cells.sums["weight"], n)))
    else:
        frame = frame.with_columns(score(profile).alias("score"))
    return frame.select(*(c for c in CELL_COLUMNS if c != "intensity"), *metrics, *boosted, "cell_key")


def _quadkeys(key: np.ndarray, level: int) -> pl.Series:
    """Quadkey strings of cell keys at ``level``, written as polars keeps strings (no conversion)."""
    stride = 4 * ((level + 3) // 4) or 1  # bytes a cell takes in the data (kernels.quadkey_views)
    per_buffer = (2**31 - 1) // stride  # a view's offset into its buffer is an int32
    parts = []
    for at in range(0, max(len(key), 1), per_buffer):
        views, data = _kernels().quadkey_views(key[at : at + per_buffer], level)
        parts.append(_strings(views, [pa.py_buffer(data)]))
    return parts[0] if len(parts) == 1 else pl.concat(parts)


def _strings(views: np.ndarray, data: list, valid: np.ndarray | None = None, nulls: int = 0) -> pl.Series:
    """A String column from the buffers of an Arrow string view array, which polars takes as they are.

    ``views``: 16 bytes a row; ``data``: the buffers its long strings lie in;
    ``valid``: the validity bitmap, when ``nulls``.
    """
    buffers = [pa.py_buffer(valid) if nulls else None, pa.py_buffer(views), *data]
    return pl.from_arrow(pa.Array.from_buffers(pa.string_view(), len(views), buffers, nulls))


def _mean_lat(total: np.ndarray, n: np.ndarray, x: np.ndarray, y: np.ndarray, level: int) -> np.ndarray:
    """Cells' mean latitudes on the grid inside them (:func:`on_grid`)."""
    shared = row_edges(y, level)
    if shared is not None:
        return _kernels().mean_lat_on_grid(total, n, y, *shared, INSIDE, GRID)
    _, south, _, north = cell_bounds(x, y, level)
    return _kernels().mean_on_grid(total, n, south + INSIDE, north - INSIDE, GRID)


def on_grid(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``v`` held within ``[lo, hi]``, at the nearest point of the :data:`GRID` there.

    Where no grid point lies within (a cell narrower than the grid, near a
    pole at the deepest levels), ``v`` keeps its bits.
    """
    # In grid units, the nearest point inside is round(v) held within
    # [ceil(lo), floor(hi)] (rounding is monotonic, so holding v first changes
    # nothing); scaling by a power of two is exact. Worked in place: a zoom's
    # cells are millions, and each fresh array costs the kernel's page faults.
    first, last = np.ceil(lo * GRID), np.floor(hi * GRID)
    out = np.multiply(v, GRID)
    np.round(out, out=out)
    np.maximum(out, first, out=out)
    np.minimum(out, last, out=out)
    out *= 1.0 / GRID
    narrow = first > last
    return np.where(narrow, np.clip(v, lo, hi), out) if narrow.any() else out


def _times(millis: np.ndarray) -> pl.Series:
    """Milliseconds since the epoch (whole seconds: see :meth:`Level.finest`) as times."""
    return pl.Series(millis).cast(pl.Datetime("ms", "UTC"))


def _lanes(cells: int, categories: int, dtype: np.dtype) -> np.ndarray:
    """Zero category counts: a row of lanes per cell, a lane per category and one for "none",
    padded to whole 64-bit words (8 lanes: whatever the lane type)."""
    return np.zeros((cells, -(-(categories + 1) // 8) * 8), dtype=dtype)


def _lane_type(report_count: np.ndarray, at_least: np.dtype = np.uint8) -> np.dtype:
    """The narrowest unsigned lane (not below ``at_least``) that holds these cells' counts."""
    most, floor = int(report_count.max(initial=0)), np.dtype(at_least).itemsize
    return next(
        t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if t().itemsize >= floor and most <= np.iinfo(t).max
    )


def _top_categories(counts: np.ndarray, categories: list[str], report_count: np.ndarray) -> pl.Series:
    """Per cell, the category with most reports, ties to the first name; null for none."""
    none = len(categories)
    lane = _kernels().top_lane(counts, none, report_count) if none else np.zeros(len(counts), np.intp)
    names = pa.array([*categories, None], pa.string_view())
    _, views, *data = names.buffers()
    table = np.frombuffer(views, np.uint64).reshape(-1, 2)[: len(names)]
    rows, valid, nulls = _kernels().view_rows(table, lane, none)
    return _strings(rows, data, valid, nulls)
