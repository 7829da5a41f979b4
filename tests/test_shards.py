"""Spatial shards: each reads its own reports, and the published bytes never depend on how many there are."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline import build, geoparquet, paths, plan, publish, tilemath, vector, warehouse
from pipeline.config import load_config
from pipeline.errors import ConfigError, PlanError, PublishError

from .conftest import AS_OF, REPO, run_extraction


def published_as(
    cfg, tileset: str, out: Path, part_cells: int | None = None, as_steps: bool = False, **changes
) -> Path:
    """Build and publish ``tileset`` into ``out`` with its settings changed; the snapshot folder.

    ``part_cells``: zooms are selected and encoded in parts of about this many cells. ``as_steps``: each
    shard scores, builds and selects in one go (``build.run_shard``, as the Dagster step does); else the
    shards are scored, then built.
    """
    made = plan.make(cfg, tileset, AS_OF)
    frozen = build.split(replace(made, settings=made.settings.model_copy(update=changes), output=out))
    plan.write(frozen)
    if not as_steps:
        build.score_tileset(frozen)
    default = publish.SELECT_PART_CELLS
    publish.SELECT_PART_CELLS = part_cells or default  # shards choose their tiles in parts too
    try:
        if as_steps:
            build.start(frozen)
            for i in range(len(frozen.shards)):
                build.run_shard(frozen, i)
            build.merge_scoring(frozen)
            build.merge_cells(frozen)
        else:
            build.build_cells(frozen)
        publish.select_tileset(frozen)
    finally:
        publish.SELECT_PART_CELLS = default
    checks = publish.check_selection(frozen)  # none when every report was excluded
    assert all(c.holds for c in checks) and (checks or not publish.read_selection(frozen.work))
    publish.encode_tiles(frozen)
    publish.stage_snapshot(frozen)
    return publish.finalize_snapshot(frozen).path


def digests(folder: Path) -> dict[str, str]:
    """Every file of a snapshot by its content, the manifest without its shard count and block size."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "manifest.json":
                manifest = json.loads(data)
                assert manifest["config"].pop("shards") is not None  # the manifest records the count
                assert manifest["config"].pop("block_reports") is not None  # and the blocks' size
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def test_the_sql_tile_key_is_the_polars_one_and_mercantiles():
    rng = np.random.default_rng(7)
    lng = np.r_[rng.uniform(-180, 180, 50_000), -180.0, 180.0, 0.0, 179.9999999999]
    lat = np.r_[rng.uniform(-86, 86, 50_000), 0.0, 0.0, -85.0511287798066, 85.0511287798066]
    frame = pl.DataFrame({"lng": lng, "lat": lat})
    x, y, key = tilemath.tile_key_sql("lng", "lat")
    by_sql = duckdb.sql(f"SELECT {key} AS k FROM (SELECT *, {x} AS _x, {y} AS _y FROM frame)").pl()["k"]
    by_polars = frame.select(tilemath.tile_key(pl.col("lng"), pl.col("lat")).alias("k"))["k"]
    assert by_sql.to_list() == by_polars.to_list()
    # the key at a coarser zoom is a shift of it, and is mercantile's tile
    import mercantile

    for i in rng.integers(0, len(lng), 200):
        for z in (0, 7, 18):
            t = mercantile.tile(lng[i], lat[i], z)
            cx, cy = tilemath.cell_xy(np.array([by_sql[int(i)] >> (2 * (tilemath.KEY_LEVEL - z))], np.uint64))
            assert (int(cx[0]), int(cy[0])) == (t.x, t.y)


def write_points(path: Path, seed: int, n: int, clusters: int) -> None:
    rng = np.random.default_rng(seed)
    centres = np.c_[rng.uniform(-120, 140, clusters), rng.uniform(-50, 60, clusters)]
    which = rng.integers(0, clusters, n)
    spread = rng.choice([0.001, 0.05, 2.0], n)
    pl.DataFrame(
        {
            "id": np.arange(n),
            "lng": np.clip(centres[which, 0] + rng.normal(0, 1, n) * spread, -179.9, 179.9),
            "lat": np.clip(centres[which, 1] + rng.normal(0, 1, n) * spread, -80, 80),
            "category": rng.choice(["pothole", "crack", "flooding", "debris"], n),
            "severity": rng.integers(1, 6, n),
            "observed_at": [f"2026-10-{1 + int(d):02d}T12:00:00Z" for d in rng.integers(0, 30, n)],
        }
    ).write_csv(path)


