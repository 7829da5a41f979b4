"""Deterministic synthetic reports for the four seed domains.

Positions cluster the way real reports do: dense neighbourhoods of uneven
size, corridors between them (roads, rail lines), and a sparse background.
Everything is vectorised NumPy/Arrow; the same ``seed``, ``count`` and
``as_of`` give the same rows. A ``bad_fraction`` of rows carries one defect
each (missing or out-of-range coordinates, bad timestamps, a too-long
description, a duplicate id, a rate-limit flood) so that a demo run shows
validation at work.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SyntheticSource
from ..profiles import STRUCTURAL, WEATHER

ROAD_CONDITIONS = WEATHER + STRUCTURAL  # seed 001's condition types, weather first
ROAD_WEIGHTS = (4, 3, 2, 2, 3, 14, 10, 6, 2, 5, 3, 4, 5, 3)
ACTIVITIES = ("running", "walking", "biking", "commuting")
NOTE_SEVERITY = {"urgent": 10.0, "notice": 5.0, "info": 1.0}
ENTITY_TYPES = ("post", "organization", "resource", "event")
CAMPUS_CATEGORIES = ("plumbing", "electrical", "hvac", "structural", "safety", "cleaning", "it")
PRIORITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW")
STATUSES = ("OPEN", "IN_PROGRESS", "RESOLVED", "CLOSED")
DEFECTS = (
    "missing_coordinates",
    "non_numeric_coordinates",
    "latitude_out_of_range",
    "outside_mercator",
    "unparseable_timestamp",
    "future_timestamp",
    "non_numeric_severity",
    "description_too_long",
    "duplicate_report_id",
)
FLOOD_SIZE = 40  # reports from one session token within 20 minutes


BATCH_ROWS = 1_000_000  # a larger source is generated (and staged) this many rows at a time


def batches(src: SyntheticSource, as_of: datetime) -> Iterator[tuple[int, pa.Table]]:
    """The source's rows a batch at a time: (the first row's number from 0, the batch).

    Up to :data:`BATCH_ROWS` rows come as one batch, exactly :func:`generate`'s
    table. A larger source draws each batch from its own generator (seeded
    with the seed and the batch's number) on one shared layout of cities, so
    no more than a batch of rows is ever held.
    """
    if src.count <= BATCH_ROWS:
        yield 0, generate(src, as_of)
        return
    for start in range(0, src.count, BATCH_ROWS):
        n = min(BATCH_ROWS, src.count - start)
        rng = np.random.default_rng([src.seed, start // BATCH_ROWS])
        yield start, _generate(src, as_of, rng, n, start, np.random.default_rng(src.seed))


def generate(src: SyntheticSource, as_of: datetime) -> pa.Table:
    """Generate ``src.count`` raw reports as a table of text columns.

    Parameters
    ----------
    src : SyntheticSource
        Domain, count, seed, bbox, time span and defect rate.
    as_of : datetime
        Reports are observed during the ``src.days`` before this time.

    Returns
    -------
    pyarrow.Table
        Canonical column names, every value a string or null, like a CSV.
    """
    rng = np.random.default_rng(src.seed)
    return _generate(src, as_of, rng, src.count, 0, rng)


def _generate(
    src: SyntheticSource, as_of: datetime, rng: np.random.Generator, n: int, first: int, layout: np.random.Generator
) -> pa.Table:
    """``n`` reports numbered from ``first``; a world's cities are drawn from ``layout`` (first)."""
    if src.spread == "world":
        cities = world_cities(layout, src.count)
        place = lambda count: world_positions(rng, count, cities=cities)  # noqa: E731
    else:
        place = lambda count: positions(rng, count, src.bbox)  # noqa: E731

    lng, lat, cluster = place(n)
    age_days = np.where(rng.random(n) < 0.7, rng.exponential(src.days / 4, n), rng.uniform(0, src.days, n))
    observed = as_of.timestamp() - np.minimum(age_days, src.days) * 86400.0
    cols: dict[str, pa.Array] = {
        "report_id": _prefixed(src.domain[:4], np.arange(first, first + n)),
        "lat": _text(lat),
        "lng": _text(lng),
        "observed_at": _times(observed),
    }
    cols.update(_DOMAINS[src.domain](rng, n, cluster, observed, place, first))
    table = pa.table(cols)
    n_bad = int(round(n * src.bad_fraction))
    if n_bad:
        table = _inject_defects(rng, table, n_bad, as_of)
    return table


def positions(
    rng: np.random.Generator, n: int, bbox: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered positions in ``bbox``: lng, lat and cluster index (-1: none)."""
    w, s, e, north = bbox
    span = min(e - w, north - s)
    k = int(np.clip(n // 1500, 6, 300))
    centers = np.column_stack(
        [
            rng.uniform(w + 0.05 * (e - w), e - 0.05 * (e - w), k),
            rng.uniform(s + 0.05 * (north - s), north - 0.05 * (north - s), k),
        ]
    )
    weights = rng.pareto(1.2, k) + 1.0
    sigma = rng.uniform(0.004, 0.03, k) * span
    kind = rng.choice(3, n, p=[0.65, 0.2, 0.15])  # neighbourhood, corridor, background
    xy = np.empty((n, 2))
    cluster = np.full(n, -1)

    m = kind == 0
    c = rng.choice(k, m.sum(), p=weights / weights.sum())
    xy[m] = centers[c] + rng.normal(size=(m.sum(), 2)) * sigma[c, None]
    cluster[m] = c

    m = kind == 1
    n_corr = int(np.clip(k // 3, 3, 40))
    a, b = rng.integers(0, k, n_corr), rng.integers(0, k, n_corr)
    seg = rng.integers(0, n_corr, m.sum())
    t = rng.random(m.sum())[:, None]
    xy[m] = centers[a[seg]] + t * (centers[b[seg]] - centers[a[seg]])
    xy[m] += rng.normal(size=(m.sum(), 2)) * 0.002 * span

    m = kind == 2
    xy[m] = np.column_stack([rng.uniform(w, e, m.sum()), rng.uniform(s, north, m.sum())])
    return np.clip(xy[:, 0], w, e), np.clip(xy[:, 1], s, north), cluster


# Populated land, roughly: (west, south, east, north, share of cities)
WORLD_REGIONS = (
    (-124.0, 26.0, -67.0, 49.0, 0.17),  # North America
    (-106.0, 15.0, -86.0, 26.0, 0.04),  # Mexico, Central America
    (-75.0, -35.0, -35.0, 5.0, 0.09),  # South America
    (-10.0, 36.0, 30.0, 60.0, 0.17),  # Europe
    (30.0, 40.0, 60.0, 58.0, 0.04),  # Eastern Europe, Caucasus
    (-17.0, -34.0, 40.0, 15.0, 0.12),  # Africa
    (34.0, 14.0, 60.0, 38.0, 0.05),  # Middle East
    (68.0, 8.0, 90.0, 32.0, 0.13),  # South Asia
    (100.0, 20.0, 128.0, 42.0, 0.12),  # East Asia
    (129.0, 31.0, 142.0, 44.0, 0.03),  # Japan
    (95.0, -8.0, 125.0, 20.0, 0.03),  # South-East Asia
    (115.0, -38.0, 153.0, -12.0, 0.01),  # Australia
)


class Cities(NamedTuple):
    """A world's layout: city centres, sizes and radii, and each city's nearest neighbour."""

    centers: np.ndarray
    size: np.ndarray
    radius: np.ndarray
    nearest: np.ndarray


def world_cities(rng: np.random.Generator, count: int) -> Cities:
    """A few hundred cities (more for more reports) on the populated regions, lognormal sizes and radii."""
    regions = np.array(WORLD_REGIONS)
    k = int(np.clip(count // 2500, 20, 500))
    home = rng.choice(len(regions), k, p=regions[:, 4] / regions[:, 4].sum())
    w, s, e, north = regions[home, 0], regions[home, 1], regions[home, 2], regions[home, 3]
    centers = np.column_stack([w + rng.random(k) * (e - w), s + rng.random(k) * (north - s)])
    size = rng.lognormal(0.0, 1.2, k)
    radius = rng.lognormal(np.log(0.04), 0.5, k)  # degrees: a few km to tens of km
    d2 = ((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return Cities(centers, size, radius, d2.argmin(1))


def world_positions(
    rng: np.random.Generator,
    n: int,
    bbox: tuple[float, float, float, float] | None = None,
    cities: Cities | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions spread like a world's reports: lng, lat and city index (-1: none).

    Cities (drawn from ``rng`` first unless given: :func:`world_cities`),
    corridors between neighbouring cities, and a thin rural background over
    the populated regions. ``bbox`` is ignored.
    """
    regions = np.array(WORLD_REGIONS)
    centers, size, radius, b = cities if cities is not None else world_cities(rng, n)
    k = len(centers)
    kind = rng.choice(3, n, p=[0.72, 0.2, 0.08])  # city, corridor, rural
    xy = np.empty((n, 2))
    cluster = np.full(n, -1)

    m = kind == 0
    c = rng.choice(k, m.sum(), p=size / size.sum())
    r = radius[c] * rng.lognormal(0.0, 0.7, m.sum())  # most close in, a long tail out
    angle = rng.uniform(0, 2 * np.pi, m.sum())
    xy[m] = centers[c] + np.column_stack([np.cos(angle), np.sin(angle)]) * r[:, None] * 0.5
    cluster[m] = c

    # corridors: each city to its nearest neighbour (roads and rail lines)
    m = kind == 1
    seg = rng.choice(k, m.sum(), p=size / size.sum())
    t = rng.random(m.sum())[:, None]
    xy[m] = centers[seg] + t * (centers[b[seg]] - centers[seg]) + rng.normal(size=(m.sum(), 2)) * 0.005

    m = kind == 2
    region = rng.choice(len(regions), m.sum(), p=regions[:, 4] / regions[:, 4].sum())
    rw, rs, re_, rn = (regions[region, i] for i in range(4))
    xy[m] = np.column_stack([rw + rng.random(m.sum()) * (re_ - rw), rs + rng.random(m.sum()) * (rn - rs)])
    return np.clip(xy[:, 0], -180.0, 180.0), np.clip(xy[:, 1], -85.0, 85.0), cluster


def _road(rng, n, cluster, observed, place, first):
    p = np.array(ROAD_WEIGHTS, float)
    tokens = rng.integers(0, max(1, n // 8), n) + first // 8
    described = rng.random(n) < 0.1
    return {
        "category": _pick(rng, ROAD_CONDITIONS, n, p / p.sum()),
        "severity": _text(rng.choice([1, 2, 3], n, p=[0.3, 0.45, 0.25])),
        "upvotes": _text(rng.poisson(0.6, n)),
        "session_token": _prefixed("tok", tokens),
        "activity": _pick(rng, ACTIVITIES, n, mask=rng.random(n) < 0.3),
        "description": _pick(rng, ("deep one, watch out", "near the corner", "reported again"), n, mask=~described),
    }


def _community(rng, n, cluster, observed, place, first):
    # Notes attach to entities, and an entity has one location: draw the
    # locations per entity, then give each note its entity's position.
    n_entities = max(1, n // 3)
    entity = rng.integers(0, n_entities, n)
    elng, elat, _ = place(n_entities)
    level = rng.choice(len(NOTE_SEVERITY), n, p=[0.15, 0.35, 0.5])
    expires = observed + rng.uniform(1, 30, n) * 86400.0
    return {
        "entity_type": pa.array(np.array(ENTITY_TYPES)[entity % len(ENTITY_TYPES)]),
        "entity_id": _prefixed("entity", entity + first // 3),  # a batch's entities are its own
        "lat": _text(elat[entity]),
        "lng": _text(elng[entity]),
        "category": pa.array(np.array(list(NOTE_SEVERITY))[level]),
        "severity": _text(np.array(list(NOTE_SEVERITY.values()))[level]),
        "expires_at": pc.if_else(pa.array(rng.random(n) < 0.6), _times(expires), pa.nulls(n, pa.string())),
        "is_public": pa.array(np.where(rng.random(n) < 0.92, "true", "false")),
    }


def _campus(rng, n, cluster, observed, place, first):
    building = np.where(cluster >= 0, cluster, 999)
    return {
        "category": _pick(rng, CAMPUS_CATEGORIES, n),
        "priority": _pick(rng, PRIORITIES, n, [0.08, 0.22, 0.4, 0.3]),
        "status": _pick(rng, STATUSES, n, [0.45, 0.25, 0.2, 0.1]),
        "severity": _text(rng.integers(1, 11, n)),
        "organization": pa.array(np.full(n, "ORG123")),
        "building": _prefixed("bldg", building),
    }


def _rail(rng, n, cluster, observed, place, first):
    departures = rng.poisson(80, n) + 1
    healthy = rng.random(n) < 0.4
    cancel_rate = np.where(healthy, 0.0, rng.beta(1, 30, n))
    delay_rate = np.where(healthy, 0.0, rng.beta(2, 10, n))
    return {
        "entity_type": pa.array(np.full(n, "station")),
        "entity_id": _prefixed("stop", np.arange(first, first + n)),
        "category": pa.array(np.full(n, "station")),
        "departures": _text(departures),
        "cancellations": _text(rng.binomial(departures, cancel_rate)),
        "delays": _text(rng.binomial(departures, delay_rate)),
    }


_DOMAINS = {
    "road_conditions": _road,
    "community_needs": _community,
    "campus_issues": _campus,
    "rail_disruptions": _rail,
}


def _inject_defects(rng: np.random.Generator, table: pa.Table, n_bad: int, as_of: datetime) -> pa.Table:
    n = table.num_rows
    if n < 2:
        return table
    # Row 0 stays clean: it is the original that duplicates copy their id from.
    idx = np.sort(rng.choice(np.arange(1, n), min(n_bad, n - 1), replace=False))
    defect = np.array(DEFECTS)[np.arange(idx.size) % len(DEFECTS)]
    cols = {name: table[name].combine_chunks() for name in table.column_names}

    def put(col: str, where: np.ndarray, values) -> None:
        if where.size == 0:
            return
        base = cols.get(col, pa.nulls(n, pa.string()))
        mask = np.zeros(n, bool)
        mask[where] = True
        vals = pa.array(values if isinstance(values, list) else [values] * where.size, pa.string())
        cols[col] = pc.replace_with_mask(base, pa.array(mask), vals)

    pick = lambda name: idx[defect == name]  # noqa: E731
    put("lat", pick("missing_coordinates"), [None] * pick("missing_coordinates").size)
    put("lng", pick("non_numeric_coordinates"), "n/a")
    put("lat", pick("latitude_out_of_range"), "95.5")
    put("lat", pick("outside_mercator"), "86.2")
    put("observed_at", pick("unparseable_timestamp"), "last tuesday")
    future = datetime.fromtimestamp(as_of.timestamp() + 3 * 86400, as_of.tzinfo).isoformat()
    put("observed_at", pick("future_timestamp"), future)
    put("severity", pick("non_numeric_severity"), "very bad")
    put("description", pick("description_too_long"), "x" * 300)
    dup = pick("duplicate_report_id")
    put("report_id", dup, cols["report_id"][0].as_py())
    if "session_token" in cols and n > FLOOD_SIZE * 10:
        flood = rng.choice(np.setdiff1d(np.arange(n), idx), FLOOD_SIZE, replace=False)
        put("session_token", flood, "tok-flood")
        start = as_of.timestamp() - 2 * 86400
        put("observed_at", np.sort(flood), _times(start + np.arange(FLOOD_SIZE) * 30.0).to_pylist())
    return pa.table(cols)


def _text(values: np.ndarray) -> pa.Array:
    return pa.array(values).cast(pa.string())


def _times(epoch_s: np.ndarray) -> pa.Array:
    micros = pa.array(np.round(np.asarray(epoch_s) * 1e6).astype(np.int64))
    return micros.cast(pa.timestamp("us", tz="UTC")).cast(pa.string())


def _prefixed(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), _text(numbers), "-")


def _pick(rng, choices, n, p=None, mask=None) -> pa.Array:
    values = pa.array(np.asarray(choices)[rng.choice(len(choices), n, p=p)])
    if mask is not None:
        values = pc.if_else(pa.array(mask), pa.nulls(n, pa.string()), values)
    return values
