"""Selection, tiles and atomic snapshots: what map clients fetch.

Three steps, each callable on its own (each is a Dagster asset):

* :func:`select_tileset` chooses, per zoom, the features of every tile and of
  the overview, into ``<home>/work/<tileset>/selected/`` (private);
* :func:`stage_snapshot` writes the public files into a fresh
  ``output/<tileset>/snapshots/.tmp-<token>/``;
* :func:`finalize_snapshot` adds ``manifest.json``, names the snapshot by its
  ``as_of`` and content hash, renames it into place, replaces ``latest.json``
  atomically and prunes old snapshots (never the one ``latest.json`` names).

A reader of ``latest.json`` therefore always finds a complete snapshot, even
if the process dies at any instruction.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import polars as pl

from . import atomic, geojson, geoparquet, privacy, site, strictjson, tilemath, vector
from .build import read_cells, read_scoring
from .config import Tileset
from .errors import PublishError
from .paths import SNAPSHOTS, Published, Work
from .plan import Plan
from .select import choose, features, overview_budget
from .snapfolder import SnapshotFolder, link_or_copy

STALE_TMP_S = 3600  # a .tmp- folder untouched this long was left by a dead run
POINT_PAD = 1e-5  # degrees (about a metre) around data that is a single point


class ZoomSelection(NamedTuple):
    z: int
    cells: int
    tiles: int  # tiles with features
    selected_tile: int
    selected_overview: int
    stratum_zoom: int  # configured: z + strata_detail
    stratum_zoom_coarsest: int  # the coarsest any tile had to use
    overview_stratum_zoom: int | None


SELECT_CELLS_IN_FLIGHT = 1_000_000  # cells selected at once (about 0.75 KB of memory each while selected)


def select_tileset(plan: Plan) -> list[ZoomSelection]:
    """Choose each zoom's tile and overview features (see :mod:`pipeline.select`).

    Zooms are independent: two at a time (polars and Parquet release the GIL).
    """
    shutil.rmtree(plan.work.selected_root, ignore_errors=True)
    sizes = {c["z"]: c["cells"] for c in read_cells(plan.work)}
    budget = vector.Budget(SELECT_CELLS_IN_FLIGHT)

    def select(z: int) -> ZoomSelection | None:
        with budget.hold(sizes.get(z, 0)):
            return _select_zoom(plan, z)

    # largest and smallest zooms alternate, so a large zoom waiting for room
    # leaves the other worker small ones to do
    by_size = sorted(plan.zooms, key=lambda z: -sizes.get(z, 0))
    order = [by_size[i // 2] if i % 2 == 0 else by_size[-1 - i // 2] for i in range(len(by_size))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        summary = sorted((s for s in pool.map(select, order) if s is not None), key=lambda s: s.z)
    _write_json(plan.work.selected_summary, [s._asdict() for s in summary])
    return summary


def _select_zoom(plan: Plan, z: int) -> ZoomSelection | None:
    ts, profile, path = plan.settings, plan.profile, plan.work.cells(z)
    if not path.exists():
        return None
    cells = pl.read_parquet(path).drop("geometry")
    cells = privacy.coarsen(
        cells, z=z, detail=ts.cell_detail, strata_detail=ts.strata_detail, min_count=profile.min_count
    )
    common = dict(z=z, detail=ts.cell_detail, strata_detail=ts.strata_detail, representative=profile.representative)
    tile_choice = choose(cells, budget=ts.max_features_per_tile, group_zoom=z, **common)
    tile_features = features(cells, tile_choice, profile)
    overview = z <= ts.overview_maxzoom
    if overview:
        over_choice = choose(cells, budget=overview_budget(z), group_zoom=0, **common)
        over_features = features(cells, over_choice, profile)
    key_to_quadkey = cells.select("cell_key", "quadkey")
    annotated = (
        cells.join(
            tile_choice.join(
                key_to_quadkey.rename({"cell_key": "target_key", "quadkey": "tile_feature"}), on="target_key"
            ).select(
                "cell_key",
                pl.col("chosen").alias("selected_tile"),
                "tier",
                "tile_feature",
                pl.col("stratum_zoom").alias("tile_stratum_zoom"),
            ),
            on="cell_key",
        )
        .with_columns(
            (
                pl.col("cell_key").is_in(over_choice.filter("chosen").get_column("cell_key").implode())
                if overview
                else pl.lit(False)
            ).alias("selected_overview")
        )
        .sort("cell_key")
        .drop("cell_key")
    )
    # cell_key, the exact quadkey as a number, stays private (see privacy.coarsen)
    out = plan.work.selected(z)
    geoparquet.write(annotated, out / "cells.parquet")  # published as is
    _write_ipc(tile_features, out / "tile_features.arrow")  # private, read once: uncompressed Arrow
    if overview:
        _write_ipc(over_features, out / "overview_features.arrow")
    return ZoomSelection(
        z,
        cells.height,
        tile_features.select(pl.struct("tile_x", "tile_y").n_unique()).item(),
        tile_features.height,
        over_features.height if overview else 0,
        z + ts.strata_detail,
        int(tile_choice.get_column("stratum_zoom").min()),
        int(over_choice.get_column("stratum_zoom").min()) if overview else None,
    )


def read_selection(work: Work) -> list[dict]:
    return json.loads(work.selected_summary.read_text())


# --- checks -----------------------------------------------------------------


class SelectionCheck(NamedTuple):
    """One zoom's selection, checked from the files."""

    z: int
    max_tile_features: int  # the fullest tile's feature count
    budget: int
    overview_features: int
    overview_budget: int
    empty_strata: int  # non-empty strata with no chosen cell
    impact_beaten: int  # tiles where an unchosen cell outscores an impact cell
    tiles_unbalanced: int  # tiles whose features do not carry all their reports
    overview_balanced: bool

    @property
    def holds(self) -> bool:
        return (
            self.max_tile_features <= self.budget
            and self.overview_features <= self.overview_budget
            and self.empty_strata == 0
            and self.impact_beaten == 0
            and self.tiles_unbalanced == 0
            and self.overview_balanced
        )


