"""Extraction (sources -> raw_reports) and validation (-> reports, rejected_reports).

No ``from __future__ import annotations`` here: Dagster reads the ``config:``
annotation at definition time.
"""

import time

import dagster as dg

from pipeline import extract, guard
from resources import HotspotsResource

from .common import RunParams, markdown_table, resolve_as_of, selected_sources


@dg.asset(
    group_name="extract",
    kinds={"duckdb"},
)
def raw_reports(
    context: dg.AssetExecutionContext, config: RunParams, hotspots: HotspotsResource
) -> dg.MaterializeResult:
    """Every row every source gave, as text, in the warehouse's `raw_reports`."""
    cfg = hotspots.load()
    sources = selected_sources(cfg, config)
    as_of = resolve_as_of(context, config)
    started = time.perf_counter()
    extract.preflight(cfg, sources)
    staged = extract.stage(cfg, sources, as_of, full_refresh=config.full_refresh, force=config.force)
    rows = [
        [name, f.file, f.rows, "kept (unchanged)" if f.kept else "read", f.error or ""]
        for name, files in staged.items()
        for f in files
    ]
    errors = [r for r in rows if r[4]]
    for name, file, _, _, error in errors:
        context.log.warning(f"source {name}: cannot read {file}: {error}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(r[2] for r in rows),
            "as_of": as_of.isoformat(),
            "files": markdown_table(["source", "file", "rows", "staged", "error"], rows),
            "files_kept": sum(f.kept for files in staged.values() for f in files),
            "unreadable_files": len(errors),
            "warehouse": dg.MetadataValue.path(str(cfg.warehouse_path)),
            "seconds": round(time.perf_counter() - started, 3),
        }
    )


@dg.multi_asset(
    specs=[
        dg.AssetSpec(name, deps=[raw_reports], group_name="extract", kinds={"duckdb"}, description=what)
        for name, what in (
            ("reports", "Canonical, validated reports (one row per located signal)."),
            ("rejected_reports", "Rows that failed validation: the source row, its fields and the reason."),
        )
    ],
)
def validated_reports(context: dg.AssetExecutionContext, config: RunParams, hotspots: HotspotsResource):
    cfg = hotspots.load()
    sources = selected_sources(cfg, config)
    as_of = resolve_as_of(context, config)
    started = time.perf_counter()
    results = extract.validate(cfg, sources, as_of, full_refresh=config.full_refresh)
    seconds = round(time.perf_counter() - started, 3)
    warehouse = dg.MetadataValue.path(str(cfg.warehouse_path))
    yield dg.MaterializeResult(
        asset_key="reports",
        metadata={
            "dagster/row_count": sum(r.valid for r in results.values()),
            "by_source": markdown_table(
                ["source", "read", "valid", "rejected"],
                [[r.source, r.read, r.valid, r.rejected_total] for r in results.values()],
            ),
            "as_of": as_of.isoformat(),
            "warehouse": warehouse,
            "seconds": seconds,
        },
    )
    yield dg.MaterializeResult(
        asset_key="rejected_reports",
        metadata={
            "dagster/row_count": sum(r.rejected_total for r in results.values()),
            "by_reason": markdown_table(
                ["source", "reason", "rows"],
                [[r.source, reason, n] for r in results.values() for reason, n in r.rejected.items()],
            ),
            "warehouse": warehouse,
        },
    )


@dg.asset_check(
    asset="reports",
    blocking=True,
)
def conservation(config: RunParams, hotspots: HotspotsResource) -> dg.AssetCheckResult:
    """read = valid + rejected, for every source of the run."""
    cfg = hotspots.load()
    rows = extract.conservation(cfg.warehouse_path, selected_sources(cfg, config))
    return dg.AssetCheckResult(
        passed=all(r.holds for r in rows),
        metadata={
            "by_source": markdown_table(
                ["source", "read", "valid", "rejected", "holds"],
                [[r.source, r.read, r.valid, r.rejected, r.holds] for r in rows],
            )
        },
    )


REJECTED_SHARE_STEP = "reports_rejected_share"  # the step of the check below, in the extract job


@dg.asset_check(
    asset="reports",
    blocking=True,
)
def rejected_share(config: RunParams, hotspots: HotspotsResource) -> dg.AssetCheckResult:
    """No source lost its data: at most `max_rejected_fraction` (default 0.5) of the rows each source read were
    rejected. A failure publishes nothing of that source; `--force` publishes.
    """
    cfg = hotspots.load()
    rows, lost = [], []
    for name in selected_sources(cfg, config):
        counts = extract.source_counts(cfg.warehouse_path, name)
        loss = guard.source_loss(cfg, name, counts["read"], counts["rejected"])
        rejected = sum(counts["rejected"].values())
        rows.append(
            [
                name,
                counts["read"],
                rejected,
                guard.share_rejected(counts["read"], rejected),
                cfg.sources[name].max_rejected_fraction,
                guard.reasons_text(counts["rejected"]) or "none",
            ]
        )
        if loss:
            lost.append(loss)
    return dg.AssetCheckResult(
        passed=not lost or config.force,
        metadata={
            "by_source": markdown_table(["source", "read", "rejected", "share", "max", "top reasons"], rows),
            "lost": "\n".join(lost) or "none",
            "forced": config.force,
        },
    )
