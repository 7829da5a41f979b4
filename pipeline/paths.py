"""Where everything lives: the private work folders under ``home`` and the public snapshots under ``output``.

::

    <home>/warehouse.duckdb                   every source's reports (private)
    <home>/work/<key>.lease                   which run is building <key>
    <home>/work/<key>/plan.json               the build's frozen plan
                      scored.parquet, scoring.json
                      cells/zoom=<z>/cells.parquet, cells.json
                      selected/zoom=<z>/…, selected.json
                      staged.json
    <output>/<tileset>/latest.json            names the live snapshot
    <output>/<tileset>/snapshots/<id>/        one published snapshot
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WAREHOUSE = "warehouse.duckdb"
SNAPSHOTS = "snapshots"
LATEST = "latest.json"


def warehouse(home: Path) -> Path:
    """The DuckDB warehouse under ``home``."""
    return home / WAREHOUSE


@dataclass(frozen=True)
class Work:
    """A build's private work folder, ``<home>/work/<key>/``."""

    root: Path

    @classmethod
    def of(cls, home: Path, key: str) -> Work:
        return cls(home / "work" / key)

    @property
    def lease(self) -> Path:
        """Keeps two runs' steps on this folder from interleaving (see ``warehouse.run_step``)."""
        return self.root.with_name(f"{self.root.name}.lease")

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def scored(self) -> Path:
        return self.root / "scored.parquet"

    @property
    def scoring(self) -> Path:
        return self.root / "scoring.json"

    @property
    def cells_root(self) -> Path:
        return self.root / "cells"

    def cells(self, z: int) -> Path:
        return self.cells_root / f"zoom={z}" / "cells.parquet"

    @property
    def cells_summary(self) -> Path:
        return self.root / "cells.json"

    @property
    def selected_root(self) -> Path:
        return self.root / "selected"

    def selected(self, z: int) -> Path:
        return self.selected_root / f"zoom={z}"

    @property
    def selected_summary(self) -> Path:
        return self.root / "selected.json"

    @property
    def staged(self) -> Path:
        return self.root / "staged.json"


@dataclass(frozen=True)
class Published:
    """A tileset's public folder, ``<output>/<tileset>/``."""

    root: Path

    @classmethod
    def of(cls, output: Path, tileset: str) -> Published:
        return cls(output / tileset)

    @property
    def snapshots(self) -> Path:
        return self.root / SNAPSHOTS

    @property
    def latest(self) -> Path:
        return self.root / LATEST
