"""Scoring: each valid report of a tileset's source becomes a weight, or is excluded with a reason.

Exclusion is not rejection: a report that does not count for this tileset at
this ``as_of`` (expired, too old, a category the profile does not know, ...)
stays in the warehouse and is counted here by reason, so that
``valid = scored + excluded`` per tileset.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import polars as pl

from .profiles import Filters, Profile
from .schema import METRICS as METRIC_COLUMNS
from .tilemath import tile_key

# Reasons, in the order they are tested; a report takes the first that applies.
EXCLUSIONS = (
    "not_public",  # is_public = false: never counted, never published
    "after_as_of",  # observed after the tileset's as_of
    "expired",  # expires_at <= as_of (seed 000's active notes)
    "too_old",  # max_age_days old or older
    "unknown_category",  # not a category the profile knows (or has no decay for)
    "severity_out_of_range",  # outside the profile's severity range
    "filtered_out",  # fails one of the tileset's filters
    "folded_into_entity",  # seed 000: another active note of the same entity and location
)
SCORED_COLUMNS = ("lat", "lng", "tile_key", "observed_at", "category", "weight", "severity_boost", "decay")
READ_COLUMNS = (
    "report_id",
    "entity_type",
    "entity_id",
    "lat",
    "lng",
    "observed_at",
    "expires_at",
    "category",
    "severity",
    "priority",
    "status",
    "organization",
    "building",
    "activity",
    "upvotes",
    "departures",
    "cancellations",
    "delays",
    "is_public",
    "tile_key",  # see tilemath.tile_key; computed here when a caller's frame lacks it
)  # never session_token or description
DAY_US = 86_400 * 10**6
READ_TYPES = {
    **{c: pl.String for c in READ_COLUMNS},
    "lat": pl.Float64,
    "lng": pl.Float64,
    "severity": pl.Float64,
    "departures": pl.Float64,
    "cancellations": pl.Float64,
    "delays": pl.Float64,
    "upvotes": pl.Int64,
    "is_public": pl.Boolean,
    "observed_at": pl.Datetime("us", "UTC"),
    "expires_at": pl.Datetime("us", "UTC"),
    "tile_key": pl.UInt64,
}


class ScoreResult(NamedTuple):
    """Scored reports of one tileset and what was excluded."""

    scored: pl.DataFrame
    valid: int
    excluded: dict[str, int]

    @property
    def holds(self) -> bool:
        """``valid = scored + excluded``."""
        return self.valid == self.scored.height + sum(self.excluded.values())


def describe(profile: Profile) -> str:
    """One sentence for the map legend: what a cell's intensity means under ``profile``."""
    score = {
        "sum": "the sum of its reports' weights",
        "mean": "the mean weight of its reports",
        "boosted_count": "n × (1 + mean(severity × priority boost) × "
        f"{profile.severity_weight_multiplier:g}) × mean(decay)",
    }[profile.score]
    if profile.metrics:
        score += " (weight = " + " + ".join(profile.metrics) + ")"
    scale = "÷ the zoom's highest score" if profile.normalize == "max" else "scaled min–max over the zoom"
    d = profile.decay
    days = ", ".join(f"{k.replace('_', ' ')} {v:g} d" for k, v in d.days.items())
    decay = {
        "none": "no decay with age",
        "half_life": f"weights halve every {days}",
        "time_constant": f"weights decay as exp(-age/τ), τ {days}",
        "normalized_exponential": f"weights decay as exp(-{d.factor:g}·min(age/{d.max_age_days:g} d, 1))",
    }[d.mode]
    window = f"; reports older than {profile.max_age_days:g} days left out" if profile.max_age_days else ""
    return f"Intensity: a cell's score, {score}, {scale}; {decay}{window}."


def age_days(as_of: datetime) -> pl.Expr:
    """Age in days at ``as_of`` (never negative)."""
    # Polars divides a column by a number as a product with its reciprocal,
    # but a one-row frame by true division: a product, spelled out, gives
    # the same bits whatever the frame (a shard may hold a single report).
    return ((pl.lit(as_of) - pl.col("observed_at")).dt.total_microseconds() * (1.0 / DAY_US)).clip(lower_bound=0.0)


def decay_days(profile: Profile) -> pl.Expr:
    """Half-life / time constant of each report: by category, then its class, then "default".

    For a profile with a closed list of categories it reads the report's code
    (:data:`CODE`, which :func:`category_code` adds and :func:`score_reports`
    adds first), not its ``category``.
    """
    days = profile.decay.days
    per_category = {c: days[k] for c, k in profile.category_class.items() if k in days}
    per_category.update({k: v for k, v in days.items() if k not in profile.category_class.values()})
    per_category.pop("default", None)
    default = days.get("default")
    # Always a column, never a number: the bits of age / days would then depend on
    # the frame's length (see age_days), and a shard may hold a single report.
    if profile.categories is not None:  # a report's code (category_code) picks its days (none: excluded)
        known = _closed(profile)
        days_by_code = pl.Series([per_category.get(c, default) for c in known], dtype=pl.Float64)
        return pl.lit(days_by_code).gather(pl.col(CODE).to_physical())
    if not per_category:
        return pl.col("category").replace_strict({}, default=default, return_dtype=pl.Float64)
    # a category's place among the known ones, then its days by that place: faster than
    # looking each report's string up in a mapping (unknown and null: no place)
    known = sorted(per_category)
    place = pl.col("category").cast(pl.Enum(known), strict=False).to_physical()
    looked_up = pl.lit(pl.Series([per_category[c] for c in known], dtype=pl.Float64)).gather(place)
    return looked_up if default is None else looked_up.fill_null(default)


