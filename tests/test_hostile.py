"""Hostile input: a generated corpus through every format, fuzzing, injection. Nothing crashes, nothing is lost."""

from __future__ import annotations

import csv
import io
import json
import math
import string
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import build, extract, scoring, warehouse
from pipeline.config import Tileset, load_config, validate_config
from pipeline.errors import ConfigError, SourceError
from pipeline.plan import resolve
from pipeline.sources import files as file_sources

from .conftest import AS_OF, run_extraction

HEADER = ["id", "lat", "lng", "t", "cat", "sev", "desc"]
GOOD = ["g", "40.7", "-73.9", "2026-10-30T10:00:00Z", "pothole", "2", "ok"]
ODD_VALUES = {
    "lat": [
        "",
        " 40.7 ",
        "forty",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e999",
        "120",
        "-91",
        "85.06",
        "40,7",
        "0x10",
        "4e1",
        "\u0664\u0660",
    ],
    "lng": ["", "181", "-180", "180", "1e-320", "inf"],
    "t": [
        "",
        "2026-10-30",
        "2026-10-30 10:00",
        "2026-10-30T10:00:00+05:30",
        "2026-10-30T10:00:00-11:00",
        "0001-01-01",
        "9999-12-31T23:59:59Z",
        "1793000000",
        "1793000000000",
        "1793000000000000",
        "-5",
        "yesterday",
        "2026-02-30",
        "30/10/2026",
        "infinity",
        "-infinity",
        "NaT",
        "2026-13-01",
    ],
    "sev": ["", "2", "two", "NaN", "1e999", "-1", "3.5"],
    "cat": ["=cmd|' /C calc'!A0", "+SUM(1,2)", "@import", "'; DROP TABLE reports; --", "a\x00b", "ü\u202e"],
    "desc": ["x" * 281, "line1\nline2", 'quote "inside"', "x" * 10_000_000],
}


def _csv_text(rows: list[list[str]], newline: str = "\n", delimiter: str = ",") -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline, delimiter=delimiter)
    writer.writerow(HEADER)
    writer.writerows(rows)
    return out.getvalue()


def hostile_corpus(root: Path) -> dict[str, int]:
    """Write the corpus; returns file name -> data lines written (what must be accounted for)."""
    written = {}

    def put(name: str, data: bytes, lines: int) -> None:
        (root / name).write_bytes(data)
        written[name] = lines

    rows = []
    for column, values in ODD_VALUES.items():
        for i, value in enumerate(values):
            row = list(GOOD)
            row[0] = f"{column}-{i}"
            row[HEADER.index(column)] = value
            rows.append(row)
    put("odd_values.csv", _csv_text(rows).encode(), len(rows))
    put("bom_crlf.csv", "\ufeff".encode() + _csv_text([GOOD, ["g2", "41"] + GOOD[2:]], newline="\r\n").encode(), 2)
    put("semicolons.csv", _csv_text([["s1", *GOOD[1:]]], delimiter=";").encode(), 1)
    put("empty.csv", b"", 0)
    put("header_only.csv", (",".join(HEADER) + "\n").encode(), 0)
    bad_utf8 = _csv_text([["u1", *GOOD[1:]]]).encode() + b"u2,40.7,-73.9,2026-10-30,\xff\xfe\xfd,2,x\n"
    put("invalid_utf8.csv", bad_utf8 + _csv_text([["u3", *GOOD[1:]]]).split("\n", 1)[1].encode(), 3)
    put("nul.csv", _csv_text([["n1", "40.7", "-73.9", "2026-10-30", "po\x00thole", "2", "x"]]).encode(), 1)
    ragged = ",".join(HEADER) + "\nr1,40.7\nr2,40.7,-73.9,2026-10-30,pothole,2,x,extra,more\n"
    put("ragged.csv", ragged.encode(), 2)
    put("missing_columns.csv", b"id,lat\nm1,40.7\n", 1)
    put("swapped.csv", _csv_text([["w1", "-73.9", "40.7", *GOOD[3:]]]).encode(), 1)
    put("duplicate_ids_a.csv", _csv_text([["dup", *GOOD[1:]]]).encode(), 1)
    put("duplicate_ids_b.csv", _csv_text([["dup", *GOOD[1:]]]).encode(), 1)
    return written