def config_for(write_config, tmp_path: Path, **tileset) -> object:
    columns = {c: c for c in ("lat", "lng", "category", "severity", "observed_at")}
    return load_config(
        write_config(
            {
                "sources": {
                    "pts": {
                        "kind": "file",
                        "path": str(tmp_path / "pts.csv"),
                        "columns": {"report_id": "id", **columns},
                    }
                },
                "tilesets": {"pts": {"source": "pts", "minzoom": 0, "maxzoom": 12, **tileset}},
            }
        )
    )


def test_split_covers_every_key_in_order_and_balances_reports(write_config, tmp_path):
    write_points(tmp_path / "pts.csv", seed=1, n=5000, clusters=40)
    cfg = config_for(write_config, tmp_path, shards=8)
    run_extraction(cfg)
    frozen = build.split(plan.make(cfg, "pts", AS_OF))
    starts, ends = zip(*frozen.shards)
    assert starts[0] == 0 and ends[-1] == 1 << 60 and list(starts[1:]) == list(ends[:-1])
    assert all(lo <= hi for lo, hi in frozen.shards)
    shift = 2 * (tilemath.KEY_LEVEL - frozen.shard_zoom)
    assert all(lo % (1 << shift) == 0 for lo in starts)  # whole tiles at the shard zoom
    with warehouse.reader(cfg.warehouse_path) as con:
        counts = [
            con.execute("SELECT count(*) FROM reports WHERE tile_key >= ? AND tile_key < ?", list(r)).fetchone()[0]
            for r in frozen.shards
        ]
        biggest_tile = con.execute(
            f"SELECT max(n) FROM (SELECT count(*) n FROM reports GROUP BY tile_key >> {shift})"
        ).fetchone()[0]
    assert sum(counts) == 5000
    assert max(counts) <= 5000 / 8 + biggest_tile  # balanced up to one tile


def test_auto_takes_one_shard_per_shard_reports(write_config, tmp_path):
    write_points(tmp_path / "pts.csv", seed=2, n=1000, clusters=30)
    cfg = config_for(write_config, tmp_path, shards="auto", shard_reports=300, shard_zoom=10)
    run_extraction(cfg)
    assert len(build.split(plan.make(cfg, "pts", AS_OF)).shards) == 4


def test_a_warehouse_without_tile_keys_is_a_clear_error(write_config, tmp_path):
    write_points(tmp_path / "pts.csv", seed=3, n=50, clusters=3)
    cfg = config_for(write_config, tmp_path)
    run_extraction(cfg)
    con = duckdb.connect(str(cfg.warehouse_path))
    con.execute("UPDATE reports SET tile_key = NULL")
    con.close()
    with pytest.raises(PlanError, match="no tile keys"):
        build.split(plan.make(cfg, "pts", AS_OF))
    with warehouse.writer(cfg.warehouse_path):  # the next extraction's connection keys them again
        pass
    assert len(build.split(plan.make(cfg, "pts", AS_OF)).shards) == 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 400),
    clusters=st.integers(1, 12),
    shards=st.sampled_from([2, 3, 7, 64]),
    shard_zoom=st.integers(0, 10),
    profile=st.sampled_from(["generic", "road_conditions"]),
    min_count=st.sampled_from([1, 3]),
    part_cells=st.sampled_from([1, 7, 60]),
    block_reports=st.sampled_from([1, 25, 10**6]),
    as_steps=st.booleans(),
)
# a shard whose reports all had one half-life: polars once took it as a number, and divided by it differently
@example(
    seed=1038,
    n=66,
    clusters=1,
    shards=7,
    shard_zoom=7,
    profile="road_conditions",
    min_count=1,
    part_cells=1,
    block_reports=10**6,
    as_steps=False,
)
def test_any_sharding_publishes_the_same_bytes(
    write_config,
    tmp_path_factory,
    seed,
    n,
    clusters,
    shards,
    shard_zoom,
    profile,
    min_count,
    part_cells,
    block_reports,
    as_steps,
):
    """Shards, the blocks a shard builds its cells in, and the parts of whole tiles a zoom is selected and
    encoded in, change no byte."""
    tmp = tmp_path_factory.mktemp("shards")
    write_points(tmp / "pts.csv", seed, n, clusters)
    columns = {c: c for c in ("lat", "lng", "category", "severity", "observed_at")}
    path = tmp / "hotspots.yaml"
    path.write_text(
        json.dumps(
            {
                "home": str(tmp / ".hotspots"),
                "output": str(tmp / "output"),
                "sources": {
                    "pts": {"kind": "file", "path": str(tmp / "pts.csv"), "columns": {"report_id": "id", **columns}}
                },
                "tilesets": {"pts": {"source": "pts", "profile": profile, "maxzoom": 10, "min_count": min_count}},
            }
        )
    )
    cfg = load_config(path)
    run_extraction(cfg)
    one = published_as(cfg, "pts", tmp / "one", shards=1, shard_zoom=shard_zoom)
    sharding = {"shards": shards, "shard_zoom": shard_zoom, "block_reports": block_reports}
    many = published_as(cfg, "pts", tmp / "many", part_cells, as_steps, **sharding)
    assert digests(one) == digests(many)


