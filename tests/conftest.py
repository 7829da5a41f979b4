"""Shared fixtures: real sample data paths, config files in tmp_path, a fixed as_of."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from pipeline import build, extract, plan, publish
from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
AS_OF = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
IN_CI = bool(os.environ.get("CI"))


# the columns of shared/data/nyc311_animals_2025.csv (NYC 311 service requests)
NYC_COLUMNS = {
    "report_id": "Unique Key",
    "lat": "Latitude",
    "lng": "Longitude",
    "observed_at": "Created Date",
    "category": "Complaint Type",
    "status": "Status",
}


def shared_file(name: str) -> Path:
    """A real sample file from ../shared/data (never copied into the repo)."""
    path = SHARED_DATA / name
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing: CI must have ../shared beside the checkout")
        pytest.skip(f"{path} is not here (needs ../shared/data beside the checkout)")
    return path


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config mapping to tmp_path/hotspots.yaml and return its path."""

    def write(data: dict, name: str = "hotspots.yaml") -> Path:
        data = {"output": "output", "home": ".hotspots", **data}
        data.setdefault("tilesets", {name: {"source": name} for name in data["sources"]})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def run_extraction(cfg: Config, as_of: datetime = AS_OF):
    """Stage and validate every source of cfg; return the validation results."""
    sources = list(cfg.sources)
    extract.preflight(cfg, sources)
    staged = extract.stage(cfg, sources, as_of)
    return staged, extract.validate(cfg, sources, as_of)


def plan_for(cfg: Config, tileset: str, as_of: datetime = AS_OF) -> plan.Plan:
    """What a build's first step does: resolve the plan, split it into shards, freeze it in the work folder."""
    frozen = build.split(plan.make(cfg, tileset, as_of))
    plan.write(frozen)
    return frozen


def plan_of(cfg: Config, tileset: str) -> plan.Plan:
    """The plan the tileset's last build froze (what its later steps read)."""
    return plan.read(cfg.work(tileset).plan)


def publish_tileset(cfg: Config, tileset: str, as_of: datetime = AS_OF) -> publish.Snapshot:
    """Score, build, select, stage and publish one tileset (extraction done); the snapshot."""
    frozen = plan_for(cfg, tileset, as_of)
    build.score_tileset(frozen)
    build.build_cells(frozen)
    publish.select_tileset(frozen)
    publish.encode_tiles(frozen)
    publish.stage_snapshot(frozen)
    return publish.finalize_snapshot(frozen)


@pytest.fixture
def extract_config(write_config):
    """Write a config, load it, run extraction; returns (cfg, staged, validated)."""

    def run(data: dict, as_of: datetime = AS_OF):
        cfg = load_config(write_config(data))
        staged, validated = run_extraction(cfg, as_of)
        return cfg, staged, validated

    return run


def execute_build(defs, instance, tileset: str, params: dict | None = None, raise_on_error: bool = True):
    """A tileset's build as Dagster runs it: the plan job, a shard job per shard, the merge job, a
    shard tiles job per shard, the publish job.

    ``params`` (RunParams) go to every op that takes config. Returns the last
    run's result (the first that failed, if one did).
    """
    import dagster as dg

    from assets.location import MERGE_JOB, PLAN_JOB, PUBLISH_JOB, SHARD_JOB, SHARD_TILES_JOB

    def run(job_name: str, key):
        job = defs.resolve_job_def(job_name)
        ops = [n.name for n in job.graph.node_defs if n.config_schema is not None] if params is not None else []
        return job.execute_in_process(
            run_config={"ops": {op: {"config": params} for op in ops}},
            partition_key=key,
            instance=instance,
            raise_on_error=raise_on_error,
        )

    planned = run(PLAN_JOB, tileset)
    if not planned.success:
        return planned
    [meta] = [e.materialization.metadata for e in planned.get_asset_materialization_events()]
    shards = [dg.MultiPartitionKey({"tileset": tileset, "shard": str(i)}) for i in range(meta["shards"].value)]
    for job in (SHARD_JOB, MERGE_JOB, SHARD_TILES_JOB):
        for result in [run(job, key) for key in shards] if job != MERGE_JOB else [run(job, tileset)]:
            if not result.success:
                return result
    return run(PUBLISH_JOB, tileset)


@pytest.fixture(scope="module")
def server():
    """A real PostgreSQL 15 + PostGIS for a module's tests (tests/pg.py); missing: fails in CI, else skips."""
    from . import pg

    why = pg.missing()
    if why:
        if IN_CI:
            pytest.fail(f"CI must provide PostgreSQL + PostGIS: {why}")
        pytest.skip(why)
    with pg.server() as srv:
        yield srv
