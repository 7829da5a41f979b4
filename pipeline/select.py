"""Stratified selection (seed 003, generalised to every zoom and every tile).

A map shows only so many features. For each zoom and each *group* — a tile,
or the whole world for the per-zoom overview — with budget ``B``:

1. **coverage**: strata are the tiles at ``z + strata_detail`` (coarsened
   while the group has more non-empty strata than ``B``); every non-empty
   stratum keeps its best cell (by score, or the busiest);
2. **impact**: the rest of ``B`` goes to the highest-score cells not chosen;
3. **fold**: every unchosen cell's additive aggregates go to the nearest
   chosen cell of its stratum, so a group's features carry all its reports;
4. ties break on the cell key (the quadkey), so the result is deterministic.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from . import pyramid
from .profiles import Profile

FOLDED_SUMS = ("report_count", "weight", "departures", "cancellations", "delays", "severity_boost_sum", "decay_sum")


def overview_budget(z: int) -> int:
    """Seed 003's ``resolve_max_points`` by zoom: 500 up to z5, 1000 up to z8, then 2000."""
    return 500 if z <= 5 else 1000 if z <= 8 else 2000


def choose(
    cells: pl.DataFrame,
    *,
    z: int,
    detail: int,
    strata_detail: int,
    budget: int,
    group_zoom: int,
    representative: str = "score",
    stratum_zoom: int | None = None,
) -> pl.DataFrame:
    """Choose the cells of one zoom that a group shows, and where the others fold.

    Parameters
    ----------
    cells : DataFrame
        One zoom of the pyramid (``cell_key``, ``score``, ``report_count``,
        ``lng``, ``lat``, optionally ``departures``).
    z, detail, strata_detail : int
        The zoom, its cell detail, and the strata's detail below ``z``.
    budget : int
        Features per group.
    group_zoom : int
        ``z`` for a group per tile, ``0`` for one group (the overview).
    representative : {"score", "busiest"}
        What makes a stratum's best cell.
    stratum_zoom : int, optional
        The groups' stratum zoom, when known from more cells than ``cells``
        (see :class:`Overview`); by default found from ``cells``.

    Returns
    -------
    DataFrame
        Per cell, in ``cell_key`` order: ``cell_key``, ``chosen``, ``tier``
        (``coverage`` / ``impact`` / null), ``target_key`` (the chosen cell it
        folds into; its own key when chosen) and ``stratum_zoom`` (its
        group's effective stratum zoom).
    """
    level = z + detail
    finest = min(z + strata_detail, level)
    if stratum_zoom is None:  # groups of at most `budget` cells (most tiles at fine zooms) keep them all
        group = pl.col("cell_key") // (4 ** (level - group_zoom))
        small = cells.select((pl.len().over(group) <= budget).alias("small")).to_series()
        if small.any():
            kept = _keep_all(cells.filter(small), level, finest, representative)
            if small.all():
                return kept
            rest = _choose(cells.filter(~small), level, finest, budget, group_zoom, representative, None)
            return pl.concat([kept, rest]).sort("cell_key")
    return _choose(cells, level, finest, budget, group_zoom, representative, stratum_zoom)


