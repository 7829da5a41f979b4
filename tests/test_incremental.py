"""Incremental extraction: a file source reads only its new and changed files, and ends where a full read would."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import extract, publish, warehouse
from pipeline.config import load_config

from .conftest import AS_OF, publish_tileset

HEADER = ["id", "lat", "lng", "t", "sev"]
MAPPING = {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t", "severity": "sev"}
TABLES = ("raw_reports", "reports", "rejected_reports")


def _config(folder: Path, data: Path, tileset: dict | None = None, **source) -> Path:
    """A config in ``folder`` (its own warehouse) reading ``data/*.csv``; ``tileset``: its settings."""
    folder.mkdir(parents=True, exist_ok=True)
    src = {"kind": "file", "path": str(data / "*.csv"), "format": "csv", "columns": MAPPING, **source}
    tilesets = {"t": {"source": "s", **(tileset or {})}}
    cfg = {"output": "output", "home": ".hotspots", "sources": {"s": src}, "tilesets": tilesets}
    (folder / "hotspots.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder / "hotspots.yaml"


def _extract(config: Path, full_refresh: bool = False, as_of: datetime = AS_OF) -> dict[str, bool]:
    """Stage and validate; which files were kept (True) or read (False), by name."""
    cfg = load_config(config)
    staged = extract.stage(cfg, ["s"], as_of, full_refresh=full_refresh)
    extract.validate(cfg, ["s"], as_of, full_refresh=full_refresh)
    return {Path(f.file).name: f.kept for f in staged["s"]}


def _tables(config: Path) -> dict[str, list[tuple]]:
    """The source's rows in each table, in the order the table holds them (reports: by tile key)."""
    with warehouse.reader(load_config(config).warehouse_path) as con:
        out = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
        out["reports in order"] = con.execute("SELECT report_id, tile_key FROM reports").fetchall()
    return out


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, HEADER)
        w.writeheader()
        w.writerows(rows)


row = st.fixed_dictionaries(
    {
        "id": st.sampled_from("abcdefgh"),  # ids repeat across files: the first (by file, line) is kept
        "lat": st.sampled_from(["40.7", "40.71", "51.5", "x", ""]),  # and bad rows are rejected
        "lng": st.sampled_from(["-73.9", "-0.1", "-73.95"]),
        "t": st.sampled_from(["2026-10-30T10:00:00Z", "2026-10-31T08:30:00Z", "yesterday"]),
        "sev": st.sampled_from(["1", "2", "3"]),
    }
)
step = st.one_of(
    st.tuples(st.just("write"), st.sampled_from("pqrs"), st.lists(row, max_size=5)),  # add or rewrite a file
    st.tuples(st.just("touch"), st.sampled_from("pqrs"), st.just([])),  # a new time, the same bytes
    st.tuples(st.just("remove"), st.sampled_from("pqrs"), st.just([])),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(step, min_size=1, max_size=5))
def test_an_incremental_extraction_ends_where_a_full_one_would(tmp_path_factory, steps):
    """After any sequence of added, rewritten, touched and removed files, the warehouse of
    incremental extractions holds exactly the rows of a fresh, full extraction; only new and
    changed files were read."""
    root = tmp_path_factory.mktemp("inc")
    data = root / "data"
    data.mkdir()
    incremental = _config(root / "incremental", data)
    _extract(incremental)
    for i, (op, name, rows) in enumerate(steps):
        path = data / f"{name}.csv"
        before = {p.name: p.read_bytes() for p in data.glob("*.csv")}  # as the last extraction staged them
        if op == "write":
            _write(path, rows)
        elif op == "touch" and path.exists():
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        elif op == "remove":
            path.unlink(missing_ok=True)
        now = {p.name: p.read_bytes() for p in data.glob("*.csv")}
        assert _extract(incremental) == {n: before.get(n) == b for n, b in sorted(now.items())}, (i, op, name)
        full = _config(root / f"full-{i}", data)
        _extract(full)
        assert _tables(incremental) == _tables(full), (i, op, name)


def _prime(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    for name, ids in (("a", "ab"), ("b", "cd"), ("c", "ef")):
        _write(
            data / f"{name}.csv", [{"id": i, "lat": "40.7", "lng": "-73.9", "t": "2026-10-30", "sev": "2"} for i in ids]
        )
    config = _config(tmp_path / "w", data)
    assert _extract(config) == {"a.csv": False, "b.csv": False, "c.csv": False}
    return data, config


def test_only_new_and_changed_files_are_read(tmp_path):
    data, config = _prime(tmp_path)
    old = (data / "b.csv").stat().st_mtime_ns
    os.utime(data / "b.csv", ns=(old, old - 10**10))  # an older time, the same bytes: unchanged
    _write(data / "c.csv", [{"id": "z", "lat": "51.5", "lng": "-0.1", "t": "2026-10-30", "sev": "1"}])
    _write(data / "d.csv", [{"id": "y", "lat": "51.5", "lng": "-0.1", "t": "2026-10-30", "sev": "1"}])
    (data / "a.csv").unlink()
    assert _extract(config) == {"b.csv": True, "c.csv": False, "d.csv": False}
    with warehouse.reader(load_config(config).warehouse_path) as con:
        assert sorted(r for (r,) in con.execute("SELECT report_id FROM reports").fetchall()) == [
            "s:c",
            "s:d",
            "s:y",
            "s:z",
        ]
        files = con.execute("SELECT file, rows, digest IS NOT NULL FROM source_files ORDER BY file").fetchall()
    assert [(Path(f).name, n, d) for f, n, d in files] == [("b.csv", 2, True), ("c.csv", 1, True), ("d.csv", 1, True)]
    assert _extract(config) == {"b.csv": True, "c.csv": True, "d.csv": True}
    assert _extract(config, full_refresh=True) == {"b.csv": False, "c.csv": False, "d.csv": False}


def test_a_changed_mapping_reads_every_file_again(tmp_path):
    """Rows kept were staged with the old settings: a new mapping (or format) reads every file."""
    data, config = _prime(tmp_path)
    _config(tmp_path / "w", data, entity_type="pothole")
    assert _extract(config) == {"a.csv": False, "b.csv": False, "c.csv": False}
    with warehouse.reader(load_config(config).warehouse_path) as con:
        assert con.execute("SELECT DISTINCT entity_type FROM reports").fetchall() == [("pothole",)]


def test_a_file_whose_staged_rows_went_missing_is_read_again(tmp_path):
    """The record says a file was staged, but its rows are not there (all or some): it is read, not trusted."""
    data, config = _prime(tmp_path)
    with warehouse.writer(load_config(config).warehouse_path) as con:
        con.execute("DELETE FROM raw_reports WHERE file LIKE '%a.csv' AND report_id = 'a'")
    assert _extract(config) == {"a.csv": False, "b.csv": True, "c.csv": True}
    with warehouse.reader(load_config(config).warehouse_path) as con:
        assert con.execute("SELECT count(*) FROM reports").fetchone()[0] == 6


def test_a_kept_files_rows_are_not_checked_again_but_the_time_rule_is(tmp_path):
    """Validation keeps each unchanged file's checked rows; what depends on the run's time
    (future timestamps) and on other rows (duplicates) is decided again over all of them."""
    data, config = _prime(tmp_path)
    soon = (AS_OF + timedelta(hours=30)).isoformat()  # beyond the 24 h tolerance, until the run moves on
    _write(data / "d.csv", [{"id": "a", "lat": "51.5", "lng": "-0.1", "t": soon, "sev": "1"}])
    _extract(config)
    now = _config(tmp_path / "now", data)
    _extract(now)
    assert _tables(config) == _tables(now)
    assert ("s", "future_timestamp") in {(r[0], r[4]) for r in _tables(config)["rejected_reports"]}
    later = AS_OF + timedelta(days=1)
    assert _extract(config, as_of=later) == {"a.csv": True, "b.csv": True, "c.csv": True, "d.csv": True}
    fresh = _config(tmp_path / "fresh", data)
    _extract(fresh, as_of=later)
    assert _tables(config) == _tables(fresh)
    with warehouse.reader(load_config(config).warehouse_path) as con:
        reasons = dict(con.execute("SELECT file, reason FROM rejected_reports").fetchall())
    assert {Path(f).name: r for f, r in reasons.items()} == {"d.csv": "duplicate_report_id"}  # no longer future

    # the checked rows of a kept file are taken as they are (here: made wrong on purpose) ...
    with warehouse.writer(load_config(config).warehouse_path) as con:
        con.execute("UPDATE checked_rows SET reason_after = 'invalid_is_public' WHERE file LIKE '%a.csv'")
    _write(data / "c.csv", [{"id": "z", "lat": "51.5", "lng": "-0.1", "t": "2026-10-30", "sev": "1"}])
    _extract(config, as_of=later)
    wrong = "SELECT count(*) FROM rejected_reports WHERE reason = 'invalid_is_public'"
    with warehouse.reader(load_config(config).warehouse_path) as con:
        assert con.execute(wrong).fetchone() == (2,)
    # ... until a full refresh, or the rules change: then every file's rows are checked again
    _extract(config, full_refresh=True, as_of=later)
    with warehouse.writer(load_config(config).warehouse_path) as con:
        assert con.execute(wrong).fetchone() == (0,)
        con.execute("UPDATE checked_rows SET reason_after = 'invalid_is_public' WHERE file LIKE '%a.csv'")
    _config(tmp_path / "w", data, rules={"max_description_chars": 100})
    _extract(config, as_of=later)
    fresh = _config(tmp_path / "fresh-2", data, rules={"max_description_chars": 100})
    _extract(fresh, as_of=later)
    assert _tables(config) == _tables(fresh)


# --- an incremental run publishes what a run from scratch would -----------------------------

PLACES = [(40.7, -73.9), (40.71, -73.95), (51.5, -0.1), (51.52, -0.12), (-33.9, 151.2), (35.7, 139.7), (48.85, 2.35)]
placed = st.fixed_dictionaries(
    {
        "id": st.integers(0, 40).map(str),  # repeats: duplicates across files
        "place": st.sampled_from(PLACES),
        "jitter": st.integers(0, 50),  # about 0-5 km: a few cells and tiles per place
        "t": st.sampled_from(["2026-10-30T10:00:00Z", "2026-10-31T08:30:00Z", "2026-09-01T00:00:00Z"]),
        "sev": st.sampled_from(["1", "2", "3", "x"]),  # and a rejected severity now and then
    }
).map(
    lambda r: {
        "id": r["id"],
        "lat": f"{r['place'][0] + r['jitter'] * 0.001:.4f}",
        "lng": f"{r['place'][1] - r['jitter'] * 0.0007:.4f}",
        "t": r["t"],
        "sev": r["sev"],
    }
)
change = st.one_of(
    st.tuples(st.just("write"), st.sampled_from("pqr"), st.lists(placed, max_size=12)),  # insert, update
    st.tuples(st.just("remove"), st.sampled_from("pqr"), st.just([])),  # delete
)


def _publish(config: Path, part_cells: int) -> tuple[str, dict]:
    """Extract, build and publish the config's tileset, zooms in parts of about ``part_cells`` cells;
    the snapshot's id (its content hash) and the staging summary (with the selection's, ``zooms``)."""
    cfg = load_config(config)
    extract.stage(cfg, ["s"], AS_OF)
    extract.validate(cfg, ["s"], AS_OF)
    default = publish.SELECT_PART_CELLS
    publish.SELECT_PART_CELLS = part_cells
    try:
        snapshot = publish_tileset(cfg, "t", AS_OF)
    finally:
        publish.SELECT_PART_CELLS = default
    staged = json.loads(cfg.work("t").staged.read_text())
    return snapshot.snapshot_id, {**staged, "zooms": publish.read_selection(cfg.work("t"))}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(change, min_size=2, max_size=4), st.sampled_from([4, 1000]), st.sampled_from([1, 3]))
def test_an_incremental_run_publishes_the_bytes_of_a_run_from_scratch(tmp_path_factory, changes, part_cells, shards):
    """Inserts, updates and deletes in any order: each run over the live home (its warehouse, its
    work and tile cache, its live snapshot) publishes the snapshot a run in a new home would, to
    the byte (the snapshot id is the hash of every file). Zooms come whole or in parts, built in
    one shard or three (whose tiles draw their neighbours' across the cuts); tiles near no change
    come from the cache without being laid out."""
    root = tmp_path_factory.mktemp("equal")
    data = root / "data"
    data.mkdir()
    tileset = {"shards": shards, "shard_zoom": 8}
    live = _config(root / "live", data, tileset)
    for i, (op, name, rows) in enumerate(changes):
        path = data / f"{name}.csv"
        if op == "write":
            _write(path, rows)
        else:
            path.unlink(missing_ok=True)
        incremental, _ = _publish(live, part_cells)
        scratch, _ = _publish(_config(root / f"scratch-{i}", data, tileset), part_cells)
        assert incremental == scratch, (i, op, name)


def test_a_refresh_encodes_only_the_tiles_its_new_reports_touch(tmp_path):
    """A new report in Tokyo, scored like New York's: tiles elsewhere come from the last build's
    cache, and the snapshot is the one a run from scratch publishes."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": str(i), "lat": f"{40.7 + i * 0.002:.4f}", "lng": "-73.9", "t": "2026-10-30", "sev": "2"}
        for i in range(30)
    ]
    _write(data / "a.csv", rows)
    live = _config(tmp_path / "live", data)
    _, first = _publish(live, 1000)
    assert first["mvt"]["reused"] == 0 and first["mvt"]["encoded"] > 15
    _write(data / "b.csv", [{"id": "t1", "lat": "35.7", "lng": "139.7", "t": "2026-10-30", "sev": "2"}])
    refreshed, second = _publish(live, 1000)
    scratch, third = _publish(_config(tmp_path / "scratch", data), 1000)
    assert refreshed == scratch and third["mvt"]["reused"] == 0
    # only z0's tile holds both cities; no zoom's highest score moves (intensity is score / max)
    assert second["mvt"]["reused"] == first["mvt"]["encoded"] - 1
    # the shard's zooms (below the overviews) lay out only the tiles around Tokyo's (one a zoom, and
    # those its buffer reaches); New York's come from the cache as they are, without being compared
    encoding = json.loads(load_config(live).work("t").shard(0).encoding.read_text())
    zooms = len(encoding["zooms"])
    assert encoding["compared"] == encoding["encoded"] and zooms <= encoding["encoded"] <= 9 * zooms
    assert first["mvt"]["compared"] == first["mvt"]["encoded"]
    # below the overviews' zooms (each chosen whole), every New York tile keeps its selection
    overviews = load_config(live).tilesets["t"].overview_maxzoom
    assert [z["reused"] for z in second["zooms"]] == [z["tiles"] if z["z"] > overviews else 0 for z in first["zooms"]]
    assert sum(z["reused"] for z in second["zooms"]) > 0
    # a report in New York changes: its tiles are chosen and encoded again, the others reused
    rows[7]["sev"] = "1"  # below the highest scores: intensity elsewhere stays
    _write(data / "a.csv", rows)
    changed, fourth = _publish(live, 1000)
    assert changed == _publish(_config(tmp_path / "scratch-2", data), 1000)[0] != refreshed
    encoding = json.loads(load_config(live).work("t").shard(0).encoding.read_text())
    tiles = sum(z["tiles"] for z in encoding["zooms"])
    assert zooms <= encoding["compared"] < tiles and encoding["reused"] > 0  # its tile and its neighbours
    # the tile that holds it is chosen again (one a zoom); every other keeps its selection, even where
    # the zoom's intensity moves (a selection does not depend on it: intensity is added as it is published)
    kept = [z["tiles"] - 1 if z["z"] > overviews else 0 for z in fourth["zooms"]]
    assert [z["reused"] for z in fourth["zooms"]] == kept
    assert second["mvt"]["encoded"] + second["mvt"]["reused"] == third["mvt"]["encoded"]
