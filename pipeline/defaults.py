"""Every tunable of Hotspots, with its default, in one place.

Like supercluster's ``defaultOptions``: the config loader and the Dagster
``Config`` classes take their defaults from :data:`DEFAULTS`, so a value is
changed here once and everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    # Zoom range of a tileset's pyramid (inclusive).
    minzoom: int = 0
    maxzoom: int = 14
    # A cell at zoom z is the Web-Mercator tile at z + cell_detail:
    # 6 gives 64 x 64 cells per tile, i.e. 4 px cells on a 256 px tile.
    cell_detail: int = 6
    # Strata for stratified selection are tiles at z + strata_detail
    # (must be < cell_detail): 3 gives 8 x 8 strata per tile.
    strata_detail: int = 3
    # Feature budget of one tile, and overview budgets by zoom (seed 003's
    # resolve_max_points: 500 up to z5, 1000 up to z8).
    max_features_per_tile: int = 500
    overview_maxzoom: int = 8
    # Every snapshot has heatmap.pmtiles (every zoom: the tile product maps
    # use). Per-tile folders are extra, one file per tile: `geojson`
    # (tiles/<z>/<x>/<y>.geojson, for Leaflet and scripts) and `mvt`
    # (mvt/<z>/<x>/<y>.mvt + tiles.json, for hosts without range requests).
    formats: tuple[str, ...] = ("geojson", "mvt")
    # Their deepest zoom: a number, or "auto", the deepest zoom at which the
    # features in tiles, counted from minzoom, number at most
    # max_directory_features: a small tileset (a few thousand reports) has
    # every zoom, a country or the world its first few (a world of 1M reports:
    # z0-z4, 180 files), so a snapshot stays a few files a CDN syncs quickly.
    tiles_maxzoom: int | str = "auto"
    max_directory_features: int = 50_000
    # Spatial shards of a tileset's build: each reads, scores and builds the
    # cells of its own range of tiles (balanced by report count) and chooses
    # the features of the tiles it holds whole, so a process holds one
    # shard's reports, never the whole source's; a merge builds the coarse
    # zooms. A number, or "auto": one shard per
    # shard_reports reports. The published bytes never depend on it.
    shards: int | str = 1
    shard_reports: int = 2_000_000
    # A shard of a sharded build reads, scores and rolls up its tiles in
    # blocks of at least this many reports (as many blocks as it has this
    # many reports), one after another: the memory a block frees is the
    # next one's, so a process holds a block, not its shard, and does not
    # wait on the kernel for fresh pages (a world shard of 5M reports took
    # a fifth less time in blocks of 1M).
    block_reports: int = 1_000_000
    # Shards split at this zoom (tiles at or below it belong to one shard);
    # "auto": the coarsest zoom below the overviews' at which no tile holds
    # more than half a shard's share of the reports (see build.split).
    shard_zoom: int | str = "auto"
    # Snapshots kept per tileset; the one latest.json names is never pruned.
    retain_snapshots: int = 24
    # Fewest reports a published position may reveal (privacy by coarsening).
    min_count: int = 1

    # Extraction rules (seed 001), per source overridable under `rules:`.
    # A timestamp more than this many hours after as_of is rejected.
    future_tolerance_hours: float = 24.0
    # Longest description accepted (seed 001's CHECK constraint).
    max_description_chars: int = 280
    # Most reports one session token may file in any rolling hour.
    rate_limit_per_hour: int = 30

    # A run that lost its data does not replace the live map: a source with
    # more than this share of its rows rejected publishes nothing, and a
    # tileset scoring fewer than this share of the live snapshot's reports
    # keeps the live snapshot (`hotspots run --force` publishes anyway).
    max_rejected_fraction: float = 0.5
    min_publish_fraction: float = 0.5

    # Seconds a writer waits for the warehouse lock before giving up.
    lock_timeout_s: float = 600.0
    # Seconds between two looks of the `fresh_sources` sensor at each source
    # (a file source's folder, a database's max(watermark)): something new
    # launches an extraction, then the affected tilesets' builds. Maps poll
    # every 90 s (seed 001), so a report should be published within that.
    freshness_interval_s: int = 30


DEFAULTS = Defaults()
