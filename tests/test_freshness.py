"""Fresh within 90 seconds: the ``fresh_sources`` sensor, and a new report's way to the published map."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import polars as pl
import yaml

from assets.location import EXTRACT_JOB, MERGE_JOB, PLAN_JOB, PUBLISH_JOB, SHARD_JOB, SHARD_TILES_JOB, build_definitions
from assets.publishing import CHAIN_INTERVAL_S, FRESH_TAG
from pipeline import freshness, publish
from pipeline.config import load_config
from resources import HotspotsResource

FRESHNESS_TARGET_S = 90.0  # seed 001: the map polls every 90 s


def _file_config(tmp_path: Path, **extra) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    data = {
        "sources": {
            "s": {"kind": "file", "path": "data/*.csv", "columns": {"report_id": "id", "lat": "lat", "lng": "lng"}},
            "unread": {"kind": "file", "path": "other/*.csv", "columns": {"lat": "lat", "lng": "lng"}},
            "demo": {"kind": "synthetic", "domain": "road_conditions", "count": 100},
        },
        "tilesets": {"t": {"source": "s"}, "d": {"source": "demo"}},
        **extra,
    }
    path = tmp_path / "hotspots.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Daemon:
    """What the Dagster daemon does with the definitions, in this process: each sensor is looked at
    on its own interval (ticks counted from the start), and each run it requests is executed."""

    def __init__(self, config: Path, instance: dg.DagsterInstance, env: dict | None = None) -> None:
        self.defs = build_definitions(config)
        self.instance = instance
        self.resources = {"hotspots": HotspotsResource(config_path=str(config))}
        self.cursor: str | None = None
        self.started = time.monotonic()
        self.env = env or {}

    def tick(self, interval: float) -> None:
        """Sleep until the sensor's next look."""
        ahead = interval - (time.monotonic() - self.started) % interval
        time.sleep(ahead)

    def fresh(self) -> dg.RunRequest | None:
        sensor = self.defs.resolve_sensor_def("fresh_sources")
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, definitions=self.defs, resources=self.resources
        )
        result = sensor(context)
        self.cursor = context.cursor
        return result if isinstance(result, dg.RunRequest) else None

    def run(self, job: str, request: dg.RunRequest):
        return self.defs.resolve_job_def(job).execute_in_process(
            run_config=request.run_config,
            partition_key=request.partition_key,
            tags=request.tags,
            instance=self.instance,
        )

    def after(self, sensor: str, result) -> list[dg.RunRequest]:
        """The chain sensor's next look at a finished run."""
        self.tick(CHAIN_INTERVAL_S)
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor,
            dagster_instance=self.instance,
            dagster_run=result.dagster_run,
            dagster_event=result.get_run_success_event(),
        )
        return list(self.defs.resolve_sensor_def(sensor)(context) or [])

    def refresh(self) -> list[str]:
        """One look of ``fresh_sources`` and the builds it sets off, to their snapshots; the tilesets published."""
        request = self.fresh()
        if request is None:
            return []
        extracted = self.run(EXTRACT_JOB, request)
        assert extracted.success
        published = []
        for plan_request in self.after("publish_after_extract", extracted):
            planned = self.run(PLAN_JOB, plan_request)
            assert planned.success
            for shard_request in self.after("shards_after_plan", planned):
                shard = self.run(SHARD_JOB, shard_request)
                assert shard.success
                for merge_request in self.after("merge_after_shards", shard):
                    merged = self.run(MERGE_JOB, merge_request)
                    assert merged.success
                    for tiles_request in self.after("tiles_after_merge", merged):
                        tiles = self.run(SHARD_TILES_JOB, tiles_request)
                        assert tiles.success
                        for publish_request in self.after("publish_after_tiles", tiles):
                            assert self.run(PUBLISH_JOB, publish_request).success
                            published.append(publish_request.partition_key)
        return published


def test_the_sensor_extracts_a_source_when_it_has_something_new(tmp_path):
    config = _file_config(tmp_path, freshness_interval_s=7)
    daemon = Daemon(config, dg.DagsterInstance.ephemeral())
    assert daemon.defs.resolve_sensor_def("fresh_sources").minimum_interval_seconds == 7
    (tmp_path / "data" / "a.csv").write_text("id,lat,lng\n1,40.7,-73.9\n")
    first = daemon.fresh()  # never looked: the source's tilesets are extracted
    assert first.tags[FRESH_TAG] == "s"  # only the tilesets of the source that changed, every op told so
    assert [op["config"] for op in first.run_config["ops"].values()] == [{"tilesets": ["t"]}] * 4
    assert daemon.fresh() is None  # nothing new
    (tmp_path / "data" / "b.csv").write_text("id,lat,lng\n2,40.8,-73.9\n")
    assert daemon.fresh() is not None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("lat,lng\n1,2\n")
    assert daemon.fresh() is None  # a source no tileset reads: nothing to build
    os.utime(tmp_path / "data" / "a.csv", ns=(0, 10**18))
    assert daemon.fresh() is not None  # a new time: extraction decides by content (see test_incremental)


