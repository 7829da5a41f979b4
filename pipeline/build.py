"""Build one tileset: score its reports, then its cell pyramid, in its private work folder.

Every function takes the build's frozen :class:`~pipeline.plan.Plan`; its
``work`` folder (see :mod:`pipeline.paths`) holds, per spatial shard,
``shards/<i>/scored.parquet`` (individual positions: never published) and
the shard's cells; then ``scoring.json``, and ``cells/zoom=<z>/cells.parquet``
with ``cells.json``, merged from the shards; publishing copies what is
public into ``output/``. This module reads the warehouse and hands frames
to the pure stages (:mod:`~pipeline.scoring`, :mod:`~pipeline.pyramid`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic, extract, geoparquet, pyramid, scoring, tilemath, warehouse
from .config import MAX_SHARDS
from .errors import PlanError
from .paths import Shard, Work
from .plan import Plan


class ZoomSummary(NamedTuple):
    """What one zoom of the pyramid holds."""

    z: int
    cells: int
    reports: int
    weight: float
    max_score: float
    bytes: int


def read_reports(db: Path, source: str, keys: tuple[int, int] | None = None) -> pl.LazyFrame:
    """The valid reports of one source (of one shard's ``[lo, hi)`` tile keys), from the warehouse (read-only)."""
    cols = ", ".join(f'"{c}"' for c in scoring.READ_COLUMNS)
    where, params = "source = ?", [source]
    if keys is not None:  # a range of the key column: DuckDB skips what is out of it
        where, params = where + " AND tile_key >= ? AND tile_key < ?", [*params, *keys]
    with warehouse.reader(db) as con:
        table = con.execute(f"SELECT {cols} FROM reports WHERE {where}", params).fetch_arrow_table()
    return pl.from_arrow(table).lazy()


def split(plan: Plan) -> Plan:
    """The plan with its shards: runs of whole tiles at the shard zoom, balanced by report count.

    ``shards: auto`` takes one shard per ``shard_reports`` reports.
    ``shard_zoom: auto`` is the coarsest zoom below the overviews' at which
    no tile holds more than half a shard's share of the reports (a city
    splits deeper than the world), else ``maxzoom``. A shard may be empty
    (fewer busy tiles than shards); the ranges cover every key, so no report
    falls between two. The published bytes depend on neither choice.
    """
    ts = plan.settings
    keys, counts = _tile_counts(plan, 2 * (tilemath.KEY_LEVEL - ts.maxzoom))
    total = int(counts.sum())
    n = ts.shards if ts.shards != "auto" else max(1, min(MAX_SHARDS, -(-total // ts.shard_reports)))
    if ts.shard_zoom != "auto":
        zoom = ts.shard_zoom
    else:
        zoom = ts.maxzoom
        for z in range(min(max(ts.overview_maxzoom + 1, ts.minzoom), ts.maxzoom), ts.maxzoom):
            if _busiest(keys, counts, ts.maxzoom - z) * 2 * n <= total:
                zoom = z
                break
    keys, counts = _coarser(keys, counts, ts.maxzoom - zoom)
    end = 1 << 2 * tilemath.KEY_LEVEL
    starts = [0, *balanced_cuts(keys, counts, n, 2 * (tilemath.KEY_LEVEL - zoom), end)]
    return replace(plan, shards=tuple(zip(starts, [*starts[1:], end])), shard_zoom=zoom)


def _tile_counts(plan: Plan, shift: int, key_range: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The source's busy tiles (report keys ``>> shift``, sorted) and their reports: of every key, or of
    the keys in ``key_range`` (``lo <= key < hi``)."""
    where, params = "source = ?", [plan.source]
    if key_range is not None:
        where, params = where + " AND tile_key >= ? AND tile_key < ?", [*params, *key_range]
    with warehouse.reader(plan.warehouse) as con:
        tiles = con.execute(
            f"SELECT tile_key >> {shift} AS tile, count(*) AS n FROM reports WHERE {where} GROUP BY tile ORDER BY tile",
            params,
        ).fetchnumpy()
    if np.ma.getmaskarray(tiles["tile"]).any():
        raise PlanError(
            f"the warehouse's reports of {plan.source} have no tile keys (written by an older version): "
            "run the extraction again (hotspots run)"
        )
    return np.asarray(tiles["tile"], dtype=np.uint64), np.asarray(tiles["n"], dtype=np.int64)


def balanced_cuts(tiles: np.ndarray, counts: np.ndarray, n: int, shift: int, end: int) -> list[int]:
    """Where ``n`` runs of whole tiles balanced by report count begin, but the first: ``n - 1`` tile keys.

    ``tiles``: sorted keys of the busy tiles, ``counts`` their reports;
    ``shift``: a tile's first report key is ``tile << shift``; a run that
    would begin past the last tile begins at ``end`` (it is empty).
    """
    # run j begins after the tile at which j/n of the reports are reached
    reached = np.searchsorted(np.cumsum(counts) * n, np.arange(1, n) * int(counts.sum()), side="left") + 1
    return [int(tiles[i]) << shift if i < len(tiles) else end for i in reached]


def _coarser(keys: np.ndarray, counts: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted tile keys and their report counts, ``levels`` zooms up."""
    if not len(keys):
        return keys, counts
    up = keys >> np.uint64(2 * levels)
    starts = np.flatnonzero(np.r_[True, up[1:] != up[:-1]])
    return up[starts], np.add.reduceat(counts, starts)


def _busiest(keys: np.ndarray, counts: np.ndarray, levels: int) -> int:
    return int(_coarser(keys, counts, levels)[1].max(initial=0))


class Scored(NamedTuple):
    """What scoring a tileset (or one of its shards) gave: see ``scoring.json``."""

    valid: int
    scored: int
    excluded: dict[str, int]
    weight: float


def start(plan: Plan) -> None:
    """A new build: its shards' work from any earlier build is gone (a merge never mixes two plans)."""
    shutil.rmtree(plan.work.shards_root, ignore_errors=True)
    kept = {plan.work.shard_tile_cache(i).name for i in range(len(plan.shards))}
    for stale in plan.work.tile_cache.glob("shard-*"):  # the tile caches of shards this plan does not have
        if stale.name not in kept:
            shutil.rmtree(stale, ignore_errors=True)


def run_shard(plan: Plan, i: int) -> Scored:
    """Everything one shard does alone: score its reports, build its cells down to the pivot zoom, and
    choose the features of its tiles at the zooms whose tiles it holds whole.

    A shard of a sharded plan does the first two a block of its tiles at a
    time (:func:`blocks`): each block's reports are read, scored and rolled
    up while the last block's memory is still the process's to reuse.
    """
    _shard_cells(plan, i, _scored_blocks(plan, i))  # the scored reports in hand, not read back
    _select_shard(plan, i)
    return _shard_scored(plan, i)


def blocks(plan: Plan, i: int) -> list[tuple[int, int]]:
    """Shard ``i``'s key range in blocks of whole tiles at the shard zoom, balanced by report count: as many
    as it has ``block_reports`` reports, at least one.

    Cells at the pivot zoom and below lie in one such tile, so a shard's
    blocks are built alone, as its shards are: each block's finer zooms are a
    run of the shard's, and their pivot cells are put together as the merge
    puts the shards' together. A plan's only shard builds every zoom whole:
    one block.
    """
    lo, hi = plan.shards[i]
    if len(plan.shards) == 1:
        return [(lo, hi)]
    shift = 2 * (tilemath.KEY_LEVEL - plan.shard_zoom)
    keys, counts = _tile_counts(plan, shift, (lo, hi))
    n = max(1, int(counts.sum()) // plan.settings.block_reports)  # blocks of at least block_reports (if it has them)
    starts = [lo, *(k for k in balanced_cuts(keys, counts, n, shift, hi) if lo < k < hi)]
    return [(a, b) for a, b in zip(starts, [*starts[1:], hi]) if a < b] or [(lo, hi)]


def _scored_blocks(plan: Plan, i: int) -> Iterator[pl.DataFrame]:
    """Shard ``i``'s reports scored a block at a time, written to its ``scored.parquet`` and, summed,
    ``scoring.json`` once the last is scored."""
    if not 0 <= i < len(plan.shards):
        raise PlanError(f"the plan of {plan.key} has {len(plan.shards)} shard(s), not a shard {i}")
    pyramid.warm_up()  # for the cells that follow, while the reports are read and scored
    shard = plan.work.shard(i)
    shard.root.mkdir(parents=True, exist_ok=True)
    shard.scoring.unlink(missing_ok=True)
    parts = []
    with atomic.replacing(shard.scored) as tmp:
        writer = None
        try:
            for keys in blocks(plan, i):
                reports = read_reports(plan.warehouse, plan.source, keys)
                result = scoring.score_reports(reports, plan.profile, plan.filters, plan.as_of)
                del reports
                table = geoparquet.plain_strings(result.scored.to_arrow())
                # work state, read back once if at all: written as fast as polars would (LZ4, no
                # dictionaries), with statistics for a block's key range only
                writer = writer or pq.ParquetWriter(
                    tmp, table.schema, compression="lz4", use_dictionary=False, write_statistics=["tile_key"]
                )
                writer.write_table(table)
                del table
                weight = float(result.scored.get_column("weight").sum())
                parts.append(Scored(result.valid, result.scored.height, result.excluded, weight))
                block = [result.scored]
                del result
                yield block.pop()  # not kept here while the caller builds its cells
        finally:
            if writer is not None:
                writer.close()
    scored = _sum_scored(parts)
    _atomic(shard.scoring, lambda p: p.write_text(json.dumps({**scored._asdict(), "plan": plan.digest()})))


def _select_shard(plan: Plan, i: int) -> None:
    from .publish import select_shard  # publishing reads this module's files: imported here, not at the top

    select_shard(plan, i)


def score_shard(plan: Plan, i: int) -> Scored:
    """Score one shard's reports into its ``scored.parquet`` (+ ``scoring.json``), a block at a time."""
    for _ in _scored_blocks(plan, i):
        pass
    return _shard_scored(plan, i)


def _shard_scored(plan: Plan, i: int) -> Scored:
    doc = json.loads(plan.work.shard(i).scoring.read_text())
    del doc["plan"]
    return Scored(**doc)


def score_tileset(plan: Plan) -> Scored:
    """Score every shard (one at a time: one shard's reports in memory), then sum into ``scoring.json``."""
    start(plan)
    for i in range(len(plan.shards)):
        score_shard(plan, i)
    return merge_scoring(plan)


def merge_scoring(plan: Plan) -> Scored:
    """The tileset's ``scoring.json``, summed from its shards' (each must be this plan's)."""
    started = time.perf_counter()
    if not plan.shards:
        raise PlanError(f"the plan of {plan.key} has no shards: make it with build.split")
    parts = []
    for i in range(len(plan.shards)):
        path = plan.work.shard(i).scoring
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"shard {i} of {plan.key} has not run (no {path})") from None
        if doc.pop("plan") != plan.digest():
            raise PlanError(f"shard {i} of {plan.key} was built for another plan: run it again")
        parts.append(Scored(**doc))
    total = _sum_scored(parts)
    summary = {
        "tileset": plan.tileset,
        "source": {"name": plan.source, **extract.source_counts(plan.warehouse, plan.source)},
        "as_of": plan.as_of.isoformat(),
        **total._asdict(),
        "shards": len(parts),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _atomic(plan.work.scoring, lambda p: p.write_text(json.dumps(summary, indent=2)))
    return total


def _sum_scored(parts: list[Scored]) -> Scored:
    excluded: dict[str, int] = {}
    for part in parts:
        for reason, n in part.excluded.items():
            excluded[reason] = excluded.get(reason, 0) + n
    order = {r: i for i, r in enumerate(scoring.EXCLUSIONS)}
    return Scored(
        sum(p.valid for p in parts),
        sum(p.scored for p in parts),
        dict(sorted(excluded.items(), key=lambda kv: order[kv[0]])),
        math.fsum(p.weight for p in parts),
    )


def read_scoring(work: Work) -> dict:
    return json.loads(work.scoring.read_text())


def scored_rows(plan: Plan) -> int:
    """Rows in the shards' ``scored.parquet`` files."""
    return sum(parquet_rows(plan.work.shard(i).scored) for i in range(len(plan.shards)))


def shard_cells(plan: Plan, i: int) -> None:
    """One shard's cells, from ``maxzoom`` down to the pivot zoom, from its ``scored.parquet`` (a block at a
    time); then its tiles' selection."""
    path = plan.work.shard(i).scored
    whole = len(plan.shards) == 1
    key = pl.col("tile_key")
    _shard_cells(
        plan,
        i,
        (
            pl.read_parquet(path) if whole else pl.scan_parquet(path).filter(key >= lo, key < hi).collect()
            for lo, hi in blocks(plan, i)
        ),
    )
    _select_shard(plan, i)


def _finest(plan: Plan, scored: pl.DataFrame) -> pyramid.Level | None:
    ts = plan.settings
    return pyramid.finest(scored, plan.profile, ts.maxzoom + ts.cell_detail) if scored.height else None


def pivot_zoom(plan: Plan) -> int:
    """The coarsest zoom whose cells each lie in one shard: its cells are no larger than a shard-zoom tile.

    Shards build every zoom down to it; the merge rolls up the zooms above it
    from the shards' cells at this zoom (few: tiles at the shard zoom).
    """
    return max(plan.settings.minzoom, plan.shard_zoom - plan.settings.cell_detail)


def _shard_cells(plan: Plan, i: int, scored_blocks: Iterator[pl.DataFrame]) -> None:
    """A shard's zooms from its scored reports, given a block (:func:`blocks`) at a time in key order, down to
    the pivot zoom, without intensity (it is per zoom): each zoom's cells a part per block, and the pivot
    zoom's level for the merge. The only shard of a plan holds every zoom whole (its one block): it builds
    them all, as GeoParquet with their intensity, for the merge to move into place.
    """
    pyramid.warm_up()
    ts, shard = plan.settings, plan.work.shard(i)
    for stale in (shard.root / "cells", shard.final, shard.root / "final-tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    shard.pivot.unlink(missing_ok=True)
    whole = len(plan.shards) == 1
    bottom = ts.minzoom if whole else pivot_zoom(plan)
    overlap = pyramid.core_to_spare(len(plan.shards))
    levels = []
    # memory freed by a block's roll-up is reused by the next block's (see pyramid.reusing_memory)
    with pyramid.reusing_memory(), ExitStack() as files:
        zooms: dict[int, IpcParts] = {}
        for scored in scored_blocks:
            finest = _finest(plan, scored)
            del scored
            if finest is None:
                continue
            rolled = pyramid.roll_up(finest, ts.maxzoom, bottom, ts.cell_detail, plan.profile, overlap)
            del finest  # the roll-up drops each level once the next is made (their memory is reused)
            if whole:
                _write_final(plan, shard, ((f, int(f.get_column("z")[0])) for f, _ in rolled))
                continue
            for frame, level in rolled:  # noqa: B007 (the last level, the pivot zoom's, is kept below)
                z = int(frame.get_column("z")[0])
                if z not in zooms:
                    zooms[z] = files.enter_context(IpcParts(shard.cells(z), plain=False, batch_rows=CELL_BATCH_ROWS))
                zooms[z].write(frame)
                del frame
            levels.append(level)
    if levels:
        _atomic(shard.pivot, pyramid.Level.concat(levels).save)


def _write_final(plan: Plan, shard: Shard, zooms: Iterator[tuple[pl.DataFrame, int]]) -> None:
    summaries = _write_zooms(zooms, shard.root / "final-tmp", plan)
    _atomic(shard.root / "final.json", lambda p: p.write_text(json.dumps([s._asdict() for s in summaries])))
    (shard.root / "final-tmp").rename(shard.final)


def build_cells(plan: Plan) -> list[ZoomSummary]:
    """Every shard's cells, then the merge: one GeoParquet per zoom (see :func:`merge_cells`)."""
    for i in range(len(plan.shards)):
        shard_cells(plan, i)
    return merge_cells(plan)


def merge_cells(plan: Plan) -> list[ZoomSummary]:
    """The shards' zooms one after another (in key order), the coarser zooms rolled up from their pivot cells.

    Each zoom gets its intensity here, over all of its cells (their span is
    read first), and is written as ``cells/zoom=<z>/cells.parquet`` a shard
    at a time: the same bytes whatever the sharding, and no whole zoom held.
    """
    ts, work, pivot = plan.settings, plan.work, pivot_zoom(plan)
    if len(plan.shards) > 1:
        pyramid.warm_up()  # while the shards' zooms are merged, before the roll-up above the pivot
    shards = []
    for i in range(len(plan.shards)):
        shard = work.shard(i)
        if shard.pivot.exists() or shard.final.exists():
            shards.append(shard)
        elif json.loads(shard.scoring.read_text())["scored"]:  # scored, but its cells were never finished
            raise PlanError(f"shard {i} of {plan.key} has no cells: run it again")
    shutil.rmtree(work.cells_root, ignore_errors=True)
    if len(plan.shards) == 1 and shards:  # the only shard built every zoom: move them into place
        summaries = [ZoomSummary(**z) for z in json.loads((shards[0].root / "final.json").read_text())]
        shards[0].final.rename(work.cells_root)
    elif shards:
        summaries = [_merge_zoom(plan, [s.cells(z) for s in shards], z) for z in range(ts.maxzoom, pivot - 1, -1)]
        top = pyramid.Level.concat([pyramid.Level.load(s.pivot) for s in shards])
        above = (
            (frame, z)
            for frame, _ in pyramid.roll_up(top, pivot, ts.minzoom, ts.cell_detail, plan.profile)
            if (z := int(frame.get_column("z")[0])) < pivot
        )
        summaries = sorted(summaries + _write_zooms(above, work.cells_root, plan))
        for shard in shards:  # merged: their cells are in the zooms now (as a single shard's, moved)
            shutil.rmtree(shard.root / "cells")
            shard.pivot.unlink()
    else:
        summaries = []
    _atomic(
        work.cells_summary,
        lambda p: p.write_text(json.dumps([s._asdict() for s in summaries], indent=2)),
    )
    return summaries


def _merge_zoom(plan: Plan, parts: list[Path], z: int) -> ZoomSummary:
    """One zoom's GeoParquet from the shards' parts, one part in memory at a time.

    A first pass reads each part's summary (its span of scores and extent),
    the second writes the parts with the whole zoom's intensity.
    """
    s, x, y = pl.col("score"), pl.col("lng"), pl.col("lat")
    cells = reports = 0
    weight, span, extent = 0.0, None, []
    for part in parts:
        frame = _read_ipc(part, ["score", "lng", "lat", "report_count", "weight"])
        row = frame.select(
            s.min().alias("lo"),
            s.max().alias("hi"),
            *(e.alias(n) for e, n in ((x.min(), "w"), (y.min(), "s"), (x.max(), "e"), (y.max(), "n"))),
        ).row(0)
        if frame.height:
            span = pyramid.Span(row[0], row[1]).join(span)
            extent = geoparquet.union(extent, [float(v) for v in row[2:]])
        cells += frame.height
        reports += int(frame.get_column("report_count").sum())
        weight += float(frame.get_column("weight").sum())
    path = plan.work.cells(z)
    with geoparquet.writing(path, extent) as out:
        for part in parts:
            out.write(pyramid.with_intensity(_read_ipc(part), plan.profile, span))
    return ZoomSummary(z, cells, reports, weight, float(span.hi) if span else 0.0, path.stat().st_size)


def _read_ipc(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """An Arrow IPC file read into memory (not mapped: a mapped file's pages would count as the process's)."""
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    return pl.from_arrow(table.select(columns) if columns else table)


def _write_zooms(zooms: Iterator[tuple[pl.DataFrame, int]], root: Path, plan: Plan) -> list[ZoomSummary]:
    """Whole zooms' cells, with their intensity, as ``<root>/zoom=<z>/cells.parquet``."""

    def write(frame: pl.DataFrame, z: int) -> ZoomSummary:
        frame = pyramid.with_intensity(frame, plan.profile)
        size = geoparquet.write(frame, root / f"zoom={z}" / "cells.parquet")
        return ZoomSummary(
            z,
            frame.height,
            int(frame.get_column("report_count").sum()),
            float(frame.get_column("weight").sum()),
            float(frame.get_column("score").max()),
            size,
        )

    summaries = []
    # two zooms' files are written while the next is read or rolled up (at most three zooms held)
    with ThreadPoolExecutor(max_workers=WRITERS) as writer:
        pending: deque = deque()
        for frame, z in zooms:
            if len(pending) == WRITERS:
                summaries.append(pending.popleft().result())
            pending.append(writer.submit(write, frame, z))
            del frame
        summaries.extend(p.result() for p in pending)
    return sorted(summaries)


WRITERS = 2  # zooms' GeoParquet files written at once (each is one thread's: Parquet writes a column at a time)


class PyramidCheck(NamedTuple):
    z: int
    reports: int
    expected_reports: int
    weight: float
    expected_weight: float
    centroids_inside: bool

    @property
    def holds(self) -> bool:
        close = math.isclose(self.weight, self.expected_weight, rel_tol=1e-9, abs_tol=1e-9)
        return self.reports == self.expected_reports and close and self.centroids_inside


def check_pyramid(plan: Plan) -> list[PyramidCheck]:
    """Per zoom, read back: Σ report_count = scored reports, Σ weight = their weight, centroids in cells.

    Two zooms at a time (reading and summing release the GIL).
    """
    summary = read_scoring(plan.work)

    def check(z: int) -> PyramidCheck:
        path = plan.work.cells(z)
        if not path.exists():
            return PyramidCheck(z, 0, summary["scored"], 0.0, summary["weight"], summary["scored"] == 0)
        reports, weight, inside = 0, 0.0, True
        for cells in parquet_parts(path, ["report_count", "weight", "lng", "lat", "cell_key"]):
            reports += int(cells.get_column("report_count").sum())
            weight += float(cells.get_column("weight").sum())
            inside = inside and centroids_inside(cells, z + plan.settings.cell_detail)
        return PyramidCheck(z, reports, summary["scored"], weight, summary["weight"], inside)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(check, plan.zooms))


def centroids_inside(cells: pl.DataFrame, level: int) -> bool:
    """Whether every centroid lies within its cell's bounds (edges included)."""
    west, south, east, north = tilemath.cell_bounds(*tilemath.cell_xy(cells.get_column("cell_key").to_numpy()), level)
    lng, lat = cells.get_column("lng").to_numpy(), cells.get_column("lat").to_numpy()
    return bool(np.all((west <= lng) & (lng <= east) & (south <= lat) & (lat <= north)))


def parquet_parts(path: Path, columns: list[str] | None = None, rows: int = 1 << 20) -> Iterator[pl.DataFrame]:
    """A Parquet file's rows in order, about ``rows`` at a time (never the whole file at once)."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
        yield pl.from_arrow(batch)


def parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


CELL_BATCH_ROWS = 1 << 17  # a shard's cells are read back (to choose its tiles' features) this many at a time


class IpcParts:
    """An Arrow IPC file written a part at a time, each part one record batch (read back by part).

    ``plain``: strings as plain ``string`` (else as polars exports them, string views); ``batch_rows``:
    a part is written as batches of at most this many rows (each read back alone).
    """

    def __init__(self, path: Path, plain: bool = True, batch_rows: int | None = None) -> None:
        self.path, self.plain, self.batch_rows = path, plain, batch_rows
        self._replacing = atomic.replacing(path)
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def __enter__(self) -> IpcParts:
        self._tmp = self._replacing.__enter__()
        return self

    def write(self, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        table = geoparquet.plain_strings(table) if self.plain else table
        if self._writer is None:
            # LZ4: a 100M build's features took 20 GB uncompressed, for one read back
            options = pa.ipc.IpcWriteOptions(compression="lz4")
            self._writer = pa.ipc.new_file(self._tmp, table.schema, options=options)
        if table.num_rows:
            for batch in table.combine_chunks().to_batches(max_chunksize=self.batch_rows):
                self._writer.write_batch(batch)

    def __exit__(self, *exc) -> bool:
        if self._writer is not None:
            self._writer.close()
        return bool(self._replacing.__exit__(*exc))


def read_parts(path: Path, columns: list[str] | None = None, first: int = 0) -> Iterator[pl.DataFrame]:
    """The parts an :class:`IpcParts` file was written in, one at a time (``columns``: only these; ``first``:
    from this part on)."""
    with pa.OSFile(str(path)) as source:  # read, not mapped: a mapped file's pages count as the process's
        reader = pa.ipc.open_file(source)
        for i in range(first, reader.num_record_batches):
            batch = reader.get_batch(i)
            yield pl.from_arrow(batch.select(columns) if columns is not None else batch)


def _atomic(path: Path, write) -> None:
    with atomic.replacing(path) as tmp:
        write(tmp)


def top_cells(plan: Plan, n: int) -> list[dict]:
    """The ``n`` highest-score cells at the tileset's max zoom (ties: quadkey)."""
    path = plan.work.cells(plan.settings.maxzoom)
    if not path.exists():
        return []
    order, descending = ["score", "quadkey"], [True, False]
    cells = pl.scan_parquet(path).select("quadkey", "report_count", "score", "top_category", "lng", "lat")
    # the n first in that order without sorting the rest (reverse: the smallest quadkeys)
    top = cells.top_k(n, by=order, reverse=[not d for d in descending])
    return top.sort(order, descending=descending).collect().to_dicts()


def read_cells(work: Work) -> list[dict]:
    """The per-zoom summary ``build_cells`` wrote."""
    return json.loads(work.cells_summary.read_text())
