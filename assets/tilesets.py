"""Per-tileset assets (partitioned by tileset): scored reports, then the cell pyramid.

No ``from __future__ import annotations``: Dagster reads the ``config:`` annotation.
"""

import time

import dagster as dg

from pipeline import build, guard
from pipeline import plan as plans
from resources import HotspotsResource

from .common import RunParams, freeze_plan, markdown_table, planned_step, work_step, zooms_check


def tileset_assets(partitions: dg.PartitionsDefinition) -> tuple[list, list]:
    """The per-tileset scoring and pyramid assets and their checks."""

    @dg.asset(partitions_def=partitions, deps=["reports"], group_name="tilesets", kinds={"polars"})
    def scored_reports(
        context: dg.AssetExecutionContext, config: RunParams, hotspots: HotspotsResource
    ) -> dg.MaterializeResult:
        """Each valid report of the tileset's source weighted by its profile, or excluded with a reason (private:
        `<home>/work/<tileset>/shards/<i>/scored.parquet`, one per spatial shard). The build's first step: it
        splits the tileset into shards and freezes the plan every later step reads
        (`<home>/work/<tileset>/plan.json`).
        """
        plan = freeze_plan(context, config, hotspots.load())
        started = time.perf_counter()
        with work_step(context, plan.work):
            plan = build.split(plan)
            plans.write(plan)
            result = build.score_tileset(plan)
        seconds = round(time.perf_counter() - started, 3)
        ts = plan.settings
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.scored,
                "valid": result.valid,
                "excluded": markdown_table(
                    ["reason", "reports"], [[r, n] for r, n in result.excluded.items()] or [["none", 0]]
                ),
                "profile": f"{ts.profile}" + (f" / {ts.preset}" if ts.preset else ""),
                "as_of": plan.as_of.isoformat(),
                "seconds": seconds,
                "shards": len(plan.shards),
                "path": dg.MetadataValue.path(str(plan.work.root / "shards")),
                "plan": dg.MetadataValue.path(str(plan.work.plan)),
            }
        )

    @dg.asset_check(asset=scored_reports, partitions_def=partitions, blocking=True)
    def scoring_conservation(context: dg.AssetCheckExecutionContext):
        """valid = scored + excluded, and the shards' scored.parquet hold every scored report."""
        with planned_step(context) as plan:
            summary = build.read_scoring(plan.work)
            rows = build.scored_rows(plan)
        excluded = sum(summary["excluded"].values())
        return dg.AssetCheckResult(
            passed=summary["valid"] == summary["scored"] + excluded and rows == summary["scored"],
            metadata={"valid": summary["valid"], "scored": rows, "excluded": excluded},
        )

    @dg.asset_check(asset=scored_reports, partitions_def=partitions, blocking=True)
    def publish_guard(context: dg.AssetCheckExecutionContext, config: RunParams) -> dg.AssetCheckResult:
        """The run did not lose its data: the source rejected at most `max_rejected_fraction` of its rows, and at
        least `min_publish_fraction` of the live snapshot's reports were scored. A failure keeps the live
        snapshot; `--force` publishes anyway.
        """
        with planned_step(context) as plan:
            summary = build.read_scoring(plan.work)
            loss = guard.guard_tileset(plan, summary)
            live = guard.live_snapshot(plan.published)
        source = summary["source"]
        rejected = sum(source["rejected"].values())
        return dg.AssetCheckResult(
            passed=loss is None or config.force,
            metadata={
                "source": source["name"],
                "read": source["read"],
                "rejected": rejected,
                "rejected_share": guard.share_rejected(source["read"], rejected),
                "max_rejected_fraction": plan.max_rejected_fraction,
                "scored": summary["scored"],
                "live_scored": guard.scored_in(live[1]) if live else 0,
                "live_snapshot": live[0] if live else "none",
                "min_publish_fraction": plan.settings.min_publish_fraction,
                "problem": loss or "none",
                "forced": config.force,
            },
        )

    @dg.asset(partitions_def=partitions, deps=[scored_reports], group_name="tilesets", kinds={"polars", "parquet"})
    def cells(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Tile-aligned cells for every zoom, rolled up from the finest, shard by shard down to the shard zoom,
        then merged (`<home>/work/<tileset>/cells/zoom=<z>/cells.parquet`, GeoParquet 1.1).
        """
        started = time.perf_counter()
        with planned_step(context) as plan:
            zooms = build.build_cells(plan)
            seconds = round(time.perf_counter() - started, 3)
            top = build.top_cells(plan, 5)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": sum(z.cells for z in zooms),
                "zooms": markdown_table(
                    ["z", "cells", "reports", "weight", "max score", "bytes"],
                    [[z.z, z.cells, z.reports, z.weight, z.max_score, z.bytes] for z in zooms],
                ),
                "top_cells": markdown_table(
                    ["quadkey", "reports", "score", "top category", "lng", "lat"],
                    [[r["quadkey"], r["report_count"], r["score"], r["top_category"], r["lng"], r["lat"]] for r in top],
                ),
                "seconds": seconds,
                "cell_detail": plan.settings.cell_detail,
                "path": dg.MetadataValue.path(str(plan.work.cells_root)),
            }
        )

    @dg.asset_check(asset=cells, partitions_def=partitions, blocking=True)
    def pyramid_conservation(context: dg.AssetCheckExecutionContext):
        """At every zoom: Σ report_count = scored reports, Σ weight = their weight (1e-9 relative), and every
        centroid inside its cell.
        """
        with planned_step(context) as plan:
            rows = build.check_pyramid(plan)
        return zooms_check(rows, ["z", "reports", "expected", "weight", "expected", "centroids inside"])

    return [scored_reports, cells], [scoring_conservation, publish_guard, pyramid_conservation]
