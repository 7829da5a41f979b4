"""Each validation rule, with a real bad row in a real file, read into a real DuckDB warehouse."""

from __future__ import annotations

import csv
import json
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import extract, warehouse
from pipeline.validate import REASONS, rate_limit_excess

from .conftest import AS_OF

HEADER = ["id", "lat", "lng", "t", "sev", "up", "dep", "pub", "tok", "desc", "exp"]
GOOD = {
    "id": "ok",
    "lat": "40.7",
    "lng": "-73.9",
    "t": "2026-10-30T10:00:00Z",
    "sev": "2",
    "up": "1",
    "dep": "",
    "pub": "true",
    "tok": "",
    "desc": "fine",
    "exp": "",
}
MAPPING = {
    "report_id": "id",
    "lat": "lat",
    "lng": "lng",
    "observed_at": "t",
    "severity": "sev",
    "upvotes": "up",
    "departures": "dep",
    "is_public": "pub",
    "session_token": "tok",
    "description": "desc",
    "expires_at": "exp",
}

# report id -> (field overrides, expected reason or None for valid)
CASES = {
    "ok": ({}, None),
    "blank-id": ({"id": "  "}, "missing_report_id"),
    "no-lat": ({"lat": ""}, "missing_coordinates"),
    "text-lat": ({"lat": "forty"}, "non_numeric_coordinates"),
    "nan-lat": ({"lat": "NaN"}, "nan_coordinates"),
    "inf-lng": ({"lng": "Infinity"}, "infinite_coordinates"),
    "overflow-lng": ({"lng": "1e999"}, "infinite_coordinates"),
    "lat-91": ({"lat": "91"}, "latitude_out_of_range"),
    "lng-181": ({"lng": "-181"}, "longitude_out_of_range"),
    "lat-85.1": ({"lat": "85.1"}, "outside_mercator"),
    "lat-85.05": ({"lat": "-85.05"}, None),
    "no-time": ({"t": ""}, "missing_timestamp"),
    "bad-time": ({"t": "31/31/2026"}, "unparseable_timestamp"),
    "inf-time": ({"t": "infinity"}, "unparseable_timestamp"),
    "future": ({"t": "2026-11-02T12:30:00Z"}, "future_timestamp"),
    "near-future": ({"t": "2026-11-02T11:30:00Z"}, None),
    "epoch-s": ({"t": "1793000000"}, None),
    "epoch-ms": ({"t": "1793000000000"}, None),
    "zoned": ({"t": "2026-10-30T10:00:00+05:00"}, None),
    "bad-expiry": ({"exp": "never"}, "unparseable_expires_at"),
    "expired": ({"exp": "2026-10-01T00:00:00Z"}, None),  # excluded at scoring, not rejected
    "no-sev": ({"sev": ""}, "missing_severity"),
    "text-sev": ({"sev": "high"}, "non_numeric_severity"),
    "neg-up": ({"up": "-1"}, "invalid_upvotes"),
    "frac-up": ({"up": "1.5"}, "invalid_upvotes"),
    "neg-dep": ({"dep": "-3"}, "invalid_metric"),
    "bad-pub": ({"pub": "maybe"}, "invalid_is_public"),
    "private": ({"pub": "no"}, None),  # kept; never published
    "desc-281": ({"desc": "x" * 281}, "description_too_long"),
    "desc-280": ({"desc": "x" * 280}, None),
}


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, HEADER)
        w.writeheader()
        w.writerows(rows)


def _csv_source(path, **extra):
    return {"kind": "file", "path": str(path), "format": "csv", "columns": dict(MAPPING), **extra}


def _rows(cfg, sql, *params):
    with warehouse.reader(cfg.warehouse_path) as con:
        return con.execute(sql, list(params)).fetchall()