def test_the_sensor_waits_while_its_extraction_runs(tmp_path):
    config = _file_config(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    daemon = Daemon(config, instance)
    (tmp_path / "data" / "a.csv").write_text("id,lat,lng\n1,40.7,-73.9\n")
    request = daemon.fresh()
    cursor = daemon.cursor
    run = instance.create_run_for_job(  # launched, not yet done
        daemon.defs.resolve_job_def(EXTRACT_JOB), run_config=request.run_config, tags=request.tags
    )
    (tmp_path / "data" / "b.csv").write_text("id,lat,lng\n2,40.8,-73.9\n")
    assert daemon.fresh() is None and daemon.cursor == cursor  # seen once the run is done
    instance.report_run_failed(run)
    assert daemon.fresh() is not None


def test_a_new_road_report_is_on_the_map_within_90_seconds(server, tmp_path, monkeypatch):
    """100k seed-001 reports in a real PostgreSQL; rows inserted just after a sensor's look are in the
    snapshot `latest.json` names within 90 s: the next look (30 s later), the extraction of what is
    new, and the tileset's build, each chain sensor looking every few seconds."""
    import psycopg

    from bench.postgres import load

    load(server, 100_000)
    monkeypatch.setenv("HOTSPOTS_TEST_PG_PASSWORD", server.password)
    source = {
        "kind": "postgres",
        "host": server.host,
        "port": server.port,
        "database": "roads",
        "user": server.user,
        "password_env": "HOTSPOTS_TEST_PG_PASSWORD",
        "adapter": "road_conditions",
    }
    config = tmp_path / "hotspots.yaml"
    config.write_text(
        yaml.safe_dump(
            {"sources": {"roads": source}, "tilesets": {"roads": {"source": "roads", "profile": "road_conditions"}}}
        )
    )
    cfg = load_config(config)
    (tmp_path / "dagster").mkdir()
    daemon = Daemon(config, dg.DagsterInstance.local_temp(str(tmp_path / "dagster")))
    assert daemon.refresh() == ["roads"]  # the first look: everything, the live snapshot
    before = publish.read_latest(cfg.published("roads"))
    whole = freshness.token(cfg, "roads")  # over every row
    assert freshness.token(cfg, "roads", whole) == whole  # over the rows from the last look's watermark on
    daemon.tick(cfg.freshness_interval_s)
    assert daemon.refresh() == []  # a look: nothing new

    # inserted just after a look: the worst case, (almost) a whole interval until the next
    spot = (-6.2603, 53.3498)  # Dublin: no other report within a cell of it
    with psycopg.connect(server.dsn("roads"), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO condition_reports (location, condition_type, severity, session_token) "
            "SELECT ST_GeogFromText(%s), 'ice', 3, 'fresh-' || i FROM generate_series(1, 25) i",
            [f"SRID=4326;POINT({spot[0]} {spot[1]})"],
        )
    inserted = time.monotonic()
    published = []
    while not published and time.monotonic() - inserted < 3 * FRESHNESS_TARGET_S:
        daemon.tick(cfg.freshness_interval_s)
        published = daemon.refresh()
    seconds = time.monotonic() - inserted
    print(f"a new report on the map after {seconds:.1f} s")

    latest = publish.read_latest(cfg.published("roads"))
    assert published == ["roads"] and latest["snapshot_id"] != before["snapshot_id"]
    assert publish.verify_latest(cfg.published("roads")) is None
    snapshot = cfg.published("roads").root / latest["path"]
    manifest = json.loads((snapshot / "manifest.json").read_text())
    cells = pl.read_parquet(snapshot / "cells" / "zoom=14" / "cells.parquet")
    here = cells.filter((pl.col("lng") - spot[0]).abs() < 0.01, (pl.col("lat") - spot[1]).abs() < 0.01)
    assert here.get_column("report_count").to_list() == [25] and here.get_column("top_category").to_list() == ["ice"]
    assert manifest["counts"]["read"] == 100_025
    assert seconds <= FRESHNESS_TARGET_S, f"{seconds:.1f} s from insert to latest.json"