def test_the_default_run_publishes_the_same_bytes_with_1_7_and_64_shards_and_in_parts(tmp_path):
    cfg = load_config(REPO / "hotspots.yaml")
    cfg = cfg.model_copy(update={"home": tmp_path / ".hotspots", "output": tmp_path / "output", "roots": [tmp_path]})
    run_extraction(cfg)
    for tileset in cfg.tilesets:
        snapshots = [published_as(cfg, tileset, tmp_path / f"out-{n}", shards=n) for n in (1, 7, 64)]
        # shards really split the work: 64 of them, each with its own reports
        work = paths.Work.of(cfg.home, tileset)
        scored = [pl.read_parquet(work.shard(i).scored).height for i in range(64)]
        assert sum(scored) == build.read_scoring(work)["scored"]
        assert sum(1 for s in scored if s) > 1, tileset
        # zooms in parts of a few thousand cells: tiles whose buffers reach into other parts' tiles
        snapshots.append(published_as(cfg, tileset, tmp_path / "out-parts", 3000, shards=1))
        assert max(len(s["parts"]) for s in publish.read_selection(work)) > 1
        # 7 shards as the Dagster steps run them, each building its cells in blocks of a few hundred reports
        snapshots.append(published_as(cfg, tileset, tmp_path / "out-blocks", None, True, shards=7, block_reports=300))
        blocked = plan.read(work.plan)
        assert max(len(build.blocks(blocked, i)) for i in range(7)) > 1, tileset
        first = digests(snapshots[0])
        assert len(first) > 20
        for other in snapshots[1:]:
            assert digests(other) == first, tileset


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shards": 0}, r"tilesets\.pts\.shards: must be auto or a count from 1 to 256, got 0"),
        ({"shards": "many"}, r"tilesets\.pts\.shards: must be auto or a count"),
        ({"shard_zoom": 13}, r"tilesets\.pts\.shard_zoom: must be auto or between minzoom and maxzoom \(0\.\.12\)"),
    ],
)
def test_bad_shard_settings_name_the_key(write_config, tmp_path, changes, message):
    (tmp_path / "pts.csv").write_text("id,lat,lng\n")
    with pytest.raises(ConfigError, match=message):
        config_for(write_config, tmp_path, **changes)


def test_a_merge_never_mixes_plans_or_misses_a_shard(write_config, tmp_path):
    write_points(tmp_path / "pts.csv", seed=4, n=2000, clusters=20)
    cfg = config_for(write_config, tmp_path, shards=3, shard_zoom=8)
    run_extraction(cfg)
    first = build.split(plan.make(cfg, "pts", AS_OF))
    for i in range(3):
        build.run_shard(first, i)
    assert build.merge_scoring(first).scored == 2000
    later = replace(first, as_of=AS_OF.replace(hour=13))  # another build's plan, same shards
    with pytest.raises(PlanError, match="shard 0 of pts was built for another plan"):
        build.merge_scoring(later)
    first.work.shard(1).pivot.unlink()  # shard 1 stopped after scoring
    with pytest.raises(PlanError, match="shard 1 of pts has no cells: run it again"):
        build.merge_cells(first)
    build.run_shard(first, 1)
    assert build.merge_cells(first)
    # merged: the shards' cells are gone (a 100M build's are tens of GB), and a merge again asks for them
    assert not any(first.work.shards_root.glob("*/cells")) and not any(first.work.shards_root.glob("*/pivot.npz"))
    with pytest.raises(PlanError, match="shard 0 of pts has no cells: run it again"):
        build.merge_cells(first)
    build.start(first)
    with pytest.raises(PlanError, match="shard 0 of pts has not run"):
        build.merge_scoring(first)


