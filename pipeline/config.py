"""The ``hotspots.yaml`` file: schema, loading and validation.

A bad file raises :class:`~pipeline.errors.ConfigError` naming the key path
and the reason, e.g. ``hotspots.yaml: tilesets.quakes.maxzoom: must be >=
minzoom (5)``. Relative paths in the file are resolved against the file's
folder, so a run does not depend on the current directory.
"""

from __future__ import annotations

import glob
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import paths
from .defaults import DEFAULTS
from .errors import ConfigError, InputPathError
from .profiles import PRESETS as PRESET_VALUES
from .profiles import PROFILES as PROFILE_VALUES
from .schema import MAPPABLE

CONFIG_ENV = "HOTSPOTS_CONFIG"
DEFAULT_CONFIG_NAME = "hotspots.yaml"

PROFILES = tuple(PROFILE_VALUES)
PRESETS: dict[str, tuple[str, ...]] = {name: tuple(p) for name, p in PRESET_VALUES.items()}
FILE_FORMATS = ("csv", "parquet", "ndjson", "geojson", "gpkg", "shp", "fgb", "spatial")
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # becomes a folder name under output/

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rules(_Strict):
    """Extraction rules of a source (seed 001); defaults from :data:`DEFAULTS`."""

    future_tolerance_hours: float = Field(DEFAULTS.future_tolerance_hours, ge=0)
    max_description_chars: int = Field(DEFAULTS.max_description_chars, ge=0)
    rate_limit_per_hour: int | None = Field(DEFAULTS.rate_limit_per_hour, ge=1)


