"""The two real sample files in ../shared/data, read through `file` sources."""

from __future__ import annotations

from pipeline import warehouse

from .conftest import NYC_COLUMNS, REPO, shared_file


def _quakes(path):
    return {
        "kind": "file",
        "path": str(path),
        "format": "csv",
        "entity_type": "earthquake",
        "timestamp_format": "%m/%d/%Y",
        "columns": {"lat": "Latitude", "lng": "Longitude", "observed_at": "Date", "severity": "Magnitude"},
    }


def test_earthquakes_iso_dates_parse_and_polar_rows_are_outside_mercator(extract_config):
    path = shared_file("earthquakes_23k_1965_2016.csv")
    cfg, staged, v = extract_config({"sources": {"quakes": _quakes(path)}})
    result = v["quakes"]
    assert result.read == 23_412 == staged["quakes"][0].rows
    assert result.rejected == {"outside_mercator": 10}
    assert result.valid == 23_402
    with warehouse.reader(cfg.warehouse_path) as con:
        iso = con.execute(
            "SELECT strftime(observed_at, '%Y-%m-%dT%H:%M:%S.%g') FROM reports "
            "WHERE report_id IN ('quakes:earthquakes_23k_1965_2016.csv:3379', "
            "'quakes:earthquakes_23k_1965_2016.csv:7513', 'quakes:earthquakes_23k_1965_2016.csv:20651') "
            "ORDER BY 1"
        ).fetchall()
        assert iso == [("1975-02-23T02:58:41.000",), ("1985-04-28T02:53:41.530",), ("2011-03-13T02:23:34.520",)]
        lats = con.execute(
            "SELECT min(lat), max(lat) FROM rejected_reports r, "
            "LATERAL (SELECT CAST(json_extract_string(r.fields, '$.lat') AS DOUBLE) AS lat)"
        ).fetchone()
        assert lats[0] < -85.05113 or lats[1] > 85.05113
        span = con.execute(
            "SELECT min(observed_at)::DATE::VARCHAR, max(observed_at)::DATE::VARCHAR, "
            "min(severity), max(severity), count(DISTINCT entity_type) FROM reports"
        ).fetchone()
        assert span == ("1965-01-02", "2016-12-30", 5.5, 9.1, 1)


def test_nyc311_rows_without_coordinates_are_rejected(extract_config):
    path = shared_file("nyc311_animals_2025.csv")
    src = {
        "kind": "file",
        "path": str(path),
        "timestamp_format": "%m/%d/%Y %H:%M",
        "columns": NYC_COLUMNS,
    }
    cfg, _, v = extract_config({"sources": {"nyc": src}})
    assert v["nyc"].read == 4_969
    assert v["nyc"].rejected == {"missing_coordinates": 62}
    with warehouse.reader(cfg.warehouse_path) as con:
        kinds, first, last = con.execute(
            "SELECT count(DISTINCT category), min(observed_at)::DATE::VARCHAR, "
            "max(observed_at)::DATE::VARCHAR FROM reports"
        ).fetchone()
    assert kinds == 9 and first.startswith("2025-") and last.startswith("2025-0")


def test_nyc311_wkt_location_column_gives_the_same_positions(extract_config):
    path = shared_file("nyc311_animals_2025.csv")
    src = {
        "kind": "file",
        "path": str(path),
        "timestamp_format": "%m/%d/%Y %H:%M",
        "columns": {"report_id": "Unique Key", "geometry": "Location", "observed_at": "Created Date"},
    }
    cfg, _, v = extract_config({"sources": {"nyc": src}})
    assert v["nyc"].rejected == {"missing_coordinates": 62}
    with warehouse.reader(cfg.warehouse_path) as con:
        assert con.execute("SELECT round(avg(lat), 4), round(avg(lng), 4) FROM reports").fetchone()[0] > 40.5


def test_example_config_reads_both_files(extract_config):
    from pipeline.config import load_config

    shared_file("earthquakes_23k_1965_2016.csv")
    cfg = load_config(REPO / "examples" / "shared-data.yaml")
    assert {s.path.rsplit("/", 1)[1] for s in cfg.sources.values()} == {
        "earthquakes_23k_1965_2016.csv",
        "nyc311_animals_2025.csv",
    }
    assert cfg.home.resolve().parent.name == ".hotspots"