def _source(path: str, fmt: str = "csv", **columns) -> dict:
    mapping = {
        "report_id": "id",
        "lat": "lat",
        "lng": "lng",
        "observed_at": "t",
        "category": "cat",
        "severity": "sev",
        "description": "desc",
        **columns,
    }
    # the corpus holds files no reader can use: record them, read the rest
    return {"kind": "file", "path": path, "format": fmt, "columns": mapping, "on_unreadable_file": "skip"}


def test_the_hostile_csv_corpus_is_read_rejected_or_reported_never_crashes(tmp_path, write_config):
    written = hostile_corpus(tmp_path)
    cfg = load_config(write_config({"sources": {"h": _source("*.csv")}}))
    staged, validated = run_extraction(cfg)
    result = validated["h"]
    assert result.read == result.valid + result.rejected_total
    per_file = {Path(f.file).name: f for f in staged["h"]}
    assert per_file.keys() == written.keys()
    for name, lines in written.items():
        f = per_file[name]
        assert f.error is not None or f.rows == lines, (name, f)
    # what could not be read is said per file, and only for files that cannot hold the mapping
    # a semicolon file is not read as CSV unless the source says `delimiter: ";"`
    assert {n for n, f in per_file.items() if f.error} == {"missing_columns.csv", "semicolons.csv"}
    assert per_file["empty.csv"].rows == 0  # an empty export: nothing to read, nothing wrong
    assert "missing column(s)" in per_file["missing_columns.csv"].error
    assert result.rejected["malformed_line"] == 1 and result.rejected["duplicate_report_id"] == 1
    for reason in (
        "nan_coordinates",
        "infinite_coordinates",
        "latitude_out_of_range",
        "unparseable_timestamp",
        "non_numeric_severity",
        "description_too_long",
        "outside_mercator",
        "missing_coordinates",
    ):
        assert result.rejected.get(reason, 0) > 0, reason
    with warehouse.reader(cfg.warehouse_path) as con:
        kept = dict(con.execute("SELECT report_id, category FROM reports").fetchall())
        assert con.execute("SELECT count(*) FROM reports").fetchone()[0] == result.valid
    assert kept["h:cat-0"] == "=cmd|' /C calc'!A0"  # text stays text
    assert kept["h:cat-3"] == "'; DROP TABLE reports; --"
    assert "h:lat-1" in kept and "h:t-5" in kept  # " 40.7 " and year 0001 are fine
    semi = load_config(write_config({"sources": {"s": {**_source("semicolons.csv"), "delimiter": ";"}}}, "semi.yaml"))
    assert run_extraction(semi)[1]["s"].valid == 1