def _keep_all(cells: pl.DataFrame, level: int, finest: int, representative: str) -> pl.DataFrame:
    """:func:`choose` for groups of at most ``budget`` cells: what the general case gives them, cheaper.

    Their strata at the finest stratum zoom fit the budget, so that is their
    stratum zoom; every cell is chosen (the best of its stratum as
    ``coverage``, the others as ``impact``) and none folds.
    """
    best_first = [*_busy(cells, representative), "score", "cell_key"]
    descending = [True] * (len(best_first) - 1) + [False]
    stratum = (pl.col("cell_key") // (4 ** (level - finest))).alias("stratum")
    return (
        cells.lazy()
        .select(*dict.fromkeys(best_first), stratum)
        .sort(["stratum", *best_first], descending=[False, *descending], maintain_order=True)
        .select(
            "cell_key",
            pl.lit(True).alias("chosen"),
            pl.when(pl.col("stratum").is_first_distinct())
            .then(pl.lit("coverage"))
            .otherwise(pl.lit("impact"))
            .alias("tier"),
            pl.col("cell_key").alias("target_key"),
            pl.lit(finest, pl.Int32).alias("stratum_zoom"),
        )
        .sort("cell_key")
        .collect()
    )


def _choose(
    cells: pl.DataFrame,
    level: int,
    finest: int,
    budget: int,
    group_zoom: int,
    representative: str,
    stratum_zoom: int | None,
) -> pl.DataFrame:
    """:func:`choose`, the general case."""

    def at(zoom: int) -> pl.Expr:  # each cell's ancestor (key) at a zoom
        return pl.col("cell_key") // (4 ** (level - zoom))

    needed = dict.fromkeys(["cell_key", "score", "report_count", "lng", "lat", *_busy(cells, representative)])
    frame = cells.lazy().select(*needed)
    frame = frame.with_columns(at(group_zoom).alias("group"))
    # the finest stratum zoom at which the group's non-empty strata fit the budget
    fits = [
        pl.when(at(zoom).n_unique().over("group") <= budget).then(zoom) for zoom in range(finest, group_zoom - 1, -1)
    ]
    found = pl.coalesce(fits) if stratum_zoom is None else pl.lit(stratum_zoom)
    frame = frame.with_columns(found.cast(pl.Int32).alias("stratum_zoom"))
    stratum = pl.when(pl.col("stratum_zoom") == finest).then(at(finest))
    for zoom in range(finest - 1, group_zoom - 1, -1):
        stratum = stratum.when(pl.col("stratum_zoom") == zoom).then(at(zoom))
    frame = frame.with_columns(stratum.alias("stratum"))

    best_first = [*_busy(cells, representative), "score", "cell_key"]
    descending = [True] * (len(best_first) - 1) + [False]
    frame = frame.sort(best_first, descending=descending, maintain_order=True)
    coverage = pl.int_range(pl.len()).over(["group", "stratum"]) == 0
    frame = frame.with_columns(coverage.alias("coverage"))
    by_score = frame.sort(["coverage", "score", "cell_key"], descending=[True, True, False])
    slot = pl.int_range(pl.len()).over("group")  # coverage cells come first in each group
    frame = (
        by_score.with_columns((slot < budget).alias("chosen"))
        .with_columns(
            pl.when(pl.col("coverage"))
            .then(pl.lit("coverage"))
            .when(pl.col("chosen"))
            .then(pl.lit("impact"))
            .alias("tier")
        )
        .collect()
    )
    return _fold(frame).sort("cell_key").select("cell_key", "chosen", "tier", "target_key", "stratum_zoom")


def _busy(cells: pl.DataFrame, representative: str) -> list[str]:
    if representative != "busiest":
        return []
    return ["departures", "report_count"] if "departures" in cells.columns else ["report_count"]


def _fold(frame: pl.DataFrame, chosen: pl.DataFrame | None = None) -> pl.DataFrame:
    """Each unchosen cell's target: the nearest chosen cell of its stratum (of ``chosen``: by default
    ``frame``'s own chosen cells)."""
    chosen = (frame.filter("chosen") if chosen is None else chosen).select(
        "group",
        "stratum",
        pl.col("cell_key").alias("target_key"),
        pl.col("lng").alias("t_lng"),
        pl.col("lat").alias("t_lat"),
    )
    rest = frame.filter(~pl.col("chosen"))
    if rest.height == 0:
        return frame.with_columns(pl.col("cell_key").alias("target_key"))
    # equirectangular distance: strata are small, and only the order matters
    dx = (pl.col("lng") - pl.col("t_lng")) * pl.col("cos_lat")
    dy = pl.col("lat") - pl.col("t_lat")
    nearest = (
        rest.lazy()
        .select("group", "stratum", "cell_key", "lng", "lat", pl.col("lat").radians().cos().alias("cos_lat"))
        .join(chosen.lazy(), on=["group", "stratum"])
        .with_columns((dx * dx + dy * dy).alias("d2"))
        .filter(pl.col("d2") == pl.col("d2").min().over("cell_key"))
        .group_by("cell_key")
        .agg(pl.col("target_key").min())  # equally near: the first quadkey
        .collect()
    )
    return frame.join(nearest, on="cell_key", how="left").with_columns(
        pl.coalesce("target_key", "cell_key").alias("target_key")
    )


def features(cells: pl.DataFrame, choice: pl.DataFrame, profile: Profile) -> pl.DataFrame:
    """The chosen cells as features, with every folded cell's aggregates added.

    Position, quadkey and top category stay the chosen cell's own; counts,
    weights and metrics are summed (in a fixed order: byte-identical runs),
    the max weight and times combined; the score is recomputed. Intensity
    needs the zoom's span: :func:`finish` adds it.
    """
    own = _chosen_cells(cells, choice).sort("cell_key")
    # only the cells others fold into are added up; the rest keep their own aggregates
    into = choice.filter(pl.col("target_key") != pl.col("cell_key")).get_column("target_key").unique()
    added = _folded_sums(_folded_cells(cells, choice.filter(pl.col("target_key").is_in(into))))
    alone = own.filter(~pl.col("cell_key").is_in(into)).select(
        pl.col("cell_key").alias("target_key"), *added.columns[1:]
    )
    folded = pl.concat([added, alone.cast(added.schema)]).sort("target_key")
    if own.height != folded.height:
        raise RuntimeError("a cell folds into a cell that is not chosen")
    return _with_sums(own, folded, profile)


def _chosen_cells(cells: pl.DataFrame, choice: pl.DataFrame) -> pl.DataFrame:
    """The chosen cells, whole, with their tier (each is its own target)."""
    chosen = choice.filter(pl.col("cell_key") == pl.col("target_key")).select("cell_key", "target_key", "tier")
    return cells.join(chosen, on="cell_key")


def _folded_cells(cells: pl.DataFrame, choice: pl.DataFrame) -> pl.DataFrame:
    """What each cell adds to its target: its additive aggregates, with ``target_key``."""
    sums = [c for c in FOLDED_SUMS if c in cells.columns]
    # only what is folded is joined and sorted: the whole frame is copied once (the chosen cells)
    return cells.select("cell_key", *sums, "max_weight", "first_seen", "last_seen").join(
        choice.select("cell_key", "target_key"), on="cell_key"
    )


def _folded_sums(folded: pl.DataFrame) -> pl.DataFrame:
    """Per target (``target_key``, sorted), its :func:`_folded_cells`' aggregates, added in cell-key order."""
    sums = [c for c in FOLDED_SUMS if c in folded.columns]
    merged = folded.sort(["target_key", "cell_key"])
    target = merged.get_column("target_key").to_numpy()
    starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]]) if len(target) else np.zeros(0, np.int64)
    out = {"target_key": target[starts]}
    out.update({c: np.add.reduceat(merged.get_column(c).to_numpy(), starts) for c in sums})
    out["max_weight"] = np.maximum.reduceat(merged.get_column("max_weight").to_numpy(), starts)
    for c, reduce in (("first_seen", np.minimum), ("last_seen", np.maximum)):
        times = merged.get_column(c).dt.epoch("us").to_numpy()
        out[c] = pl.Series(reduce.reduceat(times, starts)).cast(pl.Datetime("us", "UTC"))
    return pl.DataFrame(out)