def test_every_rule_with_a_real_bad_row(tmp_path, extract_config):
    rows = [{**GOOD, "id": rid, **over} for rid, (over, _) in CASES.items()]
    rows.append({**GOOD, "lat": "41.0"})  # duplicate of "ok": the first is kept
    _write_csv(tmp_path / "reports.csv", rows)
    cfg, staged, validated = extract_config({"sources": {"s": _csv_source(tmp_path / "reports.csv")}})

    result = validated["s"]
    assert result.read == len(rows) == staged["s"][0].rows
    assert result.read == result.valid + result.rejected_total

    got = dict(_rows(cfg, "SELECT row_number, reason FROM rejected_reports"))
    expected = {i + 1: reason for i, (_, reason) in enumerate(CASES.values()) if reason}
    expected[len(rows)] = "duplicate_report_id"
    assert got == expected

    valid = {r[0] for r in _rows(cfg, "SELECT report_id FROM reports")}
    assert valid == {f"s:{rid}" for rid, (_, reason) in CASES.items() if reason is None}
    assert _rows(cfg, "SELECT lat FROM reports WHERE report_id = 's:ok'") == [(40.7,)]


def test_values_are_typed_and_times_are_utc(tmp_path, extract_config):
    rows = [{**GOOD, "id": rid, **CASES[rid][0]} for rid in ("zoned", "epoch-ms", "private", "expired")]
    _write_csv(tmp_path / "r.csv", rows)
    cfg, _, _ = extract_config({"sources": {"s": _csv_source(tmp_path / "r.csv")}})
    got = {
        r[0]: r[1:]
        for r in _rows(
            cfg,
            "SELECT report_id, strftime(observed_at, '%Y-%m-%dT%H:%M:%S'), is_public, expires_at IS NULL, "
            "severity, upvotes FROM reports",
        )
    }
    assert got["s:zoned"] == ("2026-10-30T05:00:00", True, True, 2.0, 1)
    assert got["s:epoch-ms"][0] == "2026-10-26T07:33:20"
    assert got["s:private"][1] is False
    assert got["s:expired"][2] is False


def test_rejected_rows_keep_their_raw_fields(tmp_path, extract_config):
    _write_csv(tmp_path / "r.csv", [{**GOOD, "id": "x", "lat": "forty"}])
    cfg, _, _ = extract_config({"sources": {"s": _csv_source(tmp_path / "r.csv")}})
    [(file, row, rid, reason, fields)] = _rows(
        cfg, "SELECT file, row_number, report_id, reason, fields FROM rejected_reports"
    )
    assert (file, row, rid, reason) == (str(tmp_path / "r.csv"), 1, "x", "non_numeric_coordinates")
    assert json.loads(fields)["lat"] == "forty"


def test_timestamp_formats_are_tried_before_iso(tmp_path, extract_config):
    _write_csv(
        tmp_path / "r.csv",
        [
            {**GOOD, "id": "a", "t": "10/30/2026 7:05"},
            {**GOOD, "id": "b", "t": "2026-10-29"},
            {**GOOD, "id": "c", "t": "30.10.2026"},
        ],
    )
    src = _csv_source(tmp_path / "r.csv", timestamp_format=["%m/%d/%Y %H:%M"])
    cfg, _, v = extract_config({"sources": {"s": src}})
    assert v["s"].rejected == {"unparseable_timestamp": 1}
    got = dict(_rows(cfg, "SELECT report_id, strftime(observed_at, '%Y-%m-%d %H:%M') FROM reports"))
    assert got == {"s:a": "2026-10-30 07:05", "s:b": "2026-10-29 00:00"}


def test_rate_limit_refuses_the_excess_as_the_seed_trigger_would(tmp_path, extract_config):
    start = AS_OF - timedelta(days=1)
    minutes = list(range(35)) + [60, 61]
    rows = [{**GOOD, "id": f"f{m}", "tok": "flood", "t": (start + timedelta(minutes=m)).isoformat()} for m in minutes]
    rows += [{**GOOD, "id": f"calm{i}", "tok": "calm"} for i in range(5)]
    rows += [{**GOOD, "id": f"anon{i}", "tok": ""} for i in range(40)]  # no token: never limited
    _write_csv(tmp_path / "r.csv", rows)
    cfg, _, v = extract_config({"sources": {"s": _csv_source(tmp_path / "r.csv")}})
    limited = {r[0] for r in _rows(cfg, "SELECT report_id FROM rejected_reports WHERE reason = 'rate_limited'")}
    # minutes 30..34 find 30 accepted in the hour before; at 60 and 61 minute 0
    # and 1 have left the window, so they are accepted again.
    assert limited == {f"f{m}" for m in range(30, 35)}
    assert v["s"].valid == len(rows) - 5


