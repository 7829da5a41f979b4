"""Per-tileset assets (partitioned by tileset): scored reports, then the cell pyramid.

No ``from __future__ import annotations``: Dagster reads the ``config:`` annotation.
"""

import time

import dagster as dg

from pipeline import build, guard
from resources import HotspotsResource

from .common import RunParams, markdown_table, resolve_as_of, tileset_step


def tileset_assets(partitions: dg.PartitionsDefinition) -> tuple[list, list]:
    """The per-tileset scoring and pyramid assets and their checks."""

    @dg.asset(
        partitions_def=partitions,
        deps=["reports"],
        group_name="tilesets",
        kinds={"polars"},
    )
    def scored_reports(
        context: dg.AssetExecutionContext, config: RunParams, hotspots: HotspotsResource
    ) -> dg.MaterializeResult:
        """Each valid report of the tileset's source weighted by its profile, or excluded with a reason (private:
        `<home>/work/<tileset>/scored.parquet`).
        """
        cfg, name = hotspots.load(), context.partition_key
        as_of = resolve_as_of(context, config, cfg.tilesets[name].as_of)
        started = time.perf_counter()
        with tileset_step(context, cfg, name):
            result = build.score_tileset(cfg, name, as_of)
        seconds = round(time.perf_counter() - started, 3)
        ts = cfg.tilesets[name]
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.scored.height,
                "valid": result.valid,
                "excluded": markdown_table(
                    ["reason", "reports"], [[r, n] for r, n in result.excluded.items()] or [["none", 0]]
                ),
                "profile": f"{ts.profile}" + (f" / {ts.preset}" if ts.preset else ""),
                "as_of": as_of.isoformat(),
                "seconds": seconds,
                "path": dg.MetadataValue.path(str(build.work_dir(cfg, name) / "scored.parquet")),
            }
        )

    @dg.asset_check(
        asset=scored_reports,
        partitions_def=partitions,
        blocking=True,
    )
    def scoring_conservation(context: dg.AssetCheckExecutionContext, hotspots: HotspotsResource):
        """valid = scored + excluded, and scored.parquet holds every scored report."""
        cfg, name = hotspots.load(), context.partition_key
        with tileset_step(context, cfg, name):
            summary = build.read_scoring(cfg, name)
            rows = build.parquet_rows(build.work_dir(cfg, name) / "scored.parquet")
        excluded = sum(summary["excluded"].values())
        return dg.AssetCheckResult(
            passed=summary["valid"] == summary["scored"] + excluded and rows == summary["scored"],
            metadata={"valid": summary["valid"], "scored": rows, "excluded": excluded},
        )

    @dg.asset_check(
        asset=scored_reports,
        partitions_def=partitions,
        blocking=True,
    )
    def publish_guard(
        context: dg.AssetCheckExecutionContext, config: RunParams, hotspots: HotspotsResource
    ) -> dg.AssetCheckResult:
        """The run did not lose its data: the source rejected at most `max_rejected_fraction` of its rows, and at
        least `min_publish_fraction` of the live snapshot's reports were scored. A failure keeps the live
        snapshot; `--force` publishes anyway.
        """
        cfg, name = hotspots.load(), context.partition_key
        with tileset_step(context, cfg, name):
            summary = build.read_scoring(cfg, name)
            loss = guard.guard_tileset(cfg, name, summary)
            live = guard.live_snapshot(cfg, name)
        source = summary["source"]
        rejected = sum(source["rejected"].values())
        return dg.AssetCheckResult(
            passed=loss is None or config.force,
            metadata={
                "source": source["name"],
                "read": source["read"],
                "rejected": rejected,
                "rejected_share": guard.share_rejected(source["read"], rejected),
                "max_rejected_fraction": cfg.sources[source["name"]].max_rejected_fraction,
                "scored": summary["scored"],
                "live_scored": guard.scored_in(live[1]) if live else 0,
                "live_snapshot": live[0] if live else "none",
                "min_publish_fraction": cfg.tilesets[name].min_publish_fraction,
                "problem": loss or "none",
                "forced": config.force,
            },
        )

    @dg.asset(
        partitions_def=partitions,
        deps=[scored_reports],
        group_name="tilesets",
        kinds={"polars", "parquet"},
    )
    def cells(context: dg.AssetExecutionContext, hotspots: HotspotsResource) -> dg.MaterializeResult:
        """Tile-aligned cells for every zoom, rolled up from the finest
        (`<home>/work/<tileset>/cells/zoom=<z>/cells.parquet`, GeoParquet 1.1).
        """
        cfg, name = hotspots.load(), context.partition_key
        started = time.perf_counter()
        with tileset_step(context, cfg, name):
            zooms = build.build_cells(cfg, name)
            seconds = round(time.perf_counter() - started, 3)
            top = build.top_cells(cfg, name, 5)
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
                "path": dg.MetadataValue.path(str(build.work_dir(cfg, name) / "cells")),
            }
        )

    @dg.asset_check(
        asset=cells,
        partitions_def=partitions,
        blocking=True,
    )
    def pyramid_conservation(context: dg.AssetCheckExecutionContext, hotspots: HotspotsResource):
        """At every zoom: Σ report_count = scored reports, Σ weight = their weight (1e-9 relative), and every
        centroid inside its cell.
        """
        cfg, name = hotspots.load(), context.partition_key
        with tileset_step(context, cfg, name):
            rows = build.check_pyramid(cfg, name)
        return dg.AssetCheckResult(
            passed=all(r.holds for r in rows),
            metadata={
                "zooms": markdown_table(
                    ["z", "reports", "expected", "weight", "expected", "centroids inside", "holds"],
                    [
                        [r.z, r.reports, r.expected_reports, r.weight, r.expected_weight, r.centroids_inside, r.holds]
                        for r in rows
                    ],
                )
            },
        )

    return [scored_reports, cells], [scoring_conservation, publish_guard, pyramid_conservation]
