"""The cell pyramid: conservation, centroids, a brute-force twin per profile, GeoParquet files."""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path

import mercantile
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import build, duck, pyramid, scoring, warehouse
from pipeline.config import Tileset, load_config
from pipeline.plan import resolve
from pipeline.profiles import WEATHER

from .conftest import AS_OF, plan_for, plan_of, run_extraction

MAX_LAT = 85.0511287798066


def _scored(points):
    return pl.DataFrame(
        {
            "lat": [p[1] for p in points],
            "lng": [p[0] for p in points],
            "observed_at": [AS_OF - timedelta(hours=p[3]) for p in points],
            "category": [p[4] for p in points],
            "weight": [p[2] for p in points],
            "severity_boost": [p[2] for p in points],
            "decay": [1.0] * len(points),
        },
        schema_overrides={"observed_at": pl.Datetime("us", "UTC"), "category": pl.String},
    )


point = st.tuples(
    st.floats(-180, 180, allow_nan=False),
    st.floats(-MAX_LAT, MAX_LAT, allow_nan=False),
    st.floats(0, 1e6, allow_nan=False),
    st.integers(0, 1000),
    st.sampled_from(["a", "b", "c", None]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(point, min_size=1, max_size=60),
    st.integers(0, 6),
    st.integers(0, 8),
    st.integers(1, 8),
)
def test_every_zoom_conserves_reports_and_weight_and_centroids_stay_inside(points, minzoom, span, detail):
    scored = _scored(points)
    profile, _ = resolve(Tileset(source="s"))
    levels = list(pyramid.build(scored, profile, minzoom, minzoom + span, detail))
    assert [f.get_column("z")[0] for f in levels] == list(range(minzoom + span, minzoom - 1, -1))
    total = sum(p[2] for p in points)
    for frame in levels:
        z = frame.get_column("z")[0]
        assert frame.get_column("report_count").sum() == len(points)
        assert math.isclose(frame.get_column("weight").sum(), total, rel_tol=1e-9, abs_tol=1e-9)
        assert frame.get_column("quadkey").is_sorted() and frame.get_column("quadkey").is_unique().all()
        for cell in frame.iter_rows(named=True):
            tile = mercantile.quadkey_to_tile(cell["quadkey"])
            b = mercantile.bounds(tile)
            assert b.west <= cell["lng"] <= b.east and b.south <= cell["lat"] <= b.north
            assert (cell["tile_x"], cell["tile_y"]) == (tile.x >> detail, tile.y >> detail)
            assert 0.0 <= cell["intensity"] <= 1.0
        assert frame.get_column("quadkey").str.len_chars().unique().to_list() == [z + detail]
    # zoom z is the roll-up of zoom z + 1
    for child, parent in zip(levels, levels[1:]):
        rolled = (
            child.group_by(pl.col("quadkey").str.slice(0, child.get_column("quadkey").str.len_chars()[0] - 1))
            .agg(pl.col("report_count").sum())
            .sort("quadkey")
        )
        assert rolled.rows() == parent.select("quadkey", "report_count").rows()


def _expected_tops(scored: pl.DataFrame, level: int) -> dict[str, str | None]:
    """Per cell at ``level``: the category with most reports, ties to the first name (None: only nulls)."""
    keyed = scored.with_columns(
        (pl.col("tile_key") // (1 << 2 * (30 - level))).alias("key"), pl.col("category").fill_null("\uffff")
    )
    counts = (
        keyed.group_by("key", "category")
        .agg(pl.len().alias("n"))
        .sort(["key", "n", "category"], descending=[False, True, False])
    )
    first = counts.group_by("key", maintain_order=True).first()
    return {k: (c if c != "\uffff" else None) for k, c in first.select("key", "category").iter_rows()}


def test_category_counts_roll_up_exactly_through_every_lane_width():
    """Category counts live in 8-, 16- or 32-bit lanes added as 64-bit words, widened before a count outgrows them."""
    from pipeline.tilemath import tile_key

    # a finest cell of 401 reports (16-bit lanes from the start), tied cells, a cell of only
    # uncategorised reports, and 70,000 reports of "c" spread over cells of 250 (the roll-up
    # passes 65,535 reports in a cell: 32-bit lanes)
    groups = [(0.001, 0.001, "a", 200), (0.001, 0.001, "b", 201), (0.01, 0.01, "b", 5), (0.01, 0.01, "a", 5)]
    groups += [(0.02, 0.02, None, 7), (0.02, 0.03, None, 3), (0.02, 0.03, "c", 3)]
    groups += [(0.05 + 0.001 * (i % 20), 0.05 + 0.001 * (i // 20), "c", 250) for i in range(280)]
    points = [(lng, lat, 1.0, 0, cat) for lng, lat, cat, n in groups for _ in range(n)]
    scored = _scored(points).with_columns(tile_key(pl.col("lng"), pl.col("lat")).alias("tile_key"))
    profile, _ = resolve(Tileset(source="s"))
    widths, level = [], pyramid.finest(scored, profile, 20)
    for z in range(14, -1, -1):
        level = level if z == 14 else level.parent()
        widths.append(level.category_counts.dtype.itemsize)
        assert level.category_counts.sum() == len(points)  # each report in one lane: its category's or "none"
    assert widths[0] == 2 and widths[-1] == 4 and widths == sorted(widths)
    for frame, last in pyramid.roll_up(pyramid.finest(scored, profile, 20), 14, 0, 6, profile):
        got = dict(zip(frame.get_column("cell_key").to_list(), frame.get_column("top_category").to_list()))
        assert got == _expected_tops(scored, frame.get_column("z")[0] + 6)
        assert (last is None) == (frame.get_column("z")[0] > 0)  # only the last zoom's level comes with its frame
    assert last.key.tolist() == level.key.tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([0, 1, 2, 3, 7, 14, 15, 16, 64, 65, 300]),
    st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]),
    st.integers(1, 40),
    st.randoms(use_true_random=False),
)
def test_top_category_is_the_first_of_the_most_reported_whatever_the_lanes(categories, lane, cells, rnd):
    """The packed-word maximum per lane picks what argmax along each row would: most reports, ties to the
    first name, "none" when every report lacks a category; at full lanes too, and past 64 categories."""
    counts = pyramid._lanes(cells, categories, np.dtype(lane))
    top = np.iinfo(lane).max if lane is not np.uint64 else 1 << 62
    for c in range(cells):
        for k in range(categories + 1):
            counts[c, k] = rnd.choice([0, 0, 1, 2, 3, top, top - 1])
    report_count = counts[:, : categories + 1].astype(np.float64).sum(axis=1)
    named = report_count > counts[:, categories]
    expected = np.where(named, np.argmax(counts[:, :categories], axis=1) if categories else 0, categories)
    # names short enough for an Arrow view to hold, and longer ones it points to
    names = [f"c{i}" if i % 2 else f"category-{i:04d}-named-at-length" for i in range(categories)]
    got = pyramid._top_categories(counts, names, report_count)
    got.to_arrow().validate(full=True)
    assert got.to_list() == [names[i] if i < categories else None for i in expected]


def test_reports_in_key_order_are_not_sorted_and_give_the_cells_a_sort_would(monkeypatch):
    """Reports in the warehouse's tile-key order are taken where they lie; in any other order they are
    sorted by cell, stably: the same bits when that puts each cell's reports in the same order."""
    from pipeline.tilemath import tile_key

    points = [
        (-0.1 + 0.0007 * (i % 37), 51.5 + 0.0003 * (i % 53), 1.0 + i % 7 / 3, i % 50, "abc"[i % 3]) for i in range(3000)
    ]
    scored = _scored(points).with_columns(tile_key(pl.col("lng"), pl.col("lat")).alias("tile_key"))
    in_order = scored.sort("tile_key", maintain_order=True)
    profile, _ = resolve(Tileset(source="s"))
    found, nondecreasing = [], pyramid._nondecreasing
    monkeypatch.setattr(pyramid, "_nondecreasing", lambda v, s=0: found.append(nondecreasing(v, s)) or found[-1])
    fast = list(pyramid.build(in_order, profile, 8, 14, 6))
    # each cell's reports in the order above, the cells in another order: a sort puts them back
    cells_reversed = in_order.sort(pl.col("tile_key") // 4**10, descending=True, maintain_order=True)
    slow = list(pyramid.build(cells_reversed, profile, 8, 14, 6))
    assert found == [True, False]  # in order: no sort; the cells reversed: sorted
    assert all(a.equals(b) for a, b in zip(fast, slow, strict=True))
    # and the sort was needed: taken as they lie, the cells come out of order
    monkeypatch.setattr(pyramid, "_nondecreasing", lambda v, s=0: True)
    unsorted = pyramid.finest(cells_reversed, profile, 20).key
    assert len(unsorted) == len(fast[0]) and np.all(unsorted[1:] < unsorted[:-1])


# --- an independent brute-force twin, per profile ----------------------------


def _brute_weights(profile_name: str, rows: list[dict]) -> list[dict]:
    """Scored points, computed in plain Python from the seeds' formulas."""
    out = []
    for r in rows:
        if not r["is_public"] or r["observed_at"] > AS_OF or (r["expires_at"] and r["expires_at"] <= AS_OF):
            continue
        age = max((AS_OF - r["observed_at"]).total_seconds() / 86400, 0.0)
        sev = r["severity"]
        if profile_name == "road_conditions":
            if age >= 90 or not 1 <= sev <= 3:
                continue
            half_life = 1.5 if r["category"] in WEATHER else 7.0
            decay, boost = 0.5 ** (age / half_life), sev
        elif profile_name == "campus_issues":  # preset overview: 30 days, factor 0.5
            if age >= 30 or not 1 <= sev <= 10:
                continue
            decay = math.exp(-0.5 * min(age / 90, 1))
            boost = sev / 10 * {"CRITICAL": 4, "HIGH": 2.5, "MEDIUM": 1.5, "LOW": 1}.get(r["priority"], 1)
        elif profile_name == "rail_disruptions":
            decay, boost = 1.0, (r["cancellations"] or 0) + (r["delays"] or 0)
        elif profile_name == "generic":
            decay, boost = 1.0, sev
        else:  # community_needs
            decay, boost = 1.0, {"urgent": 10, "notice": 5, "info": 1}.get(r["category"], 1)
        out.append({**r, "weight": boost * decay, "boost": boost, "decay": decay})
    if profile_name == "community_needs":
        entities = defaultdict(list)
        for p in out:
            entities[(p["entity_type"], p["entity_id"], p["lat"], p["lng"])].append(p)
        out = [
            {
                **max(notes, key=lambda p: (p["weight"], [-ord(c) for c in p["category"]])),
                "observed_at": max(p["observed_at"] for p in notes),
            }
            for notes in entities.values()
        ]
    return out


def _brute_cells(points: list[dict], profile_name: str, z: int, detail: int) -> dict[str, dict]:
    groups = defaultdict(list)
    for p in points:
        groups[mercantile.quadkey(mercantile.tile(p["lng"], p["lat"], z + detail))].append(p)
    cells = {}
    for qk, members in groups.items():
        n = len(members)
        weight = sum(p["weight"] for p in members)
        if profile_name == "campus_issues":
            score = n * (1 + sum(p["boost"] for p in members) / n * 2.0) * (sum(p["decay"] for p in members) / n)
        elif profile_name == "road_conditions":
            score = weight / n  # seed 001's avg_score
        else:
            score = weight
        counts = Counter(p["category"] for p in members if p["category"] is not None)
        top = min(counts, key=lambda c: (-counts[c], c)) if counts else None
        cells[qk] = {
            "report_count": n,
            "weight": weight,
            "score": score,
            "top_category": top,
            "lng": sum(p["lng"] for p in members) / n,
            "lat": sum(p["lat"] for p in members) / n,
            "max_weight": max(p["weight"] for p in members),
            "first_seen": min(p["observed_at"] for p in members),
            "last_seen": max(p["observed_at"] for p in members),
        }
    scores = [c["score"] for c in cells.values()]
    lo, hi = min(scores), max(scores)
    for c in cells.values():
        if profile_name == "campus_issues":
            c["intensity"] = (c["score"] - lo) / (hi - lo) if hi > lo else (1.0 if hi > 0 else 0.0)
        else:
            c["intensity"] = c["score"] / hi if hi > 0 else 0.0
    return cells


@pytest.mark.parametrize(
    ("domain", "profile_name", "extra"),
    [
        ("road_conditions", "road_conditions", {}),
        ("campus_issues", "campus_issues", {"preset": "overview"}),
        ("rail_disruptions", "rail_disruptions", {}),
        ("community_needs", "community_needs", {}),
        ("road_conditions", "generic", {}),
    ],
)
def test_pyramid_matches_a_brute_force_computation(extract_config, domain, profile_name, extra):
    src = {
        "kind": "synthetic",
        "domain": domain,
        "count": 3000,
        "seed": 11,
        "days": 100,
        "bbox": [-74.05, 40.65, -73.85, 40.8],
    }
    cfg, _, _ = extract_config(
        {"sources": {"s": src}, "tilesets": {"t": {"source": "s", "profile": profile_name, **extra}}}
    )
    with warehouse.reader(cfg.warehouse_path) as con:
        rows = con.execute("SELECT * FROM reports").pl().to_dicts()
    profile, filters = resolve(cfg.tilesets["t"])
    result = scoring.score_reports(build.read_reports(cfg.warehouse_path, "s"), profile, filters, AS_OF)
    brute = _brute_weights(profile_name, rows)
    assert result.scored.height == len(brute) > 100
    levels = {f.get_column("z")[0]: f for f in pyramid.build(result.scored, profile, 8, 13, 6)}
    for z in (13, 11, 8):
        expected = _brute_cells(brute, profile_name, z, 6)
        got = {c["quadkey"]: c for c in levels[z].iter_rows(named=True)}
        assert got.keys() == expected.keys()
        for qk, e in expected.items():
            g = got[qk]
            assert g["report_count"] == e["report_count"] and g["top_category"] == e["top_category"], qk
            for key in ("weight", "score", "intensity", "max_weight"):
                assert g[key] == pytest.approx(e[key], rel=1e-9, abs=1e-9), (qk, key)
            for key in ("lng", "lat"):  # the mean, at the nearest point of the grid
                assert g[key] * pyramid.GRID == round(g[key] * pyramid.GRID), (qk, key)
                assert abs(g[key] - e[key]) <= 0.5 / pyramid.GRID + 1e-12, (qk, key)
            seconds = [t.replace(microsecond=0) for t in (e["first_seen"], e["last_seen"])]
            assert [g["first_seen"], g["last_seen"]] == seconds


# --- the files ---------------------------------------------------------------


def test_the_top_cells_are_the_highest_scores_ties_by_quadkey(write_config):
    src = {"kind": "synthetic", "domain": "road_conditions", "count": 50}
    cfg = load_config(
        write_config({"sources": {"r": src}, "tilesets": {"r": {"source": "r", "profile": "road_conditions"}}})
    )
    run_extraction(cfg)
    frozen = plan_for(cfg, "r", AS_OF)
    quadkeys = ["0331", "0123", "0002", "0213", "0100", "0300", "0032"]
    scores = [2.0, 3.0, 2.0, 1.0, 3.0, 2.0, 0.0]  # ties: the smaller quadkey first
    cells = pl.DataFrame(
        {"quadkey": quadkeys, "report_count": range(7), "score": scores, "top_category": "x", "lng": 0.0, "lat": 0.0}
    )
    path = frozen.work.cells(frozen.settings.maxzoom)
    path.parent.mkdir(parents=True)
    cells.write_parquet(path, row_group_size=2)
    top = build.top_cells(frozen, 4)
    assert [(c["score"], c["quadkey"]) for c in top] == [(3.0, "0100"), (3.0, "0123"), (2.0, "0002"), (2.0, "0300")]
    assert top[0] == {"quadkey": "0100", "report_count": 4, "score": 3.0, "top_category": "x", "lng": 0.0, "lat": 0.0}
    assert len(build.top_cells(frozen, 10)) == 7


def test_cells_are_geoparquet_readable_by_duckdb_spatial_and_pyarrow(write_config):
    src = {"kind": "synthetic", "domain": "campus_issues", "count": 4000, "bbox": [-122.19, 37.42, -122.15, 37.44]}
    cfg = load_config(
        write_config(
            {
                "sources": {"campus": src},
                "tilesets": {"campus": {"source": "campus", "profile": "campus_issues", "maxzoom": 16}},
            }
        )
    )
    run_extraction(cfg)
    build.score_tileset(plan_for(cfg, "campus", AS_OF))
    zooms = build.build_cells(plan_of(cfg, "campus"))
    assert [z.z for z in zooms] == list(range(0, 17))
    assert all(r.holds for r in build.check_pyramid(plan_of(cfg, "campus")))
    path = cfg.work("campus").cells(16)
    assert path.parent.name == "zoom=16"
    # the materialization's top cells: the highest scores, ties by quadkey
    shown = ["quadkey", "report_count", "score", "top_category", "lng", "lat"]
    rows = pq.read_table(path, columns=shown).to_pylist()
    assert build.top_cells(plan_of(cfg, "campus"), 5) == sorted(rows, key=lambda r: (-r["score"], r["quadkey"]))[:5]

    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["geometry_types"] == ["Point"]
    west, south, east, north = geo["columns"]["geometry"]["bbox"]
    assert -122.19 <= west <= east <= -122.15 and 37.42 <= south <= north <= 37.44
    assert table.column("quadkey").to_pylist() == sorted(table.column("quadkey").to_pylist())
    for column in (
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
        "severity_boost_sum",
        "decay_sum",
    ):
        assert column in table.column_names, column

    with duck.connect() as con:
        rows = con.execute(
            "SELECT count(*), bool_and(ST_X(geometry) = lng AND ST_Y(geometry) = lat), "
            "any_value(ST_GeometryType(geometry)) FROM read_parquet(?)",
            [str(path)],
        ).fetchone()
    assert rows == (zooms[-1].cells, True, "POINT")
    # each column encoded for what it holds (smaller under zstd); points need no bbox covering column
    group = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {c: group.column(table.column_names.index(c)).encodings for c in ("weight", "last_seen", "quadkey")}
    assert "BYTE_STREAM_SPLIT" in encodings["weight"] and "DELTA_BINARY_PACKED" in encodings["last_seen"]
    assert "DELTA_BYTE_ARRAY" in encodings["quadkey"] and "bbox" not in table.column_names
    # positions on the grid, times to the second: what makes those columns small
    lng, lat = (table.column(c).to_numpy() * pyramid.GRID for c in ("lng", "lat"))
    assert (lng == lng.round()).all() and (lat == lat.round()).all()
    assert all(t.microsecond == 0 for t in table.column("first_seen").to_pylist())

    # the check reads each zoom back: a zoom that lost a cell, or whose centroid left its cell, fails alone
    frozen = plan_of(cfg, "campus")
    pq.write_table(pq.read_table(frozen.work.cells(9)).slice(1), frozen.work.cells(9))
    moved = pq.read_table(frozen.work.cells(12))
    moved = moved.set_column(moved.column_names.index("lng"), "lng", pa.array([180.0] * moved.num_rows))
    pq.write_table(moved, frozen.work.cells(12))
    rows = build.check_pyramid(frozen)
    assert [r.z for r in rows] == list(frozen.zooms)
    assert [r.z for r in rows if not r.holds] == [9, 12]
    assert rows[9].reports < rows[9].expected_reports and rows[9].centroids_inside
    assert rows[12].reports == rows[12].expected_reports and not rows[12].centroids_inside


@settings(max_examples=300, deadline=None)
@given(
    st.floats(-180, 180),
    st.floats(-180, 180),
    st.floats(0, 1e-3),
)
def test_a_centroid_goes_to_the_nearest_grid_point_inside_its_cell(v, lo, width):
    hi = lo + width
    got = float(pyramid.on_grid(np.array([v]), np.array([lo]), np.array([hi]))[0])
    assert lo <= got <= hi
    inside = [k / pyramid.GRID for k in range(math.ceil(lo * pyramid.GRID), math.floor(hi * pyramid.GRID) + 1)]
    if inside:  # the grid point inside nearest to the mean (clipped into the cell)
        held = min(max(v, lo), hi)
        assert got in inside and abs(got - held) == min(abs(p - held) for p in inside)
    else:
        assert got == min(max(v, lo), hi)


def test_empty_tileset_builds_no_cells_and_checks_hold(write_config):
    src = {"kind": "synthetic", "domain": "road_conditions", "count": 500, "days": 30}
    cfg = load_config(
        write_config(
            {
                "sources": {"r": src},
                "tilesets": {
                    "r": {"source": "r", "profile": "road_conditions", "filters": {"activities": ["skating"]}}
                },
            }
        )
    )
    run_extraction(cfg)
    result = build.score_tileset(plan_for(cfg, "r", AS_OF))
    assert result.scored == 0 and result.excluded["filtered_out"] > 0
    assert build.build_cells(plan_of(cfg, "r")) == []
    assert all(r.holds for r in build.check_pyramid(plan_of(cfg, "r")))


def test_determinism_same_input_same_bytes(write_config, tmp_path):
    src = {"kind": "synthetic", "domain": "rail_disruptions", "count": 2000}
    cfg = load_config(
        write_config(
            {"sources": {"r": src}, "tilesets": {"r": {"source": "r", "profile": "rail_disruptions", "maxzoom": 10}}}
        )
    )
    run_extraction(cfg)
    digests = []
    for _ in range(2):
        build.score_tileset(plan_for(cfg, "r", AS_OF))
        build.build_cells(plan_of(cfg, "r"))
        digests.append(
            {p.name + p.parent.name: p.read_bytes() for p in (cfg.work("r").root / "cells").rglob("*.parquet")}
        )
    assert digests[0] == digests[1] and len(digests[0]) == 11


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 700),
    cuts=st.lists(st.integers(0, 700), max_size=6),
    row_group=st.sampled_from([1, 64, 300, 128 * 1024]),
)
def test_geoparquet_written_in_parts_is_the_file_written_whole(tmp_path_factory, monkeypatch, rows, cuts, row_group):
    from pipeline import geoparquet

    monkeypatch.setattr(geoparquet, "ROW_GROUP", row_group)
    tmp = tmp_path_factory.mktemp("gpq")
    frame = pl.DataFrame(
        {
            "quadkey": [f"{i:012d}" for i in range(rows)],
            "lng": [(i * 7919 % 3600) / 10 - 180 for i in range(rows)],
            "lat": [(i * 104729 % 1700) / 10 - 85 for i in range(rows)],
            "z": pl.Series([i % 3 for i in range(rows)], dtype=pl.Int32),
            "top_category": [("ice", "pothole", None)[i % 3] for i in range(rows)],
        }
    )
    size = geoparquet.write(frame, tmp / "whole.parquet")
    bounds = sorted({0, rows, *(c for c in cuts if c <= rows)})
    with geoparquet.writing(tmp / "parts.parquet", geoparquet.extent(frame)) as out:
        for a, b in zip(bounds, bounds[1:]) if rows else [(0, 0)]:
            out.write(frame.slice(a, b - a))
    assert (tmp / "parts.parquet").read_bytes() == (tmp / "whole.parquet").read_bytes()
    assert size == (tmp / "whole.parquet").stat().st_size
    back = pq.read_table(tmp / "whole.parquet")
    bbox = json.loads(back.schema.metadata[b"geo"])["columns"]["geometry"]["bbox"]
    assert bbox == (geoparquet.extent(frame) if rows else [])
    assert pl.from_arrow(back).drop("geometry").equals(frame)
    expected_groups = -(-rows // row_group) if rows else 0
    assert pq.ParquetFile(tmp / "whole.parquet").metadata.num_row_groups == expected_groups


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(point, min_size=1, max_size=80),
    st.integers(0, 5),
    st.integers(1, 12),
    st.sampled_from(["generic", "campus_issues", "rail_disruptions"]),
    st.data(),
)
def test_an_overview_chosen_in_parts_is_the_one_chosen_whole(points, z, budget, profile_name, data):
    """Pass by pass over contiguous parts (in key order), the overview's choice and features are the whole zoom's."""
    from pipeline import select

    profile, _ = resolve(Tileset(source="s", profile=profile_name))
    detail, strata_detail = 3, 2
    scored = _scored(points)
    if profile_name == "rail_disruptions":  # its stratum's best cell is the busiest
        scored = scored.with_columns(pl.Series("departures", [float(p[3] % 7) for p in points]))
    (cells,) = pyramid.build(scored, profile, z, z, detail)
    common = dict(z=z, detail=detail, strata_detail=strata_detail, representative=profile.representative)
    whole = select.choose(cells, budget=budget, group_zoom=0, **common)
    expected = select.features(cells, whole, profile)

    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(cells.height - 1, 1)), max_size=6))))
    parts = [cells.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, cells.height]) if b > a]
    overview = select.Overview(**common, budget=budget)
    for part in parts:
        overview.count(part)
    for part in parts:
        overview.consider(part)
    overview.decide()
    choices = [overview.choice(part) for part in parts]
    for part, choice in zip(parts, choices):
        overview.add(part, choice)
    assert overview.stratum_zoom == int(whole.get_column("stratum_zoom").min())
    assert pl.concat(choices).equals(whole)
    assert overview.features(profile).equals(expected)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(point, min_size=1, max_size=120),
    st.integers(0, 5),
    st.integers(1, 12),
    st.sampled_from(["generic", "rail_disruptions"]),
)
def test_tiles_within_budget_take_the_short_way_to_the_general_cases_choice(points, z, budget, profile_name):
    """``choose`` keeps every cell of a tile of at most ``budget`` cells without the general case's
    windows and sorts; the choice and the features are the general case's, to the bit, whatever the
    mix of small and large tiles."""
    from pipeline import select

    profile, _ = resolve(Tileset(source="s", profile=profile_name))
    detail, strata_detail = 3, 2
    scored = _scored(points)
    if profile_name == "rail_disruptions":
        scored = scored.with_columns(pl.Series("departures", [float(p[3] % 7) for p in points]))
    (cells,) = pyramid.build(scored, profile, z, z, detail)
    common = dict(z=z, detail=detail, strata_detail=strata_detail, budget=budget, group_zoom=z)
    quick = select.choose(cells, **common, representative=profile.representative)
    level = z + detail
    general = select._choose(cells, level, min(z + strata_detail, level), budget, z, profile.representative, None)
    assert quick.equals(general)
    assert quick.get_column("chosen").all() == bool(
        cells.group_by(pl.col("cell_key") // 4**detail).len()["len"].max() <= budget
    )

    # features: only the cells others fold into are added up, the rest keep their own aggregates
    own = select._chosen_cells(cells, general).sort("cell_key")
    everything = select._with_sums(own, select._folded_sums(select._folded_cells(cells, general)), profile)
    assert select.features(cells, quick, profile).equals(everything)


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): ``hblkhd`` is the bytes of blocks mapped on their own."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def test_after_the_pyramid_arrays_under_8_mib_are_served_from_the_heap():
    """Leaving ``reusing_memory`` does not leave glibc's mmap threshold at 128 KiB for the rest of the
    process (mallopt stops it sliding up): 4 MiB arrays are not mappings of their own, even once the
    heap's free blocks are used up and it has to grow."""
    libc = pyramid._libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc 2.33 or later: no mallinfo2 to tell a mapped block")
    libc.mallinfo2.restype = _Mallinfo2
    with pyramid.reusing_memory():
        pass
    size = 4 << 20
    count = libc.mallinfo2().fordblks // size + 16  # free blocks serve a request first, whatever its size
    before = libc.mallinfo2().hblkhd
    blocks = [np.empty(size, np.uint8) for _ in range(count)]  # empty: no page is touched
    mapped = libc.mallinfo2().hblkhd - before
    del blocks
    assert mapped < size


def test_memory_kept_while_the_pyramid_is_built_is_given_back_after():
    """Inside ``reusing_memory`` a freed array's pages stay the process's (the next zoom reuses them); after
    it, they are returned, so the steps that follow start from what is live."""
    if pyramid._libc() is None:
        pytest.skip("not glibc: reusing_memory changes nothing")
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    size = 256 << 20
    with pyramid.reusing_memory():
        with pyramid.reusing_memory():  # nested: the outer one decides
            block = np.ones(size, np.uint8)
            del block
        kept = rss()
        block = np.ones(size, np.uint8)  # the same pages again: the process does not grow
        assert rss() - kept < size // 4
        del block
        assert rss() >= kept - size // 4
    assert rss() < kept - size // 2
