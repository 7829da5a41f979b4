"""What every Hotspots asset shares: run parameters and metadata helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import dagster as dg

from pipeline import build, warehouse
from pipeline.config import Config, parse_as_of


class RunParams(dg.Config):
    """Parameters of one run, the same for every asset of it."""

    as_of: str | None = None  # ISO 8601; wins over a tileset's own `as_of` (see build.decide_as_of)
    # when neither as_of nor the tileset's YAML says: the extraction's time (default: the run's start)
    default_as_of: str | None = None
    tilesets: list[str] = []  # tilesets to build; empty: all of them
    full_refresh: bool = False  # database sources: read everything, not only what changed
    force: bool = False  # publish even if a source or tileset lost its data (see pipeline.guard)


Context = dg.AssetExecutionContext | dg.AssetCheckExecutionContext


def run_start(context: Context) -> datetime:
    """When the run was created (UTC, whole seconds): the same in every step of a run."""
    record = context.instance.get_run_record_by_id(context.run_id)
    created = record.create_timestamp if record else datetime.now(UTC)
    return created.astimezone(UTC).replace(microsecond=0)


@contextmanager
def tileset_step(context: Context, cfg: Config, tileset: str, last: bool = False) -> Iterator[None]:
    """One step of this run on the tileset's work folder: another run's steps wait.

    Runs of one tileset (a CLI run, a scheduled run, a click in the UI) never
    interleave their steps; see :func:`pipeline.warehouse.run_step`.
    """
    with warehouse.run_step(build.lease_path(cfg, tileset), context.run.run_id, last=last):
        yield


def resolve_as_of(context: Context, params: RunParams, tileset_as_of: datetime | None = None) -> datetime:
    """This run's ``as_of`` for a step (a tileset's, with its YAML ``as_of``): see :func:`build.decide_as_of`."""
    given = parse_as_of(params.as_of) if params.as_of else None
    default = parse_as_of(params.default_as_of) if params.default_as_of else run_start(context)
    return build.decide_as_of(given, tileset_as_of, default)


def selected_sources(cfg: Config, params: RunParams) -> list[str]:
    unknown = sorted(set(params.tilesets) - set(cfg.tilesets))
    if unknown:
        raise dg.Failure(f"unknown tileset(s): {', '.join(unknown)} (known: {', '.join(cfg.tilesets)})")
    return cfg.sources_for(params.tilesets)


def markdown_table(header: list[str], rows: list[list[object]]) -> dg.MetadataValue:
    """A markdown table for asset metadata."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")