def test_hostile_files_in_every_other_format(tmp_path, write_config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "good.ndjson").write_text(
        json.dumps({"id": "j1", "lat": 40.7, "lng": -73.9, "t": "2026-10-30"})
        + "\n"
        + json.dumps({"id": "j2", "lat": "NaN", "lng": None, "t": 5})
        + "\n"
    )
    (tmp_path / "broken.ndjson").write_text('{"id": "b1", "lat": 40.7,\n')  # one record, cut short
    pq.write_table(
        pa.table(
            {"id": ["p1", "p2"], "lat": [40.7, float("inf")], "lng": [-73.9, 0.0], "t": ["2026-10-30", "garbage"]}
        ),
        tmp_path / "good.parquet",
    )
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 10)
    (tmp_path / "truncated.geojson").write_text('{"type": "FeatureCollection", "features": [')
    point = {
        "type": "Feature",
        "properties": {"id": "g1", "t": "2026-10-30"},
        "geometry": {"type": "Point", "coordinates": [-73.9, 40.7]},
    }
    (tmp_path / "ok.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [point]}))
    cols = {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t"}
    skip = {"on_unreadable_file": "skip"}
    cfg = load_config(
        write_config(
            {
                "sources": {
                    "nd": {"kind": "file", "path": "*.ndjson", "format": "ndjson", "columns": cols, **skip},
                    "pq": {"kind": "file", "path": "*.parquet", "format": "parquet", "columns": cols, **skip},
                    "gj": {
                        "kind": "file",
                        "path": "*.geojson",
                        "format": "geojson",
                        "columns": {"report_id": "id", "observed_at": "t"},
                        **skip,
                    },
                }
            }
        )
    )
    staged, validated = run_extraction(cfg)
    for name, result in validated.items():
        assert result.read == result.valid + result.rejected_total, name
    errors = {Path(f.file).name for files in staged.values() for f in files if f.error}
    assert errors == {"corrupt.parquet", "truncated.geojson"}
    assert (validated["nd"].valid, validated["pq"].valid, validated["gj"].valid) == (1, 1, 1)
    assert validated["nd"].rejected["malformed_line"] == 1  # the cut record, not the file


def broken_record_corpus(root: Path) -> dict[str, tuple[int, list[int]]]:
    """NDJSON and GeoJSON files with broken records in the middle.

    Returns file name -> (records, the line / feature numbers that are broken).
    """
    good = lambda i: {"id": f"r{i}", "lat": 40.7 + i / 1000, "lng": -73.9, "t": "2026-10-30T10:00:00Z"}  # noqa: E731
    lines = [
        json.dumps(good(1)),
        json.dumps(good(2)),
        '{"id": "r3", "lat": 40.7,, "lng"',
        json.dumps(good(4)),
        "",
        "[1, 2, 3]",
        "not json at all",
        json.dumps(good(8)),
        '{"id": "r9", "lat": 4',
        json.dumps(good(10)),
    ]
    (root / "middle.ndjson").write_text("\n".join(lines) + "\n")

    def feature(i: int) -> str:
        props = {k: v for k, v in good(i).items() if k not in ("lat", "lng")}
        return json.dumps(
            {
                "type": "Feature",
                "properties": props,
                "geometry": {"type": "Point", "coordinates": [-73.9, 40.7 + i / 1000]},
            }
        )

    features = [
        feature(1),
        feature(2),
        '{"type": "Feature", "properties": {"id": "r3"',
        feature(4),
        '{"type": "Feature", "properties": {"id": "r5", "t": }, "geometry": null}',
        feature(6),
        "42",
        feature(8),
    ]
    (root / "middle.geojson").write_text(
        '{"type": "FeatureCollection", "features": [\n' + ",\n".join(features) + "\n]}"
    )
    return {"middle.ndjson": (9, [3, 6, 7, 9]), "middle.geojson": (8, [3, 5, 7])}


def test_one_broken_record_loses_only_itself(tmp_path, write_config):
    expected = broken_record_corpus(tmp_path)
    cols = {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t"}
    cfg = load_config(
        write_config(
            {
                "sources": {
                    "nd": {"kind": "file", "path": "middle.ndjson", "format": "ndjson", "columns": cols},
                    "gj": {
                        "kind": "file",
                        "path": "middle.geojson",
                        "format": "geojson",
                        "columns": {"report_id": "id", "observed_at": "t"},
                    },
                }
            }
        )
    )
    staged, validated = run_extraction(cfg)
    for name, file in (("nd", "middle.ndjson"), ("gj", "middle.geojson")):
        records, broken = expected[file]
        result = validated[name]
        assert staged[name][0].error is None, staged[name]
        assert result.read == records == result.valid + result.rejected_total
        assert result.rejected == {"malformed_line": len(broken)} and result.valid == records - len(broken)
        with warehouse.reader(cfg.warehouse_path) as con:
            numbers = [
                n
                for (n,) in con.execute(
                    "SELECT row_number FROM rejected_reports WHERE source = ? ORDER BY row_number", [name]
                ).fetchall()
            ]
            kept = {k for (k,) in con.execute("SELECT report_id FROM reports WHERE source = ?", [name]).fetchall()}
        assert numbers == broken  # the NDJSON line / the GeoJSON feature, as an editor counts them
        assert f"{name}:r10" in kept or f"{name}:r8" in kept  # records after the broken ones were read


def test_a_file_that_vanishes_mid_run_is_a_per_file_error(tmp_path, write_config, monkeypatch):
    (tmp_path / "a.csv").write_text(_csv_text([["a1", *GOOD[1:]]]))
    cfg = load_config(write_config({"sources": {"h": _source("*.csv")}}))
    listed = file_sources.list_files
    monkeypatch.setattr(file_sources, "list_files", lambda src: [*listed(src), str(tmp_path / "gone.csv")])
    staged, validated = run_extraction(cfg)
    gone = [f for f in staged["h"] if f.file.endswith("gone.csv")][0]
    assert gone.rows == 0 and gone.error and validated["h"].valid == 1
    # by default a file that cannot be read fails its source, naming the file; the warehouse keeps its rows
    strict = load_config(write_config({"sources": {"h": {**_source("*.csv"), "on_unreadable_file": "fail"}}}))
    with pytest.raises(SourceError, match=r"source h: cannot read .*gone\.csv: .*on_unreadable_file: skip"):
        extract.stage(strict, ["h"], AS_OF)
    assert extract.conservation(strict.warehouse_path, ["h"])[0] == ("h", 1, 1, 0)


def test_preflight_checks_a_geojson_sources_columns(tmp_path, write_config):
    # GeoJSON is read with ST_Read: the check loads spatial for it (CSV, Parquet and NDJSON need none)
    point = {"type": "Feature", "properties": {"fid": "g1", "when": "2026-01-01"}, "geometry": None}
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [point]}))
    src = {"kind": "file", "path": "*.geojson", "format": "geojson", "columns": {"report_id": "fid"}}
    good = load_config(
        write_config({"sources": {"g": {**src, "columns": {"report_id": "fid", "observed_at": "when"}}}})
    )
    extract.preflight(good, ["g"])
    bad = load_config(write_config({"sources": {"g": {**src, "columns": {"report_id": "fid", "observed_at": "t"}}}}))
    with pytest.raises(ConfigError, match=r"sources\.g\.columns\.observed_at: column 't' is not in"):
        extract.preflight(bad, ["g"])
    assert file_sources.reads_spatially(bad.sources["g"])
    assert not any(
        file_sources.reads_spatially(s)
        for s in load_config(write_config({"sources": {"h": _source("*.csv")}})).sources.values()
    )


