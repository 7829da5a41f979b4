"""Config loading: good files load with paths resolved; bad ones name the key and the reason."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from assets.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError

from .conftest import REPO

CSV = {"kind": "file", "path": "data/*.csv", "columns": {"lat": "y", "lng": "x", "observed_at": "t"}}


def base() -> dict:
    return {
        "sources": {"s": copy.deepcopy(CSV)},
        "tilesets": {"t": {"source": "s", "profile": "generic"}},
    }


def test_default_config_loads_with_four_seed_profiles():
    cfg = load_config(REPO / "hotspots.yaml")
    assert {t.profile for t in cfg.tilesets.values()} == {
        "community_needs",
        "road_conditions",
        "campus_issues",
        "rail_disruptions",
    }
    assert all(s.kind == "synthetic" for s in cfg.sources.values())
    assert cfg.home.is_absolute() and cfg.output.is_absolute()


def test_relative_paths_resolve_against_the_config_file(write_config, tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(write_config(base()))
    assert cfg.sources["s"].path == str(tmp_path / "data" / "*.csv")
    assert cfg.warehouse_path == tmp_path / ".hotspots" / "warehouse.duckdb"
    assert cfg.tilesets["t"].maxzoom == 14 and cfg.tilesets["t"].cell_detail == 6


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()

BAD = [
    ("tilesets.t.profile", "nope", "tilesets.t.profile", "generic"),
    ("tilesets.t.source", "missing", "tilesets.t.source", "unknown source 'missing'"),
    ("tilesets.t.maxzoom", -1, "tilesets.t.maxzoom", "greater than or equal to 0"),
    ("tilesets.t.minzoom", 15, "tilesets.t.maxzoom", "must be >= minzoom (15)"),
    ("tilesets.t.preset", "emergency", "tilesets.t.preset", "unknown preset 'emergency' for profile generic"),
    ("tilesets.t.strata_detail", 6, "tilesets.t.strata_detail", "must be < cell_detail (6)"),
    ("tilesets.t.colour", "red", "tilesets.t.colour", "unknown key"),
    ("tilesets.t.as_of", "yesterday", "tilesets.t.as_of", "datetime"),
    ("sources.s.kind", "ftp", "sources.s", "unknown kind 'ftp'"),
    ("sources.s.kind", _DELETE, "sources.s", "missing `kind:`"),
    ("sources.s.format", "xlsx", "sources.s.format", "'csv'"),
    ("sources.s.columns.lattitude", "y", "sources.s.columns.lattitude", "unknown key"),
    ("sources.s.max_rejected_fraction", 1.5, "sources.s.max_rejected_fraction", "less than or equal to 1"),
    ("sources.s.on_unreadable_file", "ignore", "sources.s.on_unreadable_file", "'fail' or 'skip'"),
    ("tilesets.t.min_publish_fraction", -0.1, "tilesets.t.min_publish_fraction", "greater than or equal to 0"),
    ("tilesets.t.formats", ["geojson", "kml"], "tilesets.t.formats.1", "'geojson' or 'mvt'"),
    ("tilesets.t.formats", ["mvt", "mvt"], "tilesets.t.formats", "lists a format twice"),
    ("tilesets.t.tiles_maxzoom", "deep", "tilesets.t.tiles_maxzoom", "must be auto or a zoom from 0 to 20, got 'deep'"),
    ("tilesets.t.tiles_maxzoom", 21, "tilesets.t.tiles_maxzoom", "must be auto or a zoom from 0 to 20, got 21"),
    ("tilesets.t.max_directory_features", -1, "tilesets.t.max_directory_features", "greater than or equal to 0"),
    ("viewer.style", "javascript:alert(1)", "viewer.style", "must be an http(s) URL"),
    ("viewer.connect_src", ["https://tiles.example.org/path"], "viewer.connect_src.0", "must be an origin"),
    ("sources.s.columns.lat", _DELETE, "sources.s", "map lat and lng, or geometry"),
    ("sources.s.rules.rate_limit_per_hour", 0, "sources.s.rules.rate_limit_per_hour", "greater than or equal to 1"),
    ("home", "output/state", "home", "must not be inside output"),
    ("output", "../public", "output", "is outside the allowed roots"),
    ("home", "/var/tmp/hotspots", "home", "is outside the allowed roots"),
    ("output", "output/../../x", "output", "is outside the allowed roots"),
    ("roots", [], "roots", "at least 1 item"),
    ("sources", {}, "sources", "at least one source"),
]


@pytest.mark.parametrize(("key", "value", "where", "reason"), BAD, ids=[b[0] + "=" + str(b[1])[:12] for b in BAD])
def test_bad_config_names_key_and_reason(write_config, key, value, where, reason):
    path = write_config(_set(base(), key, value))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == where
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}: {where}: ")


UNTIMED = {"kind": "file", "path": "data/*.csv", "columns": {"lat": "y", "lng": "x"}}


@pytest.mark.parametrize(
    ("tileset", "key", "reason"),
    [
        ({"profile": "road_conditions"}, "scoring.decay.mode", "profile road_conditions decays by age (half_life)"),
        ({"profile": "campus_issues"}, "scoring.decay.mode", "decays by age (normalized_exponential)"),
        (
            {"profile": "generic", "scoring": {"decay": {"mode": "half_life", "days": 3}}},
            "scoring.decay.mode",
            "decays",
        ),
        ({"profile": "generic", "scoring": {"max_age_days": 30}}, "scoring.max_age_days", "keeps reports for 30 days"),
        ({"profile": "generic", "filters": {"start_date": "2026-01-01"}}, "filters.start_date", "date filter"),
    ],
)
def test_a_profile_that_needs_time_on_an_untimed_source_names_the_key(write_config, tileset, key, reason):
    data = {"sources": {"s": copy.deepcopy(UNTIMED)}, "tilesets": {"t": {"source": "s", **tileset}}}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(data))
    assert info.value.key == f"tilesets.t.{key}"
    assert reason in info.value.reason and "source s has no time (map columns.observed_at)" in info.value.reason


def test_untimed_sources_serve_profiles_without_time(write_config):
    data = {
        "sources": {"s": copy.deepcopy(UNTIMED)},
        "tilesets": {
            "rail": {"source": "s", "profile": "rail_disruptions"},
            "plain": {"source": "s", "profile": "generic"},
            "help": {"source": "s", "profile": "community_needs"},
        },
    }
    cfg = load_config(write_config(data))
    assert not cfg.sources["s"].timed and cfg.sources["s"].max_rejected_fraction == 0.5
    assert cfg.tilesets["rail"].min_publish_fraction == 0.5


def test_viewer_style_origin_reaches_the_content_security_policy(write_config):
    from pipeline.site import content_security_policy

    cfg = load_config(
        write_config(
            {
                **base(),
                "viewer": {
                    "style": "https://tiles.example.org/styles/liberty.json",
                    "connect_src": ["https://glyphs.example.net"],
                },
            }
        )
    )
    assert cfg.viewer.origins() == ["https://glyphs.example.net", "https://tiles.example.org"]
    csp = content_security_policy(cfg.viewer.origins())
    assert (
        "script-src 'self';" in csp
        and "connect-src 'self' https://glyphs.example.net https://tiles.example.org;" in csp
    )
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def test_roots_confine_output_and_home(write_config, tmp_path):
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (tmp_path / "public").symlink_to(elsewhere)  # an escape through a symlink is seen through
    with pytest.raises(ConfigError, match=r"^.*: output: .*-elsewhere is outside the allowed roots") as info:
        load_config(write_config({**base(), "output": "public"}))
    assert str(tmp_path) in info.value.reason
    cfg = load_config(write_config({**base(), "output": "public", "roots": [".", str(elsewhere)]}))
    assert cfg.output == tmp_path / "public"
    # the config file (it may name a database and its user) is never inside output
    with pytest.raises(ConfigError, match="output: must not hold the config file"):
        load_config(write_config({**base(), "output": ".", "home": "../state", "roots": [".."]}))


def test_bad_source_name_is_refused(write_config):
    data = base()
    data["sources"] = {"../escape": copy.deepcopy(CSV)}
    data["tilesets"]["t"]["source"] = "../escape"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(data))
    assert info.value.key == "sources.../escape" and "lowercase" in info.value.reason


def test_bad_synthetic_bbox(write_config):
    data = base()
    data["sources"]["s"] = {"kind": "synthetic", "domain": "road_conditions", "bbox": [10, 0, 5, 1]}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(data))
    assert info.value.key == "sources.s.bbox" and "west < east" in info.value.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [("sources: [unclosed", "not valid YAML at line 1"), ("- a list", "must be a mapping")],
)
def test_not_yaml_or_not_a_mapping(tmp_path, text, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_exits_2_with_key_path_on_bad_config(write_config, capsys):
    path = write_config(_set(base(), "tilesets.t.minzoom", 15))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"hotspots: {path}: tilesets.t.maxzoom: must be >= minzoom (15), got 14"


def test_cli_exits_2_on_glob_matching_nothing(write_config, capsys):
    path = write_config(base())
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "source s: path" in err and err.strip().endswith("matches no file")


def test_cli_exits_2_on_unknown_column(write_config, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("y,x,when\n1,2,2026-01-01\n")
    path = write_config(base())
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sources.s.columns.observed_at: column 't' is not in" in err and "(it has: y, x, when)" in err


def test_cli_exits_2_on_unknown_tileset_and_bad_as_of(write_config, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("y,x,t\n1,2,2026-01-01\n")
    path = write_config(base())
    assert main(["run", "--config", str(path), "--tileset", "zzz"]) == 2
    assert "--tileset: unknown tileset 'zzz' (known: t)" in capsys.readouterr().err
    assert main(["run", "--config", str(path), "--as-of", "soon"]) == 2
    assert "as_of: not an ISO 8601 time: 'soon'" in capsys.readouterr().err


def test_cli_bad_config_is_one_line_without_traceback(write_config):
    path = write_config(_set(base(), "tilesets.t.profile", "heat"))
    proc = subprocess.run(
        [sys.executable, "-m", "assets.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(path).parent,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "tilesets.t.profile" in proc.stderr


PG = {"kind": "postgres", "database": "roads", "user": "hotspots", "password_env": "PGPW"}


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ({}, "give exactly one of adapter, table or query"),
        ({"adapter": "road_conditions", "table": "t"}, "give exactly one of adapter, table or query"),
        ({"adapter": "roads"}, "'community_needs', 'road_conditions', 'campus_issues' or 'rail_disruptions'"),
        ({"table": "t"}, "columns: map the table's or query's columns"),
        ({"table": "t", "columns": {"lat": "y", "lng": "x", "observed_at": "t"}}, "columns.report_id: required"),
        ({"table": "t", "columns": {"report_id": "id", "lat": "y"}}, "map lat and lng, or geometry"),
        ({"adapter": "road_conditions", "columns": {"lat": "y"}}, "an adapter maps its own columns"),
        ({"adapter": "road_conditions", "port": 70000}, "less than or equal to 65535"),
    ],
)
def test_bad_postgres_sources(write_config, source, reason):
    data = base()
    data["sources"]["s"] = {**PG, **source}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(data))
    assert info.value.key.startswith("sources.s") and reason in info.value.reason


def test_good_postgres_sources(write_config):
    data = base()
    data["sources"] = {
        "a": {**PG, "adapter": "community_needs"},
        "b": {
            **PG,
            "query": "SELECT 1",
            "watermark": "updated_at",
            "columns": {"report_id": "id", "geometry": "geog", "observed_at": "t"},
        },
    }
    data["tilesets"] = {"t": {"source": "a", "profile": "community_needs"}}
    cfg = load_config(write_config(data))
    assert cfg.sources["a"].incremental and cfg.sources["b"].watermark == "updated_at"