@given(
    st.lists(st.integers(0, 60), max_size=40),
    st.lists(st.integers(0, 60), max_size=40),
)
def test_among_is_membership_in_sorted_keys(values, keys):
    keys_sorted = np.unique(np.array(keys, np.uint64))
    found = publish.among(np.array(values, np.uint64), keys_sorted)
    assert found.tolist() == np.isin(np.array(values, np.uint64), keys_sorted).tolist()


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=30),  # rows of each tile (tile k's key: 10 k + 3)
    st.integers(1, 7),  # rows of each frame the rows come in
    st.lists(st.integers(0, 320), max_size=8),  # the ends taken, in any order (one before the last: nothing)
    st.integers(0, 2**30),  # which tiles are wanted
)
def test_the_last_builds_rows_are_taken_tile_by_tile_whatever_frames_they_come_in(counts, frame_rows, ends, bits):
    keys = np.arange(len(counts), dtype=np.uint64) * 10 + 3
    tile = np.repeat(keys, counts)
    rows = pl.DataFrame({"row": np.arange(len(tile)), "tile_x": tile.astype(np.int64)})
    frames = (rows.slice(a, frame_rows) for a in range(0, rows.height, frame_rows))
    cursor = publish._Cursor(frames, 0, keys, np.array(counts), Path("selected"))
    wanted = keys[[bool(bits >> k & 1) for k in range(len(keys))]]
    start = 0
    for end in ends:
        got = cursor.take(end, wanted)
        expected = rows.filter((pl.col("tile_x") >= start) & (pl.col("tile_x") < end), pl.col("tile_x").is_in(wanted))
        assert got.get_column("row").to_list() == expected.get_column("row").to_list()
        assert got.get_column("_tile").to_list() == expected.get_column("tile_x").to_list()
        start = max(start, end)


def test_a_last_build_with_fewer_rows_than_its_tiles_record_is_an_error():
    rows = pl.DataFrame({"row": [0, 1, 2]})
    cursor = publish._Cursor(iter([rows]), 0, np.array([5, 9], np.uint64), np.array([2, 2]), Path("zoom=9"))
    assert cursor.take(6, np.array([5], np.uint64)).get_column("row").to_list() == [0, 1]
    with pytest.raises(PublishError, match=r"selection in zoom=9 has fewer rows than its tiles.arrow records: remove"):
        cursor.take(10, np.array([9], np.uint64))


