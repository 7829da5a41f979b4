"""``hotspots``: run the pipeline from the command line.

``hotspots run [--config F] [--tileset T] [--as-of ISO]`` runs the Dagster
asset job in-process. Exit codes: 0 ok, 2 bad config or input path, 1 any
other failure. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import dagster as dg

from pipeline import build, extract, publish, warehouse
from pipeline.config import ConfigError, check_inputs, load_config, parse_as_of
from pipeline.errors import HotspotsError

from .location import EXTRACT_JOB, PUBLISH_JOB, build_definitions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotspots", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="extract, validate and publish (the whole asset job)")
    run.add_argument("--config", help="config file (default: $HOTSPOTS_CONFIG or ./hotspots.yaml)")
    run.add_argument("--tileset", action="append", default=[], help="only this tileset (repeatable)")
    run.add_argument("--as-of", help="ISO 8601 time the run is computed at (default: now)")
    run.add_argument("--full-refresh", action="store_true", help="database sources: read every row again")
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's step logs")
    serve = sub.add_parser("serve", help="serve the publish root (viewer at /index.html) like a static host")
    serve.add_argument("--config", help="config file (default: $HOTSPOTS_CONFIG or ./hotspots.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        return _serve(args) if args.command == "serve" else _run(args)
    except HotspotsError as exc:
        print(f"hotspots: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for name in args.tileset:
        if name not in cfg.tilesets:
            raise ConfigError("--tileset", f"unknown tileset {name!r} (known: {', '.join(cfg.tilesets)})")
    tilesets = args.tileset or list(cfg.tilesets)
    # one as_of for every run of this command, so its tilesets agree
    as_of = parse_as_of(args.as_of) if args.as_of else None
    sources = cfg.sources_for(tilesets)
    check_inputs(cfg, sources)
    extract.preflight(cfg, sources)

    defs = build_definitions(cfg.file)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    now = as_of or datetime.now(timezone.utc).replace(microsecond=0)
    params = {"as_of": as_of.isoformat() if as_of else None, "tilesets": tilesets, "full_refresh": args.full_refresh}
    if not _execute(defs, EXTRACT_JOB, params, instance, args.verbose)[0]:
        return 1
    _print_extraction(cfg, sources)
    for name in tilesets:
        # tileset as_of (YAML) applies unless --as-of was given
        ts_params = {**params, "as_of": (as_of or cfg.tilesets[name].as_of or now).isoformat()}
        # the job's steps take the tileset's lease (other runs of it wait); a job that
        # stops early hands it back here instead of letting it expire
        ok, run_id = _execute(defs, PUBLISH_JOB, ts_params, instance, args.verbose, partition=name)
        warehouse.release(build.lease_path(cfg, name), run_id)
        if not ok:
            return 1
        _print_tileset(cfg, name)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.serve import serve

    cfg = load_config(args.config)
    server = serve(cfg.output, args.host, args.port)
    print(f"serving {cfg.output} at http://{args.host}:{server.server_address[1]}/index.html", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _execute(defs, job_name, params, instance, verbose, partition=None) -> tuple[bool, str]:
    job = defs.resolve_job_def(job_name)
    run_config = {
        "ops": {node.name: {"config": params} for node in job.graph.node_defs if node.config_schema is not None},
        # failures are reported below in one line; -v shows Dagster's own logs
        "loggers": {"console": {"config": {"log_level": "INFO" if verbose else "CRITICAL"}}},
    }
    result = job.execute_in_process(
        run_config=run_config, instance=instance, partition_key=partition, raise_on_error=False
    )
    if result.success:
        return True, result.run_id
    for event in result.all_events:
        if event.is_step_failure:
            print(f"hotspots: step {event.step_key} failed: {_root_cause(event.step_failure_data.error)}",
                  file=sys.stderr)  # fmt: skip
    return False, result.run_id


def _root_cause(error) -> str:
    """The innermost error's first line; our own errors without their class name."""
    ours = {cls.__name__ for cls in (HotspotsError, *HotspotsError.__subclasses__())}
    while getattr(error, "cause", None) is not None and error.cls_name not in ours:
        error = error.cause
    message = error.message.strip().splitlines()[0] if error.message.strip() else error.cls_name
    return message.split(f"{error.cls_name}: ", 1)[-1] if error.cls_name in ours else message


def _print_extraction(cfg, sources: list[str]) -> None:
    print(f"{'source':<20} {'read':>10} {'valid':>10} {'rejected':>10}")
    for row in extract.conservation(cfg.warehouse_path, sources):
        print(f"{row.source:<20} {row.read:>10,} {row.valid:>10,} {row.rejected:>10,}")
    print(f"warehouse: {cfg.warehouse_path} (tables reports, rejected_reports)")


def _print_tileset(cfg, name: str) -> None:
    s = build.read_scoring(cfg, name)
    excluded = ", ".join(f"{r} {n:,}" for r, n in s["excluded"].items()) or "none"
    zooms = build.read_cells(cfg, name)
    print(f"tileset {name}: {s['scored']:,} scored, excluded: {excluded}; as_of {s['as_of']}")
    if zooms:
        print(f"  cells z{zooms[0]['z']}-z{zooms[-1]['z']}: "
              f"{sum(z['cells'] for z in zooms):,} cells -> {build.work_dir(cfg, name) / 'cells'}")
    latest = publish.read_latest(cfg, name)
    if latest:
        print(f"  published: {publish.tileset_root(cfg, name) / latest['path']} "
              f"(latest: {publish.tileset_root(cfg, name) / publish.LATEST})")


if __name__ == "__main__":
    sys.exit(main())
