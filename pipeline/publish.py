"""Selection, tiles and atomic snapshots: what map clients fetch.

Four steps, each callable on its own (each is a Dagster asset):

* :func:`select_tileset` chooses, per zoom, the features of every tile and of
  the overview, into ``<home>/work/<tileset>/selected/`` (private); the
  zooms whose tiles each lie in one shard were chosen by the shards
  (:func:`select_shard`) and are only put together here;
* :func:`encode_shard` (once per shard) encodes the MVT tiles of a shard's
  range at those zooms (:func:`encode_tiles`: every shard, one after another);
* :func:`stage_snapshot` writes the public files into a fresh
  ``output/<tileset>/snapshots/.tmp-<token>/``;
* :func:`finalize_snapshot` adds ``manifest.json``, names the snapshot by its
  ``as_of`` and content hash, renames it into place, replaces ``latest.json``
  atomically and prunes old snapshots (never the one ``latest.json`` names).

A reader of ``latest.json`` therefore always finds a complete snapshot, even
if the process dies at any instruction.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic, geojson, geoparquet, privacy, pyramid, site, strictjson, tilemath, vector
from .build import IpcParts, parquet_parts, parquet_rows, read_cells, read_parts, read_scoring
from .config import Tileset
from .digests import tile_digests
from .errors import PublishError
from .paths import SNAPSHOTS, Published, Shard, Work
from .plan import Plan
from .profiles import Profile
from .select import Overview, choose, features, finish, overview_budget
from .snapfolder import SnapshotFolder, link_or_copy

STALE_TMP_S = 3600  # a .tmp- folder untouched this long was left by a dead run
POINT_PAD = 1e-5  # degrees (about a metre) around data that is a single point


class ZoomSelection(NamedTuple):
    z: int
    cells: int
    tiles: int  # tiles with features
    selected_tile: int
    selected_overview: int
    stratum_zoom: int  # configured: z + strata_detail
    stratum_zoom_coarsest: int  # the coarsest any tile had to use
    overview_stratum_zoom: int | None
    tile_span: tuple[float, float] | None  # the tile features' scores: their intensity's scale
    parts: tuple[int, ...]  # cells per part (each part is a batch of tile_features.arrow)
    reused: int = 0  # tiles whose selection was the last build's (their cells unchanged)


SELECT_CELLS_IN_FLIGHT = 1_000_000  # cells selected at once (about 1.7 KB of memory each while selected)
# a zoom is selected (and later encoded) in parts of whole tiles of about this
# many cells: a process's peak follows it (two parts at once), not the zoom's size
SELECT_PART_CELLS = 250_000


def select_tileset(plan: Plan) -> list[ZoomSelection]:
    """Choose each zoom's tile and overview features (see :mod:`pipeline.select`).

    The zooms each shard holds whole tiles of (:func:`shard_zooms`) were
    chosen by the shards (:func:`select_shard`): here their parts are put
    together, with the zoom's intensity. The other zooms are chosen here, two
    at a time (polars and Parquet release the GIL), each read in parts of
    whole tiles: tiles choose their features on their own, and an overview
    zoom's one overview among all of its parts
    (:class:`pipeline.select.Overview`, which reads them three times).

    A tile finer than the overviews' whose cells are the cells it had in the
    last build takes its published rows and features from that build
    (:class:`_Previous`) instead of choosing them again.
    """
    work = plan.work
    by_shards = set(shard_zooms(plan))
    chosen = _shard_selections(plan) if by_shards else []
    previous = work.root / "selected-previous"  # the last build's: its unchanged tiles are taken
    shutil.rmtree(previous, ignore_errors=True)
    if work.selected_root.exists():
        os.rename(work.selected_root, previous)
    sizes = {c["z"]: c["cells"] for c in read_cells(work)}
    budget = vector.Budget(SELECT_CELLS_IN_FLIGHT)
    salt = _selection_salt(plan)

    def select(z: int) -> ZoomSelection | None:
        if z in by_shards:
            return _assemble_zoom(plan, z, chosen, salt)
        with budget.hold(min(sizes.get(z, 0), SELECT_PART_CELLS)):
            last = _Previous.open(previous / f"zoom={z}", salt) if z > plan.settings.overview_maxzoom else None
            return _select_zoom(plan, z, last, salt)

    # largest and smallest zooms alternate, so a large zoom waiting for room
    # leaves the other worker small ones to do
    by_size = sorted(plan.zooms, key=lambda z: -sizes.get(z, 0))
    order = [by_size[i // 2] if i % 2 == 0 else by_size[-1 - i // 2] for i in range(len(by_size))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        summary = sorted((s for s in pool.map(select, order) if s is not None), key=lambda s: s.z)
    _write_json(work.selected_summary, [s._asdict() for s in summary])
    shutil.rmtree(previous, ignore_errors=True)
    for shard, _ in chosen:  # put together: the shards' parts are in the zooms now
        shard.selected.unlink()
        shutil.rmtree(shard.selections, ignore_errors=True)
    return summary


def cell_parts(path: Path, detail: int, limit: int | None, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
    """A zoom's cells (``cells.parquet``, in key order) in parts of whole tiles of about ``limit`` cells.

    ``None``: the whole zoom as one part. A tile larger than ``limit`` is one part.
    """
    rows = min(limit or 1 << 20, 1 << 20)
    return tile_parts(parquet_parts(path, columns, rows=rows), detail, limit)


def tile_parts(frames: Iterator[pl.DataFrame], detail: int, limit: int | None) -> Iterator[pl.DataFrame]:
    """Cells in key order (``cell_key``) from ``frames`` of any size, as parts of whole tiles (:func:`cell_parts`)."""
    shift = np.uint64(2 * detail)  # a cell key less its detail's digits: its tile's key
    held: list[pl.DataFrame] = []
    count = 0
    for batch in frames:
        held.append(batch)
        count += batch.height
        if limit is None or count < limit:
            continue
        frame = pl.concat(held)
        tiles = frame.get_column("cell_key").to_numpy() >> shift
        cut = int(np.searchsorted(tiles, tiles[-1]))  # where the last (maybe unfinished) tile starts
        held, count = [frame.slice(cut)], frame.height - cut
        if cut:
            yield frame.slice(0, cut)
    if count:
        yield pl.concat(held)


class _Tally:
    """What the parts of a zoom's tile selection add up to, as they come (see :func:`_select_part`)."""

    def __init__(self, coarsest: int) -> None:
        self.tiles = self.selected = self.reused = 0
        self.parts: list[int] = []  # cells per part
        self.coarsest = coarsest  # the coarsest stratum zoom any tile had to use
        self.span: pyramid.Span | None = None  # the tile features' scores
        self.extent: list[float] = []  # the published positions'
        self.known: list[pa.Table] = []  # each part's tiles (:func:`_tile_record`): the next build's record
        self.chosen: list[np.ndarray] = []  # the keys of the tiles chosen again (not taken from the last build)


