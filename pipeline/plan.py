"""The frozen plan of one build: every parameter of a tileset's run, resolved once.

The first step of a run (scoring) makes the plan from the config and the
run's ``as_of`` and writes it to ``<home>/work/<key>/plan.json``; every later
step and check reads that file, never ``hotspots.yaml``. Editing the YAML
while a run is under way changes nothing in it: the next run plans again.
The public part of the plan goes into each snapshot's ``manifest.json``.

``key`` names the build and its work folder: today the tileset's name; a
shard or a time slice of a tileset will be a key of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path

import numpy as np

from . import atomic, paths, site, strictjson
from .config import Config, Tileset, Viewer
from .errors import PlanError
from .profiles import PRESETS, PROFILES, Decay, Filters, Profile, _frozen


def decide_as_of(given: datetime | None, tileset_as_of: datetime | None, default: datetime) -> datetime:
    """The one rule for the time a build is computed at.

    ``given`` (``--as-of``, run config ``as_of``) wins; else the tileset's own
    ``as_of`` from the YAML; else ``default``: the time of the extraction the
    run publishes (``hotspots run``'s start, or the extraction run's, which the
    publishing sensor passes on), else the run's own start.
    """
    return given or tileset_as_of or default


@dataclass(frozen=True)
class Plan:
    """One build of one tileset, with everything its steps need.

    Attributes
    ----------
    key : str
        The build's identity and work folder name (the tileset's name).
    tileset : str
        The tileset it publishes (``output/<tileset>/``).
    as_of : datetime
        The time the reports are scored at (:func:`decide_as_of`).
    settings : Tileset
        The tileset's YAML entry as validated: zooms, ``cell_detail``,
        ``strata_detail``, budgets, ``min_count``, formats, guards.
    source, source_kind : str
        The source it reads from the warehouse.
    max_rejected_fraction : float
        The source's guard (see :mod:`pipeline.guard`).
    siblings : tuple of str
        Every tileset of the source (what a source's loss keeps unpublished).
    home, output : Path
        The private and public roots.
    viewer : Viewer
        The map page's settings.
    site : tuple of dict
        What the page lists of every tileset of the config
        (:func:`pipeline.site.tileset_entry`), shown when it has a live snapshot.
    shards : tuple of (int, int)
        The build's spatial shards: half-open ranges of report tile keys
        (:func:`pipeline.tilemath.tile_key`), each a run of whole tiles at
        ``shard_zoom``, in key order; set by :func:`pipeline.build.split`.
    shard_zoom : int
        Where the shards split: each builds the zooms from ``maxzoom`` to
        this one; the merge builds the coarser ones.
    """

    key: str
    tileset: str
    as_of: datetime
    settings: Tileset
    source: str
    source_kind: str
    max_rejected_fraction: float
    siblings: tuple[str, ...]
    home: Path
    output: Path
    viewer: Viewer
    site: tuple[dict, ...]
    shards: tuple[tuple[int, int], ...] = ()
    shard_zoom: int = 0

    @cached_property
    def resolved(self) -> tuple[Profile, Filters]:
        return resolve(self.settings)

    @property
    def profile(self) -> Profile:
        """The profile with the preset and the tileset's ``scoring:`` applied."""
        return self.resolved[0]

    @property
    def filters(self) -> Filters:
        return self.resolved[1]

    @property
    def zooms(self) -> range:
        return range(self.settings.minzoom, self.settings.maxzoom + 1)

    @property
    def work(self) -> paths.Work:
        return paths.Work.of(self.home, self.key)

    @property
    def published(self) -> paths.Published:
        return paths.Published.of(self.output, self.tileset)

    @property
    def warehouse(self) -> Path:
        return paths.warehouse(self.home)

    def public(self) -> dict:
        """What a snapshot's manifest says of its plan (its top-level keys): no path, nothing private."""
        return {
            "key": self.key,
            "as_of": self.as_of.isoformat(),
            "source": {"kind": self.source_kind},
            "config": self.settings.model_dump(mode="json", exclude={"source", "as_of"}),
            "profile": jsonable(self.profile),
            "filters": jsonable(self.filters),
        }

    def digest(self) -> str:
        """Names this plan (what a shard's work records, so that a merge never mixes two plans)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        doc = {
            "key": self.key,
            "tileset": self.tileset,
            "as_of": self.as_of.isoformat(),
            "settings": self.settings.model_dump(mode="json"),
            "source": self.source,
            "source_kind": self.source_kind,
            "max_rejected_fraction": self.max_rejected_fraction,
            "siblings": list(self.siblings),
            "home": str(self.home),
            "output": str(self.output),
            "viewer": self.viewer.model_dump(mode="json"),
            "site": list(self.site),
            "shards": [list(r) for r in self.shards],
            "shard_zoom": self.shard_zoom,
            # for a reader of the file; the steps resolve them from `settings`
            "profile": jsonable(self.profile),
            "filters": jsonable(self.filters),
        }
        return strictjson.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        doc = json.loads(text)
        return cls(
            key=doc["key"],
            tileset=doc["tileset"],
            as_of=datetime.fromisoformat(doc["as_of"]),
            settings=Tileset.model_validate(doc["settings"]),
            source=doc["source"],
            source_kind=doc["source_kind"],
            max_rejected_fraction=doc["max_rejected_fraction"],
            siblings=tuple(doc["siblings"]),
            home=Path(doc["home"]),
            output=Path(doc["output"]),
            viewer=Viewer.model_validate(doc["viewer"]),
            site=tuple(doc["site"]),
            shards=tuple(tuple(r) for r in doc.get("shards", ())),
            shard_zoom=doc.get("shard_zoom", 0),
        )


def make(cfg: Config, tileset: str, as_of: datetime) -> Plan:
    """Resolve the plan of a build of ``tileset`` at ``as_of`` (already decided)."""
    if tileset not in cfg.tilesets:
        raise PlanError(f"unknown tileset {tileset!r} (known: {', '.join(cfg.tilesets) or 'none'})")
    ts = cfg.tilesets[tileset]
    return Plan(
        key=tileset,
        tileset=tileset,
        as_of=as_of,
        settings=ts,
        source=ts.source,
        source_kind=cfg.sources[ts.source].kind,
        max_rejected_fraction=cfg.sources[ts.source].max_rejected_fraction,
        siblings=tuple(t for t, other in cfg.tilesets.items() if other.source == ts.source),
        home=cfg.home,
        output=cfg.output,
        viewer=cfg.viewer,
        site=tuple(site.tileset_entry(name, resolve(other)[0]) for name, other in cfg.tilesets.items()),
    )


def write(plan: Plan) -> Path:
    """Freeze the plan beside its work: ``<home>/work/<key>/plan.json``."""
    plan.work.root.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(plan.work.plan, plan.to_json().encode())
    return plan.work.plan


def read(path: Path) -> Plan:
    """The plan a run froze (see :func:`write`).

    Raises
    ------
    PlanError
        If there is none (the build's first step has not run) or it cannot be read.
    """
    try:
        return Plan.from_json(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"no plan at {path}: run the build's first step (build_plan) first") from None
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise PlanError(f"unreadable plan at {path} ({exc}): run the build's first step again") from None


def resolve(settings: Tileset) -> tuple[Profile, Filters]:
    """A tileset's profile and filters: profile <- preset <- the tileset's overrides."""
    profile, filters = PROFILES[settings.profile], Filters()
    if settings.preset:
        preset = PRESETS[settings.profile][settings.preset]
        profile, filters = preset.apply(profile), preset.filters

    s, d = settings.scoring, settings.scoring.decay
    days = profile.decay.days
    if d.days is not None:
        days = _frozen({"default": d.days} if isinstance(d.days, (int, float)) else d.days)
    decay = Decay(
        mode=d.mode or profile.decay.mode,
        days=days,
        factor=profile.decay.factor if d.factor is None else d.factor,
        max_age_days=d.max_age_days or profile.decay.max_age_days,
    )
    overrides = {
        k: getattr(s, k)
        for k in ("score", "normalize", "severity_weight_multiplier", "upvote_weight", "max_age_days", "representative")
        if getattr(s, k) is not None
    }
    if s.metrics is not None:
        overrides["metrics"] = tuple(s.metrics)
    if s.priority_boost is not None:
        overrides["priority_boost"] = _frozen(s.priority_boost)
    if s.category_severity is not None:
        overrides["category_severity"] = _frozen(s.category_severity)
    if settings.min_count is not None:
        overrides["min_count"] = settings.min_count
    profile = replace(profile, decay=decay, **overrides)

    given = {f.name: getattr(settings.filters, f.name) for f in fields(Filters)}
    filters = replace(
        filters,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None},
    )
    return profile, filters


def jsonable(value):
    """A profile, filters or summary as plain JSON values (strict: no NaN or infinity)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return strictjson.finite(value)  # generic's severity range ends at +inf: null in JSON
