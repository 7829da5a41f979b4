"""Shards on a real distributed engine: a Dask cluster (a scheduler and two worker processes) through dagster-dask."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.location import EXTRACT_JOB, MERGE_JOB, PLAN_JOB, PUBLISH_JOB, SHARD_JOB, SHARD_TILES_JOB, build_definitions
from pipeline.config import load_config

from .conftest import AS_OF, IN_CI, execute_build
from .test_shards import digests

try:
    from dask.distributed import Client, LocalCluster
except ImportError:  # the `cluster` extra; CI installs it (dev depends on it)
    if IN_CI:
        raise
    pytest.skip("dask.distributed is not installed (pip install -e '.[cluster]')", allow_module_level=True)


def sharded(write_config, name: str) -> Path:
    rail = {"kind": "synthetic", "domain": "rail_disruptions", "count": 4000}
    tileset = {"source": "rail", "profile": "rail_disruptions", "shards": 4, "shard_zoom": 13}
    return write_config({"sources": {"rail": rail}, "tilesets": {"rail": tileset}}, name=f"{name}/hotspots.yaml")


def latest_snapshot(config: Path) -> Path:
    published = load_config(config).published("rail")
    return published.root / json.loads(published.latest.read_text())["path"]


def test_a_sharded_tileset_on_a_dask_cluster_publishes_the_in_process_bytes(write_config, tmp_path):
    params = {"as_of": AS_OF.isoformat()}
    (tmp_path / "local").mkdir()
    (tmp_path / "dask").mkdir()
    local, remote = sharded(write_config, "local"), sharded(write_config, "dask")

    with _instance(tmp_path / "instance-local") as instance:
        defs = build_definitions(local)
        extract = defs.resolve_job_def(EXTRACT_JOB)
        assert extract.execute_in_process(run_config={"ops": {"raw_reports": {"config": params}}}, instance=instance)
        assert execute_build(defs, instance, "rail", params).success

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        with Client(cluster) as client, _instance(tmp_path / "instance-dask") as instance:
            workers = {f"{host}:{pid}" for host, pid in client.run(_where).values()}
            assert len(workers) == 2

            def run(job: str, key, config: dict | None = None) -> dg.ExecutionResult:
                reconstructable = dg.build_reconstructable_job(
                    "assets.location", "job", reconstructable_args=(str(remote), job, "dask")
                )
                with pytest.MonkeyPatch.context() as env:  # the executor's cluster: this one
                    env.setenv("HOTSPOTS_DASK_SCHEDULER", cluster.scheduler_address)
                    result = dg.execute_job(
                        reconstructable,
                        instance=instance,
                        run_config={"ops": config or {}},
                        tags={"dagster/partition": key} if isinstance(key, str) else dict(key_tags(key)),
                    )
                assert result.success, job
                return result

            run(EXTRACT_JOB, "", {"raw_reports": {"config": params}})
            planned = run(PLAN_JOB, "rail", {"build_plan": {"config": params}})
            [meta] = [e.materialization.metadata for e in planned.get_asset_materialization_events()]
            assert meta["shards"].value == 4
            ran_on, rows, chosen = set(), [], []
            for i in range(4):
                shard = run(SHARD_JOB, dg.MultiPartitionKey({"tileset": "rail", "shard": str(i)}))
                [m] = [e.materialization.metadata for e in shard.get_asset_materialization_events()]
                assert m["in_plan"].value
                rows.append(m["dagster/row_count"].value)
                chosen.append(m["tile_features"].value)
                ran_on.add(m["process"].value)
            assert sum(1 for n in rows if n) >= 2  # the work really was split
            assert all(f > 0 for n, f in zip(rows, chosen) if n)  # each shard chose its own tiles' features
            assert ran_on <= workers and ran_on  # every shard ran in a worker process of the cluster
            run(MERGE_JOB, "rail")
            encoded_on, tiles = set(), []
            for i in range(4):  # the second wave: each shard encodes its tiles
                shard = run(SHARD_TILES_JOB, dg.MultiPartitionKey({"tileset": "rail", "shard": str(i)}))
                [m] = [e.materialization.metadata for e in shard.get_asset_materialization_events()]
                tiles.append(m["dagster/row_count"].value)
                encoded_on.add(m["process"].value)
            assert sum(1 for n in tiles if n) >= 2 and encoded_on <= workers
            run(PUBLISH_JOB, "rail")
    finally:
        cluster.close()

    assert digests(latest_snapshot(local)) == digests(latest_snapshot(remote))


def _instance(folder: Path) -> dg.DagsterInstance:
    folder.mkdir()
    return dg.DagsterInstance.local_temp(str(folder))  # on disk: the workers open it too


def _where() -> tuple[str, int]:
    import os
    import socket

    return socket.gethostname(), os.getpid()


def key_tags(key: dg.MultiPartitionKey):
    """The run tags Dagster gives a run of one partition of a multi-partitioned job."""
    yield "dagster/partition", str(key)
    for dimension, value in key.keys_by_dimension.items():
        yield f"dagster/partition/{dimension}", value
