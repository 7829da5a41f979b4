"""Nightly retention (seed 001's pg_cron job): old reports out of the warehouse, old snapshots pruned."""

from __future__ import annotations

from datetime import datetime, timedelta

from . import publish, warehouse
from .config import Config
from .plan import resolve


def max_age_days(cfg: Config, source: str) -> float | None:
    """How long a source's reports can still count: the longest max age of its
    tilesets, or None (keep everything) if one of them has no limit."""
    ages = [resolve(ts)[0].max_age_days for ts in cfg.tilesets.values() if ts.source == source]
    return None if not ages or None in ages else max(ages)


def retain(cfg: Config, now: datetime) -> dict:
    """Delete reports older than every tileset of their source can use; prune snapshots.

    Their staged rows go too, so ``read = valid + rejected`` still holds.

    Returns
    -------
    dict
        ``{"deleted": {source: rows}, "pruned": {tileset: [snapshot ids]}}``
    """
    deleted = {}
    if cfg.warehouse_path.exists():
        with warehouse.writer(cfg.warehouse_path) as con:
            for source in cfg.sources:
                days = max_age_days(cfg, source)
                if days is None:
                    continue
                params = {"source": source, "cutoff": now - timedelta(days=days)}
                con.execute("BEGIN TRANSACTION")
                con.execute(
                    """
                    DELETE FROM raw_reports r USING reports p
                    WHERE p.source = $source AND p.observed_at < $cutoff
                      AND r.source = p.source AND r.file = p.file AND r.row_number = p.row_number
                    """,
                    params,
                )
                [(n,)] = con.execute(
                    "DELETE FROM reports WHERE source = $source AND observed_at < $cutoff", params
                ).fetchall()
                con.execute("COMMIT")
                deleted[source] = n
    pruned = {name: publish.prune(cfg.published(name), ts.retain_snapshots) for name, ts in cfg.tilesets.items()}
    return {"deleted": deleted, "pruned": pruned}