def _with_sums(own: pl.DataFrame, folded: pl.DataFrame, profile: Profile) -> pl.DataFrame:
    """The chosen cells (sorted by key) with their targets' folded aggregates, and the score again."""
    out = own.with_columns(folded.drop("target_key").get_columns())
    return out.with_columns(pyramid.score(profile).alias("score"))


def finish(features: pl.DataFrame, profile: Profile, span: pyramid.Span | None) -> pl.DataFrame:
    """Features with ``intensity`` over their zoom's ``span`` (of the features' scores) and ``healthy``."""
    return features.with_columns(
        pyramid.intensity(profile, span).alias("intensity"), (pl.col("score") == 0).alias("healthy")
    )


class Overview:
    """A zoom's overview (one group, the world) chosen from cells that come a part at a time.

    The parts (whole tiles, in key order) are read three times, and the
    result is what :func:`choose` and :func:`features` give over the whole
    zoom, to the bit:

    1. :meth:`count`: the non-empty strata at each candidate zoom, which fix
       the stratum zoom (a stratum may span parts: parts are in key order, so
       it is the last of one part and the first of the next);
    2. :meth:`consider`: each part's candidates, its best cell per stratum and
       its ``budget`` highest scores. A stratum's best is the best of its
       parts' bests; and a cell the impact tier takes has fewer than
       ``budget`` cells above it in its part (coverage cells, or cells taken
       before it), so it is a candidate too. :meth:`decide` chooses among them;
    3. :meth:`choice` gives each part's folds, :meth:`add` keeps its
       aggregates, and :meth:`features` adds them up.
    """

    def __init__(self, *, z: int, detail: int, strata_detail: int, budget: int, representative: str) -> None:
        self.common = dict(z=z, detail=detail, strata_detail=strata_detail, budget=budget, group_zoom=0)
        self.representative, self.budget, self.level = representative, budget, z + detail
        self._distinct = dict.fromkeys(range(min(z + strata_detail, self.level), -1, -1), 0)
        self._last: dict[int, int] = {}
        self._candidates: list[pl.DataFrame] = []
        self.stratum_zoom: int | None = None
        self._chosen: pl.DataFrame | None = None
        self._own: list[pl.DataFrame] = []
        self._folded: list[pl.DataFrame] = []

    def _stratum(self, zoom: int) -> pl.Expr:
        return pl.col("cell_key") // (4 ** (self.level - zoom))

    def count(self, cells: pl.DataFrame) -> None:
        """Pass 1: a part's strata."""
        if cells.height == 0:
            return
        keys = cells.get_column("cell_key").to_numpy()
        for zoom in self._distinct:
            ancestors = keys >> np.uint64(2 * (self.level - zoom))
            new = int(np.count_nonzero(ancestors[1:] != ancestors[:-1])) + 1
            self._distinct[zoom] += new - (self._last.get(zoom) == int(ancestors[0]))
            self._last[zoom] = int(ancestors[-1])
        self.stratum_zoom = next(zoom for zoom, n in self._distinct.items() if n <= self.budget or zoom == 0)

    def consider(self, cells: pl.DataFrame) -> None:
        """Pass 2: a part's candidates."""
        if cells.height == 0:
            return
        busy = _busy(cells, self.representative)
        frame = cells.select(*dict.fromkeys(["cell_key", "score", "report_count", "lng", "lat", *busy]))
        best_first = [*busy, "score", "cell_key"]
        stratum = self._stratum(self.stratum_zoom).alias("stratum")
        best = (
            frame.with_columns(stratum)
            .sort(best_first, descending=[True] * (len(best_first) - 1) + [False])
            .unique("stratum", keep="first", maintain_order=True)
            .drop("stratum")
        )
        top = frame.sort(["score", "cell_key"], descending=[True, False]).head(self.budget)
        self._candidates += [best, top]

    def decide(self) -> None:
        """The chosen cells, from the candidates."""
        if not self._candidates:
            return
        candidates = pl.concat(self._candidates).unique("cell_key").sort("cell_key")
        self._candidates = []
        choice = choose(
            candidates, **self.common, representative=self.representative, stratum_zoom=self.stratum_zoom
        ).filter("chosen")
        self._chosen = candidates.join(choice.select("cell_key", "tier"), on="cell_key").select(
            "cell_key",
            "tier",
            "lng",
            "lat",
            pl.lit(0, pl.UInt64).alias("group"),
            self._stratum(self.stratum_zoom).alias("stratum"),
        )

    def choice(self, cells: pl.DataFrame) -> pl.DataFrame:
        """Pass 3: a part's cells as :func:`choose` gives them (chosen, tier, target, stratum zoom)."""
        chosen = self._chosen
        frame = cells.select(
            "cell_key",
            "lng",
            "lat",
            pl.lit(0, pl.UInt64).alias("group"),
            self._stratum(self.stratum_zoom).alias("stratum"),
        ).join(chosen.select("cell_key", "tier"), on="cell_key", how="left", maintain_order="left")
        frame = frame.with_columns(pl.col("tier").is_not_null().alias("chosen"))
        return (
            _fold(frame, chosen)
            .with_columns(pl.lit(self.stratum_zoom, pl.Int32).alias("stratum_zoom"))
            .sort("cell_key")
            .select("cell_key", "chosen", "tier", "target_key", "stratum_zoom")
        )

    def add(self, cells: pl.DataFrame, choice: pl.DataFrame) -> None:
        """Pass 3: a part's chosen cells and aggregates, kept for :meth:`features` (a few numbers a cell)."""
        self._own.append(_chosen_cells(cells, choice))
        self._folded.append(_folded_cells(cells, choice))

    def features(self, profile: Profile) -> pl.DataFrame:
        """The overview's features (as :func:`features` gives them over the whole zoom).

        The sums are added over all of the zoom's cells at once: NumPy adds
        pairwise, so sums continued part by part would differ in the last bits.
        """
        own = pl.concat(self._own).sort("cell_key")
        sums = _folded_sums(pl.concat(self._folded))
        self._folded = []
        if own.height != sums.height:
            raise RuntimeError("a cell folds into a cell that is not chosen")
        return _with_sums(own, sums, profile)
