"""A run that lost its data does not replace the live map; the CLI says why; public JSON is strict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg

from assets.extraction import conservation, raw_reports, rejected_share, validated_reports
from assets.location import EXTRACT_JOB, MERGE_JOB, build_definitions
from pipeline import strictjson
from resources import HotspotsResource

from .conftest import AS_OF, NYC_COLUMNS, execute_build, shared_file

HOTSPOTS = str(Path(sys.executable).parent / "hotspots")
LATER = "2026-11-02T12:00:00+00:00"


def _hotspots(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HOTSPOTS, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _shared(write_config, nyc_format: str | None) -> Path:
    """Both real sample files, each a generic tileset; NYC's dates parse only with its format."""
    nyc = {"kind": "file", "path": str(shared_file("nyc311_animals_2025.csv")), "columns": NYC_COLUMNS}
    if nyc_format:
        nyc["timestamp_format"] = nyc_format
    quakes = {
        "kind": "file",
        "path": str(shared_file("earthquakes_23k_1965_2016.csv")),
        "timestamp_format": "%m/%d/%Y",
        "columns": {"lat": "Latitude", "lng": "Longitude", "observed_at": "Date", "severity": "Magnitude"},
    }
    return write_config(
        {
            "sources": {"nyc": nyc, "quakes": quakes},
            "tilesets": {"nyc": {"source": "nyc", "maxzoom": 8}, "quakes": {"source": "quakes", "maxzoom": 6}},
        }
    )


def public_json_files(output: Path) -> list[Path]:
    return sorted(p for p in output.rglob("*") if p.suffix in (".json", ".geojson") and "_lib" not in p.parts)