def test_rate_limit_can_be_turned_off(tmp_path, extract_config):
    rows = [{**GOOD, "id": f"f{m}", "tok": "flood"} for m in range(40)]
    _write_csv(tmp_path / "r.csv", rows)
    src = _csv_source(tmp_path / "r.csv", rules={"rate_limit_per_hour": None})
    _, _, v = extract_config({"sources": {"s": src}})
    assert v["s"].valid == 40


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.integers(0, 20_000), max_size=120),
    limit=st.integers(1, 6),
    window=st.integers(1, 3_000),
)
def test_rate_limit_excess_matches_trigger_semantics(times, limit, window):
    times = np.sort(np.array(times, dtype=np.int64))
    refused = rate_limit_excess(np.zeros(len(times)), times, limit, window)
    accepted = times[~refused]
    for i, t in enumerate(times):
        # what the trigger counts: accepted rows in (t - window, t] filed before this one
        before = accepted[(accepted > t - window) & (accepted <= t)]
        earlier = np.sum(before < t) + np.sum(before == t) - (0 if refused[i] else 1)
        if refused[i]:
            assert np.sum((accepted > t - window) & (accepted <= t)) >= limit
        else:
            assert earlier < limit


def test_parquet_ndjson_and_typed_columns(tmp_path, extract_config):
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "lat": pa.array([40.7, None, 95.0]),
            "lng": pa.array([-73.9, -73.9, -73.9]),
            "t": pa.array([1.792e12, 1.792e12, 1.792e12]).cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, tmp_path / "r.parquet")
    with open(tmp_path / "r.ndjson", "w") as fh:
        for rec in ({"id": "a", "lat": 40.7, "lng": -73.9, "t": 1792000000}, {"id": "b", "lat": "x", "lng": 1, "t": 1}):
            fh.write(json.dumps(rec) + "\n")
    cols = {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t"}
    cfg, _, v = extract_config(
        {
            "sources": {
                "pq": {"kind": "file", "path": str(tmp_path / "*.parquet"), "format": "parquet", "columns": cols},
                "nd": {"kind": "file", "path": str(tmp_path / "*.ndjson"), "format": "ndjson", "columns": cols},
            }
        }
    )
    assert v["pq"].rejected == {"missing_coordinates": 1, "latitude_out_of_range": 1}
    assert v["nd"].rejected == {"non_numeric_coordinates": 1}
    times = _rows(cfg, "SELECT report_id, strftime(observed_at, '%Y-%m-%d %H:%M:%S') FROM reports ORDER BY 1")
    assert times == [("nd:a", "2026-10-14 17:46:40"), ("pq:a", "2026-10-14 17:46:40")]


def test_geojson_points_give_positions_other_geometries_are_rejected(tmp_path, extract_config):
    def feature(fid, geometry):
        return {"type": "Feature", "properties": {"fid": fid, "when": "2026-10-30T00:00:00Z"}, "geometry": geometry}

    fc = {
        "type": "FeatureCollection",
        "features": [
            feature("pt", {"type": "Point", "coordinates": [-73.9, 40.7]}),
            feature("line", {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}),
            feature("poly", {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}),
            feature("none", None),
            feature("far", {"type": "Point", "coordinates": [10, 89]}),
        ],
    }
    (tmp_path / "r.geojson").write_text(json.dumps(fc))
    src = {
        "kind": "file",
        "path": str(tmp_path / "r.geojson"),
        "format": "geojson",
        "columns": {"report_id": "fid", "observed_at": "when"},
    }
    cfg, _, v = extract_config({"sources": {"g": src}})
    reasons = dict(_rows(cfg, "SELECT report_id, reason FROM rejected_reports"))
    assert reasons == {
        "line": "non_point_geometry",
        "poly": "non_point_geometry",
        "none": "missing_coordinates",
        "far": "outside_mercator",
    }
    assert _rows(cfg, "SELECT lat, lng FROM reports") == [(40.7, -73.9)]
    # the warehouse keeps no geometry: its readers read every table without the spatial extension
    with warehouse.reader(cfg.warehouse_path) as con:
        assert con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'spatial'").fetchall() in (
            [],
            [(False,)],
        )
        tables = [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        assert {"raw_reports", "reports", "rejected_reports", "checked_rows"} <= set(tables)
        for table in tables:
            con.execute(f'SELECT * FROM "{table}"').fetchall()


def test_wkt_geometry_column_and_empty_points(tmp_path, extract_config):
    (tmp_path / "r.csv").write_text(
        "id,t,where\n"
        'a,2026-10-30,"POINT (-73.9 40.7)"\n'
        'b,2026-10-30,"POINT EMPTY"\n'
        'c,2026-10-30,"not wkt"\n'
        'd,2026-10-30,"LINESTRING (0 0, 1 1)"\n'
    )
    src = {
        "kind": "file",
        "path": str(tmp_path / "r.csv"),
        "columns": {"report_id": "id", "observed_at": "t", "geometry": "where"},
    }
    cfg, _, v = extract_config({"sources": {"w": src}})
    assert dict(_rows(cfg, "SELECT report_id, reason FROM rejected_reports")) == {
        "b": "empty_geometry",
        "c": "invalid_geometry",
        "d": "non_point_geometry",
    }


def test_the_spatial_extension_is_loaded_for_the_sources_that_need_it(tmp_path, extract_config):
    from pipeline.config import FileSource, PostgresSource
    from pipeline.sources import needs_spatial

    lat_lng = {"report_id": "id", "lat": "y", "lng": "x"}
    assert not needs_spatial(FileSource(kind="file", path="*.csv", columns=lat_lng))
    assert needs_spatial(FileSource(kind="file", path="*.csv", columns={"geometry": "where"}))
    assert needs_spatial(FileSource(kind="file", path="*.geojson", format="geojson", columns={}))
    assert not needs_spatial(PostgresSource(kind="postgres", database="d", user="u", adapter="road_conditions"))
    by_geometry = {"report_id": "id", "geometry": "g"}
    assert needs_spatial(PostgresSource(kind="postgres", database="d", user="u", table="t", columns=by_geometry))
    # a lat/lng source is staged without it; a writer asked for it has it
    _write_csv(tmp_path / "a.csv", [{**GOOD, "id": "a"}])
    cfg, _, v = extract_config({"sources": {"s": _csv_source(tmp_path / "*.csv")}})
    assert v["s"].valid == 1
    with warehouse.writer(cfg.warehouse_path) as con:
        loaded = con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'spatial'").fetchone()
        assert loaded in (None, (False,))
    with warehouse.writer(cfg.warehouse_path, spatial=True) as con:
        assert con.execute("SELECT ST_X(ST_Point(1, 2))").fetchone() == (1.0,)


def test_an_unreadable_file_does_not_stop_the_others_when_the_source_says_skip(tmp_path, extract_config):
    _write_csv(tmp_path / "a.csv", [{**GOOD, "id": "a"}])
    (tmp_path / "b.csv").write_text("something,else\n1,2\n")  # lacks the mapped columns
    _write_csv(tmp_path / "c.csv", [{**GOOD, "id": "c"}])
    cfg, staged, v = extract_config(
        {"sources": {"s": {**_csv_source(tmp_path / "*.csv"), "on_unreadable_file": "skip"}}}
    )
    errors = {f.file.rsplit("/", 1)[1]: f.error for f in staged["s"]}
    assert errors["a.csv"] is None and errors["c.csv"] is None
    assert errors["b.csv"].startswith("missing column(s): id, lat, lng")
    assert v["s"].valid == 2
    logged = _rows(cfg, "SELECT file, rows, error IS NOT NULL FROM source_files ORDER BY file")
    assert [(f.rsplit("/", 1)[1], n, e) for f, n, e in logged] == [
        ("a.csv", 1, False),
        ("b.csv", 0, True),
        ("c.csv", 1, False),
    ]


def test_rerun_is_idempotent_and_reports_replace(tmp_path, write_config):
    from pipeline.config import load_config

    from .conftest import run_extraction

    _write_csv(tmp_path / "r.csv", [{**GOOD, "id": "a"}, {**GOOD, "id": "b", "lat": ""}])
    cfg = load_config(write_config({"sources": {"s": _csv_source(tmp_path / "r.csv")}}))
    run_extraction(cfg)
    run_extraction(cfg)
    assert extract.conservation(cfg.warehouse_path, ["s"])[0] == ("s", 2, 1, 1)
    _write_csv(tmp_path / "r.csv", [{**GOOD, "id": "c"}])
    run_extraction(cfg)
    assert _rows(cfg, "SELECT report_id FROM reports") == [("s:c",)]
    assert _rows(cfg, "SELECT count(*) FROM rejected_reports") == [(0,)]


def test_reason_names_are_documented_in_readme():
    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in readme] == []


