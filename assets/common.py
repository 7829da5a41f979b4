"""What every Hotspots asset shares: run parameters and metadata helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from pipeline import plan, warehouse
from pipeline.config import Config, parse_as_of
from pipeline.errors import PlanError
from pipeline.paths import Work

PLANNER = dg.AssetKey("build_plan")  # the first step of a build: it freezes the plan
SELECTOR = dg.AssetKey("selection")  # the merge's last step: its run's lease passes to the tiles


class RunParams(dg.Config):
    """Parameters of one run, the same for every asset of it."""

    as_of: str | None = None  # ISO 8601; wins over a tileset's own `as_of` (see plan.decide_as_of)
    # when neither as_of nor the tileset's YAML says: the extraction's time (default: the run's start)
    default_as_of: str | None = None
    tilesets: list[str] = []  # tilesets to build; empty: all of them
    full_refresh: bool = False  # read every file and database row again, not only what changed
    force: bool = False  # publish even if a source or tileset lost its data (see pipeline.guard)
    # the build this run is part of (its plan, shard and publish runs): they hold the
    # tileset's lease under this name, so another build's runs wait; default: the plan run's id
    build: str | None = None


Context = dg.AssetExecutionContext | dg.AssetCheckExecutionContext


def run_start(context: Context) -> datetime:
    """When the run was created (UTC, whole seconds): the same in every step of a run."""
    record = context.instance.get_run_record_by_id(context.run_id)
    created = record.create_timestamp if record else datetime.now(UTC)
    return created.astimezone(UTC).replace(microsecond=0)


@contextmanager
def work_step(
    context: Context, work: Work, last: bool = False, owner: str | None = None, joins: str | None = None
) -> Iterator[None]:
    """One step of this run on a build's work folder: another run's steps wait.

    Runs of one tileset (a CLI run, a scheduled run, a click in the UI) never
    interleave their steps; see :func:`pipeline.warehouse.run_step`. ``owner``:
    hold the lease under the build's name instead of this run's; ``joins``:
    take it over from that build.
    """
    with warehouse.run_step(work.lease, owner or context.run.run_id, last=last, joins=joins):
        yield


def freeze_plan(context: Context, params: RunParams, cfg: Config) -> plan.Plan:
    """The plan of this run's build of the partition's tileset, resolved from the config once.

    Only the first step (``build_plan``) calls this; it writes the plan
    into the work folder (under the lease) and names the file in its
    materialization, where every later step finds it.
    """
    name = context.partition_key
    if name not in cfg.tilesets:
        raise dg.Failure(f"tileset {name} is no longer in {cfg.file}: reload the code location")
    return plan.make(cfg, name, resolve_as_of(context, params, cfg.tilesets[name].as_of))


@contextmanager
def planned_step(
    context: Context, last: bool = False, lease: bool = True, takes_over: bool = False, build: str | None = None
) -> Iterator[plan.Plan]:
    """A later step of a build: the work folder's lease, and the plan its first step froze.

    ``last``: the build's last step hands the lease back; ``lease=False``: a
    check after it, which reads only what is published; ``takes_over``: the
    publish run's first step, which takes the lease over from its build
    (``build``, else the run that froze the plan).
    """
    work, plan_run = _latest_plan(context, context.partition_key)
    joins = (build or plan_run) if takes_over else None
    with work_step(context, work, last=last, joins=joins) if lease else nullcontext():
        yield plan.read(work.plan)


@contextmanager
def shard_step(
    context: Context, tileset: str, i: int, build: str | None, owner: str | None = None
) -> Iterator[plan.Plan]:
    """A shard's step: its build keeps the tileset's lease (another build waits), the shard its own
    (the build's shards run side by side); and the build's plan. ``owner``: who holds the tileset's
    lease meanwhile (default: the build, else the run that froze the plan)."""
    work, plan_run = _latest_plan(context, tileset)
    owner = owner or build or plan_run
    with warehouse.run_step(work.lease, owner):  # renew: another build cannot start meanwhile
        pass
    with warehouse.run_step(work.shard(i).lease, context.run.run_id, last=True):
        yield plan.read(work.plan)
    with warehouse.run_step(work.lease, owner):  # and the gap to the next shard or the merge
        pass


def merge_run(context: Context, tileset: str) -> str:
    """The run that put the tileset's latest selection together (the merge): the shards' encoding
    holds the tileset's lease in its name, and the publish run takes it over from it."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=SELECTOR, asset_partitions=[tileset]), limit=1
    ).records
    if not records:
        raise PlanError(f"tileset {tileset} has no selection yet: materialize {SELECTOR.to_user_string()}")
    return records[0].run_id


def _latest_plan(context: Context, tileset: str) -> tuple[Work, str]:
    """The work folder the tileset's latest plan was frozen in (named by its materialization), and
    the run that froze it (a build's name when none was given)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PLANNER, asset_partitions=[tileset]), limit=1
    ).records
    entry = records[0].asset_materialization.metadata.get("plan") if records else None
    if entry is None:
        raise PlanError(f"tileset {tileset} has no plan yet: materialize {PLANNER.to_user_string()}")
    return Work(Path(entry.value).parent), records[0].run_id


def resolve_as_of(context: Context, params: RunParams, tileset_as_of: datetime | None = None) -> datetime:
    """This run's ``as_of`` for a build (a tileset's, with its YAML ``as_of``): see :func:`plan.decide_as_of`."""
    given = parse_as_of(params.as_of) if params.as_of else None
    default = parse_as_of(params.default_as_of) if params.default_as_of else run_start(context)
    return plan.decide_as_of(given, tileset_as_of, default)


def selected_sources(cfg: Config, params: RunParams) -> list[str]:
    unknown = sorted(set(params.tilesets) - set(cfg.tilesets))
    if unknown:
        raise dg.Failure(f"unknown tileset(s): {', '.join(unknown)} (known: {', '.join(cfg.tilesets)})")
    return cfg.sources_for(params.tilesets)


def zooms_check(rows: list, header: list[str]) -> dg.AssetCheckResult:
    """Passes when every zoom's row ``holds``; the rows (NamedTuples, one column a field) as a table."""
    return dg.AssetCheckResult(
        passed=all(r.holds for r in rows),
        metadata={"zooms": markdown_table([*header, "holds"], [[*r, r.holds] for r in rows])},
    )


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