def test_shards_choose_their_own_tiles_and_the_selection_step_puts_them_together(write_config, tmp_path, monkeypatch):
    # small parts and row groups: a read from a shard's start skips whole ones, and begins inside one
    monkeypatch.setattr(publish, "SELECT_PART_CELLS", 40)
    monkeypatch.setattr(geoparquet, "ROW_GROUP", 64)
    write_points(tmp_path / "pts.csv", seed=6, n=3000, clusters=30)
    cfg = config_for(write_config, tmp_path, shards=3, shard_zoom=10)
    run_extraction(cfg)
    first = build.split(plan.make(cfg, "pts", AS_OF))
    plan.write(first)
    build.score_tileset(first)
    build.build_cells(first)  # each shard chose its tiles before the merge took its cells
    mine = publish.shard_zooms(first)
    assert mine == [10, 11, 12]  # z9 is finer than the overviews, but its tiles span shards: the merge's
    chosen = [publish.read_shard_selection(first, i) for i in range(3)]
    assert sum(1 for c in chosen if c) >= 2  # the tiles really were chosen in more than one shard
    summary = {s.z: s for s in publish.select_tileset(first)}
    selected = first.work.selected_root
    chosen_files = _selected_contents(selected)
    # the last build read from a tile key on (where a shard's range begins): nothing before it is left
    # to read, and the rows after it are the ones a read from the beginning takes
    salt, folder = publish._selection_salt(first), first.work.selected(12)
    keys = pa.ipc.open_file(pa.memory_map(str(folder / "tiles.arrow"))).read_all().column("tile").to_numpy()
    assert len(keys) > 3 and pq.ParquetFile(folder / "cells.parquet").num_row_groups > 3
    for start in (int(keys[0]), int(keys[1]), int(keys[len(keys) // 2]), int(keys[-1])):
        late, whole = publish._Previous.open(folder, salt, start), publish._Previous.open(folder, salt)
        assert all(f.height == 0 for f in late.take(start, keys))
        whole.take(start, keys)
        end, wanted = int(keys[-1]) + 1, keys[keys >= start][::2]
        assert all(a.equals(b) for a, b in zip(late.take(end, wanted), whole.take(end, wanted), strict=True))
    for z in mine:
        # a zoom the shards chose is the sum of their parts: every tile in exactly one shard
        assert summary[z].tiles == sum(s.tiles for c in chosen for s in c if s.z == z) > 0
        assert summary[z].cells == sum(s.cells for c in chosen for s in c if s.z == z)
    assert all(c.holds for c in publish.check_selection(first))
    # put together: the shards' parts are gone, and putting them together again asks for them
    assert not any(first.work.shards_root.glob("*/selected"))
    with pytest.raises(PublishError, match="shard 0 of pts has not chosen its tiles"):
        publish.select_tileset(first)

    # the next build over the same reports, in 2 shards: every shard takes each of its tiles from the last
    # build, wherever its key range starts (the sharding does not change a selection)
    second = build.split(replace(first, settings=first.settings.model_copy(update={"shards": 2})))
    plan.write(second)
    build.score_tileset(second)
    build.build_cells(second)
    for i in range(2):
        for s in publish.read_shard_selection(second, i):
            assert s.reused == s.tiles
    later = replace(second, as_of=AS_OF.replace(hour=13))  # another build's plan
    with pytest.raises(PublishError, match="shard 0 of pts chose its tiles for another plan"):
        publish.select_tileset(later)
    again = publish.select_tileset(second)  # the failed step kept the last build's selection to take from
    assert [s._replace(reused=0, parts=()) for s in again] == [s._replace(parts=()) for s in summary.values()]
    assert all(s.reused == s.tiles for s in again if s.z > first.settings.overview_maxzoom)
    # what each shard took from the last build, read from where its range begins, is what it had chosen
    assert _selected_contents(selected) == chosen_files


def _selected_contents(selected: Path) -> dict[str, object]:
    """A build's selection: the published cells' bytes, the features' rows (their parts follow the shards)."""
    out: dict[str, object] = {}
    for path in sorted(selected.rglob("*.parquet")):
        out[str(path.relative_to(selected))] = path.read_bytes()
    for path in sorted(selected.rglob("tile_features.arrow")):
        out[str(path.relative_to(selected))] = pl.concat(publish.read_parts(path)).rows()
    return out


def test_shards_encode_their_own_tiles_and_the_publication_reads_them(write_config, tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "SELECT_PART_CELLS", 40)  # parts: rows strays between a shard's own parts too
    write_points(tmp_path / "pts.csv", seed=8, n=3000, clusters=2)  # shard borders run through clusters
    cfg = config_for(write_config, tmp_path, shards=3, shard_zoom=10)
    run_extraction(cfg)
    first = build.split(plan.make(cfg, "pts", AS_OF))
    plan.write(first)
    build.score_tileset(first)
    build.build_cells(first)
    publish.select_tileset(first)
    # each shard's features whose buffers reach into other shards' tiles were kept for those shards
    zooms = publish.shard_zooms(first)
    shards = [first.work.shard(i) for i in range(3)]
    strays = [f.height for z in zooms for s in shards if s.strays(z).exists() for f in publish.read_parts(s.strays(z))]
    assert sum(strays) > 0
    done = [publish.encode_shard(first, i) for i in range(3)]
    assert sum(1 for d in done if d["zooms"] and d["encoded"]) >= 2  # more than one shard encoded tiles
    seen: dict[int, set] = {}
    for i in range(3):
        for zoom in done[i]["zooms"]:
            z = zoom["z"]
            batches = vector.encoded_batches(vector.TileCache.zoom_file(first.work.shard_tile_cache(i), z))
            tiles = pl.concat([_keys(vector.encoded_of(b, z)) for b in batches])
            lo, hi = publish.shard_range(first, i, z)
            assert tiles.height == zoom["tiles"] and tiles["key"].is_between(lo, hi, closed="left").all()
            assert not seen.setdefault(z, set()) & set(tiles["key"])  # a tile is one shard's
            seen[z] |= set(tiles["key"])
    # the publication needs every shard's tiles, for this plan
    first.work.shard(1).encoding.unlink()
    with pytest.raises(PublishError, match="shard 1 of pts has not encoded its tiles"):
        publish.stage_snapshot(first)
    publish.encode_shard(first, 1)
    with pytest.raises(PublishError, match="shard 0 of pts encoded its tiles for another plan"):
        publish.stage_snapshot(replace(first, as_of=AS_OF.replace(hour=13)))
    staged = publish.stage_snapshot(first)
    for zoom in staged["zooms"]:
        if zoom["z"] in seen:  # every tile of a zoom the shards encoded is in the archive, none twice
            assert zoom["mvt_tiles"] == len(seen[zoom["z"]])
    # again, nothing changed: every tile comes from its shard's tile cache
    again = [publish.encode_shard(first, i) for i in range(3)]
    assert sum(d["encoded"] for d in again) == 0
    assert sum(d["reused"] for d in again) == sum(len(keys) for keys in seen.values())


def _keys(tiles: vector.Encoded) -> pl.DataFrame:
    """The Morton keys (``key``) of encoded tiles."""
    xy = pl.DataFrame({"x": tiles.x, "y": tiles.y}).cast(pl.UInt64)
    return xy.select(tilemath.morton(pl.col("x"), pl.col("y")).alias("key"))
