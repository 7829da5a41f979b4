"""Per-tileset assets (partitioned by tileset): the plan, its shards (tileset x shard), scored reports, the pyramid.

No ``from __future__ import annotations``: Dagster reads the ``config:`` annotation.
"""

import os
import socket
import time

import dagster as dg

from pipeline import build, guard, publish
from pipeline import plan as plans
from resources import HotspotsResource

from .common import (
    RunParams,
    freeze_plan,
    markdown_table,
    planned_step,
    shard_step,
    work_step,
    zooms_check,
)

SHARD = "shard"  # the shard dimension of the `shards` asset (dynamic: keys "0", "1", ...)


def shard_partitions(partitions: dg.PartitionsDefinition) -> dg.MultiPartitionsDefinition:
    """Tileset x shard: each shard of a tileset's build is a partition of the ``shards`` asset."""
    return dg.MultiPartitionsDefinition({"tileset": partitions, SHARD: dg.DynamicPartitionsDefinition(name=SHARD)})


def tileset_assets(partitions: dg.PartitionsDefinition) -> tuple[list, list]:
    """The per-tileset planning, shard, scoring and pyramid assets and their checks."""

    @dg.asset(partitions_def=partitions, deps=["reports"], group_name="tilesets", kinds={"duckdb"})
    def build_plan(context: dg.AssetExecutionContext, config: RunParams, hotspots: HotspotsResource):
        """The build's first step: the plan every later step reads (`<home>/work/<tileset>/plan.json`): the
        tileset's settings and `as_of`, frozen, and its spatial shards (runs of whole tiles balanced by report
        count; each is a partition of `shards`).
        """
        plan = freeze_plan(context, config, hotspots.load())
        # the build keeps the tileset's lease until its publish run takes it over
        with work_step(context, plan.work, owner=config.build):
            plan = build.split(plan)
            plans.write(plan)
            build.start(plan)
        keys = [str(i) for i in range(len(plan.shards))]
        known = set(context.instance.get_dynamic_partitions(SHARD))
        context.instance.add_dynamic_partitions(SHARD, [k for k in keys if k not in known])
        return dg.MaterializeResult(
            metadata={
                "shards": len(plan.shards),
                "shard_zoom": plan.shard_zoom,
                "as_of": plan.as_of.isoformat(),
                "plan": dg.MetadataValue.path(str(plan.work.plan)),
            }
        )

    @dg.asset(partitions_def=shard_partitions(partitions), deps=[build_plan], group_name="tilesets", kinds={"polars"})
    def shards(context: dg.AssetExecutionContext, config: RunParams) -> dg.MaterializeResult:
        """One spatial shard of a tileset: its own reports only (a range of the warehouse's tile keys), weighted,
        its cells from `maxzoom` down to the pivot zoom, and the features of its tiles at the zooms whose tiles
        it holds whole (`<home>/work/<tileset>/shards/<i>/`, private). Shards run in any order, on any executor;
        a shard the plan does not have does nothing.
        """
        key = context.partition_key.keys_by_dimension
        tileset, i = key["tileset"], int(key[SHARD])
        started = time.perf_counter()
        with shard_step(context, tileset, i, config.build) as plan:
            if i >= len(plan.shards):
                return dg.MaterializeResult(metadata={"dagster/row_count": 0, "in_plan": False})
            scored = build.run_shard(plan, i)
            chosen = publish.read_shard_selection(plan, i)
            lo, hi = plan.shards[i]
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": scored.scored,
                "in_plan": True,
                "valid": scored.valid,
                "tile_keys": f"[{lo}, {hi})",
                "tile_features": sum(s.selected_tile for s in chosen),  # chosen here, in the shard's process
                "tiles chosen": markdown_table(
                    ["z", "cells", "tiles", "tile features", "reused tiles"],
                    [[s.z, s.cells, s.tiles, s.selected_tile, s.reused] for s in chosen] or [["none", 0, 0, 0, 0]],
                ),
                "process": f"{socket.gethostname()}:{os.getpid()}",  # which worker ran it
                "seconds": round(time.perf_counter() - started, 3),
            }
        )

    @dg.asset(partitions_def=partitions, deps=[shards], group_name="tilesets", kinds={"polars"})
    def scored_reports(context: dg.AssetExecutionContext, config: RunParams) -> dg.MaterializeResult:
        """Each valid report of the tileset's source weighted by its profile, or excluded with a reason, summed
        from its shards (`<home>/work/<tileset>/scoring.json`; the weighted reports stay in each shard's
        private `scored.parquet`).
        """
        started = time.perf_counter()
        with planned_step(context, takes_over=True, build=config.build) as plan:
            result = build.merge_scoring(plan)
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
                "shards": len(plan.shards),
                "seconds": round(time.perf_counter() - started, 3),
                "path": dg.MetadataValue.path(str(plan.work.scoring)),
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
        """Tile-aligned cells for every zoom: the shards' parts one after another, the zooms above the pivot rolled
        up from their cells at the pivot zoom (`<home>/work/<tileset>/cells/zoom=<z>/cells.parquet`, GeoParquet 1.1).
        """
        started = time.perf_counter()
        with planned_step(context) as plan:
            zooms = build.merge_cells(plan)
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

    return [build_plan, shards, scored_reports, cells], [scoring_conservation, publish_guard, pyramid_conservation]
