"""Scoring profiles: how a report becomes a weight, one per seed system.

``weight = severity_score × priority_boost × decay × (1 + upvote_weight × upvotes)``

A :class:`Profile` holds a seed's rules; a preset (seed 002) tunes it; a
tileset's ``scoring:`` and ``filters:`` override both
(:func:`pipeline.scoring.resolve`). Every number below is the seed's own.

One deliberate difference from a seed, documented in the README: seed 001
calls 1.5 d and 7 d "half-lives" but computes ``exp(-age/τ)``, a time
constant. ``half_life`` mode is a true half-life, ``0.5 ** (age / h)``;
``time_constant`` reproduces the seed's literal formula.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from .defaults import DEFAULTS

DecayMode = Literal["none", "half_life", "time_constant", "normalized_exponential"]
ScoreMode = Literal["sum", "mean", "boosted_count"]
Normalize = Literal["max", "minmax"]
Metric = Literal["departures", "cancellations", "delays"]


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Decay:
    """How a report's weight fades with age.

    ``days`` maps a category class (or a category, or ``"default"``) to a
    half-life / time constant in days, for the two modes that use it.
    ``factor`` and ``max_age_days`` are seed 002's ``exp(-factor ·
    min(age / max_age, 1))``.
    """

    mode: DecayMode = "none"
    days: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    factor: float = 0.5
    max_age_days: float = 90.0


@dataclass(frozen=True)
class Filters:
    """Which reports a tileset keeps; ``None`` keeps everything."""

    entity_types: tuple[str, ...] | None = None
    categories: tuple[str, ...] | None = None
    priorities: tuple[str, ...] | None = None
    statuses: tuple[str, ...] | None = None
    buildings: tuple[str, ...] | None = None
    organizations: tuple[str, ...] | None = None
    activities: tuple[str, ...] | None = None
    min_severity: float | None = None
    start_date: object | None = None  # datetime, UTC
    end_date: object | None = None


@dataclass(frozen=True)
class Profile:
    """A seed's scoring rules.

    Attributes
    ----------
    name : str
    severity_range : (float, float) or None
        Raw severities outside are excluded (``severity_out_of_range``).
    severity_scale : float
        ``severity_score = severity / severity_scale`` (seed 002: 10).
    category_severity : mapping or None
        Severity from the category label instead of the severity column
        (seed 000: urgent 10, notice 5, info 1); others get
        ``default_category_severity`` (the seed's ``ELSE 1``).
    categories : tuple or None
        Known categories; others are excluded (``unknown_category``).
    category_class : mapping
        Category -> class, for per-class decay (seed 001).
    priority_boost : mapping
        Priority -> multiplier; a missing or unknown priority gets 1.
    decay : Decay
    score : {"sum", "mean", "boosted_count"}
        Cell score: Σ weight, mean weight (seed 001's avg_score), or seed
        002's ``n × (1 + mean(severity_score × boost) × multiplier) × mean(decay)``.
    severity_weight_multiplier : float
        Seed 002's multiplier in ``boosted_count``.
    upvote_weight : float
    max_age_days : float or None
        Older reports are excluded (``too_old``).
    normalize : {"max", "minmax"}
        Per-zoom intensity: ``score / max`` or seed 002's min–max.
    metrics : tuple of str
        Seed 003: the impact (the weight) is the sum of these metrics.
    one_point_per_entity : bool
        Seed 000: one point per (entity, location), weighted by the max of
        its active notes.
    representative : {"score", "busiest"}
        Which cell keeps a stratum in stratified selection ("busiest": the
        most reports or departures, seed 003's ``total_departures DESC``).
    min_count : int
        Fewest reports a published position may stand for; sparser cells
        are placed at their stratum's centre (:mod:`pipeline.privacy`).
    """

    name: str
    severity_range: tuple[float, float] | None = None
    severity_scale: float = 1.0
    category_severity: Mapping[str, float] | None = None
    default_category_severity: float = 1.0
    categories: tuple[str, ...] | None = None
    category_class: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    priority_boost: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    decay: Decay = Decay()
    score: ScoreMode = "sum"
    severity_weight_multiplier: float = 0.0
    upvote_weight: float = 0.0
    max_age_days: float | None = None
    normalize: Normalize = "max"
    metrics: tuple[Metric, ...] = ()
    one_point_per_entity: bool = False
    representative: Literal["score", "busiest"] = "score"
    min_count: int = DEFAULTS.min_count


WEATHER = ("ice", "snow", "mud", "flooding", "standing_water")
STRUCTURAL = (
    "pothole",
    "crack",
    "uneven_surface",
    "missing_section",
    "debris",
    "broken_glass",
    "poor_lighting",
    "construction",
    "congestion",
)

PROFILES: dict[str, Profile] = {
    "generic": Profile(name="generic", severity_range=(0.0, math.inf)),  # a weight is never negative
    # seed 000: MAX(CASE severity WHEN 'urgent' THEN 10 WHEN 'notice' THEN 5 ELSE 1)
    "community_needs": Profile(
        name="community_needs",
        category_severity=_frozen({"urgent": 10.0, "notice": 5.0, "info": 1.0}),
        default_category_severity=1.0,
        one_point_per_entity=True,
        min_count=3,  # people ask for help at their homes: never show one household
    ),
    # seed 001: severity 1-3, two decay classes, AVG(decay_score), 90 days
    "road_conditions": Profile(
        name="road_conditions",
        severity_range=(1.0, 3.0),
        categories=WEATHER + STRUCTURAL,
        category_class=_frozen(
            {**{c: "weather_environmental" for c in WEATHER}, **{c: "structural" for c in STRUCTURAL}}
        ),
        decay=Decay(mode="half_life", days=_frozen({"weather_environmental": 1.5, "structural": 7.0})),
        score="mean",
        max_age_days=90.0,
    ),
    # seed 002: severity/10 × priority boost, exp(-0.5·min(age/90d, 1)), multiplier 2, normalised
    "campus_issues": Profile(
        name="campus_issues",
        severity_range=(1.0, 10.0),
        severity_scale=10.0,
        priority_boost=_frozen({"CRITICAL": 4.0, "HIGH": 2.5, "MEDIUM": 1.5, "LOW": 1.0}),
        decay=Decay(mode="normalized_exponential", factor=0.5, max_age_days=90.0),
        score="boosted_count",
        severity_weight_multiplier=2.0,
        normalize="minmax",
    ),
    # seed 003: impact = cancellations + delays; busiest station represents its cell
    "rail_disruptions": Profile(
        name="rail_disruptions",
        metrics=("cancellations", "delays"),
        representative="busiest",
    ),
}


@dataclass(frozen=True)
class Preset:
    """Seed 002's named configurations: profile changes plus filters."""

    decay_factor: float
    severity_weight_multiplier: float
    max_age_days: float | None
    filters: Filters = Filters()
    needs: tuple[str, ...] = ()  # filters the user must give (e.g. buildings)

    def apply(self, profile: Profile) -> Profile:
        return replace(
            profile,
            decay=replace(profile.decay, factor=self.decay_factor),
            severity_weight_multiplier=self.severity_weight_multiplier,
            max_age_days=self.max_age_days,
        )


PRESETS: dict[str, dict[str, Preset]] = {
    "campus_issues": {
        "emergency": Preset(
            decay_factor=1.0,
            severity_weight_multiplier=3.0,
            max_age_days=7,
            filters=Filters(priorities=("CRITICAL", "HIGH"), statuses=("OPEN", "IN_PROGRESS")),
        ),
        "maintenance": Preset(
            decay_factor=0.3,
            severity_weight_multiplier=1.5,
            max_age_days=90,
            filters=Filters(statuses=("OPEN", "RESOLVED")),
        ),
        "overview": Preset(decay_factor=0.5, severity_weight_multiplier=2.0, max_age_days=30),
        # the seed's example building ("engineering-bldg") is one campus's: the tileset names its own
        "building": Preset(decay_factor=0.4, severity_weight_multiplier=2.0, max_age_days=60, needs=("buildings",)),
    },
}