CODE = "_category_code"  # scoring's own column: the category as an Enum of a closed list (null: not on it)


def _closed(profile: Profile) -> list[str]:
    return sorted(set(profile.categories))


def category_code(profile: Profile) -> pl.Expr:
    """A profile with a closed list of categories: each report's as an ``Enum`` of that list, null for
    any other (and for none), read once by the exclusion rules, the decay and the scored reports."""
    return pl.col("category").cast(pl.Enum(_closed(profile)), strict=False).alias(CODE)


def decay(profile: Profile, as_of: datetime) -> pl.Expr:
    """Decay factor in [0, 1] of each report."""
    d = profile.decay
    if d.mode == "half_life":
        return pl.lit(0.5) ** (age_days(as_of) / decay_days(profile))
    if d.mode == "time_constant":  # seed 001's literal exp(-age/τ)
        return (-age_days(as_of) / decay_days(profile)).exp()
    if d.mode == "normalized_exponential":  # seed 002
        return (-d.factor * (age_days(as_of) * (1.0 / d.max_age_days)).clip(upper_bound=1.0)).exp()
    return pl.lit(1.0)


def severity_score(profile: Profile) -> pl.Expr:
    """Severity on the profile's scale; for seed 003 the impact (sum of metrics)."""
    if profile.metrics:
        return pl.sum_horizontal([pl.col(m).fill_null(0.0) for m in profile.metrics])
    if profile.category_severity is not None:
        return pl.col("category").replace_strict(
            dict(profile.category_severity),
            default=profile.default_category_severity,
            return_dtype=pl.Float64,
        )
    return pl.col("severity") * (1.0 / profile.severity_scale)  # see age_days: a product


def priority_boost(profile: Profile) -> pl.Expr:
    """Seed 002's boost by priority; 1 where the profile has none or the priority is unknown."""
    if not profile.priority_boost:
        return pl.lit(1.0)
    return pl.col("priority").replace_strict(dict(profile.priority_boost), default=1.0, return_dtype=pl.Float64)


def weight(profile: Profile) -> pl.Expr:
    """``severity_boost × decay × (1 + upvote_weight × upvotes)``."""
    upvotes = 1.0 + profile.upvote_weight * pl.col("upvotes").fill_null(0)
    return pl.col("severity_boost") * pl.col("decay") * upvotes


def _every_category_decays(profile: Profile) -> bool:
    # True when the profile's category list already excludes every report
    # whose category has no half-life / time constant.
    days = profile.decay.days
    if "default" in days:
        return True
    known = profile.categories
    return known is not None and all(c in days or profile.category_class.get(c) in days for c in known)


def _in(column: str, values: tuple[str, ...]) -> pl.Expr:
    return pl.col(column).is_in(list(values)).fill_null(False)


def filter_passes(filters: Filters) -> pl.Expr:
    """True where a report passes every filter of the tileset."""
    conds = [
        _in(col, getattr(filters, name))
        for name, col in (
            ("entity_types", "entity_type"),
            ("categories", "category"),
            ("priorities", "priority"),
            ("statuses", "status"),
            ("buildings", "building"),
            ("organizations", "organization"),
            ("activities", "activity"),
        )
        if getattr(filters, name) is not None
    ]
    if filters.min_severity is not None:
        conds.append(pl.col("severity") >= filters.min_severity)
    if filters.start_date is not None:
        conds.append(pl.col("observed_at") >= pl.lit(filters.start_date))
    if filters.end_date is not None:
        conds.append(pl.col("observed_at") <= pl.lit(filters.end_date))
    return pl.all_horizontal(conds) if conds else pl.lit(True)


