"""Builds the Dagster definitions of Hotspots over one config file.

``assets/definitions.py`` (what ``workspace.yaml`` loads) calls it with the
default config; the CLI calls it with ``--config``. Importing this module
loads no config.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

from pipeline.config import default_config_path, load_config
from resources import HotspotsResource

from .extraction import conservation, raw_reports, rejected_share, validated_reports
from .publishing import publishing_assets, retention_job, schedules_and_sensors
from .tilesets import tileset_assets

EXTRACT_JOB = "extract"
PUBLISH_JOB = "publish"


def build_definitions(config_path: str | Path | None = None) -> dg.Definitions:
    """Definitions of every asset, check and job, over one config file.

    The tilesets of the config are the partitions of the per-tileset assets.
    """
    path = (Path(config_path) if config_path else default_config_path()).resolve()
    cfg = load_config(path)
    partitions = dg.StaticPartitionsDefinition(sorted(cfg.tilesets))
    # Partitioned asset checks (a result per tileset) are a Dagster preview
    # feature, used here on purpose: its warning is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        scoring_assets, scoring_checks = tileset_assets(partitions)
        published, published_checks = publishing_assets(partitions, upstream=scoring_assets[-1])
    per_tileset, per_tileset_checks = scoring_assets + published, scoring_checks + published_checks
    extract_job = dg.define_asset_job(
        EXTRACT_JOB,
        selection=dg.AssetSelection.assets(raw_reports, validated_reports),
        description="Read every source into the warehouse and validate it.",
    )
    publish_job = dg.define_asset_job(
        PUBLISH_JOB,
        selection=dg.AssetSelection.assets(*per_tileset),
        partitions_def=partitions,
        description="Score, build and publish one tileset (a partition).",
    )
    schedules_sensors = schedules_and_sensors(extract_job, publish_job, partitions)
    return dg.Definitions(
        assets=[raw_reports, validated_reports, *per_tileset],
        asset_checks=[conservation, rejected_share, *per_tileset_checks],
        jobs=[extract_job, publish_job, retention_job],
        schedules=[s for s in schedules_sensors if isinstance(s, dg.ScheduleDefinition)],
        sensors=[s for s in schedules_sensors if isinstance(s, dg.SensorDefinition)],
        resources={"hotspots": HotspotsResource(config_path=str(path))},
        # a run's steps in its own process, as `hotspots run` does: a step in a
        # process of its own paid seconds of imports, ten times per tileset
        executor=dg.in_process_executor,
    )