def test_untimed_reports_take_the_runs_as_of(tmp_path, write_config):
    """A rail station table has no time: its reports are dated at the run's as_of."""
    from pipeline.config import load_config

    from .conftest import run_extraction

    (tmp_path / "stations.csv").write_text(
        "id,lat,lon,departures,delays,cancellations\ns1,52.52,13.40,120,7,1\ns2,48.14,11.58,80,0,0\ns3,,11.5,3,0,0\n"
    )
    cols = {
        "report_id": "id",
        "lat": "lat",
        "lng": "lon",
        "departures": "departures",
        "delays": "delays",
        "cancellations": "cancellations",
    }
    cfg = load_config(
        write_config(
            {
                "sources": {"rail": {"kind": "file", "path": str(tmp_path / "stations.csv"), "columns": cols}},
                "tilesets": {"rail": {"source": "rail", "profile": "rail_disruptions"}},
            }
        )
    )
    _, validated = run_extraction(cfg)
    assert (validated["rail"].valid, validated["rail"].rejected) == (2, {"missing_coordinates": 1})
    assert _rows(cfg, "SELECT DISTINCT observed_at FROM reports") == [(AS_OF,)]


def test_reports_sorted_in_key_ranges_are_the_one_sort(tmp_path, write_config, monkeypatch):
    """Valid rows reach ``reports`` a range of tile keys at a time: the same rows, in the same order."""
    from pipeline import validate
    from pipeline.config import load_config

    from .conftest import run_extraction

    rng = np.random.default_rng(7)
    rows = [
        {**GOOD, "id": f"r{i}", "lat": f"{lat:.5f}", "lng": f"{lng:.5f}"}
        for i, (lat, lng) in enumerate(zip(rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)))
    ]
    rows += [{**GOOD, "id": f"same{i}", "lat": "10.0", "lng": "20.0"} for i in range(40)]  # one key, many rows
    rows += [{**GOOD, "id": "bad", "lat": "270"}, {**GOOD, "id": "r3"}]  # rejected: a range, a duplicate
    _write_csv(tmp_path / "r.csv", rows)
    cfg = load_config(write_config({"sources": {"s": _csv_source(tmp_path / "r.csv")}}))
    query = "SELECT * EXCLUDE (file) FROM reports ORDER BY rowid"

    run_extraction(cfg)
    whole = _rows(cfg, query)
    monkeypatch.setattr(validate, "INSERT_PART_ROWS", 23)
    (result,) = run_extraction(cfg)[1].values()
    assert (result.read, result.valid) == (len(rows), len(rows) - 2)
    assert _rows(cfg, query) == whole
    keys = [r[0] for r in _rows(cfg, "SELECT tile_key FROM reports ORDER BY rowid")]
    assert keys == sorted(keys) and len(whole) == len(rows) - 2
