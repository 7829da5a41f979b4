"""MVT tiles, the PMTiles archive and TileJSON, read back with readers other than the writer."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import threading
from pathlib import Path

import mapbox_vector_tile
import mercantile
import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pmtiles.reader import MmapSource, Reader, all_tiles
from pmtiles.tile import Compression, Entry, TileType, tileid_to_zxy, zxy_to_tileid
from pmtiles.tile import serialize_directory as reference_directory
from pmtiles.writer import optimize_directories

from pipeline.config import load_config
from pipeline.tilemath import tile_ids
from pipeline.vector import (
    BUFFER,
    EMPTY_TILE,
    EXTENT,
    FLAGS,
    MAX_TILE_BYTES,
    Archive,
    Budget,
    Encoded,
    Encoder,
    Inputs,
    TileCache,
    directories,
    encoded_batches,
    encoded_of,
    gzip_within,
    serialize_directory,
    varints,
)

from .conftest import publish_tileset, run_extraction


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("vector")
    (root / "hotspots.yaml").write_text(
        json.dumps(
            {
                "sources": {
                    "rail": {
                        "kind": "synthetic",
                        "domain": "rail_disruptions",
                        "count": 6000,
                        "seed": 9,
                        "bbox": [5.9, 47.3, 15.0, 55.0],
                    }
                },
                "tilesets": {
                    "rail": {
                        "source": "rail",
                        "profile": "rail_disruptions",
                        "maxzoom": 11,
                        "max_features_per_tile": 60,
                        "tiles_maxzoom": 11,
                    }
                },
            }
        )
    )
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
        raw = gzip.decompress(data)
        layer = mapbox_vector_tile.decode(raw, default_options={"y_coord_down": True})["cells"]
        assert layer["extent"] == EXTENT
        for flag in FLAGS:  # a flag's key is in a tile only where a feature has the flag
            assert (flag.encode() in raw) == any(flag in f["properties"] for f in layer["features"]), (path, flag)
        twin_path = snapshot / "tiles" / str(z) / str(x) / f"{y}.geojson"
        twin = json.loads(twin_path.read_text())["features"] if twin_path.exists() else []
        # MVT carries what a map draws (no cell, z or weight): match twins by position and properties
        unmatched = [
            (
                *_pixel(*f["geometry"]["coordinates"], z, x, y),
                # a flag is in MVT only where true
                {k: v for k, v in f["properties"].items() if k not in GEOJSON_ONLY and not (k in FLAGS and v is False)},
            )
            for f in twin
        ]
        for feature in layer["features"]:
            assert all(feature["properties"].get(flag, True) is True for flag in FLAGS)
            px, py = feature["geometry"]["coordinates"]
            assert -BUFFER <= px <= EXTENT + BUFFER and -BUFFER <= py <= EXTENT + BUFFER
            match = next(
                (
                    i
                    for i, (ex, ey, want) in enumerate(unmatched)
                    if abs(px - ex) <= 1 and abs(py - ey) <= 1 and _same(feature["properties"], want)
                ),
                None,
            )
            if match is None:
                assert not (0 < px < EXTENT and 0 < py < EXTENT), "only buffer features come from neighbours"
            else:
                unmatched.pop(match)
        assert not unmatched, f"{path}: GeoJSON features missing from MVT"


GEOJSON_ONLY = {"cell", "z", "weight"}


def _same(got: dict, want: dict) -> bool:
    if got.keys() != want.keys():
        return False
    for key, value in want.items():
        if isinstance(value, float):
            if not isinstance(got[key], float) or got[key] != pytest.approx(value, rel=1e-12):
                return False
        elif type(got[key]) is not type(value) or got[key] != value:
            return False
    return True


def test_pmtiles_archive_lists_every_tile(snapshot: Path):
    with open(snapshot / "heatmap.pmtiles", "rb") as fh:
        source = MmapSource(fh)
        reader = Reader(source)
        header, metadata = reader.header(), reader.metadata()
        listed = {(z, x, y): data for (z, x, y), data in all_tiles(source)}
    files = {
        (int(p.parts[-3]), int(p.parts[-2]), int(p.stem)): p.read_bytes() for p in (snapshot / "mvt").rglob("*.mvt")
    }
    assert listed == files
    assert header["tile_type"] == TileType.MVT and header["tile_compression"] == Compression.GZIP
    assert header["clustered"] and (header["min_zoom"], header["max_zoom"]) == (0, 11)
    assert 5.9e7 <= header["min_lon_e7"] < header["max_lon_e7"] <= 15.0e7
    assert [layer["id"] for layer in metadata["vector_layers"]] == ["cells"]
    assert {"count", "intensity", "delays", "cancellations", "departures"} <= set(
        metadata["vector_layers"][0]["fields"]
    )


def test_tilejson(snapshot: Path):
    doc = json.loads((snapshot / "tiles.json").read_text())
    assert doc["tilejson"] == "3.0.0" and doc["tiles"] == ["mvt/{z}/{x}/{y}.mvt"]
    assert (doc["minzoom"], doc["maxzoom"]) == (0, 11) and len(doc["bounds"]) == 4 and len(doc["center"]) == 3
    assert doc["vector_layers"][0]["id"] == "cells"
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["layout"]["pmtiles"] == "heatmap.pmtiles"
    assert max(z["mvt_max_tile_bytes"] for z in manifest["zooms"]) <= MAX_TILE_BYTES


# --- the streaming archive -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(z=st.integers(0, 24), data=st.data())
def test_tile_ids_are_pmtiles_ids(z, data):
    n = 2**z
    xs = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20))
    ys = data.draw(st.lists(st.integers(0, n - 1), min_size=len(xs), max_size=len(xs)))
    ids = tile_ids(z, np.array(xs), np.array(ys))
    assert ids.tolist() == [zxy_to_tileid(z, x, y) for x, y in zip(xs, ys)]
    # and back: the same tile as mercantile names it, by quadkey
    for tile_id, x, y in zip(ids.tolist(), xs, ys):
        assert mercantile.quadkey(*tileid_to_zxy(tile_id)[1:], z) == mercantile.quadkey(x, y, z)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5000), st.integers(1, 1 << 22), st.integers(1, 4), st.booleans()),
        min_size=1,
        max_size=400,
    )
)
def test_directory_is_the_reference_writers(rows):
    ids = np.cumsum([r[0] for r in rows]).astype(np.uint64)
    lengths = np.array([r[1] for r in rows], np.uint64)
    contiguous = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    offsets = np.where([r[3] for r in rows], contiguous, contiguous // 3)  # some entries point back (shared tiles)
    runs = np.array([r[2] for r in rows], np.uint64)
    entries = [Entry(*map(int, e)) for e in zip(ids, offsets, lengths, runs)]
    assert serialize_directory(ids, offsets, lengths, runs) == reference_directory(entries)
    assert directories(ids, offsets, lengths, runs) == optimize_directories(entries, 16384 - 127)[:2]


def test_a_large_directory_splits_into_leaves_as_the_reference_writer_does():
    rng = np.random.default_rng(5)
    n = 300_000
    ids = np.cumsum(rng.integers(1, 9, n)).astype(np.uint64)
    lengths = rng.integers(20, 1 << 16, n).astype(np.uint64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    runs = np.ones(n, np.uint64)
    root, leaves = directories(ids, offsets, lengths, runs)
    assert leaves and len(root) < 16384 - 127
    entries = [Entry(*map(int, e)) for e in zip(ids, offsets, lengths, runs)]
    assert (root, leaves) == optimize_directories(entries, 16384 - 127)[:2]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(max_size=300) | st.sampled_from([b"\x00" * 4000, b"tile" * 500]), max_size=60),
    st.integers(20, 30_000),
    st.integers(1, 9_000),
)
def test_gzip_within_is_gzip_or_says_it_is_too_long(pieces, limit, chunk):
    # the root directory's test: compressed as gzip does, given up once the output reaches the limit
    body = b"".join(pieces)
    whole = gzip.compress(body, mtime=0)
    assert gzip_within(body, limit, chunk) == (whole if len(whole) < limit else None)


def _varint(value: int) -> bytes:  # the protobuf rule, a byte at a time
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1) | st.sampled_from([0, 127, 128, 16383, 16384, 2**63, 2**64 - 1])))
def test_varints_are_protobufs_whatever_the_value(values):
    assert varints(np.array(values, np.uint64)) == b"".join(_varint(v) for v in values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=60), st.sampled_from([0, 2**63, 2**64 - 1]))
def test_equal_contents_are_found_as_numpy_finds_them(keys, high):
    """The archive's dedupe of 16-byte digests: each distinct one's first tile, and every tile's distinct one."""
    from pipeline.vector import _first_of_equal

    hi = np.array([high - k if high else k for k, _ in keys], np.uint64)
    lo = np.array([k for _, k in keys], np.uint64)
    records = np.empty(len(keys), np.dtype([("hi", np.uint64), ("lo", np.uint64)]))
    records["hi"], records["lo"] = hi, lo
    _, first, which = np.unique(records, return_index=True, return_inverse=True)
    got_first, got_which = _first_of_equal(hi, lo)
    assert got_first.tolist() == first.tolist()
    assert got_which.tolist() == which.ravel().tolist()


