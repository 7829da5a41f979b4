"""Per-tileset publishing assets: selection, tiles (staged), the snapshot; plus schedules.

No ``from __future__ import annotations``: Dagster reads the ``config:`` annotation.
"""

import json
import os
import socket
import time

import dagster as dg

from pipeline import freshness, publish, retention
from pipeline.errors import SourceError
from resources import HotspotsResource

from .common import RunParams, markdown_table, merge_run, planned_step, run_start, shard_step, zooms_check
from .extraction import REJECTED_SHARE_STEP
from .tilesets import SHARD


def publishing_assets(
    partitions: dg.PartitionsDefinition, shard_partitions: dg.PartitionsDefinition, upstream: dg.AssetsDefinition
) -> tuple[list, list]:
    """Selection, the shards' tiles (tileset x shard), tiles and snapshot assets (partitioned by tileset) and
    their checks."""

    @dg.asset(partitions_def=partitions, deps=[upstream], group_name="publish", kinds={"polars"})
    def selection(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Per zoom, each tile's and the overview's features: coverage of every stratum, then impact, every other
        cell folded into its nearest chosen one. The zooms whose tiles each lie in one shard were chosen by the
        shards: here they are put together, with their intensity.
        """
        started = time.perf_counter()
        with planned_step(context) as plan:
            zooms = publish.select_tileset(plan)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": sum(z.selected_tile for z in zooms),
                "zooms": markdown_table(
                    [
                        "z",
                        "cells",
                        "tile features",
                        "overview features",
                        "stratum zoom",
                        "coarsest",
                        "overview stratum",
                    ],
                    [
                        [
                            z.z,
                            z.cells,
                            z.selected_tile,
                            z.selected_overview,
                            z.stratum_zoom,
                            z.stratum_zoom_coarsest,
                            "" if z.overview_stratum_zoom is None else z.overview_stratum_zoom,
                        ]
                        for z in zooms
                    ],
                ),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )

    @dg.asset_check(asset=selection, partitions_def=partitions, blocking=True)
    def selection_holds(context: dg.AssetCheckExecutionContext):
        """Per zoom and tile: features <= budget, every non-empty stratum covered, no unchosen cell outscores an
        impact cell, features carry all reports (and the overview's too).
        """
        with planned_step(context) as plan:
            rows = publish.check_selection(plan)
        header = ["z", "fullest tile", "budget", "overview", "overview budget", "empty strata", "impact beaten"]
        return zooms_check(rows, [*header, "tiles unbalanced", "overview balanced"])

    @dg.asset(partitions_def=shard_partitions, deps=[selection], group_name="publish", kinds={"duckdb"})
    def shard_tiles(context: dg.AssetExecutionContext, config: RunParams) -> dg.MaterializeResult:
        """One shard's MVT tiles (the build's second wave of shards): at the zooms whose tiles it chose, every
        tile in its range, with the zoom's intensity and its neighbours' buffered rows, kept in the shard's
        tile cache (`<home>/work/<tileset>/tile-cache/shard-<i>/`, private), where tiles whose rows are
        unchanged come from and the archive reads them. Shards run in any order, on any executor.
        """
        key = context.partition_key.keys_by_dimension
        tileset, i = key["tileset"], int(key[SHARD])
        started = time.perf_counter()
        with shard_step(context, tileset, i, config.build, owner=merge_run(context, tileset)) as plan:
            if i >= len(plan.shards):
                return dg.MaterializeResult(metadata={"dagster/row_count": 0, "in_plan": False})
            done = publish.encode_shard(plan, i)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": sum(z["tiles"] for z in done["zooms"]),
                "in_plan": True,
                "encoded": done["encoded"],
                "from the tile cache": done["reused"],
                "laid out and compared": done["compared"],
                "zooms": markdown_table(
                    ["z", "MVT tiles"], [[z["z"], z["tiles"]] for z in done["zooms"]] or [["none", 0]]
                ),
                "process": f"{socket.gethostname()}:{os.getpid()}",  # which worker ran it
                "seconds": round(time.perf_counter() - started, 3),
            }
        )

    @dg.asset(
        partitions_def=partitions,
        deps=[selection, shard_tiles],
        group_name="publish",
        kinds={"geojson", "parquet", "pmtiles"},
    )
    def tiles(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The snapshot's public files, written into `output/<tileset>/snapshots/.tmp-<token>/`: cells
        GeoParquet, overview GeoJSON, heatmap.pmtiles (every zoom, streamed: the shards' tiles and the
        overview zooms', encoded here) and the per-tile folders `formats` asks for (GeoJSON tiles, MVT tiles
        and tiles.json). Files identical to the live snapshot's are hard links to them.
        """
        started = time.perf_counter()
        with planned_step(context, takes_over=True, build=merge_run(context, context.partition_key)) as plan:
            staged = publish.stage_snapshot(plan)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": sum(z["tiles"] for z in staged["zooms"]),
                "zooms": markdown_table(
                    [
                        "z",
                        "tiles",
                        "tile bytes",
                        "MVT tiles",
                        "MVT bytes",
                        "largest MVT",
                        "overview bytes",
                        "cells bytes",
                    ],
                    [
                        [
                            z["z"],
                            z["tiles"],
                            z["tile_bytes"],
                            z["mvt_tiles"],
                            z["mvt_bytes"],
                            z["mvt_max_tile_bytes"],
                            z["overview_bytes"],
                            z["cells_bytes"],
                        ]
                        for z in staged["zooms"]
                    ],
                ),
                "pmtiles_bytes": staged["pmtiles_bytes"],
                "folders maxzoom": str(staged["folders"]),
                "files": len(staged["digests"]),
                "shared with the live snapshot": "{files} files, {bytes:,} bytes".format(**staged["shared"]),
                "staging": dg.MetadataValue.path(staged["path"]),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )

    @dg.asset(partitions_def=partitions, deps=[tiles], group_name="publish", kinds={"json"})
    def snapshot(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The published snapshot: manifest, atomic rename to `snapshots/<id>/`, `latest.json` replaced
        atomically, old snapshots pruned.
        """
        with planned_step(context, last=True) as plan:
            snap = publish.finalize_snapshot(plan)
        return dg.MaterializeResult(
            metadata={
                "snapshot_id": snap.snapshot_id,
                "files": snap.files,
                "bytes": snap.bytes,
                "reused": snap.reused,
                "pruned": ", ".join(snap.pruned) or "none",
                "path": dg.MetadataValue.path(str(snap.path)),
                "latest": dg.MetadataValue.path(str(plan.published.latest)),
            }
        )

    @dg.asset_check(asset=snapshot, partitions_def=partitions, blocking=True)
    def latest_is_complete(context: dg.AssetCheckExecutionContext):
        """latest.json names a complete snapshot: its manifest and every file it counts are there."""
        with planned_step(context, lease=False) as plan:
            problem = publish.verify_latest(plan.published)
        return dg.AssetCheckResult(passed=problem is None, metadata={"problem": problem or "none"})

    return [selection, shard_tiles, tiles, snapshot], [selection_holds, latest_is_complete]


@dg.op(description="Delete warehouse reports older than their source's tilesets can use; prune snapshots.")
def retain(context: dg.OpExecutionContext, hotspots: HotspotsResource) -> None:
    done = retention.retain(hotspots.load(), run_start(context))
    context.log.info(f"retention: deleted {done['deleted']}, pruned {done['pruned']}")


@dg.job(name="retention", description="Nightly retention (seed 001's pg_cron job at 02:00 UTC).")
def retention_job():
    retain()


def _schedule(name: str, cron: str, job, description: str | None = None) -> dg.ScheduleDefinition:
    # On by default, in UTC: Hotspots is a scheduled batch; `dagster dev` runs them (turn off in the UI)
    return dg.ScheduleDefinition(
        name=name,
        cron_schedule=cron,
        execution_timezone="UTC",
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )


CHAIN_INTERVAL_S = 5  # the sensors that carry a build on look this often: a build waits at most this per step


def _sensor(name: str, status: dg.DagsterRunStatus, watched, requested, description: str):
    """A sensor (on by default) that runs ``requested`` when a run of ``watched`` reaches ``status``."""
    return dg.run_status_sensor(
        run_status=status,
        monitored_jobs=[watched],
        request_job=requested,
        name=name,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
        minimum_interval_seconds=CHAIN_INTERVAL_S,
    )


FRESH_TAG = "hotspots/fresh"  # the sources an extraction launched by `fresh_sources` reads
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def fresh_sources_sensor(extract_job, interval_s: int) -> dg.SensorDefinition:
    """``fresh_sources``: every ``interval_s`` seconds, a token of each source (see
    :mod:`pipeline.freshness`); an extraction of the tilesets of the sources whose token changed."""

    @dg.sensor(
        name="fresh_sources",
        job=extract_job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Every {interval_s} s (`freshness_interval_s`), look at each source (a file source's folder, a "
        "database's max(watermark) and row count); when one has something new, extract it: "
        "`publish_after_extract` then builds the tilesets that read it.",
    )
    def fresh_sources(context: dg.SensorEvaluationContext, hotspots: HotspotsResource):
        if _active_fresh_runs(context.instance, extract_job.name):
            # the cursor stays: what changed meanwhile is seen once it is done
            return dg.SkipReason("an extraction it launched is still running")
        cfg = hotspots.load()
        before = json.loads(context.cursor) if context.cursor else {}
        now = {}
        for name in sorted(cfg.sources):
            try:
                now[name] = freshness.token(cfg, name, before.get(name))
            except SourceError as exc:  # looked at again next time
                context.log.warning(str(exc))
                now[name] = before.get(name)
        changed = [n for n, t in now.items() if t is not None and t != before.get(n)]
        context.update_cursor(json.dumps(now, sort_keys=True))
        tilesets = sorted(t for t, ts in cfg.tilesets.items() if ts.source in changed)
        if not tilesets:
            return dg.SkipReason("no source a tileset reads has anything new")
        job = context.repository_def.get_job(extract_job.name)  # its assets' and checks' ops take the same config
        ops = [node.name for node in job.graph.node_defs if node.config_schema is not None]
        return dg.RunRequest(
            run_config={"ops": {op: {"config": {"tilesets": tilesets}} for op in ops}},
            tags={FRESH_TAG: ",".join(sorted({cfg.tilesets[t].source for t in tilesets}))},
        )

    return fresh_sources


def _active_fresh_runs(instance: dg.DagsterInstance, job_name: str) -> int:
    runs = instance.get_runs(dg.RunsFilter(job_name=job_name, statuses=ACTIVE))
    return sum(FRESH_TAG in run.tags for run in runs)


BUILD_TAG, SHARDS_TAG, TILESET_TAG = "hotspots/build", "hotspots/shards", "hotspots/tileset"


def schedules_and_sensors(
    extract_job,
    plan_job,
    shard_job,
    merge_job,
    shard_tiles_job,
    publish_job,
    partitions: dg.StaticPartitionsDefinition,
    freshness_s: int,
) -> list:
    """``hourly_publish`` (seed 000's hourly snapshot), ``nightly_retention``, ``fresh_sources``
    (an extraction when a source has something new), and the sensors that carry a build
    on: extraction -> each tileset's plan -> its shards -> the merge and selection -> its shards' tiles
    -> its publication."""
    hourly = _schedule(
        "hourly_publish",
        "0 * * * *",
        extract_job,
        "Extract every source; `publish_after_extract` then plans each tileset's build.",
    )
    nightly = _schedule("nightly_retention", "0 2 * * *", retention_job)

    def publish_requests(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        if run.tags.get("hotspots/launched_by") == "cli":
            return  # `hotspots run` publishes its own extraction
        params = next(iter((run.run_config.get("ops") or {}).values()), {}).get("config", {})
        record = context.instance.get_run_record_by_id(run.run_id)
        # the extraction's time is only the default: a tileset's own YAML as_of still wins,
        # unless the extraction was given one (as `hotspots run --as-of` overrides the YAML)
        extracted_at = params.get("as_of") or record.create_timestamp.replace(microsecond=0).isoformat()
        tilesets = params.get("tilesets") or partitions.get_partition_keys()
        for name in tilesets:
            config = {"as_of": params.get("as_of"), "default_as_of": extracted_at, "tilesets": [name]}
            yield dg.RunRequest(
                run_key=f"{run.run_id}:{name}",
                partition_key=name,
                run_config={"ops": {"build_plan": {"config": config}}},
            )

    @_sensor(
        "publish_after_extract",
        dg.DagsterRunStatus.SUCCESS,
        extract_job,
        plan_job,
        "After an extraction, plan the build of each tileset it read; its time is their default as_of.",
    )
    def publish_after_extract(context: dg.RunStatusSensorContext):
        yield from publish_requests(context)

    @_sensor(
        "publish_after_partial_extract",
        dg.DagsterRunStatus.FAILURE,
        extract_job,
        plan_job,
        "An extraction whose reports were validated but whose `rejected_share` check failed "
        "(a source lost its data): publish its tilesets anyway; each tileset's blocking `publish_guard` "
        "keeps the live snapshot of a tileset whose source lost its data, and the others are published.",
    )
    def publish_after_partial_extract(context: dg.RunStatusSensorContext):
        failures = context.instance.all_logs(context.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        if {event.step_key for event in failures} != {REJECTED_SHARE_STEP}:
            return  # extraction itself failed (the warehouse kept what it had), or conservation did
        yield from publish_requests(context)

    @_sensor(
        "shards_after_plan",
        dg.DagsterRunStatus.SUCCESS,
        plan_job,
        shard_job,
        "After a tileset's plan, run each of its shards (a run each: the executor and run "
        "coordinator decide how many at once).",
    )
    def shards_after_plan(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        if run.tags.get("hotspots/launched_by") == "cli":
            return
        tileset = run.tags["dagster/partition"]
        events = context.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        n = next(int(e.asset_materialization.metadata["shards"].value) for e in events)
        yield from each_shard({BUILD_TAG: run.run_id, SHARDS_TAG: str(n), TILESET_TAG: tileset}, "")

    def each_shard(tags: dict, step: str):
        """A run per shard of the build ``tags`` name (its run keys: the build, ``step``, the shard)."""
        for i in range(int(tags[SHARDS_TAG])):
            yield dg.RunRequest(
                run_key=f"{tags[BUILD_TAG]}:{step}{i}",
                partition_key=dg.MultiPartitionKey({"tileset": tags[TILESET_TAG], "shard": str(i)}),
                tags={k: tags[k] for k in (BUILD_TAG, SHARDS_TAG, TILESET_TAG)},
            )

    def all_done(context: dg.RunStatusSensorContext, job, then: str):
        """A run of ``then`` once every shard run of ``job`` in the build has succeeded."""
        tags = context.dagster_run.tags
        if BUILD_TAG not in tags:
            return  # a shard run by hand: its tileset is carried on by hand too
        done = context.instance.get_runs_count(
            dg.RunsFilter(job_name=job.name, tags={BUILD_TAG: tags[BUILD_TAG]}, statuses=[dg.DagsterRunStatus.SUCCESS])
        )
        if done >= int(tags[SHARDS_TAG]):
            yield dg.RunRequest(
                run_key=f"{tags[BUILD_TAG]}:{then}",
                partition_key=tags[TILESET_TAG],
                tags={k: tags[k] for k in (BUILD_TAG, SHARDS_TAG, TILESET_TAG)},
            )

    @_sensor(
        "merge_after_shards",
        dg.DagsterRunStatus.SUCCESS,
        shard_job,
        merge_job,
        "Once every shard of a build has run, merge its tileset's shards and choose its tiles.",
    )
    def merge_after_shards(context: dg.RunStatusSensorContext):
        yield from all_done(context, shard_job, "merge")

    @_sensor(
        "tiles_after_merge",
        dg.DagsterRunStatus.SUCCESS,
        merge_job,
        shard_tiles_job,
        "Once a build's tiles are chosen, each of its shards encodes its own (a run each).",
    )
    def tiles_after_merge(context: dg.RunStatusSensorContext):
        tags = context.dagster_run.tags
        if BUILD_TAG not in tags or SHARDS_TAG not in tags:
            return  # merged by hand: its tiles are encoded by hand too
        yield from each_shard(tags, "tiles:")

    @_sensor(
        "publish_after_tiles",
        dg.DagsterRunStatus.SUCCESS,
        shard_tiles_job,
        publish_job,
        "Once every shard of a build has encoded its tiles, put the archive together and publish the snapshot.",
    )
    def publish_after_tiles(context: dg.RunStatusSensorContext):
        yield from all_done(context, shard_tiles_job, "publish")

    return [
        hourly,
        nightly,
        fresh_sources_sensor(extract_job, freshness_s),
        publish_after_extract,
        publish_after_partial_extract,
        shards_after_plan,
        merge_after_shards,
        tiles_after_merge,
        publish_after_tiles,
    ]
