"""Extracting 1M seed-001 ``condition_reports`` rows from a real PostgreSQL/PostGIS (target: under 15 s).

The server (Debian's PostgreSQL 15 + PostGIS) runs on loopback for the run;
rows are loaded with COPY (not timed). Timed: reading them through DuckDB's
postgres extension into ``raw_reports`` (PostGIS turning geography into
lat/lng on the server), then validating them into ``reports``. Baseline, same
run: the same query's rows fetched into Python by psycopg (``fetchall``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import yaml

from pipeline import extract
from pipeline.config import load_config
from pipeline.sources.postgres import ROAD_CONDITIONS
from tests import pg

ROWS = 1_000_000
TARGET_S = 15.0
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def load(srv: pg.Server, rows: int) -> None:
    import psycopg

    pg.create_database(
        srv, "roads", (Path(__file__).parents[1] / "tests/fixtures/postgres/road_conditions.sql").read_text()
    )
    rng = np.random.default_rng(1)
    lng, lat = rng.uniform(-0.5, 0.3, rows), rng.uniform(51.3, 51.7, rows)
    kinds = np.array(["ice", "pothole", "crack", "flooding", "debris", "mud", "snow"])[rng.integers(0, 7, rows)]
    ages = rng.integers(0, 80 * 86400, rows)
    with psycopg.connect(srv.dsn("roads"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE condition_reports DISABLE TRIGGER check_rate_limit")  # a bulk import
        with cur.copy(
            "COPY condition_reports (location, condition_type, severity, session_token, upvotes, "
            "submitted_at) FROM STDIN"
        ) as copy:
            for i in range(rows):
                copy.write_row(
                    (
                        f"SRID=4326;POINT({lng[i]:.6f} {lat[i]:.6f})",
                        kinds[i],
                        1 + i % 3,
                        f"tok-{i % 50000}",
                        i % 5,
                        NOW - timedelta(seconds=int(ages[i])),
                    )
                )
        cur.execute("ALTER TABLE condition_reports ENABLE TRIGGER check_rate_limit")
        cur.execute("VACUUM ANALYZE condition_reports")


def main(rows: int = ROWS) -> bool:
    why = pg.missing()
    if why:
        print(f"postgres: skipped: {why}")
        return True
    with pg.server() as srv, tempfile.TemporaryDirectory(prefix="hotspots-bench-") as tmp:
        load(srv, rows)
        os.environ["HOTSPOTS_BENCH_PG_PASSWORD"] = srv.password
        (Path(tmp) / "hotspots.yaml").write_text(
            yaml.safe_dump(
                {
                    "sources": {
                        "roads": {
                            "kind": "postgres",
                            "host": srv.host,
                            "port": srv.port,
                            "database": "roads",
                            "user": srv.user,
                            "password_env": "HOTSPOTS_BENCH_PG_PASSWORD",
                            "adapter": "road_conditions",
                        }
                    },
                    "tilesets": {"roads": {"source": "roads", "profile": "road_conditions"}},
                }
            )
        )
        cfg = load_config(Path(tmp) / "hotspots.yaml")
        started = time.perf_counter()
        extract.stage(cfg, ["roads"], NOW)
        staged = time.perf_counter() - started
        [result] = extract.validate(cfg, ["roads"], NOW).values()
        seconds = time.perf_counter() - started

        import psycopg

        started = time.perf_counter()
        with psycopg.connect(srv.dsn("roads")) as conn:
            fetched = len(conn.execute(ROAD_CONDITIONS.format(where="")).fetchall())
        baseline = time.perf_counter() - started

    ok = seconds < TARGET_S and result.read == rows
    print(f"postgres: {rows:,} condition_reports from PostgreSQL 15 + PostGIS (loopback)")
    print(f"  hotspots read into raw_reports : {staged:6.2f} s")
    print(
        f"  ... and validated into reports : {seconds:6.2f} s  ({rows / seconds / 1e6:.2f} M rows/s; "
        f"{result.valid:,} valid, {result.rejected_total:,} rejected)"
    )
    print(f"  target                         : {TARGET_S:6.2f} s  (ratio {seconds / TARGET_S:.2f} of target)")
    print(f"  baseline: psycopg fetchall of the same query into Python: {baseline:.2f} s ({fetched:,} rows)")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS) else 1)