def _tiles(z: int, xy: list[tuple[int, int]], data: list[bytes]) -> Encoded:
    x, y = np.array([t[0] for t in xy]), np.array([t[1] for t in xy])
    ids = tile_ids(z, x, y)
    order = np.argsort(ids)
    return Encoded.of(z, x[order], y[order], ids[order], [data[i] for i in order])


def test_archive_stores_duplicates_once_reads_back_and_ignores_the_order_tiles_came_in(tmp_path):
    same, other, root = (gzip.compress(t, mtime=0) for t in (b"same", b"other", b"root"))
    batches = [
        _tiles(0, [(0, 0)], [root]),
        _tiles(2, [(0, 0), (1, 0)], [same, same]),
        _tiles(2, [(0, 1), (3, 3)], [same, other]),
        _tiles(1, [(1, 1)], [other]),
    ]
    built = []
    for name, order in (("a", [0, 1, 2, 3]), ("b", [2, 3, 0, 1]), ("c", [3, 2, 1, 0])):
        archive = Archive(tmp_path / f"{name}.pmtiles")
        for i in order:
            archive.add(batches[i])
        size = archive.close({"name": "t"}, [-10.0, -10.0, 10.0, 10.0])
        assert size == (tmp_path / f"{name}.pmtiles").stat().st_size
        built.append((tmp_path / f"{name}.pmtiles").read_bytes())
    assert built[0] == built[1] == built[2]  # the same bytes, whatever order the tiles came in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pmtiles", "b.pmtiles", "c.pmtiles"]  # no scratch
    with open(tmp_path / "b.pmtiles", "rb") as fh:
        source = MmapSource(fh)
        header = Reader(source).header()
        tiles = dict(all_tiles(source))
    assert header["clustered"] and (header["min_zoom"], header["max_zoom"]) == (0, 2)
    assert header["addressed_tiles_count"] == 6 and header["tile_contents_count"] == 3
    assert tiles[(2, 0, 1)] == tiles[(2, 1, 0)] == same and gzip.decompress(tiles[(2, 3, 3)]) == b"other"
    assert gzip.decompress(tiles[(1, 1, 1)]) == b"other" and gzip.decompress(tiles[(0, 0, 0)]) == b"root"
    twice = Archive(tmp_path / "twice.pmtiles")
    twice.add(batches[1])
    twice.add(batches[1])
    with pytest.raises(ValueError, match="added twice"):
        twice.close({}, [-1.0, -1.0, 1.0, 1.0])
    # as a shard keeps its tiles (its tile cache, a zoom at a time), and the publication adds them
    # from the cache's Arrow batches
    cache, kept = TileCache(tmp_path / "shard"), sorted(batches, key=lambda b: b.z)
    for b in kept:
        cache.add(Inputs(b.z, (0, 4**b.z), ("count",), b.x, b.y, b.tile_id, np.zeros(len(b.x), np.uint64)), b)
    cache.commit()
    archive, sizes, read = Archive(tmp_path / "shard" / "d.pmtiles"), [], []
    for z in (0, 1, 2):
        for batch in encoded_batches(TileCache.zoom_file(tmp_path / "shard", z)):
            read.append(encoded_of(batch, z))
            for piece in (batch.slice(0, 1), batch.slice(1)):  # a slice begins inside its buffers
                sizes += archive.add_batch(piece).tolist()
    archive.close({"name": "t"}, [-10.0, -10.0, 10.0, 10.0])
    assert (tmp_path / "shard" / "d.pmtiles").read_bytes() == built[0]
    assert sizes == [len(d) for b in kept for d in b.data.to_pylist()]
    for got, want in zip(read, kept, strict=True):  # each tile's column and row back from its key
        assert (got.x.tolist(), got.y.tolist(), got.tile_id.tolist()) == (
            want.x.tolist(),
            want.y.tolist(),
            want.tile_id.tolist(),
        )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=9), max_size=30), st.randoms(use_true_random=False), st.integers(1, 12))
