"""Selection, GeoJSON tiles and snapshots: budgets, coverage, RFC 7946, determinism, privacy, crashes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from pipeline import extract, publish, retention, warehouse
from pipeline.config import load_config
from pipeline.select import overview_budget

from .conftest import AS_OF, plan_of, publish_tileset, run_extraction

_publish = publish_tileset


@pytest.fixture
def roads(write_config):
    """A small road tileset with tight budgets, so that selection folds and coarsens."""
    src = {
        "kind": "synthetic",
        "domain": "road_conditions",
        "count": 6000,
        "seed": 5,
        "days": 60,
        "bbox": [-0.2, 51.45, 0.0, 51.55],
    }
    tilesets = {
        "roads": {"source": "r", "profile": "road_conditions", "maxzoom": 12, "max_features_per_tile": 40},
        "tight": {
            "source": "r",
            "profile": "road_conditions",
            "maxzoom": 9,
            "max_features_per_tile": 5,
            "overview_maxzoom": 9,
            "retain_snapshots": 2,
        },
    }
    cfg = load_config(write_config({"sources": {"r": src}, "tilesets": tilesets}))
    run_extraction(cfg)
    return cfg


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def test_selection_invariants_hold_in_every_published_tile(roads):
    snap = _publish(roads, "roads")
    assert all(check.holds for check in publish.check_selection(plan_of(roads, "roads")))
    manifest = json.loads((snap.path / "manifest.json").read_text())
    for zoom in manifest["zooms"]:
        z = zoom["z"]
        cells = pl.read_parquet(snap.path / "cells" / f"zoom={z}" / "cells.parquet")
        tiles = sorted((snap.path / "tiles" / str(z)).rglob("*.geojson"))
        assert len(tiles) == zoom["tiles"] == cells.select("tile_x", "tile_y").n_unique()
        for path in tiles:
            x, y = int(path.parent.name), int(path.stem)
            mine = cells.filter((pl.col("tile_x") == x) & (pl.col("tile_y") == y))
            feats = _features(path)
            assert 0 < len(feats) <= 40
            assert sum(f["properties"]["count"] for f in feats) == mine.get_column("report_count").sum()
            assert {f["properties"]["cell"] for f in feats} == set(mine.filter("selected_tile").get_column("quadkey"))
            # no unchosen cell outscores an impact cell
            impact = mine.filter(pl.col("tier") == "impact").get_column("score")
            unchosen = mine.filter(~pl.col("selected_tile")).get_column("score")
            if len(impact) and len(unchosen):
                assert unchosen.max() <= impact.min()
            # every non-empty stratum has a chosen cell
            sz = mine.get_column("tile_stratum_zoom")[0]
            assert sz == z + 3 or mine.height > 40
            strata = mine.group_by(pl.col("quadkey").str.slice(0, sz))  # a stratum's quadkey prefixes its cells'
            assert strata.agg(pl.col("selected_tile").any()).get_column("selected_tile").all()
        if (snap.path / "overview" / f"{z}.geojson").exists():
            over = _features(snap.path / "overview" / f"{z}.geojson")
            assert len(over) <= overview_budget(z)
            assert sum(f["properties"]["count"] for f in over) == cells.get_column("report_count").sum()


def test_the_selection_check_catches_a_selection_that_breaks_its_rules(roads):
    """The check reads the selection back from its files: each broken rule shows in its zoom's row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _publish(roads, "roads")
    plan = plan_of(roads, "roads")
    z = max(s["z"] for s in publish.read_selection(plan.work))
    folder = plan.work.selected(z)
    # a feature that lost a report, and a stratum's only chosen cell no longer chosen
    feats = pl.concat(list(publish.read_parts(folder / "tile_features.arrow")))
    feats = feats.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.col("report_count") - 1)
        .otherwise(pl.col("report_count"))
        .alias("report_count")
    )
    with (
        pa.OSFile(str(folder / "tile_features.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, feats.to_arrow().schema) as out,
    ):
        out.write_table(feats.to_arrow())
    sizes = [s["parts"] for s in publish.read_selection(plan.work) if s["z"] == z][0]
    assert sum(sizes) and len(sizes) == 1  # one part: the rewritten file's one batch matches it
    cells = pq.read_table(folder / "cells.parquet")
    stratum = pl.col("quadkey").str.head(pl.col("tile_stratum_zoom"))  # as the check groups them
    alone = (
        pl.from_arrow(cells)
        .with_row_index()
        .filter(pl.col("selected_tile") & (pl.col("selected_tile").sum().over(stratum) == 1))
    )
    assert alone.height, "some stratum has one chosen cell"
    first = int(alone.get_column("index")[0])
    flags = cells.column("selected_tile").to_pylist()
    flags[first] = False
    pq.write_table(
        cells.set_column(cells.schema.get_field_index("selected_tile"), "selected_tile", pa.array(flags)),
        folder / "cells.parquet",
    )
    rows = {c.z: c for c in publish.check_selection(plan)}
    assert all(rows[other].holds for other in rows if other != z)
    assert rows[z].tiles_unbalanced == 1 and rows[z].empty_strata == 1 and not rows[z].holds


def test_tight_budgets_coarsen_strata_and_the_manifest_says_so(roads):
    snap = _publish(roads, "tight")
    assert all(check.holds for check in publish.check_selection(plan_of(roads, "tight")))
    zooms = json.loads((snap.path / "manifest.json").read_text())["zooms"]
    coarsened = [z for z in zooms if z["stratum_zoom_coarsest"] < z["stratum_zoom"]]
    assert coarsened, "with 5 features per tile some tile must have had to coarsen its strata"
    for z in zooms:
        for path in (snap.path / "tiles" / str(z["z"])).rglob("*.geojson"):
            assert len(_features(path)) <= 5
    tiers = {f["properties"]["tier"] for z in zooms for f in _features(snap.path / "overview" / f"{z['z']}.geojson")}
    assert tiers <= {"coverage", "impact"} and "coverage" in tiers


def _is_rfc7946(doc: dict) -> list[str]:
    problems = []
    if doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
        return ["not a FeatureCollection"]
    if "crs" in doc:
        problems.append("crs member (RFC 7946 4: WGS84 only)")
    for f in doc["features"]:
        if f.get("type") != "Feature" or set(f) != {"type", "geometry", "properties"}:
            problems.append(f"bad feature keys {sorted(f)}")
        g = f["geometry"]
        if g.get("type") != "Point" or len(g.get("coordinates", [])) != 2:
            problems.append("not a 2D Point")
            continue
        lng, lat = g["coordinates"]
        if not (-180 <= lng <= 180 and -90 <= lat <= 90):
            problems.append(f"position out of range {lng},{lat}")
        if any(len(repr(c).split(".")[-1]) > 6 for c in (lng, lat) if "." in repr(c) and "e" not in repr(c)):
            problems.append(f"more than 6 decimals {lng},{lat}")
        props = f["properties"]
        if any(isinstance(v, (dict, list)) for v in props.values()):
            problems.append("nested property")
        if set(props) < {
            "cell",
            "z",
            "count",
            "weight",
            "score",
            "intensity",
            "top_category",
            "last_seen",
            "tier",
            "healthy",
            "coarsened",
        }:
            problems.append(f"missing properties {sorted(props)}")
    return problems


def test_every_geojson_file_is_rfc7946(roads):
    snap = _publish(roads, "roads")
    files = list(snap.path.rglob("*.geojson"))
    zooms = json.loads((snap.path / "manifest.json").read_text())["zooms"]
    assert len(files) == sum(z["tiles"] for z in zooms) + sum(1 for z in zooms if z["overview_bytes"]) > 20
    for path in files:
        assert _is_rfc7946(json.loads(path.read_text())) == [], path


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.name != "latest.json"
    }


def test_same_input_and_as_of_give_identical_files(roads, tmp_path):
    first = _publish(roads, "roads")
    before = _digests(roads.output / "roads")
    latest_before = json.loads((roads.output / "roads" / "latest.json").read_text())
    # a fresh build from scratch: other work folder, same warehouse and as_of
    shutil.rmtree(roads.work("roads").root)
    shutil.rmtree(roads.output / "roads")
    second = _publish(roads, "roads")
    assert second.snapshot_id == first.snapshot_id and not second.reused
    assert _digests(roads.output / "roads") == before
    latest_after = json.loads((roads.output / "roads" / "latest.json").read_text())
    assert {k: v for k, v in latest_after.items() if k != "generated_at"} == {
        k: v for k, v in latest_before.items() if k != "generated_at"
    }
    # publishing the same content again reuses the snapshot
    third = _publish(roads, "roads")
    assert third.reused and third.snapshot_id == first.snapshot_id
    assert len(list((roads.output / "roads" / "snapshots").iterdir())) == 1


def test_latest_json_contract(roads):
    snap = _publish(roads, "roads")
    latest = json.loads((roads.output / "roads" / "latest.json").read_text())
    assert set(latest) == {"snapshot_id", "generated_at", "as_of", "path"}
    assert latest["path"] == f"snapshots/{snap.snapshot_id}/"
    assert latest["as_of"] == AS_OF.isoformat()
    assert snap.snapshot_id.startswith("20261101T120000Z-")
    assert publish.verify_latest(roads.published("roads")) is None


def test_retention_keeps_the_last_snapshots_and_never_the_latest_one(roads):
    ids = [_publish(roads, "tight", AS_OF + timedelta(hours=h)).snapshot_id for h in range(4)]
    kept = sorted(p.name for p in (roads.output / "tight" / "snapshots").iterdir())
    assert kept == sorted(ids[-2:])
    assert json.loads((roads.output / "tight" / "latest.json").read_text())["snapshot_id"] == ids[-1]


def test_nightly_retention_trims_the_warehouse_and_keeps_conservation(roads):
    before = extract.conservation(roads.warehouse_path, ["r"])[0]
    done = retention.retain(roads, AS_OF)  # the road profile keeps 90 days; the source spans 60
    assert done["deleted"] == {"r": 0}
    done = retention.retain(roads, AS_OF + timedelta(days=120))
    after = extract.conservation(roads.warehouse_path, ["r"])[0]
    assert done["deleted"]["r"] > 0 and after.valid == before.valid - done["deleted"]["r"]
    assert after.holds
    with warehouse.reader(roads.warehouse_path) as con:
        oldest = con.execute("SELECT min(observed_at) FROM reports").fetchone()[0]
    assert oldest is None or oldest >= AS_OF + timedelta(days=30)


SECRET_TOKEN, SECRET_TEXT, HIDDEN = "tok-SECRET-7f3a", "PRIVATE-DESCRIPTION-91c2", "HIDDEN-CATEGORY-e55d"


def test_nothing_private_is_ever_published(write_config, tmp_path):
    rows = ["id,lat,lng,t,cat,sev,tok,desc,pub"]
    for i in range(300):
        lat, lng = 51.5 + (i % 17) * 0.001, -0.1 + (i % 13) * 0.001
        rows.append(f"RID-{i:05d},{lat},{lng},2026-10-30T10:00:00Z,pothole,2,{SECRET_TOKEN},{SECRET_TEXT},true")
    rows.append(f"RID-hidden,51.6,-0.3,2026-10-30T10:00:00Z,{HIDDEN},2,{SECRET_TOKEN},{SECRET_TEXT},false")
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    columns = {
        "report_id": "id",
        "lat": "lat",
        "lng": "lng",
        "observed_at": "t",
        "category": "cat",
        "severity": "sev",
        "session_token": "tok",
        "description": "desc",
        "is_public": "pub",
    }
    cfg = load_config(
        write_config(
            {
                "sources": {
                    "r": {"kind": "file", "path": "r.csv", "columns": columns, "rules": {"rate_limit_per_hour": None}}
                },
                "tilesets": {"r": {"source": "r", "profile": "generic", "maxzoom": 12}},
            }
        )
    )
    run_extraction(cfg)
    snap = _publish(cfg, "r")
    published = [p for p in cfg.output.rglob("*") if p.is_file()]
    assert len(published) > 20
    for path in published:
        data = path.read_bytes()
        for secret in (SECRET_TOKEN, SECRET_TEXT, HIDDEN, "RID-"):
            assert secret.encode() not in data, (path, secret)
    overview = _features(snap.path / "overview" / "0.geojson")
    assert sum(f["properties"]["count"] for f in overview) == 300  # the non-public row is not counted
    # and nothing under output/ is state: no warehouse, no scored reports
    assert not [p for p in published if p.suffix == ".duckdb" or p.name == "scored.parquet"]


KILL_LOOP = """
import sys
from datetime import timedelta
from pipeline.config import load_config
from tests.conftest import AS_OF, publish_tileset
cfg = load_config(sys.argv[1])
for hour in range(10_000):
    publish_tileset(cfg, "tight", AS_OF + timedelta(hours=hour))
    print(hour, flush=True)
"""


def test_sigkill_at_random_points_always_leaves_a_complete_latest_snapshot(roads):
    rng = random.Random(7)
    repo = Path(__file__).resolve().parents[1]

    def publishing() -> subprocess.Popen:
        command = [sys.executable, "-c", KILL_LOOP, str(roads.file)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.Popen(command, cwd=repo, start_new_session=True, **pipes)

    # how long a process takes here to start and publish once (a loaded machine takes
    # longer): the kills below land before, during and after publishes, at any speed.
    # Twice: the first may compile the pyramid's loops for this checkout.
    for _ in range(2):
        started, proc = time.monotonic(), publishing()
        try:
            assert proc.stdout.readline(), proc.communicate()[1].decode()[-2000:]
            first = time.monotonic() - started
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    published_before = 0
    kills = 30
    for i in range(kills):
        proc = publishing()
        try:
            time.sleep(first * rng.uniform(0.3, 2.0))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        assert b"Traceback" not in err, err.decode()[-2000:]
        published_before += len(out.splitlines())
        latest = publish.read_latest(roads.published("tight"))
        if latest is not None:
            assert publish.verify_latest(roads.published("tight")) is None, (i, latest)
            manifest = json.loads((roads.output / "tight" / latest["path"] / "manifest.json").read_text())
            for path in (roads.output / "tight" / latest["path"]).rglob("*.geojson"):
                json.loads(path.read_text())  # every file of it parses
            assert manifest["as_of"] == latest["as_of"]
    assert published_before > 0, "no publish finished between kills: raise the sleep"


def test_the_default_run_publishes_every_tileset_within_its_contract(tmp_path):
    """`hotspots run` on the shipped hotspots.yaml: checks, files and RFC 7946 for every zoom and tile."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "hotspots.yaml", tmp_path / "hotspots.yaml")
    run = subprocess.run(
        [str(Path(sys.executable).parent / "hotspots"), "run", "--as-of", AS_OF.isoformat()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    cfg = load_config(tmp_path / "hotspots.yaml")
    assert set(cfg.tilesets) == {"community_needs", "road_conditions", "campus_issues", "rail_disruptions"}
    for name in cfg.tilesets:
        assert all(check.holds for check in publish.check_selection(plan_of(cfg, name))), name
        assert publish.verify_latest(cfg.published(name)) is None
        latest = publish.read_latest(cfg.published(name))
        assert f"published: {cfg.output / name / 'snapshots' / latest['snapshot_id']} " in run.stdout
        for path in (cfg.output / name / latest["path"]).rglob("*.geojson"):
            assert _is_rfc7946(json.loads(path.read_text())) == [], path


def _inodes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_ino for p in folder.rglob("*") if p.is_file()}


def _with(cfg, tileset: str, **changes):
    ts = cfg.tilesets[tileset].model_copy(update=changes)
    return cfg.model_copy(update={"tilesets": {**cfg.tilesets, tileset: ts}})


def test_a_snapshot_links_the_files_it_shares_with_the_live_one(roads):
    first = _publish(roads, "tight")
    # a change only the manifest sees (it records the config): a new snapshot, every other file a link
    second = _publish(_with(roads, "tight", retain_snapshots=3), "tight")
    assert second.snapshot_id != first.snapshot_id
    before, after = _inodes(first.path), _inodes(second.path)
    assert before.keys() == after.keys()
    shared = {p for p in after if after[p] == before[p]}
    assert shared == set(after) - {"manifest.json"}
    staged = json.loads((roads.work("tight").root / "staged.json").read_text())
    assert staged["shared"]["files"] == len(shared)
    # a later as_of decays every weight: changed files are written anew, never linked
    third = _publish(roads, "tight", AS_OF + timedelta(days=3))
    changed = {p for p, ino in _inodes(third.path).items() if ino != after.get(p)}
    assert "heatmap.pmtiles" in changed
    for rel in changed - {"manifest.json"}:
        if rel in after:
            assert (third.path / rel).read_bytes() != (second.path / rel).read_bytes(), rel


def test_without_hard_links_shared_files_are_written(roads, monkeypatch):
    first = _publish(roads, "tight")

    def no_links(src, dst, **kwargs):
        raise PermissionError(1, "links not allowed here")

    monkeypatch.setattr(os, "link", no_links)  # a file system or host that forbids hard links
    second = _publish(_with(roads, "tight", retain_snapshots=3), "tight")
    before, after = _inodes(first.path), _inodes(second.path)
    assert not set(before.items()) & set(after.items())
    for rel in after:
        if rel != "manifest.json":
            assert (second.path / rel).read_bytes() == (first.path / rel).read_bytes(), rel
