"""Synthetic sources: deterministic, clustered, and carrying every seed domain's fields."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from pipeline import warehouse
from pipeline.config import SyntheticSource, load_config
from pipeline.sources import synthetic
from pipeline.sources.synthetic import DEFECTS, generate, positions

from .conftest import AS_OF, run_extraction

DOMAIN_FIELDS = {
    "community_needs": {"entity_type", "entity_id", "category", "severity", "expires_at", "is_public"},
    "road_conditions": {"category", "severity", "upvotes", "session_token", "activity", "description"},
    "campus_issues": {"category", "priority", "status", "severity", "organization", "building"},
    "rail_disruptions": {"entity_id", "departures", "cancellations", "delays"},
}


def _number(text) -> bool:
    try:
        return abs(float(text)) <= 85
    except (TypeError, ValueError):
        return False


def _src(domain, **kw):
    return SyntheticSource(kind="synthetic", domain=domain, **kw)


@pytest.mark.parametrize("domain", sorted(DOMAIN_FIELDS))
def test_same_seed_same_rows_other_seed_other_rows(domain):
    a = generate(_src(domain, count=3000, seed=7), AS_OF)
    b = generate(_src(domain, count=3000, seed=7), AS_OF)
    c = generate(_src(domain, count=3000, seed=8), AS_OF)
    assert a.equals(b)
    assert not a.equals(c)
    assert a.num_rows == 3000
    assert DOMAIN_FIELDS[domain] <= set(a.column_names)
    assert all(a[name].type == "string" for name in a.column_names)


def test_positions_cluster_more_than_uniform():
    rng = np.random.default_rng(0)
    lng, lat, cluster = positions(rng, 50_000, (0.0, 0.0, 1.0, 1.0))
    assert (0 <= lng).all() and (lng <= 1).all() and (0 <= lat).all() and (lat <= 1).all()
    counts = np.bincount((np.floor(lng * 99.999) * 100 + np.floor(lat * 99.999)).astype(int), minlength=10_000)
    top = np.sort(counts)[::-1]
    assert top[:100].sum() > 0.15 * counts.sum()  # 1% of the area holds >15% (uniform: 1%)
    assert (counts > 0).mean() > 0.5  # and the sparse background still reaches most of it
    assert (cluster == -1).mean() == pytest.approx(0.35, abs=0.02)


def test_domain_values_follow_the_seeds():
    roads = generate(_src("road_conditions", count=5000, bad_fraction=0), AS_OF).to_pydict()
    assert set(roads["severity"]) == {"1", "2", "3"}
    assert len(set(roads["category"])) == 14
    needs = generate(_src("community_needs", count=5000, bad_fraction=0), AS_OF).to_pydict()
    assert {(c, s) for c, s in zip(needs["category"], needs["severity"])} == {
        ("urgent", "10"),
        ("notice", "5"),
        ("info", "1"),
    }
    # an entity has one location, however many notes it has
    by_entity = {}
    for e, la, ln in zip(needs["entity_id"], needs["lat"], needs["lng"]):
        by_entity.setdefault(e, set()).add((la, ln))
    assert max(len(v) for v in by_entity.values()) == 1 and len(by_entity) < 5000
    rail = generate(_src("rail_disruptions", count=5000, bad_fraction=0), AS_OF).to_pydict()
    healthy = sum(c == "0" and d == "0" for c, d in zip(rail["cancellations"], rail["delays"]))
    assert 0.3 < healthy / 5000 < 0.5


def test_defects_reach_validation(extract_config):
    src = {"kind": "synthetic", "domain": "road_conditions", "count": 20_000, "bad_fraction": 0.005}
    _, _, v = extract_config({"sources": {"demo": src}})
    rejected = v["demo"].rejected
    assert set(rejected) == set(DEFECTS) | {"rate_limited"}
    assert rejected["rate_limited"] == 10  # a flood of 40 in 20 minutes: 30 pass
    assert v["demo"].read == 20_000 == v["demo"].valid + v["demo"].rejected_total


def test_times_lie_in_the_window_before_as_of():
    t = generate(_src("campus_issues", count=2000, days=10, bad_fraction=0), AS_OF)
    parsed = [datetime.fromisoformat(x.replace("Z", "+00:00")) for x in t["observed_at"].to_pylist()]
    assert min(parsed) >= AS_OF - timedelta(days=10) and max(parsed) <= AS_OF


def test_world_spread_is_deterministic_and_spans_continents():
    from pipeline.sources.synthetic import WORLD_REGIONS, world_positions

    lng, lat, city = world_positions(np.random.default_rng(3), 200_000)
    again = world_positions(np.random.default_rng(3), 200_000)
    assert np.array_equal(lng, again[0]) and np.array_equal(lat, again[1])
    inside = np.zeros(len(lng), dtype=int)
    for w, s, e, n, _ in WORLD_REGIONS:
        inside += (w - 2 <= lng) & (lng <= e + 2) & (s - 2 <= lat) & (lat <= n + 2)
    assert (inside > 0).mean() > 0.99  # on the populated regions (cities near an edge spill a little)
    populated = {
        i
        for i, (w, s, e, n, _) in enumerate(WORLD_REGIONS)
        if ((w <= lng) & (lng <= e) & (s <= lat) & (lat <= n)).sum() > 1000
    }
    assert len(populated) >= 10
    # a few hundred cities hold most reports; the rest are corridors and a rural background
    assert 50 <= len(np.unique(city[city >= 0])) <= 500 and 0.6 < (city >= 0).mean() < 0.8


@pytest.mark.parametrize("domain", sorted(DOMAIN_FIELDS))
def test_a_large_source_comes_a_batch_at_a_time_on_one_world(domain, monkeypatch, write_config):
    monkeypatch.setattr(synthetic, "BATCH_ROWS", 1000)
    src = _src(domain, count=3500, seed=5, spread="world", bad_fraction=0.01)
    parts = list(synthetic.batches(src, AS_OF))
    assert [(first, t.num_rows) for first, t in parts] == [(0, 1000), (1000, 1000), (2000, 1000), (3000, 500)]
    again = list(synthetic.batches(src, AS_OF))
    assert all(a.equals(b) for (_, a), (_, b) in zip(parts, again))  # deterministic
    assert not parts[0][1].equals(parts[1][1].slice(0, 1000))  # each batch draws its own rows
    ids = pa.concat_tables([t for _, t in parts], promote_options="default").column("report_id").to_pylist()
    duplicates = [(i, t) for _, t in parts for i in [t.column("report_id")[0].as_py()]]
    assert len(set(ids)) == len(ids) - sum(ids.count(i) - 1 for i, _ in duplicates)  # only injected duplicates

    # one layout of cities for every batch: most of a batch's points fall in squares the batch before used
    def squares(t: pa.Table) -> list[tuple[int, int]]:
        pairs = zip(t.column("lng").to_pylist(), t.column("lat").to_pylist())
        return [(round(float(x)), round(float(y))) for x, y in pairs if _number(x) and _number(y)]

    first, second = squares(parts[0][1]), squares(parts[1][1])
    assert sum(xy in set(first) for xy in second) > 0.7 * len(second)
    # staged from files written a batch at a time, in one statement: every row read
    cfg = load_config(
        write_config(
            {
                "sources": {"s": {"kind": "synthetic", "domain": domain, "count": 3500, "seed": 5, "spread": "world"}},
                "tilesets": {},
            }
        )
    )
    staged, validated = run_extraction(cfg)
    assert [(f.file, f.rows) for f in staged["s"]] == [(f"synthetic:{domain}:seed=5:count=3500", 3500)]
    assert not list((cfg.home / "scratch").glob("synthetic-*"))  # the batches' files are gone
    with warehouse.reader(cfg.warehouse_path) as con:
        read = con.execute("SELECT count(*) FROM raw_reports WHERE source = 's'").fetchone()[0]
        valid = con.execute("SELECT count(*) FROM reports WHERE source = 's'").fetchone()[0]
        rejected = con.execute("SELECT count(*) FROM rejected_reports WHERE source = 's'").fetchone()[0]
    assert read == 3500 == valid + rejected == validated["s"].read
