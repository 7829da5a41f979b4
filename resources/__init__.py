"""Dagster resources: where the config file is, and what it says."""

from __future__ import annotations

from dagster import ConfigurableResource

from pipeline.config import Config, load_config


class HotspotsResource(ConfigurableResource):
    """The Hotspots configuration a run works from.

    ``config_path`` is the ``hotspots.yaml`` to load (absolute, or relative to
    the current directory); its ``home`` holds the DuckDB warehouse and its
    ``output`` is the publish root.
    """

    config_path: str

    def load(self) -> Config:
        """Load and validate the configuration file."""
        return load_config(self.config_path)
