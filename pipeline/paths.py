"""Where everything lives: the private work folders under ``home`` and the public snapshots under ``output``.

::

    <home>/warehouse.duckdb                   every source's reports (private)
    <home>/dagster/                           the Dagster instance (runs, materializations)
    <home>/duckdb_extensions/                 the postgres extension, from its wheel
    <home>/work/<key>.lease                   which run is building <key>
    <home>/work/<key>/plan.json               the build's frozen plan
                      shards/<i>/scored.parquet, scoring.json, cells/, pivot.npz,
                                selected/, selected.json   (one shard's)
                      shards/<i>.lease        which run is building shard <i>
                      scoring.json
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


def dagster_instance(home: Path) -> Path:
    """The Dagster instance `hotspots run` records its runs in (and `make dev` shows)."""
    return home / "dagster"


def duckdb_extensions(home: Path) -> Path:
    """Where DuckDB installs the postgres extension from its wheel (no download)."""
    return home / "duckdb_extensions"


def scratch(home: Path) -> Path:
    """Private scratch space of the warehouse's writer (a synthetic source's batches while staged)."""
    return home / "scratch"


def _in_root(name: str) -> property:
    """A file or folder of the work folder, by name."""
    return property(lambda self: self.root / name, doc=f"``{name}``")


@dataclass(frozen=True)
class Work:
    """A build's private work folder, ``<home>/work/<key>/``."""

    root: Path

    plan = _in_root("plan.json")  # the frozen plan (pipeline.plan)
    scoring = _in_root("scoring.json")
    shards_root = _in_root("shards")
    cells_root = _in_root("cells")
    cells_summary = _in_root("cells.json")
    selected_root = _in_root("selected")
    selected_summary = _in_root("selected.json")
    staged = _in_root("staged.json")
    tile_cache = _in_root("tile-cache")  # the last build's MVT tiles (vector.TileCache)

    @classmethod
    def of(cls, home: Path, key: str) -> Work:
        return cls(home / "work" / key)

    @property
    def lease(self) -> Path:
        """Keeps two runs' steps on this folder from interleaving (see ``warehouse.run_step``)."""
        return self.root.with_name(f"{self.root.name}.lease")

    def cells(self, z: int) -> Path:
        return self.cells_root / f"zoom={z}" / "cells.parquet"

    def shard(self, i: int) -> Shard:
        return Shard(self.shards_root / str(i))

    def selected(self, z: int) -> Path:
        return self.selected_root / f"zoom={z}"

    def shard_tile_cache(self, i: int) -> Path:
        """Shard ``i``'s MVT tiles from the last build (kept across builds: the shards' folders are not)."""
        return self.tile_cache / f"shard-{i}"


@dataclass(frozen=True)
class Shard:
    """One shard's part of a build, ``<work>/shards/<i>/`` (see :func:`pipeline.build.split`)."""

    root: Path

    scored = _in_root("scored.parquet")  # individual positions: never published
    scoring = _in_root("scoring.json")
    pivot = _in_root("pivot.npz")  # its cells at the pivot zoom, with what the roll-up above needs
    final = _in_root("final")  # a plan's only shard: every zoom's cells, ready to move into place
    selected = _in_root("selected.json")  # what it chose, per zoom (publish.select_shard)
    selections = _in_root("selected")  # its tiles' selection, a folder per zoom (see selection)
    encoding = _in_root("encoded.json")  # what it encoded, per zoom (publish.encode_shard)

    def strays(self, z: int) -> Path:
        """Its features' buffered rows drawn in other shards' tiles at zoom ``z`` (see publish.select_shard)."""
        return self.root / "strays" / f"{z}.arrow"

    @property
    def lease(self) -> Path:
        """Keeps two runs of this shard apart (shards of one build run side by side)."""
        return self.root.with_name(f"{self.root.name}.lease")

    def cells(self, z: int) -> Path:
        """Its cells of zoom ``z`` (at or below the pivot zoom), before intensity (Arrow IPC)."""
        return self.root / "cells" / f"{z}.arrow"

    def selection(self, z: int) -> Path:
        """Its tiles' selection at zoom ``z``: published rows without intensity, tile features, digests."""
        return self.selections / f"zoom={z}"


@dataclass(frozen=True)
class Published:
    """A tileset's public folder, ``<output>/<tileset>/``."""

    root: Path

    snapshots = _in_root(SNAPSHOTS)
    latest = _in_root(LATEST)  # names the live snapshot

    @classmethod
    def of(cls, output: Path, tileset: str) -> Published:
        return cls(output / tileset)