def test_pieces_are_copied_in_order_whatever_the_chunk(tmp_path_factory, pieces, rnd, chunk):
    """The archive's data at close: pieces of the scratch file, read a chunk at a time, none mapped."""
    import io

    from pipeline.vector import _copy_pieces

    path = tmp_path_factory.mktemp("pieces") / "scratch"
    path.write_bytes(b"".join(pieces))
    sizes = np.array([len(p) for p in pieces], np.uint64)
    starts = np.cumsum(np.r_[0, sizes[:-1]]).astype(np.uint64) if pieces else np.zeros(0, np.uint64)
    order = list(range(len(pieces)))
    rnd.shuffle(order)
    out = io.BytesIO()
    with open(path, "rb") as data:
        _copy_pieces(data.fileno(), out, starts[order], sizes[order], chunk)
    assert out.getvalue() == b"".join(pieces[i] for i in order)


def test_an_empty_archive_holds_one_empty_tile(tmp_path):
    archive = Archive(tmp_path / "e.pmtiles")
    archive.close({}, [-1.0, -1.0, 1.0, 1.0])
    with open(tmp_path / "e.pmtiles", "rb") as fh:
        assert dict(all_tiles(MmapSource(fh))) == {(0, 0, 0): EMPTY_TILE}


# --- formats: the archive has every zoom, per-tile folders only some --------------