def test_files_that_change_mid_run_are_read_as_they_are_then(tmp_path, write_config, monkeypatch):
    (tmp_path / "a.csv").write_text(_csv_text([["a1", *GOOD[1:]]]))
    (tmp_path / "b.csv").write_text(_csv_text([["b1", *GOOD[1:]]]))
    cfg = load_config(write_config({"sources": {"h": _source("*.csv")}}))
    extract.preflight(cfg, ["h"])  # both files fit the mapping here...
    listed = file_sources.list_files

    def then_changed(src):
        files = listed(src)
        (tmp_path / "a.csv").write_text(_csv_text([["a1", *GOOD[1:]], ["a2", *GOOD[1:]], ["a3", "x", *GOOD[2:]]]))
        (tmp_path / "b.csv").write_text("id,nothing\nb1,else\n")  # ...and then b loses its columns
        return files

    monkeypatch.setattr(file_sources, "list_files", then_changed)
    staged = extract.stage(cfg, ["h"], AS_OF)
    result = extract.validate(cfg, ["h"], AS_OF)["h"]
    files = {Path(f.file).name: f for f in staged["h"]}
    assert files["a.csv"].rows == 3 and files["a.csv"].error is None
    assert files["b.csv"].rows == 0 and "missing column(s)" in files["b.csv"].error
    assert (result.read, result.valid, result.rejected_total) == (3, 2, 1)


def test_identifiers_and_values_never_become_sql(tmp_path, write_config):
    evil = "lat'); DROP TABLE reports; --"
    (tmp_path / "e.csv").write_text(f"id,{evil},lng,t,cat\ne1,40.7,-73.9,2026-10-30,'; DROP TABLE reports; --\n")
    src = _source("e.csv", lat=evil)
    del src["columns"]["severity"], src["columns"]["description"]
    cfg = load_config(
        write_config(
            {
                "sources": {"e": src},
                "tilesets": {"e": {"source": "e", "filters": {"categories": ["'; DROP TABLE reports; --"]}}},
            }
        )
    )
    run_extraction(cfg)
    profile, filters = resolve(cfg.tilesets["e"])
    result = scoring.score_reports(build.read_reports(cfg.warehouse_path, "e"), profile, filters, AS_OF)
    assert result.scored.height == 1 and result.excluded == {}
    with warehouse.reader(cfg.warehouse_path) as con:
        assert {t for (t,) in con.execute("SHOW TABLES").fetchall()} >= {"reports", "raw_reports", "rejected_reports"}


text = st.text(alphabet=string.printable + "é\u202e\x00", max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(text, min_size=7, max_size=7), min_size=1, max_size=20))
def test_fuzzed_rows_are_always_accounted_for(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "f.csv").write_text(_csv_text(rows), encoding="utf-8", errors="surrogateescape")
    (root / "hotspots.yaml").write_text(
        yaml.safe_dump({"sources": {"f": _source("f.csv")}, "tilesets": {"f": {"source": "f"}}})
    )
    cfg = load_config(root / "hotspots.yaml")
    staged, validated = run_extraction(cfg)
    result = validated["f"]
    assert result.read == result.valid + result.rejected_total
    assert staged["f"][0].error is not None or result.read >= 1