def exclusion(profile: Profile, filters: Filters, as_of: datetime) -> pl.Expr:
    """The first exclusion reason of each report (its place in :data:`EXCLUSIONS`), or null when it counts.

    For a profile with a closed list of categories it reads the report's code
    (:data:`CODE`, added by :func:`category_code`), as :func:`decay_days` does.
    """
    rules: list[tuple[pl.Expr, str]] = [
        (pl.col("is_public").not_(), "not_public"),
        (pl.col("observed_at") > pl.lit(as_of), "after_as_of"),
        (pl.col("expires_at") <= pl.lit(as_of), "expired"),
    ]
    if profile.max_age_days is not None:  # seed 001: counts while submitted_at > now - 90 days
        rules.append((age_days(as_of) >= profile.max_age_days, "too_old"))
    if profile.categories is not None:
        rules.append((pl.col(CODE).is_null(), "unknown_category"))
    if profile.decay.mode in ("half_life", "time_constant") and not _every_category_decays(profile):
        rules.append((decay_days(profile).is_null(), "unknown_category"))
    if profile.severity_range is not None:
        lo, hi = profile.severity_range
        rules.append((~pl.col("severity").is_between(lo, hi), "severity_out_of_range"))
    rules.append((~filter_passes(filters), "filtered_out"))

    code = {reason: i for i, reason in enumerate(EXCLUSIONS)}  # a small integer is cheaper to count by than a string
    expr = pl.when(rules[0][0].fill_null(False)).then(pl.lit(code[rules[0][1]], pl.UInt8))
    for cond, reason in rules[1:]:
        expr = expr.when(cond.fill_null(False)).then(pl.lit(code[reason], pl.UInt8))
    return expr.otherwise(pl.lit(None, dtype=pl.UInt8)).alias("excluded")


def score_reports(reports: pl.LazyFrame, profile: Profile, filters: Filters, as_of: datetime) -> ScoreResult:
    """Weight every report of a tileset, or exclude it with a reason.

    Parameters
    ----------
    reports : LazyFrame
        Canonical reports (:data:`READ_COLUMNS`) of the tileset's source.
    profile, filters : Profile, Filters
        From :func:`resolve`.
    as_of : datetime
        The tileset's time (UTC).

    Returns
    -------
    ScoreResult
        ``scored`` has :data:`SCORED_COLUMNS` plus the profile's metrics; its
        ``category`` is an ``Enum`` of the profile's categories where it has a
        list of them (no other is kept), else a string.
    """
    present = reports.collect_schema().names()
    # the canonical types, whatever the caller built (an all-null column has no type of its own)
    reports = reports.with_columns(pl.col(c).cast(t) for c, t in READ_TYPES.items() if c in present)
    if "tile_key" not in present:
        reports = reports.with_columns(tile_key(pl.col("lng"), pl.col("lat")).alias("tile_key"))
    closed = profile.categories is not None
    if closed:  # the category read once, as a code (the string only where a filter reads it)
        reports = reports.with_columns(category_code(profile))
    reason = exclusion(profile, filters, as_of)
    boost, decays, weights = severity_score(profile) * priority_boost(profile), decay(profile, as_of), weight(profile)
    columns = [*SCORED_COLUMNS, *(METRIC_COLUMNS if profile.metrics else ())]
    made_from = [CODE if closed and c == "category" else c for c in columns]  # the scored reports' columns
    # Judged once: the columns scoring reads, and each report's reason. The reasons are
    # counted from it, and the reports that count are scored from it.
    read = {c for e in (reason, boost, decays, weights) for c in e.meta.root_names()}
    read |= {*made_from, *(("entity_type", "entity_id", "report_id") if profile.one_point_per_entity else ())}
    judged = reports.select(*(c for c in reports.collect_schema().names() if c in read), reason).collect()
    kept = (
        judged.lazy()
        .filter(pl.col("excluded").is_null())
        .with_columns(boost.alias("severity_boost"), decays.alias("decay"))
        .with_columns(weights.alias("weight"))
    )
    if profile.one_point_per_entity:
        kept = _one_point_per_entity(kept, made_from, CODE if closed else "category")
    scored = kept.select(pl.col(c).alias(name) for c, name in zip(made_from, columns)).collect()
    reasons = judged.group_by("excluded").len()
    valid = int(reasons.get_column("len").sum())
    excluded = {EXCLUSIONS[code]: n for code, n in reasons.drop_nulls("excluded").iter_rows()}
    folded = valid - sum(excluded.values()) - scored.height
    if folded:
        excluded["folded_into_entity"] = folded
    order = {r: i for i, r in enumerate(EXCLUSIONS)}
    excluded = dict(sorted(excluded.items(), key=lambda kv: order[kv[0]]))
    return ScoreResult(scored, valid, excluded)


def _one_point_per_entity(kept: pl.LazyFrame, columns: list[str], category: str) -> pl.LazyFrame:
    # Seed 000: GROUP BY lat, lng, entity type and id; weight = MAX over active
    # notes. The point shows its heaviest note's label and its latest time.
    # (``category``: the column it is in, a string or a code of names in order)
    entity = pl.coalesce(pl.col("entity_id"), pl.col("report_id")).alias("_entity")
    by_weight = [pl.col("weight"), pl.col(category)]
    return (
        kept.with_columns(entity)
        .group_by(["entity_type", "_entity", "lat", "lng"])
        .agg(
            pl.col("weight").max(),
            pl.col("severity_boost").max(),
            pl.col("decay").max(),
            pl.col("observed_at").max(),
            pl.col("tile_key").first(),  # the same position: the same key
            pl.col(category).sort_by(by_weight, descending=[True, False]).first(),
        )
        .sort(["entity_type", "_entity", "lat", "lng"])  # deterministic order
        .select(columns)
    )