@pytest.fixture(scope="module")
def archive_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    (root / "hotspots.yaml").write_text(
        json.dumps(
            {
                "sources": {
                    "roads": {
                        "kind": "synthetic",
                        "domain": "road_conditions",
                        "count": 8000,
                        "seed": 12,
                        "bbox": [-0.3, 51.4, 0.1, 51.6],
                    }
                },
                "tilesets": {
                    "auto": {"source": "roads", "maxzoom": 13, "max_directory_features": 2000},
                    "none": {"source": "roads", "maxzoom": 13, "formats": []},
                    "geojson": {"source": "roads", "maxzoom": 13, "formats": ["geojson"], "tiles_maxzoom": 5},
                },
            }
        )
    )
    cfg = load_config(root / "hotspots.yaml")
    run_extraction(cfg)
    return {name: publish_tileset(cfg, name).path for name in cfg.tilesets}


def _archive(snapshot: Path) -> dict[tuple[int, int, int], bytes]:
    with open(snapshot / "heatmap.pmtiles", "rb") as fh:
        return dict(all_tiles(MmapSource(fh)))


def test_per_tile_folders_follow_formats_and_the_archive_has_every_zoom(archive_only):
    auto, none, only_geojson = archive_only["auto"], archive_only["none"], archive_only["geojson"]
    manifest = json.loads((auto / "manifest.json").read_text())
    deepest = manifest["folders"]["tiles"]
    # auto: the deepest zoom whose features, counted from z0, fit max_directory_features
    running = list(itertools.accumulate(z["selected_tile"] for z in manifest["zooms"]))
    assert deepest == max(z["z"] for z, total in zip(manifest["zooms"], running) if total <= 2000) < 13
    assert manifest["folders"]["mvt"] == deepest
    assert {int(p.name) for p in (auto / "tiles").iterdir()} == set(range(deepest + 1))
    assert {int(p.name) for p in (auto / "mvt").iterdir()} == set(range(deepest + 1))
    assert json.loads((auto / "tiles.json").read_text())["maxzoom"] == deepest
    for snapshot in (auto, none, only_geojson):
        assert {z for z, _, _ in _archive(snapshot)} == set(range(14))  # the archive: every zoom
    assert not (none / "tiles").exists() and not (none / "mvt").exists() and not (none / "tiles.json").exists()
    layout = json.loads((none / "manifest.json").read_text())["layout"]
    assert "tiles" not in layout and "mvt" not in layout and "tilejson" not in layout
    assert {int(p.name) for p in (only_geojson / "tiles").iterdir()} == set(range(6))
    assert not (only_geojson / "mvt").exists() and not (only_geojson / "tiles.json").exists()
    # the archive is the same whichever folders were published
    assert _archive(auto) == _archive(none) == _archive(only_geojson)


