"""Dagster, three layers: definitions load; materialize() everything; the webserver loads the location."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.extraction import conservation, raw_reports, rejected_share, validated_reports
from assets.location import EXTRACT_JOB, MERGE_JOB, PLAN_JOB, PUBLISH_JOB, SHARD_JOB, SHARD_TILES_JOB, build_definitions
from pipeline import build, publish, warehouse
from pipeline.config import load_config
from resources import HotspotsResource

from .conftest import AS_OF, REPO, execute_build

BIN = Path(sys.executable).parent


@pytest.fixture
def small_config(write_config) -> Path:
    return write_config(
        {
            "sources": {
                "roads": {"kind": "synthetic", "domain": "road_conditions", "count": 4000, "bad_fraction": 0.01},
                "rail": {"kind": "synthetic", "domain": "rail_disruptions", "count": 1000},
            },
            "tilesets": {
                "roads": {"source": "roads", "profile": "road_conditions"},
                "rail": {"source": "rail", "profile": "rail_disruptions"},
            },
        }
    )


def _params(*ops: str) -> dict:
    return {"ops": {op: {"config": {"as_of": AS_OF.isoformat()}} for op in ops}}


ALL_OPS = ("raw_reports", "validated_reports", "reports_conservation", "reports_rejected_share")


def _env(config: Path, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOTSPOTS_CONFIG": str(config), "DAGSTER_HOME": str(home)}


def test_definitions_load(small_config):
    defs = build_definitions(small_config)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
        "raw_reports",
        "reports",
        "rejected_reports",
        "build_plan",
        "shards",
        "scored_reports",
        "cells",
        "selection",
        "shard_tiles",
        "tiles",
        "snapshot",
    }
    assert {k.name for k in graph.asset_check_keys} == {
        "conservation",
        "rejected_share",
        "scoring_conservation",
        "publish_guard",
        "pyramid_conservation",
        "selection_holds",
        "latest_is_complete",
    }
    publish = defs.resolve_job_def(PUBLISH_JOB)
    assert publish.partitions_def.get_partition_keys() == ["rail", "roads"]
    assert defs.resolve_job_def(PLAN_JOB).partitions_def.get_partition_keys() == ["rail", "roads"]
    shards = defs.resolve_job_def(SHARD_JOB).partitions_def  # tileset x shard
    assert defs.resolve_job_def(SHARD_TILES_JOB).partitions_def == shards  # the second wave of shards
    assert isinstance(shards, dg.MultiPartitionsDefinition)
    assert {d.name for d in shards.partitions_defs} == {"tileset", "shard"}
    assert defs.resolve_job_def(EXTRACT_JOB).partitions_def is None
    schedules = {s.name: (s.cron_schedule, s.execution_timezone, s.job_name) for s in defs.schedules}
    assert schedules == {
        "hourly_publish": ("0 * * * *", "UTC", "extract"),
        "nightly_retention": ("0 2 * * *", "UTC", "retention"),
    }
    assert [s.name for s in defs.sensors] == [
        "fresh_sources",
        "publish_after_extract",
        "publish_after_partial_extract",
        "shards_after_plan",
        "merge_after_shards",
        "tiles_after_merge",
        "publish_after_tiles",
    ]


def test_materialize_everything(small_config, tmp_path):
    defs = build_definitions(small_config)
    instance = dg.DagsterInstance.ephemeral()
    assets = list(defs.assets)
    checks = list(defs.asset_checks)
    result = dg.materialize(
        [raw_reports, validated_reports, conservation, rejected_share],
        resources={"hotspots": HotspotsResource(config_path=str(small_config))},
        run_config=_params(*ALL_OPS),
        instance=instance,
    )
    assert result.success
    resources = {"hotspots": HotspotsResource(config_path=str(small_config))}
    for tileset in ("roads", "rail"):
        planned = dg.materialize(
            [*assets, *checks],
            selection=dg.AssetSelection.assets("build_plan"),
            partition_key=tileset,
            resources=resources,
            run_config=_params("build_plan"),
            instance=instance,
        )
        assert planned.success
        shard = dg.materialize(
            [*assets, *checks],
            selection=dg.AssetSelection.assets("shards"),
            partition_key=dg.MultiPartitionKey({"tileset": tileset, "shard": "0"}),
            resources=resources,
            instance=instance,
        )
        assert shard.success
        merged = dg.materialize(
            [*assets, *checks],
            selection=dg.AssetSelection.assets("scored_reports", "cells", "selection"),
            partition_key=tileset,
            resources=resources,
            instance=instance,
        )
        assert merged.success
        encoded = dg.materialize(
            [*assets, *checks],
            selection=dg.AssetSelection.assets("shard_tiles"),
            partition_key=dg.MultiPartitionKey({"tileset": tileset, "shard": "0"}),
            resources=resources,
            instance=instance,
        )
        assert encoded.success
        published = dg.materialize(
            [*assets, *checks],
            selection=dg.AssetSelection.assets("tiles", "snapshot"),
            partition_key=tileset,
            resources=resources,
            instance=instance,
        )
        assert published.success
        evaluations = {e.check_name: e.passed for run in (merged, published) for e in run.get_asset_check_evaluations()}
        assert evaluations == {
            "scoring_conservation": True,
            "publish_guard": True,
            "pyramid_conservation": True,
            "selection_holds": True,
            "latest_is_complete": True,
        }
        meta = {
            e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for run in (merged, encoded, published)
            for e in run.get_asset_materialization_events()
        }
        assert meta["shard_tiles"]["dagster/row_count"].value > 0  # the shard encoded its tiles
        assert "| 14 |" in meta["cells"]["zooms"].value and "| 0 |" in meta["cells"]["zooms"].value
        assert (tmp_path / ".hotspots" / "work" / tileset / "cells" / "zoom=14" / "cells.parquet").exists()
        latest = json.loads((tmp_path / "output" / tileset / "latest.json").read_text())
        assert meta["snapshot"]["snapshot_id"].value == latest["snapshot_id"]
        assert (tmp_path / "output" / tileset / latest["path"] / "manifest.json").exists()
    mats = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats["raw_reports"]["dagster/row_count"].value == 5000
    valid = mats["reports"]["dagster/row_count"].value
    rejected = mats["rejected_reports"]["dagster/row_count"].value
    assert valid + rejected == 5000 and rejected >= 40
    assert "| roads | rate_limited | 10 |" in mats["rejected_reports"]["by_reason"].value
    assert mats["reports"]["warehouse"].value == str(tmp_path / ".hotspots" / "warehouse.duckdb")
    assert {(c.check_name, c.passed) for c in result.get_asset_check_evaluations()} == {
        ("conservation", True),
        ("rejected_share", True),
    }
    assert (tmp_path / ".hotspots" / "warehouse.duckdb").exists()
    assert not any((tmp_path / "output").glob("**/*.duckdb"))
    assert not any((tmp_path / "output").glob("**/scored.parquet"))


def _after_extract(defs, instance, extraction) -> list[dg.RunRequest]:
    """What `publish_after_extract` requests when the daemon sees this extraction succeed."""
    sensor = defs.resolve_sensor_def("publish_after_extract")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=extraction.dagster_run,
        dagster_event=extraction.get_run_success_event(),
    )
    return list(sensor(context) or [])


def test_sensor_publishes_every_tileset_after_an_extraction(small_config):
    defs = build_definitions(small_config)
    instance = dg.DagsterInstance.ephemeral()
    extract = defs.resolve_job_def(EXTRACT_JOB)
    result = extract.execute_in_process(run_config=_params(*ALL_OPS), instance=instance)
    assert result.success
    requests = _after_extract(defs, instance, result)
    assert [r.partition_key for r in requests] == ["rail", "roads"]
    assert {r.run_key for r in requests} == {f"{result.run_id}:rail", f"{result.run_id}:roads"}
    assert requests[0].run_config["ops"]["build_plan"]["config"]["as_of"] == AS_OF.isoformat()


def test_conservation_check_fails_when_a_row_goes_missing(small_config):
    from pipeline import warehouse
    from pipeline.config import load_config

    resources = {"hotspots": HotspotsResource(config_path=str(small_config))}
    assert dg.materialize(
        [raw_reports, validated_reports], resources=resources, run_config=_params(*ALL_OPS[:2])
    ).success
    with warehouse.writer(load_config(small_config).warehouse_path) as con:
        con.execute("DELETE FROM reports WHERE report_id IN (SELECT report_id FROM reports LIMIT 1)")
    result = dg.materialize(
        [raw_reports, validated_reports, conservation],
        resources=resources,
        run_config=_params(ALL_OPS[2]),
        selection=dg.AssetSelection.checks(conservation),
        raise_on_error=False,
    )
    [check] = result.get_asset_check_evaluations()
    assert not check.passed


def test_dagster_definitions_validate_and_dg_check_defs(small_config, tmp_path):
    env = _env(small_config, tmp_path)
    out = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [str(BIN / "dg"), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"


def test_webserver_loads_the_hotspots_location(small_config, tmp_path):
    port = _free_port()
    log = open(tmp_path / "webserver.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=_env(small_config, tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        entries, deadline = None, time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=json.dumps({"query": QUERY}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    entries = json.load(resp)["data"]["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()
            time.sleep(1)
        assert entries == [{"name": "hotspots", "loadStatus": "LOADED"}], (tmp_path / "webserver.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


RUN_JOB = """
import sys
sys.path.insert(0, REPO)  # tests.conftest, from any working folder
from assets.location import build_definitions
from tests.conftest import execute_build
import dagster as dg
config, job_name, partition, as_of = sys.argv[1:5]
defs = build_definitions(config)
instance = dg.DagsterInstance.ephemeral()
if job_name == "extract":
    ops = {o: {"config": {"as_of": as_of}} for o in ("raw_reports", "validated_reports", "reports_conservation")}
    result = defs.resolve_job_def(job_name).execute_in_process(
        run_config={"ops": ops}, instance=instance, raise_on_error=False
    )
