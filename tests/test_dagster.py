"""Dagster, three layers: definitions load; materialize() everything; the webserver loads the location."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from assets.location import EXTRACT_JOB, PUBLISH_JOB, build_definitions
from assets.extraction import conservation, raw_reports, validated_reports
from resources import HotspotsResource

from .conftest import AS_OF, REPO

BIN = Path(sys.executable).parent


@pytest.fixture
def small_config(write_config) -> Path:
    return write_config({
        "sources": {
            "roads": {"kind": "synthetic", "domain": "road_conditions", "count": 4000, "bad_fraction": 0.01},
            "rail": {"kind": "synthetic", "domain": "rail_disruptions", "count": 1000},
        },
        "tilesets": {
            "roads": {"source": "roads", "profile": "road_conditions"},
            "rail": {"source": "rail", "profile": "rail_disruptions"},
        },
    })  # fmt: skip


def _params(*ops: str) -> dict:
    return {"ops": {op: {"config": {"as_of": AS_OF.isoformat()}} for op in ops}}


ALL_OPS = ("raw_reports", "validated_reports", "reports_conservation")


def _env(config: Path, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOTSPOTS_CONFIG": str(config), "DAGSTER_HOME": str(home)}


def test_definitions_load(small_config):
    defs = build_definitions(small_config)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_reports", "reports", "rejected_reports", "scored_reports", "cells"}
    assert {k.name for k in graph.asset_check_keys} == {
        "conservation", "scoring_conservation", "pyramid_conservation",
    }  # fmt: skip
    publish = defs.resolve_job_def(PUBLISH_JOB)
    assert publish.partitions_def.get_partition_keys() == ["rail", "roads"]
    assert defs.resolve_job_def(EXTRACT_JOB).partitions_def is None


def test_materialize_everything(small_config, tmp_path):
    defs = build_definitions(small_config)
    instance = dg.DagsterInstance.ephemeral()
    assets = list(defs.assets)
    checks = list(defs.asset_checks)
    result = dg.materialize(
        [raw_reports, validated_reports, conservation],
        resources={"hotspots": HotspotsResource(config_path=str(small_config))},
        run_config=_params(*ALL_OPS),
        instance=instance,
    )
    assert result.success
    for tileset in ("roads", "rail"):
        published = dg.materialize(
            [*assets, *checks],
            selection=dg.AssetSelection.assets("scored_reports", "cells"),
            partition_key=tileset,
            resources={"hotspots": HotspotsResource(config_path=str(small_config))},
            run_config=_params("scored_reports"),
            instance=instance,
        )
        assert published.success
        evaluations = {e.check_name: e.passed for e in published.get_asset_check_evaluations()}
        assert evaluations == {"scoring_conservation": True, "pyramid_conservation": True}
        meta = {
            e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in published.get_asset_materialization_events()
        }
        assert "| 14 |" in meta["cells"]["zooms"].value and "| 0 |" in meta["cells"]["zooms"].value
        assert (tmp_path / ".hotspots" / "work" / tileset / "cells" / "zoom=14" / "cells.parquet").exists()
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
    [check] = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == "conservation"
    assert (tmp_path / ".hotspots" / "warehouse.duckdb").exists()
    assert not any((tmp_path / "output").glob("**/*.duckdb"))
    assert not any((tmp_path / "output").glob("**/scored.parquet"))


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
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
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
        cwd=REPO, env=_env(small_config, tmp_path), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
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
