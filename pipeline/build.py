"""Build one tileset: score its reports, then its cell pyramid, in its private work folder.

``<home>/work/<tileset>/`` holds ``scored.parquet`` (individual positions:
never published), ``scoring.json``, and ``cells/zoom=<z>/cells.parquet``
with ``cells.json``; publishing copies what is public into ``output/``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from . import atomic, extract, geoparquet, pyramid, scoring
from .config import Config


class ZoomSummary(NamedTuple):
    """What one zoom of the pyramid holds."""

    z: int
    cells: int
    reports: int
    weight: float
    max_score: float
    bytes: int


def work_dir(cfg: Config, tileset: str) -> Path:
    """The tileset's private working folder under ``home``."""
    return cfg.home / "work" / tileset


def lease_path(cfg: Config, tileset: str) -> Path:
    """The lease that keeps two runs' steps on a tileset's work folder from interleaving."""
    return cfg.home / "work" / f"{tileset}.lease"


def cells_path(cfg: Config, tileset: str, z: int) -> Path:
    return work_dir(cfg, tileset) / "cells" / f"zoom={z}" / "cells.parquet"


def decide_as_of(given: datetime | None, tileset_as_of: datetime | None, default: datetime) -> datetime:
    """The one rule for the time a run is computed at.

    ``given`` (``--as-of``, run config ``as_of``) wins; else the tileset's own
    ``as_of`` from the YAML; else ``default``: the time of the extraction the
    run publishes (``hotspots run``'s start, or the extraction run's, which the
    publishing sensor passes on), else the run's own start.
    """
    return given or tileset_as_of or default


def score_tileset(cfg: Config, tileset: str, as_of: datetime) -> scoring.ScoreResult:
    """Score the tileset's reports into ``scored.parquet`` (+ ``scoring.json``)."""
    ts = cfg.tilesets[tileset]
    profile, filters = scoring.resolve(ts)
    started = time.perf_counter()
    result = scoring.score_reports(scoring.read_reports(cfg.warehouse_path, ts.source), profile, filters, as_of)
    out = work_dir(cfg, tileset)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "scored.parquet", lambda p: result.scored.write_parquet(p, compression="zstd"))
    summary = {
        "tileset": tileset,
        "source": {"name": ts.source, **extract.source_counts(cfg.warehouse_path, ts.source)},
        "as_of": as_of.isoformat(),
        "valid": result.valid,
        "scored": result.scored.height,
        "excluded": result.excluded,
        "weight": float(result.scored.get_column("weight").sum()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _atomic(out / "scoring.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    return result


def read_scoring(cfg: Config, tileset: str) -> dict:
    return json.loads((work_dir(cfg, tileset) / "scoring.json").read_text())


def build_cells(cfg: Config, tileset: str) -> list[ZoomSummary]:
    """Build the pyramid from ``scored.parquet`` and write one GeoParquet per zoom."""
    ts = cfg.tilesets[tileset]
    profile, _ = scoring.resolve(ts)
    scored = pl.read_parquet(work_dir(cfg, tileset) / "scored.parquet")
    cells_root = work_dir(cfg, tileset) / "cells"
    shutil.rmtree(cells_root, ignore_errors=True)
    summaries = []

    def write(frame: pl.DataFrame, z: int) -> ZoomSummary:
        size = geoparquet.write(frame, cells_path(cfg, tileset, z))
        return ZoomSummary(
            z,
            frame.height,
            int(frame.get_column("report_count").sum()),
            float(frame.get_column("weight").sum()),
            float(frame.get_column("score").max()),
            size,
        )

    # a zoom's file is written while the next coarser zoom is rolled up (at most two zooms held)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for frame in pyramid.build(scored, profile, ts.minzoom, ts.maxzoom, ts.cell_detail):
            if frame.height == 0:
                continue
            if pending is not None:
                summaries.append(pending.result())
            pending = writer.submit(write, frame, int(frame.get_column("z")[0]))
            del frame
        if pending is not None:
            summaries.append(pending.result())
    summaries.sort()
    _atomic(
        work_dir(cfg, tileset) / "cells.json",
        lambda p: p.write_text(json.dumps([s._asdict() for s in summaries], indent=2)),
    )
    return summaries


class PyramidCheck(NamedTuple):
    z: int
    reports: int
    expected_reports: int
    weight: float
    expected_weight: float
    centroids_inside: bool

    @property
    def holds(self) -> bool:
        close = math.isclose(self.weight, self.expected_weight, rel_tol=1e-9, abs_tol=1e-9)
        return self.reports == self.expected_reports and close and self.centroids_inside


def check_pyramid(cfg: Config, tileset: str) -> list[PyramidCheck]:
    """Per zoom, read back: Σ report_count = scored reports, Σ weight = their weight, centroids in cells."""
    ts = cfg.tilesets[tileset]
    summary = read_scoring(cfg, tileset)
    rows = []
    for z in range(ts.minzoom, ts.maxzoom + 1):
        path = cells_path(cfg, tileset, z)
        if not path.exists():
            rows.append(PyramidCheck(z, 0, summary["scored"], 0.0, summary["weight"], summary["scored"] == 0))
            continue
        cells = pl.read_parquet(path, columns=["report_count", "weight", "lng", "lat", "cell_key"])
        rows.append(
            PyramidCheck(
                z,
                int(cells.get_column("report_count").sum()),
                summary["scored"],
                float(cells.get_column("weight").sum()),
                summary["weight"],
                centroids_inside(cells, z + ts.cell_detail),
            )
        )
    return rows


def centroids_inside(cells: pl.DataFrame, level: int) -> bool:
    """Whether every centroid lies within its cell's bounds (edges included)."""
    west, south, east, north = pyramid.cell_bounds(*pyramid.cell_xy(cells.get_column("cell_key").to_numpy()), level)
    lng, lat = cells.get_column("lng").to_numpy(), cells.get_column("lat").to_numpy()
    return bool(np.all((west <= lng) & (lng <= east) & (south <= lat) & (lat <= north)))


def parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _atomic(path: Path, write) -> None:
    with atomic.replacing(path) as tmp:
        write(tmp)


def top_cells(cfg: Config, tileset: str, n: int) -> list[dict]:
    """The ``n`` highest-score cells at the tileset's max zoom (ties: quadkey)."""
    path = cells_path(cfg, tileset, cfg.tilesets[tileset].maxzoom)
    if not path.exists():
        return []
    cells = pl.read_parquet(path, columns=["quadkey", "report_count", "score", "top_category", "lng", "lat"])
    return cells.sort(["score", "quadkey"], descending=[True, False]).head(n).to_dicts()


def read_cells(cfg: Config, tileset: str) -> list[dict]:
    """The per-zoom summary ``build_cells`` wrote."""
    return json.loads((work_dir(cfg, tileset) / "cells.json").read_text())