else:  # a tileset's whole build: plan, shards, merge, the shards' tiles, publish
    result = execute_build(defs, instance, partition, {"as_of": as_of}, raise_on_error=False)
print("OK" if result.success else "FAILED")
""".replace("REPO", repr(str(REPO)), 1)


def test_two_tilesets_and_an_extraction_at_the_same_time_all_succeed(small_config):
    def start(job, partition=""):
        return subprocess.Popen(
            [sys.executable, "-c", RUN_JOB, str(small_config), job, partition, AS_OF.isoformat()],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    first = start(EXTRACT_JOB)
    assert first.wait(timeout=240) == 0 and first.stdout.read().strip() == "OK"
    procs = [start(PUBLISH_JOB, "roads"), start(PUBLISH_JOB, "rail"), start(EXTRACT_JOB)]
    try:
        outcomes = [(p.wait(timeout=300), p.stdout.read().strip(), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for code, out, err in outcomes:
        assert (code, out) == (0, "OK"), err[-3000:]
        assert "lock" not in err.lower(), err[-3000:]
    for tileset in ("roads", "rail"):
        latest = json.loads((small_config.parent / "output" / tileset / "latest.json").read_text())
        assert latest["as_of"] == AS_OF.isoformat()


def test_a_dagster_run_beside_a_cli_run_of_the_same_tileset(small_config, tmp_path):
    """A multiprocess Dagster run (each step its own process) and `hotspots run`, at once, on one tileset."""
    env = _env(small_config, tmp_path)
    first = subprocess.run(
        [str(BIN / "hotspots"), "run", "--tileset", "roads", "--as-of", AS_OF.isoformat()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    middle, later = AS_OF.replace(hour=15), AS_OF.replace(hour=18)
    # the Dagster deployment's way: the plan, shard and publish jobs, recorded in $DAGSTER_HOME's instance
    script = RUN_JOB.replace("dg.DagsterInstance.ephemeral()", "dg.DagsterInstance.get()")
    dagster_run = [sys.executable, "-c", script, str(small_config), PUBLISH_JOB, "roads", middle.isoformat()]
    cli_run = [str(BIN / "hotspots"), "run", "--tileset", "roads", "--as-of", later.isoformat()]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in (dagster_run, cli_run)
    ]
    try:
        outcomes = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for code, out in outcomes:
        assert code == 0, out[-4000:]
        assert "FAILED" not in out and "WarehouseBusyError" not in out and "is busy" not in out, out[-4000:]
    assert outcomes[0][1].strip().endswith("OK")
    # each run published its own as_of, whole: its steps were not mixed with the other's
    snapshots = small_config.parent / "output" / "roads" / "snapshots"
    published = {
        p.name.split("-")[0]: json.loads((p / "manifest.json").read_text())
        for p in snapshots.iterdir()
        if not p.name.startswith(".")
    }
    assert set(published) == {f"{t:%Y%m%dT%H%M%SZ}" for t in (AS_OF, middle, later)}
    for manifest in published.values():
        assert (
            manifest["counts"]["scored"] + sum(manifest["counts"]["excluded"].values()) == manifest["counts"]["valid"]
        )
    cfg = load_config(small_config)
    assert publish.verify_latest(cfg.published("roads")) is None
    assert not cfg.work("roads").lease.exists()  # both runs handed the tileset back
    with warehouse.reader(cfg.warehouse_path) as con:
        assert con.execute("SELECT count(*) FROM reports WHERE source = 'roads'").fetchone()[0] > 3900


def test_the_sensor_honours_a_tilesets_yaml_as_of(write_config):
    """The hourly schedule extracts without an as_of: each tileset's own `as_of:` still applies."""
    own = datetime(2026, 10, 15, 6, 0, tzinfo=UTC)
    config = write_config(
        {
            "sources": {"rail": {"kind": "synthetic", "domain": "rail_disruptions", "count": 500}},
            "tilesets": {
                "pinned": {"source": "rail", "profile": "rail_disruptions", "as_of": own.isoformat()},
                "live": {"source": "rail", "profile": "rail_disruptions"},
            },
        }
    )
    defs = build_definitions(config)
    instance = dg.DagsterInstance.ephemeral()
    extracted = defs.resolve_job_def(EXTRACT_JOB).execute_in_process(instance=instance)  # as the schedule does
    assert extracted.success
    extracted_at = next(
        e.materialization.metadata["as_of"].value
        for e in extracted.get_asset_materialization_events()
        if e.materialization.asset_key.to_user_string() == "reports"
    )
    cfg = load_config(config)
    for request in _after_extract(defs, instance, extracted):
        params = request.run_config["ops"]["build_plan"]["config"]
        assert execute_build(defs, instance, request.partition_key, params).success
        scored_at = build.read_scoring(cfg.work(request.partition_key))["as_of"]
        assert scored_at == (own.isoformat() if request.partition_key == "pinned" else extracted_at)


