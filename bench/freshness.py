"""`python -m bench freshness`: a new road report's way to the map under `dagster dev`, the real daemon.

A real PostgreSQL 15 + PostGIS on loopback with 100k seed-001
``condition_reports`` (the ``road_conditions`` adapter, a tileset at the
default z0-z14). ``dagster dev`` (webserver and daemon, as ``make dev``
starts them) publishes it first; then, a few times, 25 new reports are
inserted at a random moment and the bench waits for the snapshot
``latest.json`` names to hold them. Everything is as deployed: the
``fresh_sources`` sensor on its 30 s interval, each run a process of its own
(Dagster's default run launcher), the chain sensors. Target: <= 90 s (seed
001's map polls every 90 s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests import pg

from .postgres import load
from .ui import _free_port, dagster_dev

ROWS = 100_000
TRIALS = 3
NEW = 25
TARGET_S = 90.0
PASSWORD_ENV = "HOTSPOTS_BENCH_PG_PASSWORD"


def _latest(output: Path) -> dict | None:
    path = output / "roads" / "latest.json"
    return json.loads(path.read_text()) if path.exists() else None


def _read(output: Path, latest: dict) -> int:
    manifest = json.loads((output / "roads" / latest["path"] / "manifest.json").read_text())
    return manifest["counts"]["read"]


def _wait(output: Path, until, limit: float) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        latest = _latest(output)
        if latest is not None and until(latest):
            return latest
        time.sleep(0.2)
    raise RuntimeError(f"no new snapshot within {limit:.0f} s")


def main(rows: int = ROWS) -> bool:
    import psycopg

    why = pg.missing()
    if why:
        print(f"freshness: skipped: {why}")
        return True
    seconds = []
    with pg.server() as srv, tempfile.TemporaryDirectory(prefix="hotspots-bench-fresh-") as tmp:
        load(srv, rows)
        folder = Path(tmp)
        source = {
            "kind": "postgres",
            "host": srv.host,
            "port": srv.port,
            "database": "roads",
            "user": srv.user,
            "password_env": PASSWORD_ENV,
            "adapter": "road_conditions",
        }
        config = folder / "hotspots.yaml"
        config.write_text(
            yaml.safe_dump(
                {"sources": {"roads": source}, "tilesets": {"roads": {"source": "roads", "profile": "road_conditions"}}}
            )
        )
        env = {
            **os.environ,
            "HOTSPOTS_CONFIG": str(config),
            "DAGSTER_HOME": str(folder / "dagster"),
            PASSWORD_ENV: srv.password,
        }
        (folder / "dagster").mkdir()
        output = folder / "output"
        server = dagster_dev(folder, env, _free_port())
        try:
            started = time.monotonic()
            first = _wait(output, lambda latest: True, 300)  # the sensor's first look: the whole source
            print(f"freshness: first snapshot after {time.monotonic() - started:.1f} s (dagster dev started)")
            read, rng = _read(output, first), random.Random(1)
            for trial in range(TRIALS):
                time.sleep(rng.uniform(0, 30))  # a random moment in the sensor's cycle
                with psycopg.connect(srv.dsn("roads"), autocommit=True) as conn:
                    conn.execute(
                        "INSERT INTO condition_reports (location, condition_type, severity, session_token) "
                        "SELECT ST_GeogFromText('SRID=4326;POINT(-6.26 53.35)'), 'ice', 3, %s || i "
                        "FROM generate_series(1, %s) i",
                        [f"fresh-{trial}-", NEW],
                    )
                inserted = time.monotonic()
                read += NEW
                _wait(output, lambda latest, n=read: _read(output, latest) == n, 300)
                seconds.append(time.monotonic() - inserted)
                print(f"  trial {trial + 1}: {NEW} new reports on the map after {seconds[-1]:.1f} s")
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    ok = max(seconds) <= TARGET_S
    print(
        f"freshness: {rows:,} road reports in PostgreSQL, dagster dev; new reports on the map after "
        f"{min(seconds):.1f}-{max(seconds):.1f} s (mean {sum(seconds) / len(seconds):.1f}; target <= {TARGET_S:.0f})"
    )
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS) else 1)