def test_every_zoom_of_the_archive_conserves_reports_per_tile(archive_only):
    """Decoded MVT carries each tile's reports where no GeoJSON twin exists to check against."""
    snapshot = archive_only["none"]
    tiles = _archive(snapshot)
    for path in sorted((snapshot / "cells").glob("zoom=*/cells.parquet")):
        z = int(path.parent.name.split("=")[1])
        cells = pl.read_parquet(path, columns=["tile_x", "tile_y", "report_count"])
        reports = {
            (x, y): n for x, y, n in cells.group_by("tile_x", "tile_y").agg(pl.col("report_count").sum()).iter_rows()
        }
        for (x, y), total in reports.items():
            layer = mapbox_vector_tile.decode(gzip.decompress(tiles[(z, x, y)]), default_options={"y_coord_down": True})
            features = layer["cells"]["features"]
            # the tile's own features lie in [0, EXTENT]; a neighbour's buffer features outside,
            # or (rounded) on the shared edge
            inside = sum(
                f["properties"]["count"] for f in features if all(0 < c < EXTENT for c in f["geometry"]["coordinates"])
            )
            closed = sum(
                f["properties"]["count"]
                for f in features
                if all(0 <= c <= EXTENT for c in f["geometry"]["coordinates"])
            )
            assert inside <= total <= closed, (z, x, y)
        assert {(x, y) for tz, x, y in tiles if tz == z} >= set(reports)


def test_tiles_are_the_same_bytes_whatever_the_workers_and_chunks(archive_only):
    snapshot = archive_only["none"]
    work = snapshot.parents[3] / ".hotspots" / "work" / "none" / "selected"
    for z in (11, 13):
        features = pl.read_ipc(work / f"zoom={z}" / "tile_features.arrow")
        with Encoder(workers=1) as one, Encoder(workers=3) as many:
            many.CHUNK_ROWS = 97  # many chunks, each ending on a tile boundary
            a, b = one.submit(features, z).result(), many.submit(features, z).result()
        assert a.data == b.data and np.array_equal(a.tile_id, b.tile_id) and np.array_equal(a.x, b.x)
        assert np.all(np.diff(a.tile_id) > 0) and len(a.data) >= 4 and len(features) > 2 * 97


def test_an_encoder_abandoned_mid_run_shuts_down_instead_of_hanging(archive_only):
    """A failed publish leaves zooms whose budget is never released: leaving the encoder must not wait forever."""
    work = archive_only["none"].parents[3] / ".hotspots" / "work" / "none" / "selected"
    features = pl.read_ipc(work / "zoom=13" / "tile_features.arrow")
    done = threading.Event()

    def abandon():
        with Encoder(workers=2) as encoder:
            encoder._budget = Budget(features.height)  # room for one zoom at a time
            encoder.submit(features, 13)
            encoder.submit(features, 13)  # waits for the first's budget, which nobody releases
        done.set()

    thread = threading.Thread(target=abandon, daemon=True)
    thread.start()
    assert done.wait(60), "the encoder hung on shutdown"