def test_a_yaml_edit_between_steps_changes_nothing_in_a_planned_build(small_config):
    """Scoring freezes the plan; the later steps read it, not the YAML (which once gave selection
    another cell_detail than the cells were built with)."""
    defs = build_definitions(small_config)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"hotspots": HotspotsResource(config_path=str(small_config))}
    everything = [*defs.assets, *defs.asset_checks]

    def steps(*names: str, **run_config):
        return dg.materialize(
            everything,
            selection=dg.AssetSelection.assets(*names),
            partition_key="roads",
            resources=resources,
            run_config=run_config,
            instance=instance,
        )

    assert dg.materialize(
        [raw_reports, validated_reports], resources=resources, run_config=_params(*ALL_OPS[:2]), instance=instance
    ).success
    assert steps("build_plan", **_params("build_plan")).success
    shard = dg.MultiPartitionKey({"tileset": "roads", "shard": "0"})
    assert dg.materialize(
        everything, selection=["shards"], partition_key=shard, resources=resources, instance=instance
    ).success
    assert steps("scored_reports", "cells").success
    edited = yaml.safe_load(small_config.read_text())
    edited["tilesets"]["roads"].update(cell_detail=4, strata_detail=1, maxzoom=9, max_features_per_tile=40)
    small_config.write_text(yaml.safe_dump(edited))
    chosen = steps("selection")
    assert dg.materialize(
        everything, selection=["shard_tiles"], partition_key=shard, resources=resources, instance=instance
    ).success
    rest = steps("tiles", "snapshot")
    assert chosen.success and rest.success
    evaluations = [e for run in (chosen, rest) for e in run.get_asset_check_evaluations()]
    assert {e.check_name: e.passed for e in evaluations} == {
        "selection_holds": True,
        "latest_is_complete": True,
    }
    cfg = load_config(small_config)
    latest = publish.read_latest(cfg.published("roads"))
    manifest = json.loads((cfg.published("roads").root / latest["path"] / "manifest.json").read_text())
    config = manifest["config"]
    assert (config["cell_detail"], config["strata_detail"], config["max_features_per_tile"]) == (6, 3, 500)
    assert max(z["z"] for z in manifest["zooms"]) == 14 and manifest["key"] == "roads"
    # the next run plans again, from the edited YAML
    assert steps("build_plan", **_params("build_plan")).success
    assert dg.materialize(
        everything, selection=["shards"], partition_key=shard, resources=resources, instance=instance
    ).success
    assert steps("scored_reports", "cells", "selection").success
    assert dg.materialize(
        everything, selection=["shard_tiles"], partition_key=shard, resources=resources, instance=instance
    ).success
    assert steps("tiles", "snapshot").success
    latest = publish.read_latest(cfg.published("roads"))
    manifest = json.loads((cfg.published("roads").root / latest["path"] / "manifest.json").read_text())
    assert manifest["config"]["cell_detail"] == 4 and max(z["z"] for z in manifest["zooms"]) == 9