def check_selection(plan: Plan) -> list[SelectionCheck]:
    """Budgets, coverage, impact order and fold conservation, read back per zoom."""
    rows = []
    for s in read_selection(plan.work):
        z = s["z"]
        folder = plan.work.selected(z)
        cells = pl.read_parquet(folder / "cells.parquet")
        feats = pl.read_ipc(folder / "tile_features.arrow")
        tile = ["tile_x", "tile_y"]
        per_tile = feats.group_by(tile).agg(pl.len().alias("n"), pl.col("report_count").sum().alias("carried"))
        reports = cells.group_by(tile).agg(pl.col("report_count").sum().alias("reports"))
        unbalanced = per_tile.join(reports, on=tile, how="full", coalesce=True).filter(
            pl.col("carried").fill_null(0) != pl.col("reports").fill_null(0)
        )
        # a stratum is a quadkey prefix (a coarsened cell's quadkey is its stratum's)
        strata = cells.group_by(pl.col("quadkey").str.head(pl.col("tile_stratum_zoom"))).agg(
            pl.col("selected_tile").any()
        )
        impact = cells.group_by(tile).agg(
            pl.col("score").filter(pl.col("tier") == "impact").min().alias("lowest_impact"),
            pl.col("score").filter(~pl.col("selected_tile")).max().alias("best_unchosen"),
        )
        beaten = impact.filter(pl.col("best_unchosen") > pl.col("lowest_impact")).height
        overview_file = folder / "overview_features.arrow"
        over = pl.read_ipc(overview_file) if overview_file.exists() else None
        rows.append(
            SelectionCheck(
                z,
                int(per_tile.get_column("n").max() or 0),
                plan.settings.max_features_per_tile,
                over.height if over is not None else 0,
                overview_budget(z),
                strata.filter(~pl.col("selected_tile")).height,
                beaten,
                unbalanced.height,
                over is None
                or int(over.get_column("report_count").sum()) == int(cells.get_column("report_count").sum()),
            )
        )
    return rows


# --- snapshots ----------------------------------------------------------------


def stage_snapshot(plan: Plan) -> dict:
    """Write the public files of a snapshot into a fresh ``.tmp-`` folder in ``output/``.

    Returns the staging summary (also kept in ``<work>/staged.json``).
    """
    published = plan.published
    with _writing(published.snapshots):
        published.snapshots.mkdir(parents=True, exist_ok=True)
        tmp = published.snapshots / f".tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        latest = read_latest(published)
        live = published.root / latest["path"] if latest else None
        try:
            return _stage_into(plan, SnapshotFolder(tmp, live))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
            raise