reports = st.fixed_dictionaries(
    {
        "lat": st.floats(-85, 85),
        "lng": st.floats(-180, 180),
        "observed_at": st.datetimes(datetime(1990, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC)),
        "expires_at": st.none() | st.datetimes(datetime(1990, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC)),
        "category": st.none() | st.sampled_from(["ice", "pothole", "urgent", "info", "x"]),
        "severity": st.floats(-5, 20),
        "priority": st.none() | st.sampled_from(["CRITICAL", "LOW", "odd"]),
        "upvotes": st.integers(0, 50),
        "is_public": st.booleans(),
        "departures": st.none() | st.floats(0, 500),
        "cancellations": st.none() | st.floats(0, 50),
        "delays": st.none() | st.floats(0, 50),
        "entity_id": st.none() | st.sampled_from(["a", "b"]),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(reports, max_size=30),
    st.sampled_from(["generic", "community_needs", "road_conditions", "campus_issues", "rail_disruptions"]),
)
def test_fuzzed_scoring_never_fails_and_conserves(rows, profile_name):
    frame = (
        pl.DataFrame(
            [
                {
                    **r,
                    "report_id": str(i),
                    "entity_type": "post",
                    "status": None,
                    "organization": None,
                    "building": None,
                    "activity": None,
                }
                for i, r in enumerate(rows)
            ],
            schema_overrides={
                "observed_at": pl.Datetime("us", "UTC"),
                "expires_at": pl.Datetime("us", "UTC"),
                "upvotes": pl.Int32,
            },
        )
        if rows
        else pl.DataFrame(schema={c: pl.String for c in scoring.READ_COLUMNS})
    )
    if not rows:
        return
    profile, filters = resolve(Tileset(source="s", profile=profile_name))
    result = scoring.score_reports(frame.lazy(), profile, filters, AS_OF)
    assert result.holds
    assert all(math.isfinite(w) and w >= 0 for w in result.scored.get_column("weight"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
config_keys = st.sampled_from(
    [
        "output",
        "home",
        "sources",
        "tilesets",
        "kind",
        "path",
        "columns",
        "source",
        "profile",
        "maxzoom",
        "minzoom",
        "scoring",
        "filters",
        "decay",
        "preset",
        "lat",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(config_keys, json_values | st.dictionaries(config_keys, json_values, max_size=4), max_size=5))
def test_fuzzed_configs_raise_only_config_errors(tmp_path_factory, data):
    try:
        validate_config(data, base=Path("/tmp"), file="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")


def test_two_runs_of_the_same_config_at_once_both_succeed(tmp_path, write_config):
    import subprocess
    import sys

    path = write_config(
        {
            "sources": {
                "a": {"kind": "synthetic", "domain": "road_conditions", "count": 20000},
                "b": {"kind": "synthetic", "domain": "campus_issues", "count": 20000},
            },
            "tilesets": {
                "a": {"source": "a", "profile": "road_conditions", "maxzoom": 10},
                "b": {"source": "b", "profile": "campus_issues", "maxzoom": 10},
            },
        }
    )
    hotspots = str(Path(sys.executable).parent / "hotspots")
    runs = [
        subprocess.Popen(
            [hotspots, "run", "--config", str(path), "--as-of", AS_OF.isoformat()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    cfg = load_config(path)
    assert all(c.holds for c in extract.conservation(cfg.warehouse_path, ["a", "b"]))
    from pipeline import publish

    assert all(publish.verify_latest(cfg.published(t)) is None for t in ("a", "b"))


def test_ndjson_keys_match_the_mapping_in_any_case_as_a_header_would(tmp_path, write_config):
    (tmp_path / "caps.ndjson").write_text(json.dumps({"ID": "a", "Lat": 40.7, "LNG": -73.9, "T": "2026-10-30"}) + "\n")
    cols = {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t"}
    cfg = load_config(
        write_config({"sources": {"c": {"kind": "file", "path": "caps.ndjson", "format": "ndjson", "columns": cols}}})
    )
    _, validated = run_extraction(cfg)
    assert (validated["c"].read, validated["c"].valid) == (1, 1)
