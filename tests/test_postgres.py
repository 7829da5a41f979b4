"""PostgreSQL/PostGIS sources against a real server: the four seed schemas, incremental reads, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mercantile
import numpy as np
import polars as pl
import pytest
import yaml

from pipeline import extract, publish, warehouse
from pipeline.config import load_config

from . import pg

FIXTURES = Path(__file__).parent / "fixtures" / "postgres"
HOTSPOTS = str(Path(sys.executable).parent / "hotspots")
NOW = datetime.now(UTC).replace(microsecond=0)
PW_ENV = "HOTSPOTS_TEST_PG_PASSWORD"


def _connect(srv, db):
    import psycopg

    return psycopg.connect(srv.dsn(db), autocommit=True)


def _config(tmp_path: Path, srv, name: str, **source) -> Path:
    data = {
        "output": "output",
        "home": ".hotspots",
        "sources": {
            name: {
                "kind": "postgres",
                "host": srv.host,
                "port": srv.port,
                "database": name,
                "user": srv.user,
                "password_env": PW_ENV,
                **source,
            }
        },
        "tilesets": {name: {"source": name, "profile": source.get("adapter", "generic"), "maxzoom": 13}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, PW_ENV: pg.PASSWORD}
    return subprocess.run(
        [HOTSPOTS, "run", "--config", str(config), "--as-of", NOW.isoformat(), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _rejected(cfg, source) -> dict:
    return extract.source_counts(cfg.warehouse_path, source)["rejected"]


# --- seed 001: road conditions ---------------------------------------------------


ROAD_BBOX = (-0.2, 51.45, 0.0, 51.55)
FLOOD_AT = (10.0, 10.0)  # far from the rest: its cells are its own


@pytest.fixture(scope="module")
def roads(server):
    pg.create_database(server, "roads", (FIXTURES / "road_conditions.sql").read_text())
    rng = np.random.default_rng(3)
    n = 3000
    lng = rng.uniform(ROAD_BBOX[0], ROAD_BBOX[2], n)
    lat = rng.uniform(ROAD_BBOX[1], ROAD_BBOX[3], n)
    kinds = ["ice", "pothole", "crack", "flooding", "debris"]
    with _connect(server, "roads") as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY condition_reports (location, condition_type, severity, description, session_token, "
            "activity_context, upvotes, submitted_at) FROM STDIN"
        ) as copy:
            for i in range(n):
                copy.write_row(
                    (
                        f"SRID=4326;POINT({lng[i]} {lat[i]})",
                        kinds[i % 5],
                        1 + i % 3,
                        None,
                        f"tok-{i % 400}",
                        "walking",
                        i % 4,
                        NOW - timedelta(hours=1 + (i % 2400)),
                    )
                )
        # bad rows the seed's constraints allow: beyond Web Mercator, from the future, a bulk-imported flood
        for i in range(3):
            cur.execute(
                "INSERT INTO condition_reports (location, condition_type, severity, session_token, submitted_at) "
                "VALUES (%s, 'ice', 2, 'tok-polar', %s)",
                (f"SRID=4326;POINT(0 {86 + i})", NOW - timedelta(days=1)),
            )
        for _ in range(5):
            cur.execute(
                "INSERT INTO condition_reports (location, condition_type, severity, session_token, submitted_at) "
                "VALUES ('SRID=4326;POINT(-0.1 51.5)', 'crack', 2, 'tok-future', %s)",
                (NOW + timedelta(days=3),),
            )
        cur.execute("ALTER TABLE condition_reports DISABLE TRIGGER check_rate_limit")
        for i in range(40):
            cur.execute(
                "INSERT INTO condition_reports (location, condition_type, severity, session_token, submitted_at) "
                "VALUES (%s, 'debris', 3, 'tok-flood', %s)",
                (f"SRID=4326;POINT({FLOOD_AT[0]} {FLOOD_AT[1]})", NOW - timedelta(days=2) + timedelta(seconds=30 * i)),
            )
        cur.execute("ALTER TABLE condition_reports ENABLE TRIGGER check_rate_limit")
    return server


def test_road_conditions_adapter_matches_postgis(roads, tmp_path):
    config = _config(tmp_path, roads, "roads", adapter="road_conditions")
    run = _run(config)
    assert run.returncode == 0, run.stderr
    cfg = load_config(config)
    counts = extract.source_counts(cfg.warehouse_path, "roads")
    assert counts["read"] == 3000 + 3 + 5 + 40
    assert counts["rejected"] == {"outside_mercator": 3, "future_timestamp": 5, "rate_limited": 10}

    # per-cell counts computed by PostGIS on the same tile-aligned grid (zoom 12 cells = tiles at 18)
    z, level = 12, 18
    size = 2 * 20037508.342789244 / 2**level
    with _connect(roads, "roads") as conn:
        rows = conn.execute(
            f"""SELECT floor((ST_X(p) + 20037508.342789244) / {size})::int AS x,
                       floor((20037508.342789244 - ST_Y(p)) / {size})::int AS y, count(*)
                FROM (SELECT ST_Transform(location::geometry, 3857) AS p FROM condition_reports
                      WHERE ST_Y(location::geometry) BETWEEN -85.0511 AND 85.0511
                        AND submitted_at <= %s AND submitted_at > %s AND session_token <> 'tok-flood') r
                GROUP BY 1, 2""",
            (NOW, NOW - timedelta(days=90)),
        ).fetchall()
    expected = {mercantile.quadkey(x, y, level): n for x, y, n in rows}
    latest = publish.read_latest(cfg.published("roads"))
    cells = pl.read_parquet(cfg.output / "roads" / latest["path"] / "cells" / f"zoom={z}" / "cells.parquet")
    flood = mercantile.quadkey(mercantile.tile(*FLOOD_AT, level))
    got = {q: n for q, n in cells.select("quadkey", "report_count").iter_rows() if q != flood}
    assert got == expected
    assert cells.filter(pl.col("quadkey") == flood).get_column("report_count").to_list() == [30]


def test_incremental_reads_only_new_rows_and_equals_a_full_refresh(roads, tmp_path):
    config = _config(tmp_path, roads, "roads", adapter="road_conditions")
    assert _run(config).returncode == 0
    cfg = load_config(config)
    with _connect(roads, "roads") as conn, conn.cursor() as cur:
        for i in range(100):
            cur.execute(
                "INSERT INTO condition_reports (location, condition_type, severity, session_token, submitted_at) "
                "VALUES (%s, 'pothole', 2, %s, %s)",
                (
                    f"SRID=4326;POINT({-0.15 + i * 1e-3} 51.5)",
                    f"tok-new-{i}",
                    NOW - timedelta(minutes=30) + timedelta(seconds=i),
                ),
            )
    run = _run(config)
    assert run.returncode == 0, run.stderr
    with warehouse.reader(cfg.warehouse_path) as con:
        [(label, rows)] = con.execute("SELECT file, rows FROM source_files WHERE source = 'roads'").fetchall()
        incremental = con.execute(
            "SELECT report_id, lat, lng, observed_at, category, severity FROM reports ORDER BY 1"
        ).fetchall()
    # the 100 new rows, the 5 future-dated ones (read again until their time) and the boundary rows
    assert "incremental since" in label and 100 <= rows <= 110
    assert _run(config, "--full-refresh").returncode == 0
    with warehouse.reader(cfg.warehouse_path) as con:
        [(label, rows)] = con.execute("SELECT file, rows FROM source_files WHERE source = 'roads'").fetchall()
        full = con.execute(
            "SELECT report_id, lat, lng, observed_at, category, severity FROM reports ORDER BY 1"
        ).fetchall()
    assert "full refresh" in label and rows == 3000 + 48 + 100
    assert incremental == full

    # rows deleted upstream disappear on a full refresh
    with _connect(roads, "roads") as conn:
        gone = [
            str(r[0]) for r in conn.execute("DELETE FROM condition_reports WHERE session_token = 'tok-7' RETURNING id")
        ]
    assert gone and _run(config, "--full-refresh").returncode == 0
    with warehouse.reader(cfg.warehouse_path) as con:
        left = con.execute(
            "SELECT count(*) FROM reports WHERE list_contains(?, split_part(report_id, ':', 2))", [gone]
        ).fetchone()[0]
    assert left == 0


def test_a_table_with_a_geography_column_reads_like_the_adapter(roads, tmp_path):
    adapter = _config(tmp_path, roads, "roads", adapter="road_conditions")
    assert _run(adapter).returncode == 0
    rows = "SELECT report_id, round(lat, 9), round(lng, 9), observed_at, category FROM reports ORDER BY 1"
    with warehouse.reader(load_config(adapter).warehouse_path) as con:
        expected = con.execute(rows).fetchall()
    # the adapter's columns, less its position
    columns = {
        "report_id": "id",
        "observed_at": "submitted_at",
        "category": "condition_type",
        "severity": "severity",
        "session_token": "session_token",
    }
    (tmp_path / "t").mkdir()
    table = _config(
        tmp_path / "t",
        roads,
        "roads",
        table="public.condition_reports",
        watermark="submitted_at",
        columns={**columns, "geometry": "location"},
    )
    run = _run(table)
    assert run.returncode == 0, run.stderr
    cfg = load_config(table)
    with warehouse.reader(cfg.warehouse_path) as con:
        got = con.execute(rows).fetchall()
    assert got == expected and len(got) > 3000
    assert _rejected(cfg, "roads") == {"outside_mercator": 3, "future_timestamp": 5, "rate_limited": 10}

    # a query that maps lat and lng is staged without DuckDB's spatial extension, even when its
    # rows also carry the geography column
    (tmp_path / "q").mkdir()
    positions = "ST_Y(location::geometry) AS y, ST_X(location::geometry) AS x"
    query = _config(
        tmp_path / "q",
        roads,
        "roads",
        query=f"SELECT *, {positions} FROM condition_reports",
        watermark="submitted_at",
        columns={**columns, "lat": "y", "lng": "x"},
    )
    run = _run(query)
    assert run.returncode == 0, run.stderr
    with warehouse.reader(load_config(query).warehouse_path) as con:
        assert con.execute(rows).fetchall() == expected


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"port": 1}, "cannot connect to postgresql://hotspots@127.0.0.1:1/roads: connection to server"),
        ({"password_env": "HOTSPOTS_WRONG_PW"}, 'password authentication failed for user "hotspots"'),
        (
            {
                "adapter": None,
                "table": "nope",
                "columns": {"report_id": "id", "lat": "y", "lng": "x", "observed_at": "t"},
            },
            'relation "nope" does not exist',
        ),
        (
            {
                "adapter": None,
                "table": "condition_reports",
                "columns": {"report_id": "id", "geometry": "location", "observed_at": "reported_on"},
            },
            'column "reported_on" does not exist',
        ),
    ],
    ids=["unreachable", "wrong-password", "missing-table", "missing-column"],
)
def test_errors_are_one_line_name_the_source_and_leave_the_warehouse_as_it_was(roads, tmp_path, change, says):
    good = _config(tmp_path, roads, "roads", adapter="road_conditions")
    assert _run(good).returncode == 0
    cfg = load_config(good)
    before = extract.conservation(cfg.warehouse_path, ["roads"])
    data = yaml.safe_load(good.read_text())
    data["sources"]["roads"] = {k: v for k, v in {**data["sources"]["roads"], **change}.items() if v is not None}
    good.write_text(yaml.safe_dump(data))
    env = {**os.environ, PW_ENV: pg.PASSWORD, "HOTSPOTS_WRONG_PW": "not-the-password"}
    run = subprocess.run([HOTSPOTS, "run", "--config", str(good)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "source roads:" in run.stderr and says in run.stderr, run.stderr
    assert pg.PASSWORD not in run.stderr + run.stdout and "not-the-password" not in run.stderr
    assert extract.conservation(cfg.warehouse_path, ["roads"]) == before


def test_the_password_is_nowhere(roads, tmp_path):
    config = _config(tmp_path, roads, "roads", adapter="road_conditions")
    run = _run(config, "-v")
    assert run.returncode == 0
    assert pg.PASSWORD not in run.stdout + run.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert pg.PASSWORD.encode() not in path.read_bytes(), path


# --- seed 000: community needs -----------------------------------------------------


def test_community_needs_adapter(server, tmp_path):
    pg.create_database(server, "needs", (FIXTURES / "community_needs.sql").read_text())
    with _connect(server, "needs") as conn:

        def location(lat, lng):
            return conn.execute(
                "INSERT INTO locations (latitude, longitude) VALUES (%s, %s) RETURNING id", (lat, lng)
            ).fetchone()[0]

        def note(entity_type, entity, severity, expired=None, public=True):
            nid = conn.execute(
                "INSERT INTO notes (severity, expired_at, is_public, created_at) VALUES (%s, %s, %s, %s) RETURNING id",
                (severity, expired, public, NOW - timedelta(days=1)),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO noteables (note_id, noteable_type, noteable_id) VALUES (%s, %s, %s)",
                (nid, entity_type, entity),
            )

        a, b, c, legacy, nowhere = (uuid.uuid4() for _ in range(5))
        here, there, blank = location(40.70, -73.90), location(40.75, -73.95), location(None, None)
        conn.execute(
            "INSERT INTO locationables (location_id, locatable_type, locatable_id) VALUES (%s, 'post', %s)", (here, a)
        )
        conn.execute(
            "INSERT INTO locationables (location_id, locatable_type, locatable_id) VALUES (%s, 'organization', %s)",
            (there, b),
        )
        conn.execute(
            "INSERT INTO locationables (location_id, locatable_type, locatable_id) VALUES (%s, 'post', %s)", (blank, c)
        )
        conn.execute(
            "INSERT INTO post_locations (location_id, post_id) VALUES (%s, %s)", (there, legacy)
        )  # legacy only
        conn.execute(
            "INSERT INTO post_locations (location_id, post_id) VALUES (%s, %s)", (there, a)
        )  # a is in locationables
        note("post", a, "urgent")
        note("post", a, "notice")
        note("post", a, "info", expired=NOW - timedelta(hours=1))
        note("organization", b, "urgent", public=False)
        note("organization", b, "info")
        note("post", c, "urgent")  # its location has no coordinates
        note("post", legacy, "notice")
        note("post", nowhere, "urgent")  # not located at all: never a row
    config = _config(tmp_path, server, "needs", adapter="community_needs")
    run = _run(config)
    assert run.returncode == 0, run.stderr
    cfg = load_config(config)
    counts = extract.source_counts(cfg.warehouse_path, "needs")
    assert counts["read"] == 7 and counts["rejected"] == {"missing_coordinates": 1}
    summary = json.loads((cfg.home / "work" / "needs" / "scoring.json").read_text())
    assert summary["excluded"] == {"not_public": 1, "expired": 1, "folded_into_entity": 1}
    points = pl.read_parquet(cfg.home / "work" / "needs" / "shards" / "0" / "scored.parquet")
    assert sorted(points.get_column("weight")) == [1.0, 5.0, 10.0]  # b: its public info; legacy: notice; a: urgent
    over = json.loads(
        (
            cfg.output / "needs" / publish.read_latest(cfg.published("needs"))["path"] / "overview" / "8.geojson"
        ).read_text()
    )
    assert sorted(f["properties"]["weight"] for f in over["features"]) == [6.0, 10.0]  # b and legacy share a place


# --- seed 002: campus issues -------------------------------------------------------


def test_campus_issues_adapter(server, tmp_path):
    pg.create_database(server, "campus", (FIXTURES / "campus_issues.sql").read_text())
    rng = np.random.default_rng(5)
    with _connect(server, "campus") as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY issues (organization_id, building_id, category, priority, status, severity, latitude, "
            "longitude, created_at) FROM STDIN"
        ) as copy:
            for i in range(800):
                copy.write_row(
                    (
                        "ORG123",
                        f"bldg-{i % 7}",
                        ["hvac", "it", "plumbing"][i % 3],
                        ["CRITICAL", "HIGH", "MEDIUM", "LOW"][i % 4],
                        ["OPEN", "IN_PROGRESS", "RESOLVED"][i % 3],
                        1 + i % 10,
                        37.42 + rng.random() * 0.02,
                        -122.19 + rng.random() * 0.04,
                        NOW - timedelta(days=int(i % 60)),
                    )
                )
        cur.execute(
            "INSERT INTO issues (organization_id, category, priority, status, severity) "
            "VALUES ('ORG123', 'it', 'LOW', 'OPEN', 3)"
        )  # no position
    config = _config(tmp_path, server, "campus", adapter="campus_issues")
    data = yaml.safe_load(config.read_text())
    data["tilesets"]["campus"]["preset"] = "emergency"
    config.write_text(yaml.safe_dump(data))
    run = _run(config)
    assert run.returncode == 0, run.stderr
    cfg = load_config(config)
    assert _rejected(cfg, "campus") == {"missing_coordinates": 1}
    with _connect(server, "campus") as conn:
        expected = conn.execute(
            "SELECT count(*) FROM issues WHERE latitude IS NOT NULL AND priority IN ('CRITICAL', 'HIGH') "
            "AND status IN ('OPEN', 'IN_PROGRESS') AND created_at > %s",
            (NOW - timedelta(days=7),),
        ).fetchone()[0]
    assert json.loads((cfg.home / "work" / "campus" / "scoring.json").read_text())["scored"] == expected > 0


# --- seed 003: rail disruptions ----------------------------------------------------


def test_rail_disruptions_adapter_sums_the_time_range(server, tmp_path):
    pg.create_database(server, "rail", (FIXTURES / "rail_disruptions.sql").read_text())
    with _connect(server, "rail") as conn, conn.cursor() as cur:
        for i in range(50):
            cur.execute(
                "INSERT INTO stops VALUES (%s, %s, %s, %s)", (f"S{i}", f"Station {i}", 50 + i * 0.05, 8 + i * 0.05)
            )
            for hour in range(30):  # hourly stats; the last 24 count
                cur.execute(
                    "INSERT INTO realtime_station_stats "
                    "(stop_id, period_start, period_end, departures, cancellations, delays) "
                    "VALUES (%s, %s, %s, 10, %s, %s)",
                    (
                        f"S{i}",
                        NOW - timedelta(hours=hour + 1),
                        NOW - timedelta(hours=hour),
                        i % 2,
                        0 if i % 3 == 0 else 1,
                    ),
                )
        cur.execute("INSERT INTO stops VALUES ('S-nowhere', 'Nowhere', NULL, NULL)")
        cur.execute(
            "INSERT INTO realtime_station_stats (stop_id, period_start, period_end, departures, cancellations, delays) "
            "VALUES ('S-nowhere', %s, %s, 5, 0, 0)",
            (NOW - timedelta(hours=2), NOW - timedelta(hours=1)),
        )
    config = _config(tmp_path, server, "rail", adapter="rail_disruptions")
    run = _run(config)
    assert run.returncode == 0, run.stderr
    cfg = load_config(config)
    assert _rejected(cfg, "rail") == {"missing_coordinates": 1}
    with warehouse.reader(cfg.warehouse_path) as con:
        sums = con.execute("SELECT sum(departures), sum(cancellations), sum(delays), count(*) FROM reports").fetchone()
    healthy = sum(1 for i in range(50) if i % 2 == 0 and i % 3 == 0)
    assert sums == (50 * 24 * 10, 25 * 24, sum(24 for i in range(50) if i % 3), 50)
    over = json.loads(
        (
            cfg.output / "rail" / publish.read_latest(cfg.published("rail"))["path"] / "overview" / "8.geojson"
        ).read_text()
    )
    assert sum(f["properties"]["healthy"] for f in over["features"]) >= 1 and healthy >= 1
