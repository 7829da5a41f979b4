"""Builds the Dagster definitions of Hotspots over one config file.

``assets/definitions.py`` (what ``workspace.yaml`` loads) calls it with the
default config; the CLI calls it with ``--config``. Importing this module
loads no config.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dagster as dg

from pipeline.config import default_config_path, load_config
from pipeline.errors import ConfigError
from resources import HotspotsResource

from .extraction import conservation, raw_reports, rejected_share, validated_reports
from .publishing import publishing_assets, retention_job, schedules_and_sensors
from .tilesets import tileset_assets

EXECUTORS = ("in_process", "multiprocess", "dask")
EXTRACT_JOB = "extract"
PLAN_JOB = "plan"
SHARD_JOB = "shard"
MERGE_JOB = "merge"
SHARD_TILES_JOB = "encode"
PUBLISH_JOB = "publish"


def executor(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor of every job: ``name``, else ``$HOTSPOTS_EXECUTOR``, else ``in_process``.

    ``in_process`` runs a run's steps in its own process (what ``hotspots run``
    does; a step in a process of its own pays seconds of imports). ``multiprocess``
    gives each step a process. ``dask`` sends each step to a Dask cluster: the
    scheduler at ``$HOTSPOTS_DASK_SCHEDULER`` (``tcp://host:8786``), else a
    local cluster per run. Its workers need this package installed and the
    config's ``home`` and ``output`` on a file system they all see.
    """
    name = name or os.environ.get("HOTSPOTS_EXECUTOR") or "in_process"
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "dask":
        from dagster_dask import dask_executor  # the `cluster` extra

        address = os.environ.get("HOTSPOTS_DASK_SCHEDULER")
        cluster = {"existing": {"address": address}} if address else {"local": {}}
        return dask_executor.configured({"cluster": cluster})
    raise ConfigError("HOTSPOTS_EXECUTOR", f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")


def job(config_path: str, name: str, executor_name: str | None = None) -> dg.JobDefinition:
    """One job of the definitions over ``config_path``: what a worker process rebuilds (see
    ``dagster.build_reconstructable_job``) to run a step the Dask executor sends it."""
    return build_definitions(config_path, executor_name).resolve_job_def(name)


def build_definitions(config_path: str | Path | None = None, executor_name: str | None = None) -> dg.Definitions:
    """Definitions of every asset, check and job, over one config file.

    The tilesets of the config are the partitions of the per-tileset assets;
    ``executor_name`` picks the executor (see :func:`executor`).
    """
    path = (Path(config_path) if config_path else default_config_path()).resolve()
    cfg = load_config(path)
    partitions = dg.StaticPartitionsDefinition(sorted(cfg.tilesets))
    # Partitioned asset checks (a result per tileset) are a Dagster preview
    # feature, used here on purpose: its warning is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        scoring_assets, scoring_checks = tileset_assets(partitions)
        build_plan, shards, *merged = scoring_assets
        published, published_checks = publishing_assets(partitions, shards.partitions_def, upstream=merged[-1])
    selection, shard_tiles, *publication = published
    per_tileset_checks = scoring_checks + published_checks
    extract_job = dg.define_asset_job(
        EXTRACT_JOB,
        selection=dg.AssetSelection.assets(raw_reports, validated_reports),
        description="Read every source into the warehouse and validate it.",
    )
    plan_job = dg.define_asset_job(
        PLAN_JOB,
        selection=dg.AssetSelection.assets(build_plan),
        partitions_def=partitions,
        description="Plan one tileset's build (a partition): freeze its settings and split it into shards.",
    )
    shard_job = dg.define_asset_job(
        SHARD_JOB,
        selection=dg.AssetSelection.assets(shards),
        partitions_def=shards.partitions_def,
        description="One shard of a tileset's build (a tileset x shard partition): score, cells to the pivot zoom.",
    )
    merge_job = dg.define_asset_job(
        MERGE_JOB,
        selection=dg.AssetSelection.assets(*merged, selection),
        partitions_def=partitions,
        description="Merge one tileset's shards (a partition): its cells above the pivot zoom; choose its tiles.",
    )
    shard_tiles_job = dg.define_asset_job(
        SHARD_TILES_JOB,
        selection=dg.AssetSelection.assets(shard_tiles),
        partitions_def=shards.partitions_def,
        description="One shard's MVT tiles (a tileset x shard partition), once its tileset's tiles are chosen.",
    )
    publish_job = dg.define_asset_job(
        PUBLISH_JOB,
        selection=dg.AssetSelection.assets(*publication),
        partitions_def=partitions,
        description="Put one tileset's archive and files together (a partition) and publish the snapshot.",
    )
    schedules_sensors = schedules_and_sensors(
        extract_job, plan_job, shard_job, merge_job, shard_tiles_job, publish_job, partitions, cfg.freshness_interval_s
    )
    return dg.Definitions(
        assets=[raw_reports, validated_reports, build_plan, shards, *merged, *published],
        asset_checks=[conservation, rejected_share, *per_tileset_checks],
        jobs=[extract_job, plan_job, shard_job, merge_job, shard_tiles_job, publish_job, retention_job],
        schedules=[s for s in schedules_sensors if isinstance(s, dg.ScheduleDefinition)],
        sensors=[s for s in schedules_sensors if isinstance(s, dg.SensorDefinition)],
        resources={"hotspots": HotspotsResource(config_path=str(path))},
        executor=executor(executor_name),
    )
