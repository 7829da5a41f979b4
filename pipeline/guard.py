"""A run that lost its data does not replace the live map.

Two guards, each a blocking Dagster check and a line from ``hotspots run``:

* a source with more than ``max_rejected_fraction`` of the rows it read
  rejected (an upstream date format changed, a CRS is wrong) publishes
  nothing: :func:`source_loss`;
* a tileset that scores fewer than ``min_publish_fraction`` of the reports its
  live snapshot holds keeps the live snapshot: :func:`tileset_loss`.

``hotspots run --force`` publishes anyway. A first snapshot, or a live one
with no reports, is never a loss: there is nothing to lose.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config
from .paths import Published
from .plan import Plan

TOP_REASONS = 3


def share_rejected(read: int, rejected: int) -> float:
    """Rejected rows as a share of the rows read (0 for a source that read nothing)."""
    return rejected / read if read else 0.0


def top_reasons(rejected: dict[str, int], n: int = TOP_REASONS) -> list[tuple[str, int]]:
    """The ``n`` most frequent reasons, most first (ties by name)."""
    return sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def reasons_text(rejected: dict[str, int], n: int = TOP_REASONS) -> str:
    """``unparseable_timestamp 4,907, missing_coordinates 62`` (and how many other reasons)."""
    top = top_reasons(rejected, n)
    text = ", ".join(f"{reason} {count:,}" for reason, count in top)
    rest = len(rejected) - len(top)
    return text + (f", {rest} other reason(s)" if rest > 0 else "")


def live_snapshot(published: Published) -> tuple[str, dict] | None:
    """The live snapshot's id and manifest, or None before the first publish."""
    latest = published.latest
    try:
        pointer = json.loads(latest.read_text())
        manifest = json.loads((latest.parent / pointer["path"] / "manifest.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pointer["snapshot_id"], manifest


def scored_in(manifest: dict) -> int:
    """How many reports a snapshot's manifest says were scored."""
    return int((manifest.get("counts") or {}).get("scored") or 0)


def _what_stays(output: Path, tilesets: list[str]) -> str:
    live = {t: live_snapshot(Published.of(output, t)) for t in tilesets}
    named = [f"{t} {snap[0]}" for t, snap in live.items() if snap]
    if not named:
        return "nothing is published"
    if len(tilesets) == 1:
        return f"the live snapshot stays {live[tilesets[0]][0]}"
    return "the live snapshots stay (" + ", ".join(named) + ")"


def source_loss(cfg: Config, source: str, read: int, rejected: dict[str, int]) -> str | None:
    """Why the source lost its data (one line), if more than its ``max_rejected_fraction`` of its rows
    were rejected; None if it did not."""
    tilesets = [t for t, ts in cfg.tilesets.items() if ts.source == source]
    limit = cfg.sources[source].max_rejected_fraction
    return _source_loss(cfg.output, tilesets, source, limit, read, rejected)


def _source_loss(
    output: Path, tilesets: list[str], source: str, limit: float, read: int, rejected: dict[str, int]
) -> str | None:
    total = sum(rejected.values())
    if share_rejected(read, total) <= limit:
        return None
    return (
        f"source {source}: {total:,} of {read:,} rows rejected ({reasons_text(rejected)}); "
        f"more than max_rejected_fraction {limit:g}, so {_what_stays(output, tilesets)} "
        f"(`hotspots rejected {source}` shows them; --force publishes anyway)"
    )


def tileset_loss(plan: Plan, scored: int) -> str | None:
    """Why the tileset lost its data (one line), if ``scored`` is below ``min_publish_fraction`` of the
    live snapshot's scored count; None if not."""
    live = live_snapshot(plan.published)
    if live is None:
        return None
    snapshot_id, manifest = live
    before = scored_in(manifest)
    fraction = plan.settings.min_publish_fraction
    if scored >= fraction * before:
        return None
    return (
        f"tileset {plan.tileset}: {scored:,} reports scored, fewer than min_publish_fraction {fraction:g} of "
        f"the live snapshot's {before:,}; the live snapshot stays {snapshot_id} (--force publishes anyway)"
    )


def guard_tileset(plan: Plan, scoring_summary: dict) -> str | None:
    """Both guards for one build, from its scoring summary (``scoring.json``)."""
    source = scoring_summary["source"]
    lost = _source_loss(
        plan.output, list(plan.siblings), source["name"], plan.max_rejected_fraction, source["read"], source["rejected"]
    )
    return lost or tileset_loss(plan, scoring_summary["scored"])