@contextmanager
def _writing(folder: Path, published: str | None = None) -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only folder) into one clear error."""
    try:
        yield
    except OSError as exc:
        after = (
            f"snapshot {published} is published, but index.html or pruning is not done"
            if published
            else "the previous snapshot stays published"
        )
        raise PublishError(f"cannot write in {folder}: {exc.strerror or exc}; {after}") from exc


def directory_maxzoom(ts: Tileset, selection: list[dict]) -> int | None:
    """The deepest zoom of the per-tile folders (``formats``), or None for none.

    ``tiles_maxzoom: auto`` is the deepest zoom at which the features in
    tiles, counted from the first zoom, number at most ``max_directory_features``.
    """
    if not ts.formats or not selection:
        return None
    if ts.tiles_maxzoom != "auto":
        return ts.tiles_maxzoom if ts.tiles_maxzoom >= selection[0]["z"] else None
    deepest, total = None, 0
    for s in selection:
        total += s["selected_tile"]
        if total > ts.max_directory_features:
            break
        deepest = s["z"]
    return deepest


def _stage_into(plan: Plan, folder: SnapshotFolder) -> dict:
    ts, tileset = plan.settings, plan.tileset
    tmp = folder.root
    selection = read_selection(plan.work)
    folders_maxz = directory_maxzoom(ts, selection)
    in_folders = lambda z, fmt: fmt in ts.formats and folders_maxz is not None and z <= folders_maxz  # noqa: E731
    zooms = []
    extent = [180.0, 90.0, -180.0, -90.0]
    metrics: set[str] = set()
    archive = vector.Archive(tmp / "heatmap.pmtiles")

    def write_files(s: dict, tile_features: pl.DataFrame) -> dict:
        """A zoom's cells, GeoJSON tiles and overview; widens the extent."""
        z, selected = s["z"], plan.work.selected(s["z"])
        cells_out = f"cells/zoom={z}/cells.parquet"
        folder.path(cells_out).parent.mkdir(parents=True)
        link_or_copy(selected / "cells.parquet", folder.path(cells_out))
        cells_bytes = folder.adopt(cells_out)
        tiles, size = geojson.write_tiles(tile_features, z, folder) if in_folders(z, "geojson") else (s["tiles"], 0)
        metrics.update(m for m in geojson.METRICS if m in tile_features.columns)
        if tile_features.height:
            box = tile_features.select(
                pl.col("lng").min().alias("w"),
                pl.col("lat").min().alias("s"),
                pl.col("lng").max().alias("e"),
                pl.col("lat").max().alias("n"),
            ).row(0)
            extent[:] = [min(extent[0], box[0]), min(extent[1], box[1]), max(extent[2], box[2]), max(extent[3], box[3])]
        overview_bytes = 0
        if (selected / "overview_features.arrow").exists():
            text = geojson.collection(pl.read_ipc(selected / "overview_features.arrow"))
            overview_bytes = folder.put(f"overview/{z}.geojson", text.encode())
        return {**s, "tiles": tiles, "tile_bytes": size, "overview_bytes": overview_bytes, "cells_bytes": cells_bytes}

    def add_tiles(zoom: dict, encoding: vector.Pending) -> dict:
        """A zoom's MVT tiles into the archive (and the mvt/ folder)."""
        z, encoded = zoom["z"], encoding.result()
        archive.add(encoded)
        mvt_bytes = sum(len(d) for d in encoded.data)
        if in_folders(z, "mvt"):
            for x, y, data in zip(encoded.x.tolist(), encoded.y.tolist(), encoded.data):
                folder.put(f"mvt/{z}/{x}/{y}.mvt", data)
        return {
            **zoom,
            "mvt_tiles": len(encoded.data),
            "mvt_bytes": mvt_bytes,
            "mvt_max_tile_bytes": max((len(d) for d in encoded.data), default=0),
            "mvt_folder_bytes": mvt_bytes if in_folders(z, "mvt") else 0,
        }

    # Zoom by zoom, coarsest first (the archive's tile-id order): while a
    # zoom's tiles are encoded (DuckDB and zlib, every core), its files are
    # written and the zoom before it goes into the archive. At most two
    # zooms' features and tiles are held at once.
    try:
        with vector.Encoder() as encoder:
            before = None
            for s in selection:
                tile_features = pl.read_ipc(plan.work.selected(s["z"]) / "tile_features.arrow")
                encoding = encoder.submit(tile_features, s["z"])
                zoom = write_files(s, tile_features)
                del tile_features
                if before is not None:
                    zooms.append(add_tiles(*before))
                before = (zoom, encoding)
            if before is not None:
                zooms.append(add_tiles(*before))
    except BaseException:
        archive.discard()
        raise
    if extent[0] >= extent[2] or extent[1] >= extent[3]:  # one point: bounds need an area (PMTiles, TileJSON)
        extent = [extent[0] - POINT_PAD, extent[1] - POINT_PAD, extent[2] + POINT_PAD, extent[3] + POINT_PAD]
    if not zooms:  # no reports: still a complete snapshot, with empty overviews and archive
        extent = list(tilemath.WORLD)  # no reports
        for z in range(ts.minzoom, min(ts.maxzoom, ts.overview_maxzoom) + 1):
            folder.put(f"overview/{z}.geojson", (geojson.COLLECTION_HEAD + geojson.COLLECTION_TAIL).encode())
    minz, maxz = (zooms[0]["z"], zooms[-1]["z"]) if zooms else (ts.minzoom, ts.maxzoom)
    layers = vector.vector_layers(sorted(metrics), minz, maxz)
    meta = {"name": tileset, "format": "pbf", "vector_layers": layers, "attribution": "Hotspots"}
    archive.close(meta, extent)
    pmtiles_bytes = folder.adopt("heatmap.pmtiles")
    published = {
        fmt: (min(folders_maxz, maxz) if fmt in ts.formats and folders_maxz is not None and zooms else None)
        for fmt in ("geojson", "mvt")
    }
    if published["mvt"] is not None or (not zooms and "mvt" in ts.formats):
        # TileJSON describes the mvt/ folder: its zooms are the folder's
        top = published["mvt"] if published["mvt"] is not None else maxz
        folder_layers = vector.vector_layers(sorted(metrics), minz, top)
        doc = vector.tilejson(tileset, folder_layers, extent, minz, top)
        folder.put("tiles.json", (strictjson.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    staged = {
        "path": str(tmp),
        "zooms": zooms,
        "digests": folder.digests,
        "pmtiles_bytes": pmtiles_bytes,
        "max_features_per_tile": ts.max_features_per_tile,
        "folders": published,
        "shared": {"files": folder.shared, "bytes": folder.shared_bytes},
    }
    _write_json(plan.work.staged, staged)
    return staged


class Snapshot(NamedTuple):
    snapshot_id: str
    path: Path
    files: int
    bytes: int
    pruned: list[str]
    reused: bool  # the same content was already published under this id


def finalize_snapshot(plan: Plan, now: datetime | None = None) -> Snapshot:
    """Name the staged snapshot, move it into place, point ``latest.json`` at it, prune."""
    staged = json.loads(plan.work.staged.read_text())
    tmp = Path(staged["path"])
    manifest = build_manifest(plan, staged)
    text = strictjson.dumps(manifest, indent=2, sort_keys=True) + "\n"
    published = plan.published
    root = published.root
    try:
        with _writing(root):
            digests = dict(staged["digests"])
            (tmp / "manifest.json").write_text(text)
            digests["manifest.json"] = hashlib.sha256(text.encode()).hexdigest()
            listing = "".join(f"{p}\0{h}\n" for p, h in sorted(digests.items()))
            content = hashlib.sha256(listing.encode()).hexdigest()
            as_of = datetime.fromisoformat(manifest["as_of"])
            snapshot_id = f"{as_of:%Y%m%dT%H%M%SZ}-{content[:12]}"
            final = tmp.parent / snapshot_id
            reused = final.exists() and _complete(final) is None
            if reused:  # identical content under its content-hash name
                shutil.rmtree(tmp)
                os.utime(final)  # published again: the newest, for retention
            else:
                if final.exists():  # an incomplete leftover under this name: never point at it
                    _discard(final)
                os.sync()  # the files reach the disk before the rename makes them visible
                os.rename(tmp, final)
                atomic.fsync_dir(final.parent)
            generated = (now or datetime.now(UTC)).replace(microsecond=0)
            _write_json(
                published.latest,
                {
                    "snapshot_id": snapshot_id,
                    "generated_at": generated.isoformat().replace("+00:00", "Z"),
                    "as_of": manifest["as_of"],
                    "path": f"{SNAPSHOTS}/{snapshot_id}/",
                },
                durable=True,
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never published: give the space back
        raise
    with _writing(plan.output, published=snapshot_id):
        write_viewer(plan)
        pruned = prune(published, plan.settings.retain_snapshots)
    sizes = sum(
        z["tile_bytes"] + z["overview_bytes"] + z["cells_bytes"] + z["mvt_folder_bytes"] for z in staged["zooms"]
    )
    sizes += staged["pmtiles_bytes"] + len(text)
    return Snapshot(snapshot_id, final, len(digests), sizes, pruned, reused)


def build_manifest(plan: Plan, staged: dict) -> dict:
    """What a snapshot holds and how it was made (its plan's public part); no private path or field."""
    scored = read_scoring(plan.work)
    return {
        **plan.public(),  # key, as_of, config, profile, filters, source
        "tileset": plan.tileset,
        "as_of": scored["as_of"],  # the plan's, as scoring used it
        "counts": {
            "read": scored["source"]["read"],
            "valid": scored["source"]["valid"],
            "rejected": scored["source"]["rejected"],
            "scored": scored["scored"],
            "excluded": scored["excluded"],
        },
        "zooms": [
            {
                k: z[k]
                for k in (
                    "z",
                    "cells",
                    "selected_tile",
                    "selected_overview",
                    "stratum_zoom",
                    "stratum_zoom_coarsest",
                    "overview_stratum_zoom",
                    "tiles",
                    "tile_bytes",
                    "overview_bytes",
                    "cells_bytes",
                    "mvt_tiles",
                    "mvt_bytes",
                    "mvt_max_tile_bytes",
                )
            }
            for z in staged["zooms"]
        ],
        "files": len(staged["digests"]) + 1,
        "pmtiles_bytes": staged["pmtiles_bytes"],
        # the deepest zoom of each per-tile folder (null: not published); the archive has every zoom
        "folders": {"tiles": staged["folders"]["geojson"], "mvt": staged["folders"]["mvt"]},
        "layout": {
            "cells": "cells/zoom=<z>/cells.parquet",
            "overview": "overview/<z>.geojson",
            "pmtiles": "heatmap.pmtiles",
            **({"tiles": "tiles/<z>/<x>/<y>.geojson"} if staged["folders"]["geojson"] is not None else {}),
            **(
                {"mvt": "mvt/<z>/<x>/<y>.mvt (gzip)", "tilejson": "tiles.json"}
                if "tiles.json" in staged["digests"]
                else {}
            ),
        },
    }


def write_viewer(plan: Plan) -> None:
    """The map page and ``tilesets.json`` (every tileset with a live snapshot); see :mod:`pipeline.site`."""
    live = [entry for entry in plan.site if read_latest(Published.of(plan.output, entry["name"]))]
    site.write_site(plan.output, plan.viewer, live)


def read_latest(published: Published) -> dict | None:
    path = published.latest
    return json.loads(path.read_text()) if path.exists() else None


def verify_latest(published: Published) -> str | None:
    """None if ``latest.json`` names a complete snapshot, else what is wrong."""
    latest = read_latest(published)
    if latest is None:
        return "no latest.json"
    problem = _complete(published.root / latest["path"])
    return f"{latest['snapshot_id']}: {problem}" if problem else None


def _complete(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return f"manifest unreadable ({exc})"
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    if files != manifest["files"]:
        return f"{files} files, manifest counts {manifest['files']}"
    return None


def prune(published: Published, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` snapshots (and stale ``.tmp-`` folders).

    The snapshot ``latest.json`` names is never deleted.
    """
    snapshots = published.snapshots
    if not snapshots.exists():
        return []
    latest = (read_latest(published) or {}).get("snapshot_id")
    done = [p for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
    done.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    doomed = [p for p in done[keep:] if p.name != latest]
    cutoff = time.time() - STALE_TMP_S
    stale = [p for p in snapshots.glob(".tmp-*") if p.stat().st_mtime < cutoff]
    for path in doomed + stale + list(snapshots.glob(".deleting-*")):
        _discard(path)
    return sorted(p.name for p in doomed)


def _discard(path: Path) -> None:
    # Out of the snapshot names first (one atomic rename), then deleted: a
    # crash mid-delete leaves a .deleting- folder, never a half snapshot
    # under a name that could be published again.
    doomed = path.with_name(f".deleting-{path.name}-{secrets.token_hex(3)}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _write_ipc(frame: pl.DataFrame, path: Path) -> None:
    with atomic.replacing(path) as tmp:
        frame.write_ipc(tmp, compression="uncompressed")


def _write_json(path: Path, value, durable: bool = False) -> None:
    atomic.write_bytes(path, (strictjson.dumps(value, indent=2) + "\n").encode(), durable)