def _select_part(
    plan: Plan, z: int, cells: pl.DataFrame, last: _Previous | None, overview: Overview | None, tally: _Tally
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One part's published rows (without intensity) and tile features: chosen, or taken from the last build.

    ``cells``: whole tiles of zoom ``z`` in key order, with or without their
    intensity (a selection does not depend on it, so neither do the digests
    that tell an unchanged tile: the zoom's span may move while a tile stays).
    """
    ts, profile = plan.settings, plan.profile
    common = dict(z=z, detail=ts.cell_detail, strata_detail=ts.strata_detail, representative=profile.representative)
    hide = dict(z=z, detail=ts.cell_detail, strata_detail=ts.strata_detail, min_count=profile.min_count)
    cells = privacy.coarsen(pyramid.in_published_order(cells.drop("intensity", strict=False)), **hide)
    fresh, reused = cells, np.zeros(0, bool)
    if not overview:  # a tile's selection depends on its cells alone: unchanged ones are reused
        keys = cells.get_column("cell_key").to_numpy() >> np.uint64(2 * ts.cell_detail)  # each cell's tile
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        digests = tile_digests(cells, cells.columns, starts)
        reused = last.hits(keys[starts], digests) if last else np.zeros(len(starts), bool)
        if reused.any():
            fresh = cells.filter(pl.Series(np.repeat(~reused, np.diff(np.r_[starts, cells.height]))))
    annotated = tile_features = None
    if fresh.height:
        tile_choice = choose(fresh, budget=ts.max_features_per_tile, group_zoom=z, **common)
        tile_features = features(fresh, tile_choice, profile)
        over_choice = None
        if overview:
            over_choice = overview.choice(fresh)
            overview.add(fresh, over_choice)
        annotated = _annotated(fresh, tile_choice, over_choice)
    if reused.any():
        old_cells, old_features = last.take(int(keys[-1]) + 1, keys[starts][reused])
        annotated, tile_features = _merge(old_cells, annotated), _merge(old_features, tile_features)
    if not overview:
        tally.known.append(_tile_record(keys[starts], digests, np.diff(np.r_[starts, cells.height]), tile_features))
        tally.chosen.append(keys[starts][~reused] if len(reused) else keys[starts])
    found = pyramid.Span.of(tile_features.get_column("score"))
    tally.span = found.join(tally.span) if found else tally.span
    tally.extent = geoparquet.union(tally.extent, geoparquet.extent(annotated))
    tally.parts.append(cells.height)
    tally.tiles += tile_features.select(pl.struct("tile_x", "tile_y").n_unique()).item()
    tally.selected += tile_features.height
    tally.coarsest = min(tally.coarsest, int(annotated.get_column("tile_stratum_zoom").min()))
    tally.reused += int(reused.sum())
    return annotated, tile_features


def _published(annotated: pl.DataFrame, profile: Profile, span: pyramid.Span | None) -> pl.DataFrame:
    """A part's published rows with their intensity over the zoom's ``span`` of cell scores, after ``score``."""
    columns = annotated.columns
    at = columns.index("score") + 1
    return annotated.with_columns(pyramid.intensity(profile, span).alias("intensity")).select(
        *columns[:at], "intensity", *columns[at:]
    )


def _select_zoom(plan: Plan, z: int, last: _Previous | None, salt: str) -> ZoomSelection | None:
    """One zoom's selection from its merged cells; ``last``: the last build's, whose unchanged tiles are taken."""
    ts, profile, path = plan.settings, plan.profile, plan.work.cells(z)
    if not path.exists() or parquet_rows(path) == 0:
        return None
    common = dict(z=z, detail=ts.cell_detail, strata_detail=ts.strata_detail, representative=profile.representative)
    hide = dict(z=z, detail=ts.cell_detail, strata_detail=ts.strata_detail, min_count=profile.min_count)
    overview = Overview(**common, budget=overview_budget(z)) if z <= ts.overview_maxzoom else None
    # the published positions' extent first (the GeoParquet schema holds it), the cells' span, the overview's strata
    extent: list[float] = []
    cell_span: pyramid.Span | None = None
    for part in cell_parts(
        path, ts.cell_detail, SELECT_PART_CELLS, ["cell_key", "quadkey", "report_count", "score", "lng", "lat"]
    ):
        extent = geoparquet.union(extent, geoparquet.extent(privacy.coarsen(part, **hide)))
        found = pyramid.Span.of(part.get_column("score"))
        cell_span = found.join(cell_span) if found else cell_span
        if overview:
            overview.count(part)
    if overview:
        wanted = ["cell_key", "quadkey", "score", "report_count", "lng", "lat", "departures"]
        columns = [c for c in wanted if c in pq.read_schema(path).names]
        for part in cell_parts(path, ts.cell_detail, SELECT_PART_CELLS, columns):
            overview.consider(privacy.coarsen(part, **hide))
        overview.decide()
    out = plan.work.selected(z)
    out.mkdir(parents=True, exist_ok=True)
    tally = _Tally(z + ts.strata_detail)
    with (
        geoparquet.writing(out / "cells.parquet", extent) as published,
        IpcParts(out / "tile_features.arrow") as feats,
    ):
        plain = [c for c in pq.read_schema(path).names if c not in ("geometry", "intensity")]
        for cells in cell_parts(path, ts.cell_detail, SELECT_PART_CELLS, plain):
            annotated, tile_features = _select_part(plan, z, cells, last, overview, tally)
            published.write(_published(annotated, profile, cell_span))  # published as is, with intensity
            feats.write(tile_features)  # private, read once: LZ4 Arrow, a batch per part
    if not overview:  # the next build's record of this one's tiles
        _write_tiles(out / "tiles.arrow", tally.known, salt)
    over_features = None
    if overview:
        chosen = overview.features(profile)
        over_features = finish(chosen, profile, pyramid.Span.of(chosen.get_column("score")))
        _write_ipc(over_features, out / "overview_features.arrow")
    return _zoom_selection(plan, z, tally, over_features.height if over_features is not None else 0, overview)


def _zoom_selection(plan: Plan, z: int, tally: _Tally, overview_features: int, overview: Overview | None):
    return ZoomSelection(
        z,
        sum(tally.parts),
        tally.tiles,
        tally.selected,
        overview_features,
        z + plan.settings.strata_detail,
        tally.coarsest,
        overview.stratum_zoom if overview else None,
        tuple(tally.span) if tally.span else None,
        tuple(tally.parts),
        tally.reused,
    )


# --- selection in the shards --------------------------------------------------


def shard_zooms(plan: Plan) -> list[int]:
    """The zooms each shard chooses the tiles of itself (:func:`select_shard`).

    Those finer than the overviews (an overview chooses among a whole zoom)
    whose tiles each lie in one shard: from the shard zoom down, or every
    such zoom when a plan has one shard.
    """
    ts = plan.settings
    top = ts.overview_maxzoom + 1 if len(plan.shards) == 1 else max(plan.shard_zoom, ts.overview_maxzoom + 1)
    return [z for z in plan.zooms if z >= top]


def select_shard(plan: Plan, i: int) -> list[dict]:
    """Choose the features of shard ``i``'s tiles at :func:`shard_zooms`, from its own cells.

    Run by the shard (after :func:`pipeline.build.run_shard` built its cells,
    before the merge takes them), two zooms at a time. Per zoom it writes, in
    ``<shard>/selected/zoom=<z>/``, its published rows without intensity
    (``cells.arrow``: intensity needs the whole zoom's span), its tile
    features and its tiles' digests, and in ``<shard>/selected.json`` what
    :func:`select_tileset` needs to put the zoom together: the cells' and
    features' spans, the extent, the parts. Tiles whose cells are unchanged
    since the last build take that build's rows (its ``selected/``, still in
    place until the selection step).
    """
    shard = plan.work.shard(i)
    shutil.rmtree(shard.selections, ignore_errors=True)
    shard.selected.unlink(missing_ok=True)
    salt = _selection_salt(plan)
    detail = plan.settings.cell_detail

    def one(z: int) -> dict | None:
        if len(plan.shards) == 1:
            path = shard.final / f"zoom={z}" / "cells.parquet"
            if not path.exists():
                return None
            columns = [c for c in pq.read_schema(path).names if c not in ("geometry", "intensity")]
            frames = parquet_parts(path, columns, rows=min(SELECT_PART_CELLS, 1 << 20))
        else:
            if not shard.cells(z).exists():
                return None
            frames = read_parts(shard.cells(z))
        out = shard.selection(z)
        out.mkdir(parents=True)
        start, end = shard_range(plan, i, z)
        last = _Previous.open(plan.work.selected(z), salt, start)
        tally = _Tally(z + plan.settings.strata_detail)
        cell_span: pyramid.Span | None = None
        with (
            IpcParts(out / "cells.arrow") as rows,
            IpcParts(out / "tile_features.arrow") as feats,
            IpcParts(shard.strays(z)) as strays,
        ):
            offset = 0  # the part's first feature among the shard's at z
            for cells in tile_parts(frames, detail, SELECT_PART_CELLS):
                found = pyramid.Span.of(cells.get_column("score"))
                cell_span = found.join(cell_span) if found else cell_span
                annotated, tile_features = _select_part(plan, z, cells, last, None, tally)
                rows.write(annotated)
                feats.write(tile_features)
                # rows its neighbours in other shards draw (before intensity: finished by those shards)
                strays.write(vector.strays(tile_features, z, offset, start, end))
                offset += tile_features.height
        _write_tiles(out / "tiles.arrow", tally.known, salt)
        if last is not None:  # what the encoder must lay out again (see encode_shard)
            _write_changed(out / "changed.arrow", _changed_tiles(last, tally, start, end), last.id)
        return {
            "z": z,
            "selection": _zoom_selection(plan, z, tally, 0, None)._asdict(),
            "cell_span": list(cell_span) if cell_span else None,
            "extent": tally.extent,
            "previous": last.id if last is not None else None,
        }

    with ThreadPoolExecutor(max_workers=2) as pool:
        zooms = [s for s in pool.map(one, shard_zooms(plan)) if s is not None]
    _write_json(shard.selected, {"plan": plan.digest(), "zooms": zooms})
    return zooms


def _changed_tiles(last: _Previous, tally: _Tally, lo: int, hi: int) -> np.ndarray:
    """The keys (sorted) of the tiles in ``[lo, hi)`` whose cells differ from the last build's ``last``:
    chosen again (new or changed), or gone."""
    now = np.concatenate([t.column("tile").to_numpy() for t in tally.known]) if tally.known else last.keys[:0]
    old = last.keys[np.searchsorted(last.keys, np.uint64(lo)) : np.searchsorted(last.keys, np.uint64(hi))]
    gone = old[~among(old, now)]  # both in key order: no sort of every tile
    return np.unique(np.concatenate([*tally.chosen, gone]).astype(np.uint64))


def among(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``keys`` (sorted, unique), found by bisection."""
    return _bisect(values, keys)[1]


def _bisect(values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``values`` is in ``keys`` (sorted, unique; a valid index if it is not there, none if
    ``keys`` is empty) and whether it is there."""
    if not len(keys):
        return np.zeros(len(values), np.intp), np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return at, keys[at] == values


def _write_changed(path: Path, tiles: np.ndarray, previous: str | None) -> None:
    """``changed.arrow``: the keys of a zoom's tiles whose cells changed since the selection ``previous``."""
    _write_arrow(path, pa.table({"tile": pa.array(tiles, pa.uint64())}), {"previous": previous or ""})


def changed_tiles(folder: Path) -> tuple[str, np.ndarray] | None:
    """A zoom's selection (``folder``): which last build it was compared with (the id of that one's
    ``tiles.arrow``) and the keys of its tiles whose cells changed since; None when not known."""
    try:
        with pa.OSFile(str(folder / "changed.arrow")) as source:
            reader = pa.ipc.open_file(source)
            previous = (reader.schema.metadata or {}).get(b"previous", b"").decode()
            tiles = reader.read_all().column("tile").to_numpy()
    except (OSError, pa.ArrowException):
        return None
    return (previous, tiles) if previous else None


def selection_id(folder: Path) -> str | None:
    """The id of a zoom's selection (``folder``; its ``tiles.arrow``), new with every selection."""
    try:
        return (_schema(folder / "tiles.arrow").metadata or {}).get(b"id", b"").decode() or None
    except (OSError, pa.ArrowException):
        return None


def shard_range(plan: Plan, i: int, z: int) -> tuple[int, int]:
    """The tile keys ``[lo, hi)`` at zoom ``z`` (at or below the shard zoom) of shard ``i``."""
    shift = 2 * (tilemath.KEY_LEVEL - z)
    lo, hi = plan.shards[i]
    return lo >> shift, hi >> shift


def read_shard_selection(plan: Plan, i: int) -> list[ZoomSelection]:
    """What shard ``i`` chose, per zoom (:func:`select_shard`)."""
    doc = json.loads(plan.work.shard(i).selected.read_text())
    return [ZoomSelection(**s["selection"]) for s in doc["zooms"]]


def _shard_selections(plan: Plan) -> list[tuple[Shard, dict[int, dict]]]:
    """Each shard and its zooms' selection summaries (:func:`select_shard`), checked against the plan."""
    out = []
    for i in range(len(plan.shards)):
        doc = _shard_doc(plan, i, plan.work.shard(i).selected, ("chosen", "chose"))
        out.append((plan.work.shard(i), {s["z"]: s for s in doc["zooms"]}))
    return out


def _shard_doc(plan: Plan, i: int, path: Path, did: tuple[str, str]) -> dict:
    """A summary shard ``i`` wrote for this plan (``did``: how to say it chose or encoded its tiles)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(
            f"shard {i} of {plan.key} has not {did[0]} its tiles (no {path}): run the build again"
        ) from None
    if doc["plan"] != plan.digest():
        raise PublishError(f"shard {i} of {plan.key} {did[1]} its tiles for another plan: run the build again")
    return doc


def _assemble_zoom(plan: Plan, z: int, chosen: list[tuple[Shard, dict[int, dict]]], salt: str) -> ZoomSelection | None:
    """A zoom the shards chose, put together in key order (shard after shard), with the whole zoom's intensity."""
    held = [(shard.selection(z), doc[z], i) for i, (shard, doc) in enumerate(chosen) if z in doc]
    if not held:
        return None
    cell_span = span = None
    extent: list[float] = []
    for _, doc, _ in held:
        if doc["cell_span"]:
            cell_span = pyramid.Span(*doc["cell_span"]).join(cell_span)
        extent = geoparquet.union(extent, doc["extent"])
        if doc["selection"]["tile_span"]:
            span = pyramid.Span(*doc["selection"]["tile_span"]).join(span)
    out = plan.work.selected(z)
    out.mkdir(parents=True, exist_ok=True)
    (out / "changed.arrow").unlink(missing_ok=True)
    layout: list[dict] = []  # where each shard's tile features lie in the zoom's (see encode_shard)
    # one shard's tile features are the zoom's as they are: linked, not copied
    features_out = out / "tile_features.arrow"
    with (
        geoparquet.writing(out / "cells.parquet", extent) as published,
        IpcParts(features_out) if len(held) > 1 else nullcontext() as feats,
    ):
        batches = features = 0
        for folder, _, i in held:
            for rows in read_parts(folder / "cells.arrow"):
                published.write(_published(rows, plan.profile, cell_span))
            mine = {"shard": i, "first_batch": batches, "batches": 0, "offset": features}
            if feats is None:
                mine["batches"] = _linked_parts(folder / "tile_features.arrow", features_out)
            else:
                for tile_features in read_parts(folder / "tile_features.arrow"):
                    feats.write(tile_features)
                    mine["batches"] += 1
                    features += tile_features.height
            batches += mine["batches"]
            layout.append(mine)
    _write_tiles(out / "tiles.arrow", [_read_table(folder / "tiles.arrow") for folder, _, _ in held], salt)
    previous = {doc.get("previous") for _, doc, _ in held}
    if len(held) == len(plan.shards) and len(previous) == 1 and None not in previous:  # every shard compared
        changed = [_read_table(folder / "changed.arrow").column("tile").to_numpy() for folder, _, _ in held]
        _write_changed(out / "changed.arrow", np.concatenate(changed), previous.pop())
    _write_json(out / "shards.json", layout)
    s = [ZoomSelection(**doc["selection"]) for _, doc, _ in held]
    return ZoomSelection(
        z,
        sum(x.cells for x in s),
        sum(x.tiles for x in s),
        sum(x.selected_tile for x in s),
        0,
        z + plan.settings.strata_detail,
        min(x.stratum_zoom_coarsest for x in s),
        None,
        tuple(span) if span else None,
        tuple(n for x in s for n in x.parts),
        sum(x.reused for x in s),
    )


def _linked_parts(source: Path, target: Path) -> int:
    """Link an :class:`IpcParts` file at ``target`` (a copy where links are impossible); its parts' count."""
    target.unlink(missing_ok=True)
    link_or_copy(source, target)
    with pa.OSFile(str(target)) as f:
        return pa.ipc.open_file(f).num_record_batches


# --- encoding in the shards ---------------------------------------------------


def encode_shard(plan: Plan, i: int) -> dict:
    """Encode shard ``i``'s MVT tiles at :func:`shard_zooms`, once the selection has put its zooms together.

    The build's second wave of shards: a tile's bytes need its zoom's
    intensity scale (all shards' features), known only after the selection.
    Per zoom, the shard encodes every tile in its range: its own features
    (read from the zoom's tile features, where :func:`_assemble_zoom` put
    them, shard after shard), with the rows of other shards' features whose
    buffer reaches into its tiles (their ``strays``, written as they chose
    them). Each feature keeps its position among the zoom's, so a tile's
    bytes are those one process makes. Tiles whose rows are unchanged come
    from the shard's tile cache. Its tiles are its new tile cache's (where
    the publication reads them: :meth:`vector.TileCache.zoom_file`); writes
    ``<shard>/encoded.json`` and returns the summary.
    """
    shard = plan.work.shard(i)
    shard.encoding.unlink(missing_ok=True)
    shutil.rmtree(shard.root / "encoded", ignore_errors=True)  # where older versions kept a copy of its tiles
    selection = {s["z"]: s for s in read_selection(plan.work)}
    cache = vector.TileCache(plan.work.shard_tile_cache(i))
    zooms = []
    try:
        with vector.Encoder(cache=cache) as encoder:
            for z in shard_zooms(plan):
                lo, hi = shard_range(plan, i, z)
                if z not in selection or lo == hi:  # no cells at z, or a shard without tiles
                    continue
                tiles, extent = 0, []
                dirty = _dirty(plan, i, z, selection[z], cache)
                before = None
                for part, tile_features in _shard_parts(plan, i, selection[z]):
                    encoding = encoder.submit(tile_features, z, part._replace(dirty=dirty))
                    extent = geoparquet.union(extent, geoparquet.extent(tile_features))
                    del tile_features
                    if before is not None:
                        tiles += len(before.result().data)  # kept in the cache, read from there
                    before = encoding
                if before is not None:
                    tiles += len(before.result().data)
                zooms.append({"z": z, "tiles": tiles, "extent": extent})  # its features' extent
    except BaseException:
        cache.discard()
        raise
    cache.commit()
    summary = {
        "plan": plan.digest(),
        "zooms": zooms,
        "encoded": cache.encoded,
        "reused": cache.reused,
        "compared": cache.compared,
    }
    _write_json(shard.encoding, summary)
    return summary


def _dirty(plan: Plan, i: int, z: int, s: dict, cache: vector.TileCache) -> vector.Dirty | None:
    """The tiles of zoom ``z`` in shard ``i`` whose rows may have changed since the tiles in ``cache``
    were made, or None when that is not known (then every tile's rows are laid out and compared).

    Known when this selection was compared with the one the cached tiles
    were made from, at the same intensity scale (the zoom's highest
    tile-feature score, or both ends of their span: a new one changes every
    tile). Records this build's for the next.
    """
    scale = pyramid.intensity_scale(plan.profile, pyramid.Span(*s["tile_span"]) if s["tile_span"] else None)
    cache.made_from(z, selection_id(plan.work.selected(z)), scale)
    changed = changed_tiles(plan.work.selected(z))
    if changed is None or not cache.follows(z, changed[0], scale):
        return None
    return vector.Dirty.around(changed[1], z, *shard_range(plan, i, z))


def encode_tiles(plan: Plan) -> list[dict]:
    """Every shard's tiles (:func:`encode_shard`), one after another in this process."""
    return [encode_shard(plan, i) for i in range(len(plan.shards))]


def _shard_parts(plan: Plan, i: int, s: dict) -> Iterator[tuple[vector.Part, pl.DataFrame]]:
    """Shard ``i``'s parts of a zoom (see :func:`encode_shard`), each a :class:`vector.Part` with its strays."""
    z = s["z"]
    span = pyramid.Span(*s["tile_span"]) if s["tile_span"] else None
    lo, hi = shard_range(plan, i, z)
    layout = json.loads((plan.work.selected(z) / "shards.json").read_text())
    mine = next((e for e in layout if e["shard"] == i), {"first_batch": 0, "batches": 0, "offset": 0})
    # the other shards' rows drawn in this one's tiles, at their features' positions in the zoom
    theirs = [
        finish(f, plan.profile, span)
        .with_columns(pl.col("_order") + e["offset"])
        .filter(pl.col("_target").is_between(lo, hi, closed="left"))
        for e in layout
        if e["shard"] != i
        for f in read_parts(plan.work.shard(e["shard"]).strays(z))
    ]
    yield from _parts_in(plan, s, (mine["first_batch"], mine["batches"], mine["offset"]), (lo, hi), theirs)


def _parts_in(
    plan: Plan, s: dict, batches: tuple[int, int, int], keys: tuple[int, int], strays: list[pl.DataFrame]
) -> Iterator[tuple[vector.Part, pl.DataFrame]]:
    """The parts of a zoom's tile features that encode the tiles of ``keys`` (``[lo, hi)``), with intensity.

    ``batches``: their first batch of the zoom's features, how many, and the
    position of their first feature among the zoom's. Each part's
    :class:`vector.Part` has the rows other parts draw in its tiles, found in
    a first pass, and those of ``strays`` (rows from elsewhere, in ``keys``).
    A range without features of its own still encodes the tiles ``strays`` reach.
    """
    z, shift = s["z"], 2 * plan.settings.cell_detail
    span = pyramid.Span(*s["tile_span"]) if s["tile_span"] else None
    path = plan.work.selected(z) / "tile_features.arrow"
    (first, count, at), (lo, hi) = batches, keys

    def own(columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
        for _, tile_features in zip(range(count), read_parts(path, columns, first=first)):
            yield tile_features if columns else finish(tile_features, plan.profile, span)

    firsts, offsets = [], []
    for cells in own(["cell_key"]):  # a first pass: where its parts begin
        firsts.append(int(cells.get_column("cell_key")[0]) >> shift)
        offsets.append(at)
        at += cells.height
    bounds = [lo, *firsts[1:], hi]
    if len(firsts) > 1:  # the rows its parts draw in each other's tiles
        for k, tile_features in enumerate(own()):
            found = vector.strays(tile_features, z, offsets[k], bounds[k], bounds[k + 1])
            strays.append(found.filter(pl.col("_target").is_between(lo, hi, closed="left")))
    strays = [f for f in strays if f.height]
    held = pl.concat([f.select(strays[0].columns) for f in strays]) if strays else None
    if firsts:
        frames = own()
    else:  # no features of its own: the tiles other features' buffers reach
        frames, offsets = iter([finish(pl.from_arrow(_schema(path).empty_table()), plan.profile, span)]), [at]
    for k, tile_features in enumerate(frames):
        a, b = bounds[k], bounds[k + 1]
        reach = held.filter(pl.col("_target").is_between(a, b, closed="left")) if held is not None else None
        yield vector.Part(offsets[k], a, b, reach), tile_features


def _schema(path: Path) -> pa.Schema:
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_file(source).schema


SELECTION_CACHE_VERSION = 4  # a change to what selection makes of the same cells: add one
PREVIOUS_BATCH_ROWS = 1 << 17  # the last build's published cells, read this many at a time


SHARDING = ("shards", "shard_reports", "shard_zoom", "block_reports")  # settings the published bytes never depend on


def _selection_salt(plan: Plan) -> str:
    """What besides a tile's cells decides its selection: the settings (but how the build is sharded),
    profile, filters, polars."""
    public = plan.public()
    config = {k: v for k, v in public["config"].items() if k not in SHARDING}
    doc = [SELECTION_CACHE_VERSION, config, public["profile"], public["filters"], pl.__version__]
    return hashlib.sha256(strictjson.dumps(doc, sort_keys=True).encode()).hexdigest()


def _tile_key() -> pl.Expr:
    """The Morton key of a row's tile (``tile_x``, ``tile_y``), as ``_tile``."""
    return tilemath.morton_of("tile_x", "tile_y").alias("_tile")


def _read_table(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


TILE_RECORD = pa.schema(
    [
        ("tile", pa.uint64()),
        ("digest", pa.uint64()),
        ("rows", pa.int64()),
        ("features", pa.int64()),
        ("first", pa.bool_()),
    ]
)


def _tile_record(tiles: np.ndarray, digests: np.ndarray, rows: np.ndarray, tile_features: pl.DataFrame) -> pa.Table:
    """A part's tiles as the next build finds them (``tiles.arrow``, :data:`TILE_RECORD`): key, digest, its
    published rows and features (each file holds them tile after tile), and whether it begins its part (a
    batch of the features file), so that a shard reads the last build from where its range begins."""
    found = tile_features.select(_tile_key()).to_series().to_numpy()  # in key order, as the rows
    counts = np.searchsorted(found, tiles, side="right") - np.searchsorted(found, tiles, side="left")
    return pa.table([tiles, digests, rows, counts, np.arange(len(tiles)) == 0], schema=TILE_RECORD)


def _write_tiles(path: Path, known: list[pa.Table], salt: str) -> None:
    """The record of a zoom's tiles (:func:`_tile_record`), with the salt it holds for and an id of its own."""
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in known]) if known else TILE_RECORD.empty_table()
    _write_arrow(path, table, {"salt": salt, "id": secrets.token_hex(8)})


def _write_arrow(path: Path, table: pa.Table, meta: dict[str, str]) -> None:
    """``table`` as an Arrow IPC file, its schema carrying ``meta``; complete or not there."""
    with atomic.replacing(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as writer:
            writer.write_table(table)


def _merge(old: pl.DataFrame, new: pl.DataFrame | None) -> pl.DataFrame:
    """Rows of reused tiles (with ``_tile``) and of tiles chosen again, tile after tile in key order."""
    if new is None:
        return old.drop("_tile")
    keys = np.concatenate([old.get_column("_tile").to_numpy(), new.select(_tile_key()).to_series().to_numpy()])
    # a stable sort keeps each frame's rows in their order; both in key order (two runs), it is one linear
    # merge, and gathering every column by it takes about half of polars' merge_sorted's time
    order = np.argsort(keys, kind="stable")
    return pl.concat([old.select(new.columns), new], rechunk=True)[order]  # a gather from one chunk: faster


class _Previous:
    """One zoom of the last build's selection: its tiles' digests, and its rows, read in key order
    as this build's parts come (parts are whole tiles in key order, so one pass reads each file once).
    """

    def __init__(self, folder: Path, tiles: pa.Table, start: int) -> None:
        self.id = (tiles.schema.metadata or {}).get(b"id", b"").decode() or None  # see selection_id
        self.keys = tiles.column("tile").to_numpy()
        self._digests = tiles.column("digest").to_numpy()
        # the rows before the first tile at or after `start` are not read: whole row groups and batches
        # are skipped, the rest of the one it begins in passed over
        at = int(np.searchsorted(self.keys, np.uint64(start)))
        rows, features = tiles.column("rows").to_numpy(), tiles.column("features").to_numpy()
        cells = pq.ParquetFile(folder / "cells.parquet")
        columns = [c for c in cells.schema_arrow.names if c not in ("geometry", "intensity")]
        groups = np.cumsum([0] + [cells.metadata.row_group(g).num_rows for g in range(cells.num_row_groups)])
        row_at = int(rows[:at].sum())
        group = max(int(np.searchsorted(groups, row_at, side="right")) - 1, 0)
        frames = (
            pl.from_arrow(b)
            for b in cells.iter_batches(PREVIOUS_BATCH_ROWS, range(group, cells.num_row_groups), columns)
        )
        self._cells = _Cursor(frames, row_at - int(groups[group]), self.keys[at:], rows[at:], folder)
        parts = np.flatnonzero(tiles.column("first").to_numpy())
        batch = max(int(np.searchsorted(parts, at, side="right")) - 1, 0)
        batch_at = int(features[: parts[batch]].sum()) if len(parts) else 0
        features_path = folder / "tile_features.arrow"
        skip = int(features[:at].sum()) - batch_at
        features_at = features[at:]
        self._features = _Cursor(read_parts(features_path, first=batch), skip, self.keys[at:], features_at, folder)

    @classmethod
    def open(cls, folder: Path, salt: str, start: int = 0) -> _Previous | None:
        """The last build's zoom in ``folder`` from tile key ``start`` on, or None: none, unfinished, or made
        with other settings."""
        try:
            with pa.OSFile(str(folder / "tiles.arrow")) as source:
                reader = pa.ipc.open_file(source)
                if (reader.schema.metadata or {}).get(b"salt") != salt.encode():
                    return None
                tiles = reader.read_all()
            return cls(folder, tiles.replace_schema_metadata(reader.schema.metadata), start)
        except (OSError, pa.ArrowException):
            return None

    def hits(self, keys: np.ndarray, digests: np.ndarray) -> np.ndarray:
        """Which of the tiles (keys ascending) had these digests in the last build."""
        at, found = _bisect(keys, self.keys)
        return found & (self._digests[at] == digests) if len(self.keys) else found

    def take(self, end: int, wanted: np.ndarray) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The published rows and features of the ``wanted`` tiles, all before key ``end`` (with ``_tile``)."""
        return self._cells.take(end, wanted), self._features.take(end, wanted)


def _skipped(frames: Iterator[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """``frames`` without their first ``rows`` rows."""
    for frame in frames:
        if rows >= frame.height:
            rows -= frame.height
            continue
        yield frame.slice(rows)
        rows = 0


class _Cursor:
    """Frames of rows in tile-key order, taken up to a key at a time.

    ``keys``: the tiles the rows belong to, ascending, and ``counts``: each
    one's rows, from the first row on (after ``skip``); a row's tile is known
    from them, not computed from its columns. ``folder``: where the rows are
    read from, for the error if they end too soon.
    """

    def __init__(
        self, frames: Iterator[pl.DataFrame], skip: int, keys: np.ndarray, counts: np.ndarray, folder: Path
    ) -> None:
        self._frames, self._folder = _skipped(frames, skip), folder
        self._keys, self._counts, self._ends = keys, counts, np.cumsum(counts)
        self._tile = 0  # tiles passed so far (the rows passed end with a tile)
        self._held: pl.DataFrame | None = None

    def take(self, end: int, wanted: np.ndarray) -> pl.DataFrame:
        """The rows before tile key ``end`` whose tile is ``wanted`` (sorted), with ``_tile``; the rest before it
        are passed (an ``end`` before the last one's takes nothing)."""
        first = self._tile
        tiles = max(first, int(np.searchsorted(self._keys, np.uint64(end))))
        row = int(self._ends[first - 1]) if first else 0
        pieces, need = [], (int(self._ends[tiles - 1]) if tiles else 0) - row
        while need > 0:
            if self._held is None or self._held.height == 0:
                self._held = next(self._frames, None)
                if self._held is None:
                    raise PublishError(
                        f"the last build's selection in {self._folder} has fewer rows than its tiles.arrow "
                        "records: remove that folder (the next build chooses every tile of the zoom again)"
                    )
            pieces.append(self._held.slice(0, need))
            self._held = self._held.slice(need)
            need -= pieces[-1].height
        self._tile = tiles
        keys, counts = self._keys[first:tiles], self._counts[first:tiles]
        kept = among(keys, wanted)
        frame = pl.concat(pieces) if pieces else self._empty()
        tile_of_kept = pl.Series("_tile", np.repeat(keys[kept], counts[kept]), pl.UInt64)
        return frame.filter(pl.Series(np.repeat(kept, counts))).with_columns(tile_of_kept)

    def _empty(self) -> pl.DataFrame:
        if self._held is None:
            self._held = next(self._frames, None)
        return self._held.clear() if self._held is not None else pl.DataFrame()


def _annotated(cells: pl.DataFrame, tile_choice: pl.DataFrame, over_choice: pl.DataFrame | None) -> pl.DataFrame:
    """The cells as published: each one's tile choice, tier, the feature it folds into, its overview choice."""
    key_to_quadkey = cells.select("cell_key", "quadkey")
    return (
        cells.join(
            tile_choice.join(
                key_to_quadkey.rename({"cell_key": "target_key", "quadkey": "tile_feature"}), on="target_key"
            ).select(
                "cell_key",
                pl.col("chosen").alias("selected_tile"),
                "tier",
                "tile_feature",
                pl.col("stratum_zoom").alias("tile_stratum_zoom"),
            ),
            on="cell_key",
        )
        .with_columns(
            (
                pl.col("cell_key").is_in(over_choice.filter("chosen").get_column("cell_key").implode())
                if over_choice is not None
                else pl.lit(False)
            ).alias("selected_overview")
        )
        .sort("cell_key")
        .drop("cell_key")  # the exact quadkey as a number stays private (see privacy.coarsen)
    )


def read_selection(work: Work) -> list[dict]:
    return json.loads(work.selected_summary.read_text())


# --- checks -----------------------------------------------------------------


class SelectionCheck(NamedTuple):
    """One zoom's selection, checked from the files."""

    z: int
    max_tile_features: int  # the fullest tile's feature count
    budget: int
    overview_features: int
    overview_budget: int
    empty_strata: int  # non-empty strata with no chosen cell
    impact_beaten: int  # tiles where an unchosen cell outscores an impact cell
    tiles_unbalanced: int  # tiles whose features do not carry all their reports
    overview_balanced: bool

    @property
    def holds(self) -> bool:
        return (
            self.max_tile_features <= self.budget
            and self.overview_features <= self.overview_budget
            and self.empty_strata == 0
            and self.impact_beaten == 0
            and self.tiles_unbalanced == 0
            and self.overview_balanced
        )


def check_selection(plan: Plan) -> list[SelectionCheck]:
    """Budgets, coverage, impact order and fold conservation, read back per zoom (a part at a time).

    Two zooms at a time, each reading only the columns the checks use.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda s: _check_zoom(plan, s), read_selection(plan.work)))


CHECKED_COLUMNS = ["tile_x", "tile_y", "report_count", "score", "quadkey", "tile_stratum_zoom", "selected_tile", "tier"]


def _check_zoom(plan: Plan, s: dict) -> SelectionCheck:
    z = s["z"]
    folder = plan.work.selected(z)
    tile = ["tile_x", "tile_y"]
    fullest = empty = beaten = unbalanced = reports = 0
    cells_parts = _slices(parquet_parts(folder / "cells.parquet", CHECKED_COLUMNS), s["parts"])
    features = read_parts(folder / "tile_features.arrow", [*tile, "report_count"])
    for cells, feats in zip(cells_parts, features, strict=True):
        per_tile = feats.group_by(tile).agg(pl.len().alias("n"), pl.col("report_count").sum().alias("carried"))
        in_cells = cells.group_by(tile).agg(pl.col("report_count").sum().alias("reports"))
        unbalanced += (
            per_tile.join(in_cells, on=tile, how="full", coalesce=True)
            .filter(pl.col("carried").fill_null(0) != pl.col("reports").fill_null(0))
            .height
        )
        # a stratum is a quadkey prefix (a coarsened cell's quadkey is its stratum's)
        strata = cells.group_by(pl.col("quadkey").str.head(pl.col("tile_stratum_zoom"))).agg(
            pl.col("selected_tile").any()
        )
        empty += strata.filter(~pl.col("selected_tile")).height
        impact = cells.group_by(tile).agg(
            pl.col("score").filter(pl.col("tier") == "impact").min().alias("lowest_impact"),
            pl.col("score").filter(~pl.col("selected_tile")).max().alias("best_unchosen"),
        )
        beaten += impact.filter(pl.col("best_unchosen") > pl.col("lowest_impact")).height
        fullest = max(fullest, int(per_tile.get_column("n").max() or 0))
        reports += int(cells.get_column("report_count").sum())
    overview_file = folder / "overview_features.arrow"
    over = pl.read_ipc(overview_file) if overview_file.exists() else None
    return SelectionCheck(
        z,
        fullest,
        plan.settings.max_features_per_tile,
        over.height if over is not None else 0,
        overview_budget(z),
        empty,
        beaten,
        unbalanced,
        over is None or int(over.get_column("report_count").sum()) == reports,
    )


def _slices(frames: Iterator[pl.DataFrame], sizes: list[int]) -> Iterator[pl.DataFrame]:
    """Consecutive runs of ``sizes`` rows from frames read in order."""
    held: list[pl.DataFrame] = []
    count = 0
    for n in sizes:
        while count < n:
            frame = next(frames)
            held.append(frame)
            count += frame.height
        whole = pl.concat(held)
        yield whole.slice(0, n)
        held, count = [whole.slice(n)], count - n


# --- snapshots ----------------------------------------------------------------


def stage_snapshot(plan: Plan) -> dict:
    """Write the public files of a snapshot into a fresh ``.tmp-`` folder in ``output/``.

    Returns the staging summary (also kept in ``<work>/staged.json``).
    """
    published = plan.published
    with _writing(published.snapshots):
        published.snapshots.mkdir(parents=True, exist_ok=True)
        tmp = published.snapshots / f".tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        latest = read_latest(published)
        live = published.root / latest["path"] if latest else None
        try:
            return _stage_into(plan, SnapshotFolder(tmp, live))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
            raise


@contextmanager
def _writing(folder: Path, published: str | None = None) -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only folder) into one clear error."""
    try:
        yield
    except OSError as exc:
        after = (
            f"snapshot {published} is published, but index.html or pruning is not done"
            if published
            else "the previous snapshot stays published"
        )
        raise PublishError(f"cannot write in {folder}: {exc.strerror or exc}; {after}") from exc


def directory_maxzoom(ts: Tileset, selection: list[dict]) -> int | None:
    """The deepest zoom of the per-tile folders (``formats``), or None for none.

    ``tiles_maxzoom: auto`` is the deepest zoom at which the features in
    tiles, counted from the first zoom, number at most ``max_directory_features``.
    """
    if not ts.formats or not selection:
        return None
    if ts.tiles_maxzoom != "auto":
        return ts.tiles_maxzoom if ts.tiles_maxzoom >= selection[0]["z"] else None
    deepest, total = None, 0
    for s in selection:
        total += s["selected_tile"]
        if total > ts.max_directory_features:
            break
        deepest = s["z"]
    return deepest


def _stage_into(plan: Plan, folder: SnapshotFolder) -> dict:
    ts, tileset = plan.settings, plan.tileset
    tmp = folder.root
    selection = read_selection(plan.work)
    folders_maxz = directory_maxzoom(ts, selection)
    in_folders = lambda z, fmt: fmt in ts.formats and folders_maxz is not None and z <= folders_maxz  # noqa: E731
    zooms: list[dict] = []
    extent: list[float] = []
    metrics: set[str] = set()
    archive = vector.Archive(tmp / "heatmap.pmtiles")

    def zoom_files(s: dict) -> dict:
        """A zoom's cells and overview; its tiles are counted in as its parts are written."""
        z, selected = s["z"], plan.work.selected(s["z"])
        cells_out = f"cells/zoom={z}/cells.parquet"
        folder.path(cells_out).parent.mkdir(parents=True)
        link_or_copy(selected / "cells.parquet", folder.path(cells_out))
        cells_bytes = folder.adopt(cells_out)
        overview_bytes = 0
        if (selected / "overview_features.arrow").exists():
            text = geojson.collection(pl.read_ipc(selected / "overview_features.arrow"))
            overview_bytes = folder.put(f"overview/{z}.geojson", text.encode())
        tiles = 0 if in_folders(z, "geojson") else s["tiles"]
        zoom = {**s, "tiles": tiles, "tile_bytes": 0, "overview_bytes": overview_bytes, "cells_bytes": cells_bytes}
        zoom.update(mvt_tiles=0, mvt_bytes=0, mvt_max_tile_bytes=0, mvt_folder_bytes=0)
        return zoom

    def write_part(zoom: dict, tile_features: pl.DataFrame) -> None:
        """A part's GeoJSON tiles; widens the extent."""
        z = zoom["z"]
        if in_folders(z, "geojson"):
            tiles, size = geojson.write_tiles(tile_features, z, folder)
            zoom["tiles"] += tiles
            zoom["tile_bytes"] += size
        metrics.update(m for m in geojson.METRICS if m in tile_features.columns)
        box = geoparquet.extent(tile_features)
        if box:
            extent[:] = geoparquet.union(extent, box)

    def add_tiles(zoom: dict, encoded: vector.Encoded) -> None:
        """A part's MVT tiles into the archive (and the mvt/ folder)."""
        z = zoom["z"]
        sizes = archive.add(encoded)
        if in_folders(z, "mvt"):
            for x, y, data in zip(encoded.x.tolist(), encoded.y.tolist(), encoded.data.to_pylist()):
                folder.put(f"mvt/{z}/{x}/{y}.mvt", data)
            zoom["mvt_folder_bytes"] += int(sizes.sum())
        count_tiles(zoom, sizes)

    def count_tiles(zoom: dict, sizes: np.ndarray) -> None:
        zoom["mvt_tiles"] += len(sizes)
        zoom["mvt_bytes"] += int(sizes.sum())
        zoom["mvt_max_tile_bytes"] = max(zoom["mvt_max_tile_bytes"], int(sizes.max(initial=0)))

    # Zoom by zoom, part by part (a part: whole tiles, see select_tileset):
    # while a part's tiles are encoded (DuckDB and gzip, on worker threads), its
    # files are written and the part before it goes into the archive. At
    # most two parts' features and tiles are held at once. The shards encoded
    # the tiles of the zooms they chose (encode_shard): those are read.
    by_shards = _shard_encodings(plan)
    cache = vector.TileCache(plan.work.tile_cache)
    try:
        with vector.Encoder(cache=cache) as encoder:
            before = None
            for s in selection:
                zoom = zoom_files(s)
                zooms.append(zoom)
                if s["z"] in by_shards.files:
                    if in_folders(s["z"], "geojson"):
                        for tile_features in _finished_parts(plan, s):
                            write_part(zoom, tile_features)
                    else:  # what writing them would find, without reading them
                        names = _schema(plan.work.selected(s["z"]) / "tile_features.arrow").names
                        metrics.update(m for m in geojson.METRICS if m in names)
                        for box in by_shards.extents[s["z"]]:
                            extent[:] = geoparquet.union(extent, box)
                    for path in by_shards.files[s["z"]]:
                        for batch in vector.encoded_batches(path):
                            if in_folders(s["z"], "mvt"):  # each tile a file too
                                add_tiles(zoom, vector.encoded_of(batch, s["z"]))
                            else:
                                count_tiles(zoom, archive.add_batch(batch))
                    continue
                for part, tile_features in _encoding_parts(plan, s):
                    encoding = encoder.submit(tile_features, s["z"], part)
                    write_part(zoom, tile_features)
                    del tile_features
                    if before is not None:
                        add_tiles(before[0], before[1].result())
                    before = (zoom, encoding)
            if before is not None:
                add_tiles(before[0], before[1].result())
    except BaseException:
        archive.discard()
        cache.discard()
        raise
    cache.commit()
    if extent and (extent[0] >= extent[2] or extent[1] >= extent[3]):  # one point: bounds need an area
        extent = [extent[0] - POINT_PAD, extent[1] - POINT_PAD, extent[2] + POINT_PAD, extent[3] + POINT_PAD]
    if not zooms:  # no reports: still a complete snapshot, with empty overviews and archive
        extent = list(tilemath.WORLD)  # no reports
        for z in range(ts.minzoom, min(ts.maxzoom, ts.overview_maxzoom) + 1):
            folder.put(f"overview/{z}.geojson", (geojson.COLLECTION_HEAD + geojson.COLLECTION_TAIL).encode())
    minz, maxz = (zooms[0]["z"], zooms[-1]["z"]) if zooms else (ts.minzoom, ts.maxzoom)
    layers = vector.vector_layers(sorted(metrics), minz, maxz)
    meta = {"name": tileset, "format": "pbf", "vector_layers": layers, "attribution": "Hotspots"}
    archive.close(meta, extent)
    pmtiles_bytes = folder.adopt("heatmap.pmtiles")
    published = {
        fmt: (min(folders_maxz, maxz) if fmt in ts.formats and folders_maxz is not None and zooms else None)
        for fmt in ("geojson", "mvt")
    }
    if published["mvt"] is not None or (not zooms and "mvt" in ts.formats):
        # TileJSON describes the mvt/ folder: its zooms are the folder's
        top = published["mvt"] if published["mvt"] is not None else maxz
        folder_layers = vector.vector_layers(sorted(metrics), minz, top)
        doc = vector.tilejson(tileset, folder_layers, extent, minz, top)
        folder.put("tiles.json", (strictjson.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    staged = {
        "path": str(tmp),
        "zooms": zooms,
        "digests": folder.digests,
        "pmtiles_bytes": pmtiles_bytes,
        "max_features_per_tile": ts.max_features_per_tile,
        "folders": published,
        "shared": {"files": folder.shared, "bytes": folder.shared_bytes},
        "mvt": {
            "encoded": cache.encoded + sum(d["encoded"] for d in by_shards.summaries),
            "reused": cache.reused + sum(d["reused"] for d in by_shards.summaries),
            "compared": cache.compared + sum(d["compared"] for d in by_shards.summaries),
        },
    }
    _write_json(plan.work.staged, staged)
    return staged


class _ShardTiles(NamedTuple):
    """The MVT tiles the shards encoded: per zoom their files in shard order, and each shard's summary."""

    files: dict[int, list[Path]]
    extents: dict[int, list[list[float]]]  # each shard's features' extent
    summaries: list[dict]


def _shard_encodings(plan: Plan) -> _ShardTiles:
    """What the shards encoded (:func:`encode_shard`), checked against the plan."""
    zooms = shard_zooms(plan)
    out = _ShardTiles({z: [] for z in zooms}, {z: [] for z in zooms}, [])
    for i in range(len(plan.shards)) if zooms else ():
        shard = plan.work.shard(i)
        doc = _shard_doc(plan, i, shard.encoding, ("encoded", "encoded"))
        out.summaries.append(doc)
        for zoom in doc["zooms"]:
            if zoom["tiles"]:  # a shard's tiles are in its tile cache (see encode_shard)
                out.files[zoom["z"]].append(vector.TileCache.zoom_file(plan.work.shard_tile_cache(i), zoom["z"]))
            out.extents[zoom["z"]].append(zoom["extent"])
    return out


def _finished_parts(plan: Plan, s: dict) -> Iterator[pl.DataFrame]:
    """A zoom's tile features a part at a time, with their intensity."""
    span = pyramid.Span(*s["tile_span"]) if s["tile_span"] else None
    for tile_features in read_parts(plan.work.selected(s["z"]) / "tile_features.arrow"):
        yield finish(tile_features, plan.profile, span)


def _encoding_parts(plan: Plan, s: dict) -> Iterator[tuple[vector.Part | None, pl.DataFrame]]:
    """A zoom's tile features a part at a time, with their intensity, and each part's :class:`vector.Part`.

    One part (``None``): the whole zoom. Several: see :func:`_parts_in`.
    """
    if len(s["parts"]) <= 1:
        for tile_features in _finished_parts(plan, s):
            yield None, tile_features
        return
    everything = (0, len(s["parts"]), 0)  # a batch per part
    yield from _parts_in(plan, s, everything, (0, 4 ** s["z"]), [])


class Snapshot(NamedTuple):
    snapshot_id: str
    path: Path
    files: int
    bytes: int
    pruned: list[str]
    reused: bool  # the same content was already published under this id


def finalize_snapshot(plan: Plan, now: datetime | None = None) -> Snapshot:
    """Name the staged snapshot, move it into place, point ``latest.json`` at it, prune."""
    staged = json.loads(plan.work.staged.read_text())
    tmp = Path(staged["path"])
    manifest = build_manifest(plan, staged)
    text = strictjson.dumps(manifest, indent=2, sort_keys=True) + "\n"
    published = plan.published
    root = published.root
    try:
        with _writing(root):
            digests = dict(staged["digests"])
            (tmp / "manifest.json").write_text(text)
            digests["manifest.json"] = hashlib.sha256(text.encode()).hexdigest()
            listing = "".join(f"{p}\0{h}\n" for p, h in sorted(digests.items()))
            content = hashlib.sha256(listing.encode()).hexdigest()
            as_of = datetime.fromisoformat(manifest["as_of"])
            snapshot_id = f"{as_of:%Y%m%dT%H%M%SZ}-{content[:12]}"
            final = tmp.parent / snapshot_id
            reused = final.exists() and _complete(final) is None
            if reused:  # identical content under its content-hash name
                shutil.rmtree(tmp)
                os.utime(final)  # published again: the newest, for retention
            else:
                if final.exists():  # an incomplete leftover under this name: never point at it
                    _discard(final)
                atomic.fsync_tree(tmp)  # the files reach the disk before the rename makes them visible
                os.rename(tmp, final)
                atomic.fsync_dir(final.parent)
            generated = (now or datetime.now(UTC)).replace(microsecond=0)
            _write_json(
                published.latest,
                {
                    "snapshot_id": snapshot_id,
                    "generated_at": generated.isoformat().replace("+00:00", "Z"),
                    "as_of": manifest["as_of"],
                    "path": f"{SNAPSHOTS}/{snapshot_id}/",
                },
                durable=True,
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never published: give the space back
        raise
    with _writing(plan.output, published=snapshot_id):
        write_viewer(plan)
        pruned = prune(published, plan.settings.retain_snapshots)
    sizes = sum(
        z["tile_bytes"] + z["overview_bytes"] + z["cells_bytes"] + z["mvt_folder_bytes"] for z in staged["zooms"]
    )
    sizes += staged["pmtiles_bytes"] + len(text)
    return Snapshot(snapshot_id, final, len(digests), sizes, pruned, reused)


def build_manifest(plan: Plan, staged: dict) -> dict:
    """What a snapshot holds and how it was made (its plan's public part); no private path or field."""
    scored = read_scoring(plan.work)
    return {
        **plan.public(),  # key, as_of, config, profile, filters, source
        "tileset": plan.tileset,
        "as_of": scored["as_of"],  # the plan's, as scoring used it
        "counts": {
            "read": scored["source"]["read"],
            "valid": scored["source"]["valid"],
            "rejected": scored["source"]["rejected"],
            "scored": scored["scored"],
            "excluded": scored["excluded"],
        },
        "zooms": [
            {
                k: z[k]
                for k in (
                    "z",
                    "cells",
                    "selected_tile",
                    "selected_overview",
                    "stratum_zoom",
                    "stratum_zoom_coarsest",
                    "overview_stratum_zoom",
                    "tiles",
                    "tile_bytes",
                    "overview_bytes",
                    "cells_bytes",
                    "mvt_tiles",
                    "mvt_bytes",
                    "mvt_max_tile_bytes",
                )
            }
            for z in staged["zooms"]
        ],
        "files": len(staged["digests"]) + 1,
        "pmtiles_bytes": staged["pmtiles_bytes"],
        # the deepest zoom of each per-tile folder (null: not published); the archive has every zoom
        "folders": {"tiles": staged["folders"]["geojson"], "mvt": staged["folders"]["mvt"]},
        "layout": {
            "cells": "cells/zoom=<z>/cells.parquet",
            "overview": "overview/<z>.geojson",
            "pmtiles": "heatmap.pmtiles",
            **({"tiles": "tiles/<z>/<x>/<y>.geojson"} if staged["folders"]["geojson"] is not None else {}),
            **(
                {"mvt": "mvt/<z>/<x>/<y>.mvt (gzip)", "tilejson": "tiles.json"}
                if "tiles.json" in staged["digests"]
                else {}
            ),
        },
    }


def write_viewer(plan: Plan) -> None:
    """The map page and ``tilesets.json`` (every tileset with a live snapshot); see :mod:`pipeline.site`."""
    live = [entry for entry in plan.site if read_latest(Published.of(plan.output, entry["name"]))]
    site.write_site(plan.output, plan.viewer, live)


def read_latest(published: Published) -> dict | None:
    path = published.latest
    return json.loads(path.read_text()) if path.exists() else None


def verify_latest(published: Published) -> str | None:
    """None if ``latest.json`` names a complete snapshot, else what is wrong."""
    latest = read_latest(published)
    if latest is None:
        return "no latest.json"
    problem = _complete(published.root / latest["path"])
    return f"{latest['snapshot_id']}: {problem}" if problem else None


def _complete(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return f"manifest unreadable ({exc})"
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    if files != manifest["files"]:
        return f"{files} files, manifest counts {manifest['files']}"
    return None


def prune(published: Published, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` snapshots (and stale ``.tmp-`` folders).

    The snapshot ``latest.json`` names is never deleted.
    """
    snapshots = published.snapshots
    if not snapshots.exists():
        return []
    latest = (read_latest(published) or {}).get("snapshot_id")
    done = [p for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
    done.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    doomed = [p for p in done[keep:] if p.name != latest]
    cutoff = time.time() - STALE_TMP_S
    stale = [p for p in snapshots.glob(".tmp-*") if p.stat().st_mtime < cutoff]
    for path in doomed + stale + list(snapshots.glob(".deleting-*")):
        _discard(path)
    return sorted(p.name for p in doomed)


def _discard(path: Path) -> None:
    # Out of the snapshot names first (one atomic rename), then deleted: a
    # crash mid-delete leaves a .deleting- folder, never a half snapshot
    # under a name that could be published again.
    doomed = path.with_name(f".deleting-{path.name}-{secrets.token_hex(3)}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _write_ipc(frame: pl.DataFrame, path: Path) -> None:
    with atomic.replacing(path) as tmp:
        frame.write_ipc(tmp, compression="uncompressed")


def _write_json(path: Path, value, durable: bool = False) -> None:
    atomic.write_bytes(path, (strictjson.dumps(value, indent=2) + "\n").encode(), durable)