def _encode(features: pl.DataFrame, z: int, cache: TileCache | None = None) -> Encoded:
    with Encoder(workers=2, cache=cache) as encoder:
        return encoder.submit(features, z).result()


def _primed(root: Path, features: pl.DataFrame, z: int) -> TileCache:
    cache = TileCache(root)
    _encode(features, z, cache)
    cache.commit()
    return TileCache(root)


edit = st.tuples(
    st.sampled_from(["score", "move", "drop", "repeat", "negative zero"]), st.integers(0, 10**6), st.integers(1, 3)
)


@settings(max_examples=15, deadline=None)
@given(st.lists(edit, max_size=4))
def test_a_tile_from_the_cache_is_the_tile_encoding_would_give(archive_only, tmp_path_factory, edits):
    """After any edits to a zoom's features, tiles taken from the last build's cache plus those
    encoded again are, byte for byte, what encoding everything gives; only tiles whose rows
    changed are encoded."""
    work = _selected_of(archive_only)
    z = 12
    before = pl.read_ipc(work / f"zoom={z}" / "tile_features.arrow")
    after = before
    for kind, at, k in edits:
        i = at % after.height
        if kind == "score":
            after = after.with_columns(
                pl.when(pl.int_range(pl.len()) == i).then(pl.col("score") + k).otherwise("score")
            )
        elif kind == "move":  # across a tile edge, maybe
            after = after.with_columns(
                pl.when(pl.int_range(pl.len()) == i).then(pl.col("lng") + k * 0.01).otherwise("lng")
            )
        elif kind == "drop":
            after = after.filter(pl.int_range(pl.len()) != i)
        elif kind == "repeat":
            after = pl.concat([after.slice(0, i + 1), after.slice(i, 1), after.slice(i + 1)])
        else:  # -0.0 and 0.0 are equal numbers but different bytes in a tile
            row = pl.int_range(pl.len()) == i
            before = before.with_columns(pl.when(row).then(0.0).otherwise("score").alias("score"))
            after = after.with_columns(pl.when(row).then(-0.0).otherwise("score").alias("score"))
    root = tmp_path_factory.mktemp("cache")
    cache = _primed(root, before, z)
    fresh, cached = _encode(after, z), _encode(after, z, cache)
    assert np.array_equal(fresh.tile_id, cached.tile_id) and np.array_equal(fresh.x, cached.x)
    assert np.array_equal(fresh.y, cached.y) and fresh.digest == cached.digest
    assert fresh.data == cached.data
    old = _encode(before, z)
    unchanged = set(zip(old.tile_id.tolist(), old.data.to_pylist())) & set(
        zip(fresh.tile_id.tolist(), fresh.data.to_pylist())
    )
    assert cache.reused + cache.encoded == len(fresh.data)
    if not edits:
        assert cache.reused == len(fresh.data) > 10
    # a reused tile has its old bytes; rows changed in a few tiles only
    assert cache.reused <= len(unchanged) and cache.reused >= len(fresh.data) - 9 * 3 * len(edits)


def _selected_of(archive_only) -> Path:
    """The ``none`` tileset's selected features (8,000 road reports in London, to z13)."""
    return archive_only["none"].parents[3] / ".hotspots" / "work" / "none" / "selected"


def test_a_cache_of_other_settings_or_unreadable_is_a_miss(archive_only, tmp_path):
    work = _selected_of(archive_only)
    features = pl.read_ipc(work / "zoom=12" / "tile_features.arrow")
    fresh = _encode(features, 12)
    cache = _primed(tmp_path, features, 12)
    assert _encode(features, 12, cache).data == fresh.data and cache.encoded == 0
    index = tmp_path / "current" / "index.json"
    doc = json.loads(index.read_text())
    index.write_text(json.dumps({**doc, "salt": "another encoder"}))
    cache = TileCache(tmp_path)
    assert _encode(features, 12, cache).data == fresh.data and cache.reused == 0
    index.write_text(json.dumps(doc))
    (tmp_path / "current" / "zoom=12.arrow").write_bytes(b"not arrow")
    cache = TileCache(tmp_path)
    assert _encode(features, 12, cache).data == fresh.data and cache.reused == 0
