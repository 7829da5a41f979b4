"""The ``hotspots`` code location (``workspace.yaml`` loads this module).

The config file is ``$HOTSPOTS_CONFIG``, else ``./hotspots.yaml``, else the
repository's own ``hotspots.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from pipeline.config import default_config_path
from resources import HotspotsResource

from .extraction import conservation, raw_reports, validated_reports

JOB_NAME = "hotspots"


def build_definitions(config_path: str | Path | None = None) -> dg.Definitions:
    """Definitions of every asset, check and job, over one config file."""
    path = Path(config_path) if config_path else default_config_path()
    job = dg.define_asset_job(
        JOB_NAME,
        selection=dg.AssetSelection.all(),
        description="Extract, validate and publish every tileset.",
    )
    return dg.Definitions(
        assets=[raw_reports, validated_reports],
        asset_checks=[conservation],
        jobs=[job],
        resources={"hotspots": HotspotsResource(config_path=str(path.resolve()))},
    )


defs = build_definitions()
