"""Build one tileset: score its reports, then its cell pyramid, in its private work folder.

Every function takes the build's frozen :class:`~pipeline.plan.Plan`; its
``work`` folder (see :mod:`pipeline.paths`) holds ``scored.parquet``
(individual positions: never published), ``scoring.json``, and
``cells/zoom=<z>/cells.parquet`` with ``cells.json``; publishing copies what
is public into ``output/``. This module reads the warehouse and hands frames
to the pure stages (:mod:`~pipeline.scoring`, :mod:`~pipeline.pyramid`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from . import atomic, extract, geoparquet, pyramid, scoring, tilemath, warehouse
from .paths import Work
from .plan import Plan


class ZoomSummary(NamedTuple):
    """What one zoom of the pyramid holds."""

    z: int
    cells: int
    reports: int
    weight: float
    max_score: float
    bytes: int


def read_reports(db: Path, source: str) -> pl.LazyFrame:
    """The valid reports of one source, from the warehouse (read-only), as Arrow."""
    cols = ", ".join(f'"{c}"' for c in scoring.READ_COLUMNS)
    with warehouse.reader(db) as con:
        table = con.execute(f"SELECT {cols} FROM reports WHERE source = ?", [source]).fetch_arrow_table()
    return pl.from_arrow(table).lazy()


def score_tileset(plan: Plan) -> scoring.ScoreResult:
    """Score the tileset's reports into ``scored.parquet`` (+ ``scoring.json``)."""
    started = time.perf_counter()
    result = scoring.score_reports(read_reports(plan.warehouse, plan.source), plan.profile, plan.filters, plan.as_of)
    work = plan.work
    work.root.mkdir(parents=True, exist_ok=True)
    _atomic(work.scored, lambda p: result.scored.write_parquet(p, compression="zstd"))
    summary = {
        "tileset": plan.tileset,
        "source": {"name": plan.source, **extract.source_counts(plan.warehouse, plan.source)},
        "as_of": plan.as_of.isoformat(),
        "valid": result.valid,
        "scored": result.scored.height,
        "excluded": result.excluded,
        "weight": float(result.scored.get_column("weight").sum()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _atomic(work.scoring, lambda p: p.write_text(json.dumps(summary, indent=2)))
    return result


def read_scoring(work: Work) -> dict:
    return json.loads(work.scoring.read_text())


def build_cells(plan: Plan) -> list[ZoomSummary]:
    """Build the pyramid from ``scored.parquet`` and write one GeoParquet per zoom."""
    ts, work = plan.settings, plan.work
    scored = pl.read_parquet(work.scored)
    shutil.rmtree(work.cells_root, ignore_errors=True)
    summaries = []

    def write(frame: pl.DataFrame, z: int) -> ZoomSummary:
        size = geoparquet.write(frame, work.cells(z))
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
        for frame in pyramid.build(scored, plan.profile, ts.minzoom, ts.maxzoom, ts.cell_detail):
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
        work.cells_summary,
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


def check_pyramid(plan: Plan) -> list[PyramidCheck]:
    """Per zoom, read back: Σ report_count = scored reports, Σ weight = their weight, centroids in cells."""
    summary = read_scoring(plan.work)
    rows = []
    for z in plan.zooms:
        path = plan.work.cells(z)
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
                centroids_inside(cells, z + plan.settings.cell_detail),
            )
        )
    return rows


def centroids_inside(cells: pl.DataFrame, level: int) -> bool:
    """Whether every centroid lies within its cell's bounds (edges included)."""
    west, south, east, north = tilemath.cell_bounds(*tilemath.cell_xy(cells.get_column("cell_key").to_numpy()), level)
    lng, lat = cells.get_column("lng").to_numpy(), cells.get_column("lat").to_numpy()
    return bool(np.all((west <= lng) & (lng <= east) & (south <= lat) & (lat <= north)))


def parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _atomic(path: Path, write) -> None:
    with atomic.replacing(path) as tmp:
        write(tmp)


def top_cells(plan: Plan, n: int) -> list[dict]:
    """The ``n`` highest-score cells at the tileset's max zoom (ties: quadkey)."""
    path = plan.work.cells(plan.settings.maxzoom)
    if not path.exists():
        return []
    cells = pl.read_parquet(path, columns=["quadkey", "report_count", "score", "top_category", "lng", "lat"])
    return cells.sort(["score", "quadkey"], descending=[True, False]).head(n).to_dicts()


def read_cells(work: Work) -> list[dict]:
    """The per-zoom summary ``build_cells`` wrote."""
    return json.loads(work.cells_summary.read_text())
