"""Vector tiles of the selected features: MVT 2.1 (layer ``cells``), a PMTiles v3 archive, TileJSON 3.0.0.

Each MVT tile holds exactly the features of its GeoJSON twin, plus those of
its neighbours that lie within ``buffer`` (64 of 4096) of its edges, so a
heatmap drawn tile by tile has no seams. Tiles are encoded by DuckDB
spatial's ``ST_AsMVT`` zoom by zoom (or a :class:`Part` of a zoom at a time,
with the neighbours' features that reach into it), in chunks of whole tiles
on every core (no Python object per feature; see :class:`Encoder`),
gzip-compressed deterministically, and streamed into the archive
(:class:`Archive`), which writes them in tile-id order whatever order they came in.
A tile whose rows are those it had in the last build is not encoded again:
its bytes come from the last build's :class:`TileCache`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import shutil
import threading
import zlib
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import duckdb
import isal
import numpy as np
import polars as pl
import pyarrow as pa
from isal import isal_zlib
from pmtiles.tile import Compression, TileType, serialize_header, tileid_to_zxy

from . import atomic, duck, tilemath
from .digests import tile_digests
from .geojson import METRICS
from .geoparquet import plain_strings

LAYER = "cells"
EXTENT = 4096
BUFFER = 64
MAX_TILE_BYTES = 500_000
# ISA-L's level 2: on tiles of a few hundred bytes, as fast as zlib-ng's
# fastest level and 6% smaller (zlib-ng's level 4 would be 9% smaller but twice as slow)
GZIP_LEVEL = 2
EMPTY_TILE = gzip.compress(b"", compresslevel=4, mtime=0)  # a tile without layers

# MVT property -> (DuckDB type, the feature column): what a map draws and its
# popups show, typed as in GeoJSON. GeoJSON and GeoParquet also carry the
# cell's quadkey, zoom and weight; leaving them out of MVT makes the archive a
# fifth smaller.
PROPERTIES = {
    "count": ("BIGINT", "report_count"),
    "score": ("DOUBLE", "score"),
    "intensity": ("DOUBLE", "intensity"),
    "top_category": ("VARCHAR", "top_category"),
    "last_seen": ("VARCHAR", "last_seen_text"),  # the text of last_seen (see SEEN)
    "tier": ("VARCHAR", "tier"),
    "healthy": ("BOOLEAN", "healthy"),
    "coarsened": ("BOOLEAN", "coarsened"),
    **{m: ("DOUBLE", m) for m in METRICS},
}
# Flags a feature carries only where true (absent reads as false: MapLibre's
# ["get", ...] gives null), and a tile only if one of its features has them:
# most cells are neither healthy nor coarsened, and the keys, tags and values
# of false ones made the archive 7% larger.
FLAGS = ("healthy", "coarsened")
# ``last_seen`` as text, made only for the rows of tiles that are encoded: a
# tile's digest takes the time itself (formatting every row cost more than the digest)
SEEN = "last_seen_text"


def with_buffer(
    features: pl.DataFrame,
    z: int,
    buffer: int = BUFFER,
    extent: int = EXTENT,
    offset: int = 0,
    own: bool = True,
) -> pl.DataFrame:
    """Each feature once per tile it shows in: its own, and neighbours within the buffer.

    Rows come per offset (own tile first), each a filtered pass over the
    features (a neighbour's over those near an edge): no 9x cross join is
    ever held in memory. ``offset``: the first feature's position among its
    zoom's features (a part of a zoom). ``own=False``: the neighbours' rows only.
    """
    n = 2**z
    margin = buffer / extent
    px, py = tilemath.mercator_x(pl.col("lng")) * n, tilemath.mercator_y(pl.col("lat")) * n
    # _order: the features' own order (by private cell key), kept as the order
    # inside each tile (coarsened cells may share a quadkey: it would not be total)
    order = pl.col("_order") if "_order" in features.columns else pl.int_range(pl.len()) + offset
    base = features.lazy().with_columns(px.alias("_px"), py.alias("_py"), order.alias("_order"))
    # a superset of the features a neighbour's pass keeps (the slack covers rounding)
    fx, fy, edge = pl.col("_px") - pl.col("tile_x"), pl.col("_py") - pl.col("tile_y"), margin + 1e-9
    near = base.filter((fx <= edge) | (fx >= 1 - edge) | (fy <= edge) | (fy >= 1 - edge)).collect().lazy()
    offsets = [(0, 0)] if own else []
    offsets += [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    parts = []
    for dx, dy in offsets:
        tx, ty = pl.col("tile_x") + dx, pl.col("tile_y") + dy
        parts.append(
            (base if (dx, dy) == (0, 0) else near)
            .filter(
                tx.is_between(0, n - 1)
                & ty.is_between(0, n - 1)
                & (pl.col("_px") - tx).is_between(-margin, 1 + margin)
                & (pl.col("_py") - ty).is_between(-margin, 1 + margin)
            )
            .with_columns(tx.alias("tx"), ty.alias("ty"))
        )
    return (
        pl.concat(parts)
        .with_columns(
            # the position in tile coordinates (0..extent, y down), as MVT stores it
            ((pl.col("_px") - pl.col("tx")) * extent).round().cast(pl.Int32).alias("gx"),
            ((pl.col("_py") - pl.col("ty")) * extent).round().cast(pl.Int32).alias("gy"),
        )
        .collect()
    )


class Part(NamedTuple):
    """A run of whole tiles of one zoom's features, encoded on its own (a zoom too large to hold).

    The part encodes the tiles whose Morton keys (at the zoom) are in
    ``[lo, hi)``, its own and empty ones its features' buffers reach, with
    ``strays``: the rows of other parts' features within the buffer of its
    tiles (see :func:`strays`). With ``dirty`` (and a tile cache that holds
    the last build's tiles of the part), only the tiles near a change are
    laid out; every other tile is the last build's.
    """

    offset: int  # its first feature's position among the zoom's (the order inside a tile)
    lo: int
    hi: int
    strays: pl.DataFrame | None
    dirty: Dirty | None = None


class Dirty(NamedTuple):
    """The tiles of a zoom whose rows may differ from the last build's, and those whose features reach them.

    A tile's rows are the features of its own tile and its eight neighbours
    (the buffer), so when the cells of only ``changed`` tiles differ from
    the last build's (same settings, same intensity scale), only the tiles
    around them (``tiles``) can differ, drawn from the features around those
    (``reach``). Both are sorted cell keys at the zoom, of the tiles a shard
    encodes (keys ``[lo, hi)``: its own features and the tiles it draws).
    """

    tiles: np.ndarray
    reach: np.ndarray

    @classmethod
    def around(cls, changed: np.ndarray, z: int, lo: int, hi: int) -> Dirty:
        def inside(keys: np.ndarray) -> np.ndarray:
            return keys[(keys >= lo) & (keys < hi)]

        tiles = inside(tilemath.neighbourhood(changed, z))
        return cls(tiles, inside(tilemath.neighbourhood(tiles, z)))


def _target_key() -> pl.Expr:  # the Morton key of the tile a buffered row is drawn in
    return tilemath.morton_of("tx", "ty").alias("_target")


def _wanted(features: pl.DataFrame) -> pl.DataFrame:
    wanted = {"lng", "lat", "tile_x", "tile_y", "last_seen", "_order", *(c for _, c in PROPERTIES.values())}
    return features.select(c for c in features.columns if c in wanted)


def _columns(features: pl.DataFrame) -> list[str]:
    """The properties (their columns) the tiles of ``features`` carry."""
    have = set(features.columns)
    return [c for _, c in PROPERTIES.values() if c in have or (c == SEEN and "last_seen" in have)]


def _in(column: str | pl.Expr, keys: np.ndarray) -> pl.Expr:
    return (pl.col(column) if isinstance(column, str) else column).is_in(pl.Series(keys, dtype=pl.UInt64).implode())


def strays(features: pl.DataFrame, z: int, offset: int, lo: int, hi: int) -> pl.DataFrame:
    """A part's buffered rows drawn in tiles outside its own ``[lo, hi)``, with ``_target``."""
    # a feature's own tile is in its part: only its neighbours' rows may stray
    if lo <= 0 and hi >= 4**z:  # every tile of the zoom: none can (only the columns are made)
        features = features.head(0)
    rows = with_buffer(_wanted(features), z, offset=offset, own=False).with_columns(_target_key())
    return rows.filter((pl.col("_target") < lo) | (pl.col("_target") >= hi))


class Encoded(NamedTuple):
    """A zoom's (or a part's) MVT tiles (gzip), in tile-id order, with a digest of each (to store repeats once).

    The bytes stay in Arrow arrays from the encoder to the files (no Python
    object per tile on the way: a refresh takes most of its tiles from the cache).
    """

    z: int
    x: np.ndarray
    y: np.ndarray
    tile_id: np.ndarray
    data: pa.Array  # binary: each tile's gzip bytes
    digest: pa.Array  # fixed_size_binary(16): each one's :func:`digest`

    @classmethod
    def of(cls, z: int, x: np.ndarray, y: np.ndarray, tile_id: np.ndarray, data: list[bytes]) -> Encoded:
        """Tiles from their bytes (their digests computed)."""
        return cls(z, x, y, tile_id, pa.array(data, pa.binary()), pa.array([digest(d) for d in data], pa.binary(16)))


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _offsets(data: pa.Array) -> np.ndarray:
    """A binary array's offsets: value i is bytes ``[o[i], o[i + 1])`` of its data buffer."""
    return np.frombuffer(data.buffers()[1], np.int32, len(data) + 1, data.offset * 4)


class Budget:
    """Work held at once (rows, cells): a piece waits until it fits; a larger one runs alone."""

    def __init__(self, total: int) -> None:
        self.total, self.free = total, total
        self.closed = False
        self._cv = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.total)
        with self._cv:
            self._cv.wait_for(lambda: self.closed or self.free >= n)
            if self.closed:
                raise RuntimeError("the work was abandoned")
            self.free -= n
        return n

    def close(self) -> None:
        """Wake every waiter: nothing more will be released (the work failed)."""
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def release(self, n: int) -> None:
        with self._cv:
            self.free += n
            self._cv.notify_all()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


class Encoder:
    """MVT tiles (gzip) of one zoom at a time, on every core.

    A zoom's rows are cut into chunks of whole tiles (contiguous in tile-id
    order); each worker thread encodes a chunk with ``ST_AsMVT`` on its own
    single-threaded DuckDB connection, then gzips it tile by tile (a call per
    tile of a few hundred bytes: those barely run in parallel, whoever holds
    the GIL). One thread per chunk makes the feature order inside a tile the
    rows' order (the features' cell-key order), so tiles are byte-identical
    run to run. A zoom is cut while the one before is still being encoded.
    Use as a context manager.
    """

    CHUNK_ROWS = 50_000
    ROWS_IN_FLIGHT = 1_000_000  # features being encoded at once: the next zoom starts when it fits

    def __init__(self, workers: int | None = None, cache: TileCache | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.cache = cache
        self._planner = ThreadPoolExecutor(max_workers=1)  # cuts one zoom at a time into chunks
        self._pool = ThreadPoolExecutor(max_workers=self.workers)  # encodes the chunks
        self._free: list[duckdb.DuckDBPyConnection] = []
        self._budget = Budget(self.ROWS_IN_FLIGHT)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        # after a failure, a zoom's budget may never be released: a planner
        # waiting for it gives up rather than hang the shutdown
        self._budget.close()
        self._planner.shutdown(cancel_futures=True)
        self._pool.shutdown(cancel_futures=True)
        for con in self._free:
            con.close()

    def submit(self, features: pl.DataFrame, z: int, part: Part | None = None) -> Pending:
        """Start encoding a zoom's selected features (or a :class:`Part` of them); ``.result()`` gives
        its :class:`Encoded`.
        """
        return Pending(z, self._planner.submit(self._plan, features, z, part), self._budget, self.cache)

    def _plan(self, features: pl.DataFrame, z: int, part: Part | None) -> Planned:
        bounds = (part.lo, part.hi) if part is not None else (0, 4**z)
        if features.height == 0 and (part is None or part.strays is None or part.strays.height == 0):
            return Planned(0, [], None, None)
        columns = _columns(features)
        strays = part.strays if part is not None else None
        last = None  # the last build's tiles of the part, when only those near a change are laid out
        if part is not None and part.dirty is not None and self.cache is not None:
            last = self.cache.holding(z, bounds, tuple(columns))
        if last is not None:
            order = (pl.int_range(pl.len()) + part.offset).alias("_order")  # positions among all the features
            features = features.with_columns(order).filter(
                _in(tilemath.morton_of("tile_x", "tile_y"), part.dirty.reach)
            )
            strays = strays.filter(_in("_target", part.dirty.tiles)) if strays is not None else None
        held = self._budget.acquire(features.height)  # released by Pending.result
        if part is None:
            rows = with_buffer(_wanted(features), z)
        else:
            rows = with_buffer(_wanted(features), z, offset=part.offset).with_columns(_target_key())
            keep = pl.col("_target").is_between(part.lo, part.hi, closed="left")
            rows = rows.filter(keep & _in("_target", part.dirty.tiles) if last is not None else keep)
            if strays is not None:
                rows = pl.concat([rows, strays.select(rows.columns)])
        rows = rows.with_columns(
            pl.Series("tile_id", tilemath.tile_ids(z, rows["tx"].to_numpy(), rows["ty"].to_numpy()))
        )
        rows = rows.sort("tile_id", "_order")
        ids = rows.get_column("tile_id").to_numpy()
        cached = inputs = None
        if self.cache is not None:
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.empty(0, np.int64)
            x, y = (rows.get_column(c).to_numpy()[starts].astype(np.int64) for c in ("tx", "ty"))
            digests = tile_digests(rows, ["gx", "gy", *("last_seen" if c == SEEN else c for c in columns)], starts)
            inputs = Inputs(z, bounds, tuple(columns), x, y, ids[starts], digests)
            if last is not None:
                hit, cached, inputs = self.cache.lookup_near(inputs, last, part.dirty.tiles)
            else:
                hit, cached = self.cache.lookup(inputs)
            if hit.any():  # only the tiles whose rows changed are encoded
                rows = rows.filter(pl.Series(np.repeat(~hit, np.diff(np.r_[starts, len(ids)]))))
                ids = rows.get_column("tile_id").to_numpy()
        props = [pl.col("last_seen").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias(c) if c == SEEN else c for c in columns]
        table = plain_strings(rows.select("tile_id", "tx", "ty", "gx", "gy", *props, _flags(columns)).to_arrow())
        del rows
        cuts = [0]
        while cuts[-1] < len(ids):  # chunk ends on a tile boundary
            end = min(cuts[-1] + self.CHUNK_ROWS, len(ids))
            cuts.append(int(np.searchsorted(ids, ids[end - 1], side="right")))
        sql = _mvt_sql(columns)
        chunks = [self._pool.submit(self._chunk, table.slice(a, b - a), sql, z) for a, b in zip(cuts, cuts[1:])]
        return Planned(held, chunks, cached, inputs)

    def _chunk(self, table: pa.Table, sql: str, z: int) -> Encoded:
        try:
            con = self._free.pop()  # atomic: two workers never share a connection
        except IndexError:
            con = _single_threaded()
        try:
            con.register("features", table)
            encoded = con.execute(sql).to_arrow_table()
            con.unregister("features")
        finally:
            self._free.append(con)
        data = [isal_zlib.compress(b, GZIP_LEVEL, wbits=31) for b in encoded.column("mvt").to_pylist()]  # gzip
        return Encoded.of(
            z,
            encoded.column("tx").to_numpy().astype(np.int64),
            encoded.column("ty").to_numpy().astype(np.int64),
            encoded.column("tile_id").to_numpy(),
            data,
        )


def _flags(columns: list[str]) -> pl.Expr:
    """``_flags``: per row, which :data:`FLAGS` some feature of its tile has (bit i: ``FLAGS[i]``)."""
    bits = [
        pl.col(PROPERTIES[f][1]).fill_null(False).any().over("tile_id").cast(pl.Int32) * (1 << i)
        for i, f in enumerate(FLAGS)
        if PROPERTIES[f][1] in columns
    ]
    return (pl.sum_horizontal(bits) if bits else pl.lit(0, pl.Int32)).alias("_flags")


def _mvt_sql(columns: list[str]) -> str:
    """Each tile of ``features`` as MVT, in tile-id order, its features in the rows' order.

    ``ST_AsMVT`` lists every property of its struct in the layer's keys,
    used or not: a tile is encoded with only the :data:`FLAGS` some feature
    of it has (``_flags``; most tiles have none).
    """

    def tiles(mask: int) -> str:
        props = ", ".join(
            f"'{name}': CASE WHEN {column} THEN true END" if name in FLAGS else f"'{name}': CAST({column} AS {typ})"
            for name, (typ, column) in PROPERTIES.items()
            if column in columns and (name not in FLAGS or mask & (1 << FLAGS.index(name)))
        )
        return f"""
            SELECT tile_id, any_value(tx) AS tx, any_value(ty) AS ty,
                   ST_AsMVT({{'geometry': ST_Point(gx, gy), {props}}}, '{LAYER}', {EXTENT}, 'geometry') AS mvt
            FROM features WHERE _flags = {mask} GROUP BY tile_id"""

    return " UNION ALL ".join(tiles(m) for m in range(1 << len(FLAGS))) + " ORDER BY tile_id"


class Inputs(NamedTuple):
    """What went into a zoom's (or a part's) tiles: each tile's id and a digest of its rows."""

    z: int
    bounds: tuple[int, int]  # the tile keys [lo, hi) it encodes (a part's; a whole zoom's)
    columns: tuple[str, ...]  # the properties its rows have
    x: np.ndarray  # each tile's column and row
    y: np.ndarray
    tile_id: np.ndarray  # in order
    digest: np.ndarray  # uint64, one per tile


class Planned(NamedTuple):
    held: int  # rows of the budget held until the result is taken
    chunks: list[Future]  # each gives an Encoded
    cached: Encoded | None  # the tiles found in the cache
    inputs: Inputs | None  # None: no cache (or no tiles)


class Pending(NamedTuple):
    """A zoom being encoded."""

    z: int
    plan: Future
    budget: Budget
    cache: TileCache | None = None

    def result(self) -> Encoded:
        held, chunks, cached, inputs = self.plan.result()
        try:
            parts = [chunk.result() for chunk in chunks]
        finally:
            self.budget.release(held)
        if cached is not None:
            parts.append(cached)
        encoded = _concat(self.z, parts)
        if self.cache is not None and inputs is not None:
            self.cache.add(inputs, encoded)
        return encoded


def _concat(z: int, parts: list[Encoded]) -> Encoded:
    """Encoded tiles of one zoom, in tile-id order."""
    if not parts:
        return Encoded.of(z, *(np.empty(0, np.int64),) * 3, [])
    if len(parts) == 1:  # already in order
        return parts[0]
    ids = np.concatenate([p.tile_id for p in parts])
    order = np.argsort(ids, kind="stable")
    data, digests = (pa.concat_arrays([getattr(p, k) for p in parts]).take(order) for k in ("data", "digest"))
    return Encoded(
        z, *(np.concatenate([getattr(p, k) for p in parts])[order] for k in ("x", "y")), ids[order], data, digests
    )


def encoded_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The batches of a tile cache's zoom (:meth:`TileCache.zoom_file`), for :meth:`Archive.add_batch`."""
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def encoded_of(batch: pa.RecordBatch, z: int) -> Encoded:
    """A batch of :func:`encoded_batches` as :class:`Encoded` tiles (their column and row from their key)."""
    x, y = (v.astype(np.int64) for v in tilemath.cell_xy(batch.column("key").to_numpy()))
    return Encoded(z, x, y, batch.column("tile_id").to_numpy(), batch.column("data"), batch.column("content"))


class TileCache:
    """The last build's MVT tiles, by what went into them: a tile whose rows are unchanged is not encoded.

    Private, in the work folder. Per zoom, an Arrow IPC file with a record
    batch per part encoded (each tile's id, the digest of its rows, its
    gzip bytes and their digest) and, in ``index.json``, each batch's tile-key bounds, the
    properties its rows had and :data:`CACHE_SALT` (what else makes the
    bytes: the encoder's settings and libraries). A build reads the last
    one's cache and writes its own beside it; :meth:`commit` puts it in
    place. Anything missing, unreadable or made otherwise is a miss, never
    an error: the tile is encoded.
    """

    @staticmethod
    def zoom_file(root: Path, z: int) -> Path:
        """The committed cache at ``root``'s tiles of zoom ``z``: for each part, a batch in tile-id order
        (what the publication adds to the archive, see :func:`encoded_batches`)."""
        return root / _CURRENT / _zoom_name(z)

    def __init__(self, root: Path) -> None:
        self.root, self.next = root / _CURRENT, root / "next"
        shutil.rmtree(self.next, ignore_errors=True)
        self.next.mkdir(parents=True)
        try:
            index = json.loads((self.root / "index.json").read_text())
            same = index["salt"] == CACHE_SALT
            self._old, self._old_zooms = (index["batches"], index["zooms"]) if same else ({}, {})
        except (OSError, ValueError, KeyError, TypeError):
            self._old, self._old_zooms = {}, {}
        self._new: dict[str, list] = {}
        self._zooms: dict[str, dict] = {}  # per zoom, the selection and intensity scale its tiles were made from
        self._writer: tuple[int, pa.ipc.RecordBatchFileWriter, pa.OSFile] | None = None
        self.reused = self.encoded = 0
        self.compared = 0  # tiles whose rows were laid out and compared with the cache's (the rest: near no change)

    def made_from(self, z: int, selection: str | None, scale: list[float] | None) -> None:
        """Say which selection of zoom ``z`` (its id) and intensity scale this build's tiles are made from."""
        self._zooms[str(z)] = {"selection": selection, "scale": scale}

    def follows(self, z: int, selection: str, scale: list[float] | None) -> bool:
        """Whether the last build's tiles of zoom ``z`` were made from ``selection`` at the intensity ``scale``."""
        return self._old_zooms.get(str(z)) == {"selection": selection, "scale": scale}

    def holding(self, z: int, bounds: tuple[int, int], columns: tuple[str, ...]) -> pa.Table | None:
        """The last build's tiles of zoom ``z`` whose keys are in ``bounds``, made from rows with
        ``columns``, if it encoded every tile there (None otherwise, or when unreadable)."""
        lo, hi = bounds
        ranges = sorted((a, b) for a, b, c in self._old.get(str(z), []) if a < hi and lo < b and tuple(c) == columns)
        end = lo
        for a, b in ranges:
            if a > end:
                return None
            end = max(end, b)
        if end < hi:
            return None
        try:
            return self._read(z, bounds, columns)
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return None

    def lookup(self, inputs: Inputs, old: pa.Table | None = None) -> tuple[np.ndarray, Encoded | None]:
        """Which of the tiles are in the cache with the same rows (a mask), and their tiles (``old``:
        the cache's tiles to look in; by default, those of the tiles' zoom and bounds)."""
        hit = np.zeros(len(inputs.tile_id), bool)
        self.encoded += len(hit)  # less those found
        self.compared += len(hit)
        if old is None:
            try:
                old = self._read(inputs.z, inputs.bounds, inputs.columns)
            except (OSError, ValueError, KeyError, pa.ArrowException):
                old = None
        if old is None:
            return hit, None
        hit, found = _found(old.column("tile_id").to_numpy(), old.column("digest").to_numpy(), inputs)
        self.reused += int(hit.sum())
        self.encoded -= int(hit.sum())
        if not hit.any():
            return hit, None
        taken = old.select(["data", "content"]).take(pa.array(found[hit]))
        x, y, tile_id = inputs.x[hit], inputs.y[hit], inputs.tile_id[hit]
        return hit, Encoded(inputs.z, x, y, tile_id, *(taken.column(c).combine_chunks() for c in ("data", "content")))

    def lookup_near(self, inputs: Inputs, old: pa.Table, dirty: np.ndarray) -> tuple[np.ndarray, Encoded, Inputs]:
        """:meth:`lookup` for the tiles near a change (``inputs``: those of ``dirty``, sorted keys), and every
        other tile of the part: the last build's (``old``, from :meth:`holding`), unchanged.

        Returns the mask over ``inputs``' tiles, the tiles taken from the cache
        (both kinds, in tile-id order) and the inputs of all the part's tiles.
        """
        (lo, hi), z = inputs.bounds, inputs.z
        ids, keys, digests = (old.column(c).to_numpy() for c in ("tile_id", "key", "digest"))
        hit, found = _found(ids, digests, inputs)
        kept = np.flatnonzero((keys >= lo) & (keys < hi) & ~np.isin(keys, dirty))
        self.encoded += len(hit) - int(hit.sum())
        self.reused += int(hit.sum()) + len(kept)
        self.compared += len(hit)
        taken = np.concatenate([found[hit], kept])
        taken = taken[np.argsort(ids[taken], kind="stable")]  # one take, in tile-id order
        x, y = tilemath.cell_xy(keys[taken])
        rows = old.select(["data", "content"]).take(pa.array(taken))
        cached = Encoded(z, x, y, ids[taken], *(rows.column(c).combine_chunks() for c in ("data", "content")))
        kx, ky = tilemath.cell_xy(keys[kept])
        tile_id = np.concatenate([inputs.tile_id, ids[kept]])
        order = np.argsort(tile_id, kind="stable")
        every = inputs._replace(
            x=np.concatenate([inputs.x, kx])[order],
            y=np.concatenate([inputs.y, ky])[order],
            tile_id=tile_id[order],
            digest=np.concatenate([inputs.digest, digests[kept]])[order],
        )
        return hit, cached, every

    def _read(self, z: int, bounds: tuple[int, int], columns: tuple[str, ...]) -> pa.Table | None:
        """The old batches of zoom ``z`` whose bounds meet ``bounds`` (made from rows with ``columns``)."""
        lo, hi = bounds
        wanted = [
            i
            for i, (a, b, made) in enumerate(self._old.get(str(z), []))
            if a < hi and lo < b and tuple(made) == columns
        ]
        if not wanted:
            return None
        # mapped, not read: a refresh takes most of a zoom's tiles (their buffers keep the map open)
        reader = pa.ipc.open_file(pa.memory_map(str(self.root / _zoom_name(z))))
        return pa.Table.from_batches([reader.get_batch(i) for i in wanted])

    def add(self, inputs: Inputs, encoded: Encoded) -> None:
        """Keep a part's tiles for the next build (parts of a zoom in turn, zoom after zoom)."""
        if not np.array_equal(inputs.tile_id, encoded.tile_id):
            raise ValueError(f"zoom {inputs.z}: the encoded tiles are not the tiles planned")
        if self._writer is None or self._writer[0] != inputs.z:
            self._close_writer()
            sink = pa.OSFile(str(self.next / _zoom_name(inputs.z)), "wb")
            self._writer = (inputs.z, pa.ipc.new_file(sink, _CACHE_SCHEMA), sink)
        batch = pa.record_batch(
            [
                pa.array(encoded.tile_id, pa.int64()),
                pa.array(tilemath.morton_keys(inputs.x, inputs.y), pa.uint64()),
                pa.array(inputs.digest, pa.uint64()),
                encoded.data,
                encoded.digest,
            ],
            schema=_CACHE_SCHEMA,
        )
        self._writer[1].write_batch(batch)
        self._new.setdefault(str(inputs.z), []).append([*inputs.bounds, list(inputs.columns)])

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer[1].close()
            self._writer[2].close()
            self._writer = None

    def commit(self) -> None:
        """This build's tiles become the cache (the last build's are gone)."""
        self._close_writer()
        index = {"salt": CACHE_SALT, "batches": self._new, "zooms": self._zooms}
        atomic.write_bytes(self.next / "index.json", json.dumps(index).encode())
        old = self.root.with_name(f"old-{secrets.token_hex(3)}")
        if self.root.exists():
            os.rename(self.root, old)
        os.rename(self.next, self.root)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        self._close_writer()
        shutil.rmtree(self.next, ignore_errors=True)


def _found(ids: np.ndarray, digests: np.ndarray, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``inputs``' tiles the cache's (``ids``, ``digests``) holds with the same rows (a mask), and
    where (a position for each: meaningful where the mask holds)."""
    if not len(ids) or not len(inputs.tile_id):
        return np.zeros(len(inputs.tile_id), bool), np.zeros(len(inputs.tile_id), np.int64)
    order = np.argsort(ids, kind="stable")
    found = order[np.minimum(np.searchsorted(ids, inputs.tile_id, sorter=order), len(ids) - 1)]
    return (ids[found] == inputs.tile_id) & (digests[found] == inputs.digest), found


def _zoom_name(z: int) -> str:
    return f"zoom={z}.arrow"


_CURRENT = "current"  # a cache's committed folder (beside "next", the one a build writes)


CACHE_VERSION = 5  # a change to how tiles are made that the settings below do not show: add one
CACHE_SALT = digest(
    json.dumps(
        [
            CACHE_VERSION,
            LAYER,
            EXTENT,
            BUFFER,
            GZIP_LEVEL,
            PROPERTIES,
            FLAGS,
            pl.__version__,
            duckdb.__version__,
            isal.__version__,
        ]
    ).encode()
).hex()
# per tile: its id, the digest of its rows, its gzip bytes and their digest (the archive's, not computed again)
_CACHE_SCHEMA = pa.schema(
    [
        ("tile_id", pa.int64()),
        ("key", pa.uint64()),  # the tile's cell key (see tilemath.morton_keys)
        ("digest", pa.uint64()),
        ("data", pa.binary()),
        ("content", pa.binary(16)),
    ]
)


def _single_threaded() -> duckdb.DuckDBPyConnection:
    con = duck.connect()
    con.execute("SET threads = 1")
    return con


class Archive:
    """A clustered PMTiles v3 archive of tiles added in any order; the directory and data at the end.

    Tile data goes to a scratch file beside the archive as it arrives; only
    five numbers per tile stay in memory (40 bytes). Identical tiles (equal
    digests) are stored once in the archive (consecutive ones as one run). :meth:`close` writes the
    header, directories and metadata, then the tile data in tile-id order
    (the order the tiles came in changes no byte), and removes the scratch file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._scratch = path.with_name(f".{path.name}.data")
        self._data = open(self._scratch, "wb")
        # per tile: its id, where its content lies in the scratch file, and the content's
        # 16-byte digest (40 bytes a tile; a dict of digests took 3 times that)
        self._ids, self._offsets, self._lengths, self._digests = (array("Q") for _ in range(4))
        self._size = 0

    def add(self, tiles: Encoded) -> np.ndarray:
        """Add a batch of tiles (each tile id once in an archive); returns their sizes."""
        return self._add(tiles.tile_id, tiles.data, tiles.digest)

    def add_batch(self, batch: pa.RecordBatch) -> np.ndarray:
        """Add a batch of :func:`encoded_batches`; returns the tiles' sizes."""
        return self._add(batch.column("tile_id").to_numpy(), batch.column("data"), batch.column("content"))

    def _add(self, ids: np.ndarray, data: pa.Array, content: pa.Array) -> np.ndarray:
        if not len(data):
            return np.empty(0, np.uint64)
        offsets = _offsets(data)
        # a repeated content too: it is stored once at close
        self._data.write(memoryview(data.buffers()[2])[offsets[0] : offsets[-1]])
        sizes = np.diff(offsets).astype(np.uint64)
        width = content.type.byte_width
        digests = memoryview(content.buffers()[1])[content.offset * width : (content.offset + len(content)) * width]
        self._record(ids, sizes, digests)
        return sizes

    def _record(self, ids: np.ndarray, sizes: np.ndarray, digests) -> None:
        """Where tiles just written to the scratch file lie, with their ids and contents' digests."""
        self._offsets.frombytes((_starts(sizes) + np.uint64(self._size)).tobytes())
        self._size += int(sizes.sum())
        self._ids.frombytes(ids.astype(np.uint64).tobytes())
        self._lengths.frombytes(sizes.tobytes())
        self._digests.frombytes(digests)

    def _layout(self) -> tuple[np.ndarray, ...]:
        """Directory entries (id, offset, length, run) and each content's scratch offset, in write order."""
        ids, scratch, lengths = (np.frombuffer(a, np.uint64) for a in (self._ids, self._offsets, self._lengths))
        order = np.argsort(ids, kind="stable")
        ids, scratch, lengths = ids[order], scratch[order], lengths[order]
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            raise ValueError("a tile was added twice")
        # equal digests: one content, kept where its first tile's copy lies
        digests = np.frombuffer(self._digests, np.uint64).reshape(-1, 2)[order]
        first, which = _first_of_equal(digests[:, 0], digests[:, 1])
        # contents in the order of their first tile: the data's order
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        contents, content_lengths = scratch[first], lengths[first]
        by_rank = np.argsort(rank)
        starts = np.zeros(len(contents), np.uint64)
        starts[by_rank] = _starts(content_lengths[by_rank])
        offsets = starts[which]
        # a run: the same content at consecutive tile ids
        new = np.ones(len(ids), bool)
        new[1:] = (ids[1:] != ids[:-1] + np.uint64(1)) | (offsets[1:] != offsets[:-1])
        heads = np.flatnonzero(new)
        runs = np.diff(np.append(heads, len(ids))).astype(np.uint64)
        return ids[heads], offsets[heads], lengths[heads], runs, contents[by_rank], content_lengths[by_rank]

    def close(self, metadata: dict, bounds: list[float]) -> int:
        """Write the archive; returns its size. No tiles: one empty tile at 0/0/0."""
        if not self._ids:
            zero = np.zeros(1, np.int64)
            self.add(Encoded.of(0, zero, zero, zero, [EMPTY_TILE]))
        self._data.close()
        ids, offsets, lengths, runs, scratch, sizes = self._layout()
        root, leaves = directories(ids, offsets, lengths, runs)
        meta = gzip.compress(json.dumps(metadata).encode(), mtime=0)
        west, south, east, north = bounds
        minz, maxz = tileid_to_zxy(int(ids[0]))[0], tileid_to_zxy(int(ids[-1] + runs[-1] - 1))[0]
        header = {
            "tile_type": TileType.MVT,
            "tile_compression": Compression.GZIP,
            "internal_compression": Compression.GZIP,
            "clustered": True,
            "min_zoom": minz,
            "max_zoom": maxz,
            "addressed_tiles_count": len(self._ids),
            "tile_entries_count": len(ids),
            "tile_contents_count": len(scratch),
            "root_offset": HEADER_BYTES,
            "root_length": len(root),
            "metadata_offset": HEADER_BYTES + len(root),
            "metadata_length": len(meta),
            "leaf_directory_offset": HEADER_BYTES + len(root) + len(meta),
            "leaf_directory_length": len(leaves),
            "tile_data_offset": HEADER_BYTES + len(root) + len(meta) + len(leaves),
            "tile_data_length": int(sizes.sum()),
            "min_lon_e7": int(west * 1e7),
            "min_lat_e7": int(south * 1e7),
            "max_lon_e7": int(east * 1e7),
            "max_lat_e7": int(north * 1e7),
            "center_zoom": min(maxz, max(minz, 10)),
            "center_lon_e7": int((west + east) / 2 * 1e7),
            "center_lat_e7": int((south + north) / 2 * 1e7),
        }
        with open(self.path, "wb") as out, open(self._scratch, "rb") as data:
            out.write(serialize_header(header) + root + meta + leaves)
            if int(sizes.sum()) == self._size and np.array_equal(scratch, _starts(sizes)):
                # the tiles came in order, each content once: the scratch file is the data
                shutil.copyfileobj(data, out, 1 << 22)
            else:  # read, not mapped: a mapped file's pages would count as this process's memory
                _copy_pieces(data.fileno(), out, scratch, sizes)
        self._scratch.unlink()
        return self.path.stat().st_size

    def discard(self) -> None:
        """Give up: close and remove the scratch file."""
        self._data.close()
        self._scratch.unlink(missing_ok=True)


def _first_of_equal(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows keyed by (``hi``, ``lo``): each distinct key's first row, in key order, and each row's key's rank.

    What ``np.unique(keys, return_index=True, return_inverse=True)`` gives, by one stable sort
    of two words (``np.unique`` of 16-byte records sorts them as Python compares records).
    """
    order = np.lexsort((lo, hi))  # stable: equal keys keep their rows' order
    h, l_ = hi[order], lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (h[1:] != h[:-1]) | (l_[1:] != l_[:-1])
    rank = np.cumsum(new) - 1
    which = np.empty(len(order), np.int64)
    which[order] = rank
    return order[new], which


def _copy_pieces(source: int, out: BinaryIO, starts: np.ndarray, sizes: np.ndarray, chunk: int = 1 << 22) -> None:
    """Write the pieces (``starts``, ``sizes``) of file ``source`` to ``out``, in order.

    Pieces that follow each other in ``source`` are read together, at most
    about ``chunk`` bytes at a time.
    """
    if not len(starts):
        return
    ends = starts + sizes
    # a new read where a piece does not start where the one before it ended
    heads = np.flatnonzero(np.r_[True, starts[1:] != ends[:-1]])
    tails = np.r_[heads[1:], len(starts)] - 1
    for lo, hi in zip(starts[heads].tolist(), ends[tails].tolist()):
        while lo < hi:
            piece = os.pread(source, min(chunk, hi - lo), lo)
            if not piece:
                raise OSError(f"the archive's scratch file ends at {lo}, before {hi}")
            out.write(piece)
            lo += len(piece)


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Where each of consecutive pieces of ``sizes`` bytes starts."""
    out = np.zeros(len(sizes), np.uint64)
    np.cumsum(sizes[:-1], out=out[1:])
    return out


HEADER_BYTES = 127
ROOT_BYTES = 16_384 - HEADER_BYTES  # the root directory must end within the first 16 KiB


def varints(values: np.ndarray) -> bytes:
    """Protobuf varints (7 bits a byte, low first) of unsigned integers, vectorised."""
    v = np.asarray(values, np.uint64).ravel()
    width = np.ones(len(v), np.int64)
    for k in range(1, 10):
        width += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(width) - width
    out = np.empty(int(width.sum()), np.uint8)
    for k in range(int(width.max(initial=0))):  # the k-th byte of the values that have one
        has = np.flatnonzero(width > k)
        group = ((v[has] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[has] + k] = group | np.where(width[has] > k + 1, 0x80, 0).astype(np.uint8)  # more follow
    return out.tobytes()


def serialize_directory(ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, runs: np.ndarray) -> bytes:
    """A PMTiles directory (gzip), as ``pmtiles.tile.serialize_directory`` writes it."""
    return gzip.compress(_directory_body(ids, offsets, lengths, runs), mtime=0)


def _directory_body(ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, runs: np.ndarray) -> bytes:
    """A directory's entries, column after column, as varints (before gzip)."""
    contiguous = np.zeros(len(ids), bool)
    contiguous[1:] = offsets[1:] == offsets[:-1] + lengths[:-1]
    return b"".join(
        [
            varints(np.array([len(ids)])),
            varints(np.diff(ids, prepend=np.uint64(0))),
            varints(runs),
            varints(lengths),
            varints(np.where(contiguous, np.uint64(0), offsets + np.uint64(1))),
        ]
    )


def gzip_within(body: bytes, limit: int, chunk: int = 1 << 16) -> bytes | None:
    """``gzip.compress(body, mtime=0)`` if it is shorter than ``limit`` bytes, else None, found as soon as
    the output reaches ``limit`` (a world's directory is megabytes: most of it is never compressed).

    The same bytes as ``gzip.compress``: zlib's output does not depend on how its input is cut.
    """
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out, size = [], 0
    for at in range(0, len(body), chunk):
        out.append(z.compress(body[at : at + chunk]))
        size += len(out[-1])
        if size >= limit:
            return None
    out.append(z.flush())
    data = b"".join(out)
    return data if len(data) < limit else None


def directories(ids, offsets, lengths, runs) -> tuple[bytes, bytes]:
    """The root directory and the leaf directories, as the PMTiles reference writer splits them."""
    root = gzip_within(_directory_body(ids, offsets, lengths, runs), ROOT_BYTES)
    if root is not None:
        return root, b""
    leaf_size = 4096
    while True:
        leaves = [
            serialize_directory(
                ids[i : i + leaf_size], offsets[i : i + leaf_size], lengths[i : i + leaf_size], runs[i : i + leaf_size]
            )
            for i in range(0, len(ids), leaf_size)
        ]
        sizes = np.array([len(leaf) for leaf in leaves], np.uint64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
        root = serialize_directory(ids[::leaf_size], starts, sizes, np.zeros(len(leaves), np.uint64))
        if len(root) < ROOT_BYTES:
            return root, b"".join(leaves)
        leaf_size *= 2


def vector_layers(metrics: list[str], minzoom: int, maxzoom: int) -> list[dict]:
    """TileJSON / PMTiles ``vector_layers``: the one layer and its fields."""
    kinds = {"VARCHAR": "String", "BOOLEAN": "Boolean"}
    fields = {
        name: kinds.get(typ, "Number")
        for name, (typ, _) in PROPERTIES.items()
        if name not in METRICS or name in metrics
    }
    return [
        {
            "id": LAYER,
            "fields": fields,
            "minzoom": minzoom,
            "maxzoom": maxzoom,
            "description": "heatmap cells: the selected features of each tile",
        }
    ]


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