def test_every_asset_check_and_sensor_says_what_it_is(small_config):
    """The UI shows these descriptions; assets and checks take them from their docstrings."""
    defs = build_definitions(small_config)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).description, key
    for check in defs.asset_checks or []:
        for spec in check.check_specs:
            assert spec.description, spec.name
    for sensor in defs.sensors:
        assert sensor.description, sensor.name
    scored = next(a for a in defs.assets if dg.AssetKey("scored_reports") in a.keys)
    assert scored.descriptions_by_key[scored.key] == inspect.getdoc(scored.op.compute_fn.decorated_fn)


def test_the_sensors_carry_a_build_from_its_plan_through_its_shards_to_its_snapshot(write_config):
    """As the daemon does: extraction -> plan -> one run per shard -> publish once the last shard is done."""
    config = write_config(
        {
            "sources": {"rail": {"kind": "synthetic", "domain": "rail_disruptions", "count": 1500}},
            "tilesets": {"rail": {"source": "rail", "profile": "rail_disruptions", "shards": 3, "shard_zoom": 10}},
        }
    )
    defs = build_definitions(config)
    instance = dg.DagsterInstance.ephemeral()
    extracted = defs.resolve_job_def(EXTRACT_JOB).execute_in_process(instance=instance)
    [request] = _after_extract(defs, instance, extracted)
    planned = defs.resolve_job_def(PLAN_JOB).execute_in_process(
        run_config=request.run_config, partition_key="rail", instance=instance
    )

    def sensor_after(name: str, result) -> list[dg.RunRequest]:
        sensor = defs.resolve_sensor_def(name)
        context = dg.build_run_status_sensor_context(
            sensor_name=name,
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=result.get_run_success_event(),
        )
        return list(sensor(context) or [])

    shard_requests = sensor_after("shards_after_plan", planned)
    assert [r.partition_key.keys_by_dimension for r in shard_requests] == [
        {"tileset": "rail", "shard": str(i)} for i in range(3)
    ]
    assert set(instance.get_dynamic_partitions("shard")) >= {"0", "1", "2"}

    def each(job: str, requests: list[dg.RunRequest], after: str) -> list[list[dg.RunRequest]]:
        """Run ``job`` for each request as the daemon would; what sensor ``after`` asks for after each run."""
        asked = []
        for r in requests:
            run = defs.resolve_job_def(job).execute_in_process(
                partition_key=r.partition_key, tags=r.tags, instance=instance
            )
            assert run.success
            asked.append(sensor_after(after, run))
        return asked

    merge_requests = each(SHARD_JOB, shard_requests, "merge_after_shards")
    assert [len(r) for r in merge_requests] == [0, 0, 1]  # only once every shard is done
    [tile_requests] = each(MERGE_JOB, merge_requests[-1], "tiles_after_merge")
    assert [r.partition_key.keys_by_dimension for r in tile_requests] == [
        {"tileset": "rail", "shard": str(i)} for i in range(3)
    ]
    publish_requests = each(SHARD_TILES_JOB, tile_requests, "publish_after_tiles")
    assert [len(r) for r in publish_requests] == [0, 0, 1]  # once every shard has encoded its tiles
    [final] = publish_requests[-1]
    published = defs.resolve_job_def(PUBLISH_JOB).execute_in_process(
        partition_key=final.partition_key, tags=final.tags, instance=instance
    )
    assert published.success
    cfg = load_config(config)
    assert build.read_scoring(cfg.work("rail"))["shards"] == 3
    assert publish.verify_latest(cfg.published("rail")) is None