def test_a_source_that_lost_its_data_keeps_the_live_snapshot_and_force_publishes(write_config, tmp_path):
    path = _shared(write_config, "%m/%d/%Y %H:%M")
    first = _hotspots("run", "--config", str(path), "--as-of", AS_OF.isoformat(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    live = (tmp_path / "output" / "nyc" / "latest.json").read_bytes()
    quakes = (tmp_path / "output" / "quakes" / "latest.json").read_bytes()
    snapshot = json.loads(live)["snapshot_id"]

    path = _shared(write_config, None)  # upstream changed its date format: no row parses any more
    lost = _hotspots("run", "--config", str(path), "--as-of", LATER, cwd=tmp_path)
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "Traceback" not in lost.stderr
    [line] = lost.stderr.splitlines()
    assert line.startswith(
        "hotspots: source nyc: 4,969 of 4,969 rows rejected (unparseable_timestamp 4,907, missing_coordinates 62); "
    )
    assert f"the live snapshot stays {snapshot}" in line
    assert "rejected: unparseable_timestamp 4,907, missing_coordinates 62" in lost.stdout  # the CLI says why
    assert (tmp_path / "output" / "nyc" / "latest.json").read_bytes() == live  # the live map stays
    assert (tmp_path / "output" / "quakes" / "latest.json").read_bytes() != quakes  # the other source published
    assert "tileset quakes: 23,402 scored" in lost.stdout and "tileset nyc" not in lost.stdout

    forced = _hotspots("run", "--config", str(path), "--as-of", LATER, "--force", "--tileset", "nyc", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    latest = json.loads((tmp_path / "output" / "nyc" / "latest.json").read_text())
    folder = tmp_path / "output" / "nyc" / latest["path"]
    manifest = strictjson.load(folder / "manifest.json")
    assert manifest["counts"]["scored"] == 0 and manifest["counts"]["read"] == 4969
    # an empty snapshot is still complete: TileJSON, an archive, overviews
    assert (folder / "heatmap.pmtiles").stat().st_size > 0 and strictjson.load(folder / "tiles.json")[
        "tilejson"
    ] == "3.0.0"
    assert strictjson.load(folder / "overview" / "0.geojson") == {"type": "FeatureCollection", "features": []}
    for file in public_json_files(tmp_path / "output"):
        strictjson.load(file)  # RFC 8259: a generic tileset's manifest once held Infinity


def test_a_tileset_that_scores_far_fewer_reports_keeps_the_live_snapshot(write_config, tmp_path):
    (tmp_path / "data").mkdir()
    rows = "".join(f"{i},40.{i:03d},-73.9,2026-10-30\n" for i in range(100))
    (tmp_path / "data" / "a.csv").write_text("id,y,x,t\n" + rows)
    source = {
        "kind": "file",
        "path": "data/a.csv",
        "columns": {"report_id": "id", "lat": "y", "lng": "x", "observed_at": "t"},
    }
    path = write_config({"sources": {"pts": source}, "tilesets": {"pts": {"source": "pts", "maxzoom": 6}}})
    assert _hotspots("run", "--config", str(path), "--as-of", AS_OF.isoformat(), cwd=tmp_path).returncode == 0
    live = (tmp_path / "output" / "pts" / "latest.json").read_bytes()

    (tmp_path / "data" / "a.csv").write_text("id,y,x,t\n" + rows[: rows.index("10,")])  # an export cut short
    out = _hotspots("run", "--config", str(path), "--as-of", LATER, cwd=tmp_path)
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    snapshot = json.loads(live)["snapshot_id"]
    assert line == (
        f"hotspots: tileset pts: 10 reports scored, fewer than min_publish_fraction 0.5 of the live "
        f"snapshot's 100; the live snapshot stays {snapshot} (--force publishes anyway)"
    )
    assert (tmp_path / "output" / "pts" / "latest.json").read_bytes() == live

    path = write_config(
        {"sources": {"pts": source}, "tilesets": {"pts": {"source": "pts", "maxzoom": 6, "min_publish_fraction": 0.05}}}
    )
    assert _hotspots("run", "--config", str(path), "--as-of", LATER, cwd=tmp_path).returncode == 0
    assert (tmp_path / "output" / "pts" / "latest.json").read_bytes() != live


def test_an_entirely_unreadable_input_exits_1_and_force_publishes(write_config, tmp_path):
    (tmp_path / "feed.ndjson").write_text(
        "".join(
            json.dumps({"id": i, "lat": 52.5, "lng": 13.4 + i / 100, "t": "2026-10-30T00:00:00Z"}) + "\n"
            for i in range(20)
        )
    )
    source = {
        "kind": "file",
        "path": "feed.ndjson",
        "format": "ndjson",
        "columns": {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t"},
    }
    path = write_config({"sources": {"feed": source}, "tilesets": {"feed": {"source": "feed", "maxzoom": 6}}})
    assert _hotspots("run", "--config", str(path), "--as-of", AS_OF.isoformat(), cwd=tmp_path).returncode == 0
    live = (tmp_path / "output" / "feed" / "latest.json").read_bytes()

    (tmp_path / "feed.ndjson").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)  # not text at all
    out = _hotspots("run", "--config", str(path), "--as-of", LATER, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith("hotspots: step raw_reports failed: source feed: cannot read ")
    assert f"{tmp_path / 'feed.ndjson'}:" in line
    assert (tmp_path / "output" / "feed" / "latest.json").read_bytes() == live

    forced = _hotspots("run", "--config", str(path), "--as-of", LATER, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert f"skipped unreadable file {tmp_path / 'feed.ndjson'}" in forced.stdout
    latest = json.loads((tmp_path / "output" / "feed" / "latest.json").read_text())
    assert latest["snapshot_id"] != json.loads(live)["snapshot_id"]
    assert strictjson.load(tmp_path / "output" / "feed" / latest["path"] / "manifest.json")["counts"]["scored"] == 0


def test_hotspots_rejected_prints_samples_with_their_reasons(write_config, tmp_path):
    (tmp_path / "a.csv").write_text(
        "id,y,x,t,cat\n1,40.7,-73.9,2026-10-30,ok\n2,,-73.9,2026-10-30,no position\n"
        "3,40.7,-73.9,someday,\x1b[31mred\x1b[0m\n4,95,-73.9,2026-10-30,pole\n"
    )
    source = {
        "kind": "file",
        "path": "a.csv",
        "columns": {"report_id": "id", "lat": "y", "lng": "x", "observed_at": "t", "category": "cat"},
    }
    path = write_config({"sources": {"s": source}, "tilesets": {"s": {"source": "s", "maxzoom": 4}}})
    run = _hotspots("run", "--config", str(path), "--as-of", AS_OF.isoformat(), "--force", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "rejected: latitude_out_of_range 1, missing_coordinates 1, unparseable_timestamp 1" in run.stdout

    out = _hotspots("rejected", "s", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "source s: 3 of 4 rows rejected"
    rows = [line for line in lines if " a.csv" in line or "a.csv " in line]
    assert len(rows) == 3
    assert any(" 2  missing_coordinates" in r and "category=no position" in r for r in rows)
    assert any(" 3  unparseable_timestamp" in r and "observed_at=someday" in r for r in rows)
    assert "\x1b" not in out.stdout and "\\x1b[31mred" in out.stdout  # no escape sequence reaches the terminal

    one = _hotspots(
        "rejected", "s", "--config", str(path), "--reason", "latitude_out_of_range", "--limit", "5", cwd=tmp_path
    )
    assert [r for r in one.stdout.splitlines() if "a.csv" in r] == [r for r in rows if "latitude_out_of_range" in r]
    unknown = _hotspots("rejected", "nope", "--config", str(path), cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown source 'nope' (known: s)" in unknown.stderr
    no_such = _hotspots("rejected", "s", "--config", str(path), "--reason", "rate_limited", cwd=tmp_path)
    assert no_such.returncode == 2 and "(reasons: latitude_out_of_range 1," in no_such.stderr


def test_dagster_checks_carry_the_numbers_and_block_only_the_lost_source(write_config, tmp_path):
    path = _shared(write_config, None)
    defs = build_definitions(path)
    instance = dg.DagsterInstance.ephemeral()
    params = {"as_of": AS_OF.isoformat()}
    extract = defs.resolve_job_def(EXTRACT_JOB)
    ops = ("raw_reports", "validated_reports", "reports_conservation", "reports_rejected_share")
    result = extract.execute_in_process(
        run_config={"ops": {op: {"config": params} for op in ops}}, instance=instance, raise_on_error=False
    )
    assert not result.success  # the blocking check fails the run: a scheduled run alerts
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["conservation"].passed and not checks["rejected_share"].passed
    table = checks["rejected_share"].metadata["by_source"].value
    assert "| nyc | 4,969 | 4,969 | 1.000 | 0.500 | unparseable_timestamp 4,907, missing_coordinates 62 |" in table
    assert "| quakes | 23,412 | 10 |" in table

    # validation finished, so the sensor publishes each tileset; each tileset's guard decides
    sensor = defs.resolve_sensor_def("publish_after_partial_extract")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event(),
    )
    requests = list(sensor(context))
    assert sorted(r.partition_key for r in requests) == ["nyc", "quakes"]
    outcomes = {}
    for request in requests:
        params = request.run_config["ops"]["build_plan"]["config"]
        run = execute_build(defs, instance, request.partition_key, params, raise_on_error=False)
        guard = _check(instance, MERGE_JOB, request.partition_key, "publish_guard")
        outcomes[request.partition_key] = (run.success, guard.passed, guard.metadata)
    assert outcomes["quakes"][:2] == (True, True)
    ok, passed, meta = outcomes["nyc"]
    assert (ok, passed) == (False, False)
    assert meta["read"].value == 4969 and meta["rejected"].value == 4969 and meta["max_rejected_fraction"].value == 0.5
    assert "source nyc: 4,969 of 4,969 rows rejected" in meta["problem"].value
    assert not (tmp_path / "output" / "nyc" / "latest.json").exists()
    assert (tmp_path / "output" / "quakes" / "latest.json").exists()


def _check(instance: dg.DagsterInstance, job: str, tileset: str, name: str):
    """The evaluation of check ``name`` in the tileset's latest run of ``job``."""
    [run] = instance.get_runs(dg.RunsFilter(job_name=job, tags={"dagster/partition": tileset}), limit=1)
    events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    [found] = [
        e.dagster_event.event_specific_data for e in events if e.dagster_event.event_specific_data.check_name == name
    ]
    return found


def test_extraction_check_alone_blocks_in_materialize(write_config):
    path = _shared(write_config, None)
    result = dg.materialize(
        [raw_reports, validated_reports, conservation, rejected_share],
        resources={"hotspots": HotspotsResource(config_path=str(path))},
        run_config={
            "ops": {
                "raw_reports": {"config": {"as_of": AS_OF.isoformat(), "force": True}},
                "validated_reports": {"config": {"as_of": AS_OF.isoformat()}},
                "reports_rejected_share": {"config": {"force": True}},
            }
        },
        raise_on_error=False,
    )
    assert result.success  # forced: the check records the loss and lets it through
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "rejected_share"]
    assert check.passed and check.metadata["forced"].value is True and "source nyc" in check.metadata["lost"].value


def test_the_partial_extract_sensor_publishes_nothing_when_extraction_itself_failed(write_config, tmp_path):
    (tmp_path / "a.csv").write_text("id,y,x,t\n1,40.7,-73.9,2026-10-30\n")
    source = {
        "kind": "file",
        "path": "a.csv",
        "columns": {"report_id": "id", "lat": "y", "lng": "x", "observed_at": "t"},
    }
    defs = build_definitions(write_config({"sources": {"s": source}}))
    (tmp_path / ".hotspots" / "warehouse.duckdb").mkdir(parents=True)  # not a database: raw_reports fails
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(EXTRACT_JOB).execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    sensor = defs.resolve_sensor_def("publish_after_partial_extract")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event(),
    )
    assert list(sensor(context) or []) == []
