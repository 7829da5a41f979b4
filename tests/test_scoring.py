"""Scoring: the seeds' own numbers, every exclusion reason, presets and overrides."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import pyramid, scoring
from pipeline.config import Tileset
from pipeline.errors import ConfigError
from pipeline.plan import resolve

AS_OF = datetime(2026, 11, 1, tzinfo=UTC)
SCHEMA = {
    "report_id": pl.String,
    "entity_type": pl.String,
    "entity_id": pl.String,
    "lat": pl.Float64,
    "lng": pl.Float64,
    "observed_at": pl.Datetime("us", "UTC"),
    "expires_at": pl.Datetime("us", "UTC"),
    "category": pl.String,
    "severity": pl.Float64,
    "priority": pl.String,
    "status": pl.String,
    "organization": pl.String,
    "building": pl.String,
    "activity": pl.String,
    "upvotes": pl.Int32,
    "departures": pl.Float64,
    "cancellations": pl.Float64,
    "delays": pl.Float64,
    "is_public": pl.Boolean,
}


def reports(*rows: dict) -> pl.LazyFrame:
    """Canonical reports; unspecified fields as extraction leaves them."""
    defaults = {"lat": 40.7, "lng": -73.9, "observed_at": AS_OF, "severity": 1.0, "upvotes": 0, "is_public": True}
    full = [{**defaults, "report_id": f"r{i}", **row} for i, row in enumerate(rows)]
    return pl.DataFrame(full, schema=SCHEMA).lazy()


def score(ts: dict, *rows: dict) -> scoring.ScoreResult:
    profile, filters = resolve(Tileset(source="s", **ts))
    return scoring.score_reports(reports(*rows), profile, filters, AS_OF)


def ago(days: float) -> datetime:
    return AS_OF - timedelta(days=days)


# --- seed 002: campus issues ------------------------------------------------


def test_seed002_two_point_scenario_weights_16_and_37():
    point_a = [{"lat": 37.43, "lng": -122.17, "severity": 3.0, "priority": "LOW"}] * 10
    point_b = [{"lat": 37.42, "lng": -122.16, "severity": 8.0, "priority": "CRITICAL"}] * 5
    ts = {"profile": "campus_issues", "maxzoom": 14}
    result = score(ts, *point_a, *point_b)
    profile, _ = resolve(Tileset(source="s", **ts))
    cells = next(pyramid.build(result.scored, profile, 14, 14, 6))  # age 0: decay 1
    assert sorted(cells.get_column("score").round(9).to_list()) == [16.0, 37.0]
    # min-max normalisation (seed 002): the lower point is 0, the higher 1
    assert sorted(cells.get_column("intensity").to_list()) == [0.0, 1.0]


@pytest.mark.parametrize(("days", "kept"), [(30, 0.8465), (60, 0.7165), (90, 0.6065), (180, 0.6065)])
def test_seed002_decay_formula(days, kept):
    # exp(-0.5 * min(age / 90 d, 1)); the seed's bar chart rounds these loosely (86/74/64 %)
    result = score({"profile": "campus_issues"}, {"observed_at": ago(days), "severity": 10.0})
    assert result.scored.get_column("decay")[0] == pytest.approx(kept, abs=5e-5)
    assert result.scored.get_column("decay")[0] == pytest.approx(math.exp(-0.5 * min(days / 90, 1)))


def test_seed002_weight_is_severity_over_10_times_boost_times_decay():
    result = score(
        {"profile": "campus_issues"},
        {"severity": 8.0, "priority": "HIGH", "observed_at": ago(45)},
        {"severity": 5.0, "priority": None, "observed_at": ago(0)},
    )
    w = result.scored.get_column("weight").to_list()
    assert w[0] == pytest.approx(0.8 * 2.5 * math.exp(-0.25))
    assert w[1] == pytest.approx(0.5)  # no priority: no boost


def test_seed002_presets_set_decay_multiplier_age_and_filters():
    rows = [
        {"priority": "CRITICAL", "status": "OPEN", "severity": 9.0, "observed_at": ago(2)},
        {"priority": "LOW", "status": "OPEN", "severity": 9.0, "observed_at": ago(2)},
        {"priority": "HIGH", "status": "CLOSED", "severity": 9.0, "observed_at": ago(2)},
        {"priority": "HIGH", "status": "IN_PROGRESS", "severity": 9.0, "observed_at": ago(8)},
    ]
    result = score({"profile": "campus_issues", "preset": "emergency"}, *rows)
    assert result.scored.height == 1
    assert result.excluded == {"too_old": 1, "filtered_out": 2}
    profile, _ = resolve(Tileset(source="s", profile="campus_issues", preset="emergency"))
    assert (profile.decay.factor, profile.severity_weight_multiplier, profile.max_age_days) == (1.0, 3.0, 7)
    for preset, values in {"maintenance": (0.3, 1.5, 90), "overview": (0.5, 2.0, 30)}.items():
        p, _ = resolve(Tileset(source="s", profile="campus_issues", preset=preset))
        assert (p.decay.factor, p.severity_weight_multiplier, p.max_age_days) == values


def test_seed002_building_preset_needs_buildings(write_config):
    from pipeline.config import load_config

    src = {"s": {"kind": "synthetic", "domain": "campus_issues"}}
    bad = {"sources": src, "tilesets": {"t": {"source": "s", "profile": "campus_issues", "preset": "building"}}}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(bad))
    assert info.value.key == "tilesets.t.filters.buildings"
    good = {
        "sources": src,
        "tilesets": {
            "t": {"source": "s", "profile": "campus_issues", "preset": "building", "filters": {"buildings": ["bldg-3"]}}
        },
    }
    cfg = load_config(write_config(good))
    result = score(
        cfg.tilesets["t"].model_dump(exclude={"source"}),
        {"building": "bldg-3", "severity": 4.0},
        {"building": "bldg-4", "severity": 4.0},
    )
    assert result.scored.height == 1 and result.excluded == {"filtered_out": 1}


def test_seed002_filters():
    rows = [
        {"category": "hvac", "severity": 8.0, "organization": "ORG123", "observed_at": ago(5)},
        {"category": "hvac", "severity": 3.0, "organization": "ORG123", "observed_at": ago(5)},
        {"category": "it", "severity": 8.0, "organization": "ORG123", "observed_at": ago(5)},
        {"category": "hvac", "severity": 8.0, "organization": "ORG9", "observed_at": ago(5)},
        {"category": "hvac", "severity": 8.0, "organization": "ORG123", "observed_at": ago(40)},
    ]
    filters = {
        "categories": ["hvac"],
        "min_severity": 7,
        "organizations": ["ORG123"],
        "start_date": ago(30).isoformat(),
        "end_date": AS_OF.isoformat(),
    }
    result = score({"profile": "campus_issues", "filters": filters}, *rows)
    assert result.scored.height == 1 and result.excluded == {"filtered_out": 4}


# --- seed 001: road conditions ----------------------------------------------


@pytest.mark.parametrize(("category", "days"), [("ice", 1.5), ("flooding", 1.5), ("pothole", 7.0), ("debris", 7.0)])
def test_seed001_half_lives_are_half_lives(category, days):
    result = score({"profile": "road_conditions"}, {"category": category, "observed_at": ago(days), "severity": 3.0})
    assert result.scored.get_column("decay")[0] == pytest.approx(0.5)
    assert result.scored.get_column("weight")[0] == pytest.approx(1.5)


@pytest.mark.parametrize(("category", "days"), [("snow", 1.5), ("crack", 7.0)])
def test_seed001_time_constant_mode_is_the_seeds_literal_formula(category, days):
    ts = {"profile": "road_conditions", "scoring": {"decay": {"mode": "time_constant"}}}
    result = score(ts, {"category": category, "observed_at": ago(days), "severity": 2.0})
    assert result.scored.get_column("decay")[0] == pytest.approx(math.exp(-1))
    assert result.scored.get_column("weight")[0] == pytest.approx(2 * math.exp(-1))


def test_seed001_cell_score_is_the_mean_decayed_severity_with_count_and_top_condition():
    rows = [
        {"category": "pothole", "severity": 3.0, "observed_at": ago(7)},
        {"category": "pothole", "severity": 1.0, "observed_at": ago(0)},
        {"category": "ice", "severity": 2.0, "observed_at": ago(1.5)},
    ]
    result = score({"profile": "road_conditions"}, *rows)
    profile, _ = resolve(Tileset(source="s", profile="road_conditions"))
    [cell] = next(pyramid.build(result.scored, profile, 10, 10, 6)).to_dicts()
    assert cell["report_count"] == 3 and cell["top_category"] == "pothole"
    assert cell["score"] == pytest.approx((1.5 + 1.0 + 1.0) / 3)


def test_seed001_exclusions_90_days_categories_severity_activity():
    rows = [
        {"category": "pothole", "severity": 2.0, "observed_at": ago(91)},
        {"category": "sinkhole", "severity": 2.0},
        {"category": "pothole", "severity": 4.0},
        {"category": "ice", "severity": 1.0, "activity": "biking"},
        {"category": "ice", "severity": 1.0, "activity": "running"},
    ]
    result = score({"profile": "road_conditions", "filters": {"activities": ["running"]}}, *rows)
    assert result.excluded == {"too_old": 1, "unknown_category": 1, "severity_out_of_range": 1, "filtered_out": 1}
    assert result.scored.height == 1 and result.holds


def test_a_closed_category_list_is_read_once_as_codes_and_a_category_filter_still_reads_the_names():
    rows = [
        {"category": "ice", "severity": 1.0},
        {"category": "pothole", "severity": 2.0},
        {"category": "sinkhole", "severity": 2.0},  # not on the list
        {"category": None, "severity": 2.0},
        {"category": "crack", "severity": 3.0},
    ]
    result = score({"profile": "road_conditions", "filters": {"categories": ["ice", "crack", "sinkhole"]}}, *rows)
    assert result.excluded == {"unknown_category": 2, "filtered_out": 1}
    scored = result.scored
    assert isinstance(scored.schema["category"], pl.Enum)
    assert scored.get_column("category").to_list() == ["ice", "crack"]
    assert scored.get_column("decay").to_list() == [1.0, 1.0] and "_category_code" not in scored.columns


def test_upvotes_weight():
    ts = {"profile": "road_conditions", "scoring": {"upvote_weight": 0.5}}
    result = score(ts, {"category": "crack", "severity": 2.0, "upvotes": 4})
    assert result.scored.get_column("weight")[0] == pytest.approx(2.0 * 3.0)


# --- seed 000: community needs ----------------------------------------------


def test_seed000_max_severity_of_active_public_notes_per_entity():
    notes = [
        # entity a: urgent + notice active, info expired -> 10
        {"entity_type": "post", "entity_id": "a", "category": "urgent"},
        {"entity_type": "post", "entity_id": "a", "category": "notice"},
        {"entity_type": "post", "entity_id": "a", "category": "info", "expires_at": ago(1)},
        # entity b: only expired notes -> absent
        {"entity_type": "post", "entity_id": "b", "category": "urgent", "expires_at": ago(0)},
        # entity c: a private urgent note does not count -> 1
        {"entity_type": "organization", "entity_id": "c", "category": "urgent", "is_public": False},
        {"entity_type": "organization", "entity_id": "c", "category": "info", "expires_at": AS_OF + timedelta(days=1)},
        # entity d at the same place as a: its own point; an unknown label is 1 (the seed's ELSE 1)
        {"entity_type": "resource", "entity_id": "d", "category": "whatever"},
        # entity a at a second location: a second point
        {"entity_type": "post", "entity_id": "a", "category": "info", "lat": 40.8},
    ]
    result = score({"profile": "community_needs"}, *notes)
    points = result.scored.sort(["lat", "weight"]).select("lat", "weight", "category").rows()
    assert points == [(40.7, 1.0, "info"), (40.7, 1.0, "whatever"), (40.7, 10.0, "urgent"), (40.8, 1.0, "info")]
    assert result.excluded == {"not_public": 1, "expired": 2, "folded_into_entity": 1}
    assert result.valid == len(notes) and result.holds


def test_seed000_filter_by_entity_type():
    notes = [
        {"entity_type": "post", "entity_id": "a", "category": "urgent"},
        {"entity_type": "event", "entity_id": "b", "category": "urgent"},
    ]
    result = score({"profile": "community_needs", "filters": {"entity_types": ["event"]}}, *notes)
    assert result.scored.height == 1 and result.excluded == {"filtered_out": 1}


# --- seed 003: rail disruptions ----------------------------------------------


def test_seed003_impact_is_the_enabled_metrics_and_healthy_stations_stay():
    stations = [
        {"departures": 100.0, "cancellations": 3.0, "delays": 10.0},
        {"departures": 80.0, "cancellations": 0.0, "delays": 0.0},  # healthy
        {"departures": 50.0, "cancellations": 2.0, "delays": None},
    ]
    both = score({"profile": "rail_disruptions"}, *stations)
    assert both.scored.get_column("weight").to_list() == [13.0, 0.0, 2.0]
    assert both.excluded == {}
    delays = score({"profile": "rail_disruptions", "scoring": {"metrics": ["delays"]}}, *stations)
    assert delays.scored.get_column("weight").to_list() == [10.0, 0.0, 0.0]
    assert set(delays.scored.columns) >= {"departures", "cancellations", "delays"}


# --- every profile ----------------------------------------------------------


@pytest.mark.parametrize(
    "profile", ["generic", "community_needs", "road_conditions", "campus_issues", "rail_disruptions"]
)
def test_not_public_after_as_of_and_expired_are_excluded_everywhere(profile):
    rows = [
        {"is_public": False, "entity_id": "x", "category": "pothole", "severity": 2.0},
        {"observed_at": AS_OF + timedelta(hours=1), "entity_id": "y", "category": "pothole", "severity": 2.0},
        {"expires_at": AS_OF, "entity_id": "z", "category": "pothole", "severity": 2.0},
        {"entity_id": "w", "category": "pothole", "severity": 2.0},
    ]
    result = score({"profile": profile}, *rows)
    assert result.excluded == {"not_public": 1, "after_as_of": 1, "expired": 1}
    assert result.scored.height == 1 and result.holds


def test_generic_profile_with_configured_decay_per_category():
    ts = {"profile": "generic", "scoring": {"decay": {"mode": "half_life", "days": {"a": 2, "b": 4}}}}
    result = score(
        ts,
        {"category": "a", "observed_at": ago(2)},
        {"category": "b", "observed_at": ago(2)},
        {"category": "c", "observed_at": ago(2)},
    )
    assert result.scored.get_column("decay").to_list() == pytest.approx([0.5, 2**-0.5])
    assert result.excluded == {"unknown_category": 1}


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["road_conditions", "generic"]),
    st.dictionaries(
        st.sampled_from(["ice", "pothole", "a", "weather_environmental", "structural", "default"]),
        st.sampled_from([1.5, 2.0, 7.0]),
        min_size=1,
    ),
    st.lists(st.tuples(st.sampled_from(["ice", "snow", "pothole", "crack", "a", "b", None]), st.floats(0.1, 80))),
)
def test_a_reports_half_life_is_its_categorys_then_its_classs_then_the_default(name, days, rows):
    """Each report's days: by category, then its class, then "default"; a report with none is excluded."""
    ts = {"profile": name, "scoring": {"decay": {"mode": "half_life", "days": days}}}
    profile, _ = resolve(Tileset(source="s", **ts))
    result = score(ts, *({"category": c, "observed_at": ago(age), "severity": 2.0} for c, age in rows))
    classes = set(profile.category_class.values())

    def days_of(category):
        if category in days and category not in classes:
            return days[category]
        return days.get(profile.category_class.get(category), days.get("default"))

    known = profile.categories
    counted = [(c, age) for c, age in rows if (known is None or c in known) and days_of(c) is not None]
    assert result.holds and result.scored.height == len(counted)
    assert result.excluded.get("unknown_category", 0) == len(rows) - len(counted)
    want = [0.5 ** (age / days_of(c)) for c, age in counted]
    assert result.scored.get_column("decay").to_list() == pytest.approx(want, rel=1e-9)
