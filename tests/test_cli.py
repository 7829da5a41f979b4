"""`hotspots run` end to end, as a user runs it (a subprocess, a real warehouse)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl

from pipeline import extract, warehouse
from pipeline.config import load_config

from .conftest import AS_OF

HOTSPOTS = str(Path(sys.executable).parent / "hotspots")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HOTSPOTS, "run", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _config(write_config, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("id,y,x,t\n1,40.7,-73.9,2026-10-30\n2,,1,2026-10-30\n")
    return write_config(
        {
            "sources": {
                "demo": {"kind": "synthetic", "domain": "campus_issues", "count": 3000},
                "csv": {
                    "kind": "file",
                    "path": "data/*.csv",
                    "columns": {"report_id": "id", "lat": "y", "lng": "x", "observed_at": "t"},
                },
            },
            "tilesets": {
                "campus": {"source": "demo", "profile": "campus_issues", "preset": "emergency"},
                "points": {"source": "csv"},
            },
        }
    )


def test_run_prints_counts_and_warehouse_and_is_idempotent(write_config, tmp_path):
    path = _config(write_config, tmp_path)
    first = _run("--config", str(path), "--as-of", AS_OF.isoformat(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "csv                           2          1          1" in first.stdout
    assert f"warehouse: {tmp_path / '.hotspots' / 'warehouse.duckdb'}" in first.stdout
    assert "tileset points: 1 scored, excluded: none; as_of 2026-11-01T12:00:00+00:00" in first.stdout
    assert f"cells z0-z14: 15 cells -> {tmp_path / '.hotspots' / 'work' / 'points' / 'cells'}" in first.stdout
    assert "tileset campus:" in first.stdout
    second = _run("--config", str(path), "--as-of", AS_OF.isoformat(), cwd=tmp_path)
    assert second.returncode == 0 and second.stdout == first.stdout
    cfg = load_config(path)
    with warehouse.reader(cfg.warehouse_path) as con:
        rows, distinct = con.execute("SELECT count(*), count(DISTINCT report_id) FROM reports").fetchone()
    counts = extract.conservation(cfg.warehouse_path, ["demo", "csv"])
    assert rows == distinct == sum(c.valid for c in counts)
    assert [c.read for c in counts] == [3000, 2] and all(c.holds for c in counts)


def test_runs_are_recorded_in_the_instance_make_dev_shows(write_config, tmp_path):
    path = _config(write_config, tmp_path)
    assert _run("--config", str(path), "--as-of", AS_OF.isoformat(), cwd=tmp_path).returncode == 0
    assert (
        _run("--config", str(path), "--tileset", "points", "--as-of", AS_OF.isoformat(), cwd=tmp_path).returncode == 0
    )
    with dg.DagsterInstance.local_temp(str(tmp_path / ".hotspots" / "dagster")) as instance:
        runs = sorted((r.job_name, _tileset(r)) for r in instance.get_runs())
        builds = [
            (job, t) for t in ("campus", "points", "points") for job in ("plan", "shard", "merge", "encode", "publish")
        ]
        assert runs == sorted([("extract", ""), ("extract", ""), *builds])
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in instance.get_runs())
        published = instance.get_runs(dg.RunsFilter(job_name="publish", tags={"dagster/partition": "points"}))[0]
        events = [e.dagster_event for e in instance.all_logs(published.run_id) if e.dagster_event]
        assert any(e.is_step_materialization for e in events) and any(
            e.event_type_value == "ASSET_CHECK_EVALUATION" for e in events
        )


def _tileset(run) -> str:
    return run.tags.get("dagster/partition/tileset", run.tags.get("dagster/partition", ""))


def test_a_sharded_build_runs_its_shards_side_by_side_and_publishes_the_same_bytes(write_config, tmp_path):
    from .test_shards import digests

    outputs = {}
    for shards in (1, 3):
        folder = tmp_path / f"s{shards}"
        folder.mkdir()
        rail = {"kind": "synthetic", "domain": "rail_disruptions", "count": 3000}
        tileset = {"source": "rail", "profile": "rail_disruptions", "shards": shards, "shard_zoom": 13}
        path = write_config({"sources": {"rail": rail}, "tilesets": {"rail": tileset}}, name=f"s{shards}/hotspots.yaml")
        done = _run("--config", str(path), "--as-of", AS_OF.isoformat(), cwd=folder)
        assert done.returncode == 0, done.stderr
        latest = (folder / "output" / "rail" / "latest.json").read_text()
        outputs[shards] = digests(folder / "output" / "rail" / __import__("json").loads(latest)["path"])
        with dg.DagsterInstance.local_temp(str(folder / ".hotspots" / "dagster")) as instance:
            runs = instance.get_runs(dg.RunsFilter(job_name="shard"))
            assert sorted(r.tags["dagster/partition/shard"] for r in runs) == [str(i) for i in range(shards)]
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        scored = [
            len(pl.read_parquet(p))
            for p in sorted((folder / ".hotspots" / "work" / "rail" / "shards").glob("*/scored.parquet"))
        ]
        assert len(scored) == shards and all(scored)  # each shard scored its own reports
    assert outputs[1] == outputs[3]


def test_commands_opening_a_new_instance_at_once_leave_it_usable(tmp_path):
    # Dagster stamps a new SQLite instance without a lock; unguarded, two of
    # four openers usually fail and can leave it with two schema heads for good
    opener = (
        "import sys, types; from assets.cli import _instance; "
        "i = _instance(types.SimpleNamespace(home=__import__('pathlib').Path(sys.argv[1]))); "
        "i.get_runs(limit=1); print('open')"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", opener, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    outcomes = [(p.wait(timeout=120), p.stderr.read().decode()[-500:]) for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    with dg.DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        assert instance.get_runs() == []


def test_run_one_tileset_reads_only_its_source(write_config, tmp_path):
    path = _config(write_config, tmp_path)
    out = _run("--config", str(path), "--tileset", "points", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "csv" in out.stdout and "demo" not in out.stdout
    assert "tileset points:" in out.stdout and "tileset campus" not in out.stdout
    assert not (tmp_path / ".hotspots" / "work" / "campus").exists()


def test_config_from_env_and_cwd(write_config, tmp_path):
    _config(write_config, tmp_path)
    out = _run(cwd=tmp_path)  # ./hotspots.yaml
    assert out.returncode == 0, out.stderr


def test_a_failing_step_exits_1_with_a_one_line_reason(write_config, tmp_path):
    path = _config(write_config, tmp_path)
    (tmp_path / ".hotspots" / "warehouse.duckdb").mkdir(parents=True)  # not a database file
    out = _run("--config", str(path), cwd=tmp_path)
    assert out.returncode == 1
    assert "hotspots: step raw_reports failed:" in out.stderr
    assert "Traceback" not in out.stderr


def test_verbose_shows_dagster_step_logs(write_config, tmp_path):
    path = _config(write_config, tmp_path)
    out = _run("--config", str(path), "--tileset", "points", "-v", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    logs = out.stdout + out.stderr
    assert 'Finished execution of step "raw_reports"' in logs and 'Finished execution of step "snapshot"' in logs


def test_without_as_of_the_tilesets_use_the_extractions_time_and_the_sensor_leaves_cli_runs_alone(
    write_config, tmp_path
):
    from assets.location import build_definitions
    from pipeline import build

    path = _config(write_config, tmp_path)
    assert _run("--config", str(path), "--tileset", "points", cwd=tmp_path).returncode == 0
    with dg.DagsterInstance.local_temp(str(tmp_path / ".hotspots" / "dagster")) as instance:
        extraction = instance.get_runs(dg.RunsFilter(job_name="extract"))[0]
        reports = instance.get_latest_materialization_event(dg.AssetKey("reports"))
        extracted_at = reports.asset_materialization.metadata["as_of"].value
        # one time for the whole command, handed to extraction and every tileset alike:
        # the tileset scores at the extraction's as_of
        ops = extraction.run_config["ops"]
        assert {op["config"]["default_as_of"] for op in ops.values() if "config" in op} == {extracted_at}
        assert build.read_scoring(load_config(path).work("points"))["as_of"] == extracted_at
        # `make dev`'s daemon, on the same instance, does not publish what the CLI publishes itself
        defs = build_definitions(path)
        sensor = defs.resolve_sensor_def("publish_after_extract")
        success = instance.all_logs(extraction.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)[0].dagster_event
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_instance=instance, dagster_run=extraction, dagster_event=success
        )
        assert list(sensor(context) or []) == []