class Columns(_Strict):
    """Canonical column -> source column. Unmapped columns are NULL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report_id: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    lat: str | None = None
    lng: str | None = None
    geometry: str | None = None
    observed_at: str | None = None
    expires_at: str | None = None
    category: str | None = None
    severity: str | None = None
    priority: str | None = None
    status: str | None = None
    organization: str | None = None
    building: str | None = None
    activity: str | None = None
    upvotes: str | None = None
    departures: str | None = None
    cancellations: str | None = None
    delays: str | None = None
    is_public: str | None = None
    session_token: str | None = None
    description: str | None = None

    def mapped(self) -> dict[str, str]:
        """The mapped canonical columns, in canonical order."""
        return {c: getattr(self, c) for c in MAPPABLE if getattr(self, c) is not None}


class _SourceBase(_Strict):
    """What every kind of source has."""

    entity_type: str | None = None
    rules: Rules = Rules()
    # More than this share of the rows read rejected: the run lost its data,
    # and nothing of this source is published (``hotspots run --force`` does).
    max_rejected_fraction: float = Field(DEFAULTS.max_rejected_fraction, ge=0, le=1)

    @property
    def timed(self) -> bool:
        """Whether the source says when each report was made (else: the run's as_of)."""
        return True


class FileSource(_SourceBase):
    """Files matched by a glob, read by DuckDB."""

    kind: Literal["file"]
    path: str
    format: Literal[FILE_FORMATS] = "csv"  # type: ignore[valid-type]
    columns: Columns
    timestamp_format: str | list[str] | None = None
    delimiter: str | None = None
    # A file that cannot be read at all: fail the source, or skip it (recorded and said).
    on_unreadable_file: Literal["fail", "skip"] = "fail"

    @model_validator(mode="after")
    def _needs_a_position(self) -> FileSource:
        cols = self.columns
        if cols.geometry is None and (cols.lat is None or cols.lng is None):
            if self.format in ("csv", "parquet", "ndjson"):
                raise ValueError("columns: map lat and lng, or geometry")
        return self

    @property
    def timed(self) -> bool:
        return self.columns.observed_at is not None

    def formats(self) -> list[str]:
        f = self.timestamp_format
        return [] if f is None else [f] if isinstance(f, str) else list(f)


class SyntheticSource(_SourceBase):
    """Deterministic, clustered reports for one seed domain (demo and benchmarks)."""

    kind: Literal["synthetic"]
    domain: Literal["community_needs", "road_conditions", "campus_issues", "rail_disruptions"]
    count: int = Field(10_000, ge=1, le=200_000_000)
    seed: int = 0
    # west, south, east, north in degrees
    bbox: tuple[float, float, float, float] = (-74.10, 40.60, -73.80, 40.85)
    # local: clusters inside bbox (a city); world: a few hundred cities on
    # several continents, corridors and a rural background (bbox ignored)
    spread: Literal["local", "world"] = "local"
    days: float = Field(30.0, gt=0)  # reports spread over this many days before as_of
    bad_fraction: float = Field(0.002, ge=0, le=1)  # malformed rows, to exercise validation

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        w, s, e, n = v
        if not (-180 <= w < e <= 180 and -85 <= s < n <= 85):
            raise ValueError("must be [west, south, east, north] with west < east, south < north")
        return v


class PostgresSource(_SourceBase):
    """A PostgreSQL/PostGIS database: a seed adapter, a table, or a query."""

    kind: Literal["postgres"]
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    database: str
    user: str
    password_env: str | None = None  # the password is read from this environment variable
    adapter: Literal["community_needs", "road_conditions", "campus_issues", "rail_disruptions"] | None = None
    table: str | None = None
    query: str | None = None
    columns: Columns | None = None
    watermark: str | None = None  # column for incremental reads (adapters bring their own)
    incremental: bool = True
    time_range_hours: float = Field(24.0, gt=0)  # rail adapter: stats summed over this window

    @model_validator(mode="after")
    def _one_way_in(self) -> PostgresSource:
        given = [k for k in ("adapter", "table", "query") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of adapter, table or query")
        if self.adapter is None:
            if self.columns is None:
                raise ValueError("columns: map the table's or query's columns (lat/lng or geometry, observed_at)")
            cols = self.columns
            if cols.geometry is None and (cols.lat is None or cols.lng is None):
                raise ValueError("columns: map lat and lng, or geometry")
            if cols.report_id is None:
                raise ValueError("columns.report_id: required for a database source (incremental reads upsert by id)")
        elif self.columns is not None:
            raise ValueError("columns: an adapter maps its own columns")
        return self

    @property
    def timed(self) -> bool:
        return self.columns is None or self.columns.observed_at is not None


Source = Annotated[FileSource | SyntheticSource | PostgresSource, Field(discriminator="kind")]


PositiveDays = Annotated[float, Field(gt=0)]


class DecayConfig(_Strict):
    """Overrides of a profile's decay (see :class:`pipeline.profiles.Decay`)."""

    mode: Literal["none", "half_life", "time_constant", "normalized_exponential"] | None = None
    # one value for every category, or per category class / category / "default"
    days: PositiveDays | dict[str, PositiveDays] | None = None
    factor: float | None = Field(None, ge=0)
    max_age_days: PositiveDays | None = None


class Scoring(_Strict):
    """Overrides of a profile (``None`` keeps the profile's value)."""

    decay: DecayConfig = DecayConfig()
    score: Literal["sum", "mean", "boosted_count"] | None = None
    normalize: Literal["max", "minmax"] | None = None
    severity_weight_multiplier: float | None = Field(None, ge=0)
    upvote_weight: float | None = Field(None, ge=0)
    max_age_days: PositiveDays | None = None
    metrics: list[Literal["departures", "cancellations", "delays"]] | None = Field(None, min_length=1)
    representative: Literal["score", "busiest"] | None = None
    priority_boost: dict[str, Annotated[float, Field(ge=0)]] | None = None
    category_severity: dict[str, float] | None = None


class FilterConfig(_Strict):
    """Which reports a tileset keeps (seed 000's entity type, seed 001's
    activity, seed 002's filters); an absent key keeps everything."""

    entity_types: list[str] | None = None
    categories: list[str] | None = None
    priorities: list[str] | None = None
    statuses: list[str] | None = None
    buildings: list[str] | None = None
    organizations: list[str] | None = None
    activities: list[str] | None = None
    min_severity: float | None = None
    start_date: datetime | None = None
    end_date: datetime | None = None

    @field_validator("start_date", "end_date")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else as_utc(v)


MAX_SHARDS = 256


class Tileset(_Strict):
    """A named profile + preset + filters + zoom range + budgets over one source."""

    source: str
    profile: Literal[PROFILES] = "generic"  # type: ignore[valid-type]
    preset: str | None = None
    scoring: Scoring = Scoring()
    filters: FilterConfig = FilterConfig()
    minzoom: int = Field(DEFAULTS.minzoom, ge=0, le=20)
    maxzoom: int = Field(DEFAULTS.maxzoom, ge=0, le=20)
    cell_detail: int = Field(DEFAULTS.cell_detail, ge=1, le=10)
    strata_detail: int = Field(DEFAULTS.strata_detail, ge=0, le=9)
    max_features_per_tile: int = Field(DEFAULTS.max_features_per_tile, ge=1)
    overview_maxzoom: int = Field(DEFAULTS.overview_maxzoom, ge=0, le=20)
    retain_snapshots: int = Field(DEFAULTS.retain_snapshots, ge=1)
    # heatmap.pmtiles always carries every zoom; these per-tile folders are extra
    formats: list[Literal["geojson", "mvt"]] = Field(default_factory=lambda: list(DEFAULTS.formats))
    tiles_maxzoom: int | str = DEFAULTS.tiles_maxzoom  # "auto" or a zoom
    max_directory_features: int = Field(DEFAULTS.max_directory_features, ge=0)
    shards: int | str = DEFAULTS.shards  # "auto" or a count
    shard_reports: int = Field(DEFAULTS.shard_reports, ge=1)
    block_reports: int = Field(DEFAULTS.block_reports, ge=1)
    shard_zoom: int | str = DEFAULTS.shard_zoom  # "auto" or a zoom
    min_count: int | None = Field(None, ge=1)
    # Fewer scored reports than this share of the live snapshot's: the run lost
    # its data and the live snapshot stays (``hotspots run --force`` publishes).
    min_publish_fraction: float = Field(DEFAULTS.min_publish_fraction, ge=0, le=1)
    as_of: datetime | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Tileset:
        if self.maxzoom < self.minzoom:
            raise _KeyError("maxzoom", f"must be >= minzoom ({self.minzoom}), got {self.maxzoom}")
        if self.strata_detail >= self.cell_detail:
            raise _KeyError(
                "strata_detail",
                f"must be < cell_detail ({self.cell_detail}), got {self.strata_detail}",
            )
        if self.preset is not None and self.preset not in PRESETS.get(self.profile, ()):
            known = ", ".join(PRESETS.get(self.profile, ())) or "none"
            raise _KeyError("preset", f"unknown preset {self.preset!r} for profile {self.profile} (known: {known})")
        if self.preset is not None:
            for key in PRESET_VALUES[self.profile][self.preset].needs:
                if not getattr(self.filters, key):
                    raise _KeyError(f"filters.{key}", f"preset {self.preset} needs a list of {key}")
        if len(set(self.formats)) != len(self.formats):
            raise _KeyError("formats", f"lists a format twice: {self.formats}")
        if isinstance(self.shard_zoom, int) and not self.minzoom <= self.shard_zoom <= self.maxzoom:
            raise _KeyError(
                "shard_zoom", f"must be auto or between minzoom and maxzoom ({self.minzoom}..{self.maxzoom})"
            )
        if self.maxzoom + self.cell_detail > 30:
            raise _KeyError(
                "cell_detail", f"maxzoom + cell_detail must be <= 30, got {self.maxzoom + self.cell_detail}"
            )
        return self

    @field_validator("as_of")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else as_utc(v)

    @field_validator("shards", mode="before")
    @classmethod
    def _count_or_auto(cls, v: object) -> int | str:
        return _auto_or_between(v, 1, MAX_SHARDS, "a count")

    @field_validator("tiles_maxzoom", "shard_zoom", mode="before")
    @classmethod
    def _zoom_or_auto(cls, v: object) -> int | str:
        return _auto_or_between(v, 0, 20, "a zoom")


def _auto_or_between(v: object, lo: int, hi: int, what: str) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        return v
    raise ValueError(f"must be auto or {what} from {lo} to {hi}, got {v!r}")


ORIGIN_PATTERN = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$"
URL_PATTERN = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s'\"<>\\]*)?$"


class Viewer(_Strict):
    """The published map page (``output/index.html``)."""

    # A MapLibre style URL for the basemap; without one (or offline) the page
    # draws land, coastlines and borders from Natural Earth (npm world-atlas).
    style: Annotated[str, Field(pattern=URL_PATTERN)] | None = None
    # Origins the page may fetch from besides its own (the style's, its tiles',
    # glyphs' and sprites' hosts); the style URL's origin is always allowed.
    connect_src: list[Annotated[str, Field(pattern=ORIGIN_PATTERN)]] = []

    def origins(self) -> list[str]:
        """Every origin the page's Content-Security-Policy allows besides its own."""
        mine = [re.match(r"^https?://[^/?#]+", self.style).group(0)] if self.style else []
        return sorted(set(mine + self.connect_src))


class Config(_Strict):
    """A whole ``hotspots.yaml``, with paths resolved."""

    output: Path = Path("output")
    home: Path = Path(".hotspots")
    # Folders output and home must be in (default: the config file's folder).
    roots: list[Path] = Field(min_length=1)
    sources: dict[Name, Source]
    tilesets: dict[Name, Tileset]
    viewer: Viewer = Viewer()
    # seconds between the `fresh_sources` sensor's looks at the sources
    freshness_interval_s: int = Field(DEFAULTS.freshness_interval_s, ge=1)
    file: Path | None = Field(None, exclude=True)  # where it was loaded from

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if not self.sources:
            raise _KeyError("sources", "declare at least one source")
        for name, ts in self.tilesets.items():
            if ts.source not in self.sources:
                known = ", ".join(self.sources)
                raise _KeyError(f"tilesets.{name}.source", f"unknown source {ts.source!r} (known: {known})")
        out, home = self.output.resolve(), self.home.resolve()  # symlinks followed: no escape through one
        roots = [r.resolve() for r in self.roots]
        for key, path in (("output", out), ("home", home)):
            if not any(path == r or r in path.parents for r in roots):
                allowed = ", ".join(map(str, roots))
                hint = "list a folder holding it under `roots:`"
                raise _KeyError(key, f"{path} is outside the allowed roots ({allowed}); {hint}")
        if out == home or out in home.parents:
            raise _KeyError("home", f"must not be inside output ({out}): it would be published")
        if home in out.parents:
            raise _KeyError("output", f"must not be inside home ({home})")
        return self

    @property
    def warehouse_path(self) -> Path:
        return paths.warehouse(self.home)

    def work(self, key: str) -> paths.Work:
        """A build's private work folder (see :mod:`pipeline.paths`)."""
        return paths.Work.of(self.home, key)

    def published(self, tileset: str) -> paths.Published:
        """A tileset's public folder, ``<output>/<tileset>/``."""
        return paths.Published.of(self.output, tileset)

    def sources_for(self, tilesets: list[str] | None) -> list[str]:
        """Names of the sources the given tilesets read (all sources for None)."""
        if not tilesets:
            return list(self.sources)
        return sorted({self.tilesets[t].source for t in tilesets})


class _KeyError(ValueError):
    """A model validator's error about a key other than the model's own."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


def as_utc(value: datetime) -> datetime:
    """A timezone-aware UTC datetime (naive input is taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_as_of(text: str) -> datetime:
    """Parse an ISO 8601 time given on the command line or in run config."""
    try:
        return as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ConfigError("as_of", f"not an ISO 8601 time: {text!r}") from None


def default_config_path() -> Path:
    """``$HOTSPOTS_CONFIG``, else ``./hotspots.yaml``, else the repository's."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    here = Path.cwd() / DEFAULT_CONFIG_NAME
    if here.exists():
        return here
    return Path(__file__).resolve().parents[1] / DEFAULT_CONFIG_NAME


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and resolve a config file.

    Parameters
    ----------
    path : path-like, optional
        The YAML file; :func:`default_config_path` when omitted.

    Returns
    -------
    Config
        With ``output``, ``home`` and file source globs made absolute.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or breaks the schema; the
        message names the key path and the reason.
    """
    file = Path(path) if path is not None else default_config_path()
    label = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "config file not found", label) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file: {exc}", label) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"not valid YAML{where}: {problem}", label) from None
    if not isinstance(data, dict):
        raise ConfigError("", "must be a mapping with `sources:` and `tilesets:`", label)
    return validate_config(data, base=file.resolve().parent, file=label)


def validate_config(data: dict[str, Any], base: Path, file: str | None = None) -> Config:
    """Validate a parsed config mapping; see :func:`load_config`."""
    try:
        cfg = Config.model_validate(_resolve_paths(data, base))
    except ValidationError as exc:
        raise _config_error(exc, file) from None
    if file and cfg.output.resolve() in Path(file).resolve().parents:
        raise ConfigError("output", f"must not hold the config file ({file}): it would be published", file)
    for name, ts in cfg.tilesets.items():
        if not cfg.sources[ts.source].timed:
            need = time_needs(ts)
            if need:
                key, why = need
                raise ConfigError(
                    f"tilesets.{name}.{key}",
                    f"{why}, but source {ts.source} has no time (map columns.observed_at)",
                    file,
                )
    return cfg.model_copy(update={"file": Path(file).resolve() if file else None})


def time_needs(ts: Tileset) -> tuple[str, str] | None:
    """The first key of a tileset that needs each report's time, and why; None if none does.

    A source without ``observed_at`` dates every report at the run's ``as_of``,
    so decay, an age window or a date filter would mean nothing on it.
    """
    from .plan import resolve  # plan imports this module

    profile, filters = resolve(ts)
    if profile.decay.mode != "none":
        return "scoring.decay.mode", f"profile {ts.profile} decays by age ({profile.decay.mode})"
    if profile.max_age_days is not None:
        return "scoring.max_age_days", f"profile {ts.profile} keeps reports for {profile.max_age_days:g} days"
    for key in ("start_date", "end_date"):
        if getattr(filters, key) is not None:
            return f"filters.{key}", "a date filter needs each report's time"
    return None


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    data = dict(data)
    roots = data.get("roots", ["."])
    if isinstance(roots, list):
        data["roots"] = [os.path.normpath(base / r) if isinstance(r, str) else r for r in roots]
    for key, default in (("output", "output"), ("home", ".hotspots")):
        value = data.get(key, default)
        if isinstance(value, str):
            data[key] = os.path.normpath(base / value)
    sources = data.get("sources")
    if isinstance(sources, dict):
        data["sources"] = {
            name: (
                {**src, "path": os.path.normpath(base / src["path"])}
                if isinstance(src, dict) and isinstance(src.get("path"), str)
                else src
            )
            for name, src in sources.items()
        }
    return data


def _config_error(exc: ValidationError, file: str | None) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if p != "[key]"]
    # Discriminated unions put the tag into the location: drop it.
    if len(loc) >= 3 and loc[0] == "sources" and loc[2] in ("file", "synthetic", "postgres"):
        del loc[2]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _KeyError):
        prefix = loc if loc and loc[0] == "tilesets" and len(loc) >= 2 else []
        key = ".".join(prefix[:2] + [ctx_error.key]) if prefix else ctx_error.key
        return ConfigError(key, ctx_error.reason, file)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown kind {err['input'].get('kind')!r} (known: file, postgres, synthetic)"
    elif err["type"] == "union_tag_not_found":
        msg = "missing `kind:` (file, postgres or synthetic)"
    elif err["type"] == "literal_error":
        msg = f"{msg}, got {err['input']!r}"
    elif err["type"] == "string_pattern_mismatch":
        msg = {
            NAME_PATTERN: "names are lowercase letters, digits, '_' and '-' (at most 64)",
            ORIGIN_PATTERN: f"must be an origin like https://tiles.example.org (no path), got {err['input']!r}",
        }.get((err.get("ctx") or {}).get("pattern"), f"must be an http(s) URL, got {err['input']!r}")
    return ConfigError(".".join(loc), msg, file)


def check_inputs(cfg: Config, sources: list[str] | None = None) -> None:
    """Check that every file source's glob matches at least one file.

    Raises
    ------
    InputPathError
        Naming the source and the glob.
    """
    for name in sources or list(cfg.sources):
        src = cfg.sources[name]
        if isinstance(src, FileSource) and not glob.glob(src.path, recursive=True):
            raise InputPathError(f"source {name}: path {src.path!r} matches no file")
