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

import dagster as dg

from pipeline import extract
from pipeline.config import ConfigError, check_inputs, load_config, parse_as_of
from pipeline.errors import HotspotsError

from .definitions import JOB_NAME, build_definitions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotspots", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="extract, validate and publish (the whole asset job)")
    run.add_argument("--config", help="config file (default: $HOTSPOTS_CONFIG or ./hotspots.yaml)")
    run.add_argument("--tileset", action="append", default=[], help="only this tileset (repeatable)")
    run.add_argument("--as-of", help="ISO 8601 time the run is computed at (default: now)")
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's step logs")
    args = parser.parse_args(argv)
    try:
        return _run(args)
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
    as_of = parse_as_of(args.as_of).isoformat() if args.as_of else None
    sources = cfg.sources_for(args.tileset)
    check_inputs(cfg, sources)
    extract.preflight(cfg, sources)

    defs = build_definitions(cfg.file)
    job = defs.resolve_job_def(JOB_NAME)
    params = {"as_of": as_of, "tilesets": args.tileset}
    ops = [node.name for node in job.graph.node_defs]
    run_config = {
        "ops": {op: {"config": params} for op in ops if _takes_params(job, op)},
        "loggers": {"console": {"config": {"log_level": "INFO" if args.verbose else "WARNING"}}},
    }
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"hotspots: step {event.step_key} failed: {event.step_failure_data.error.message.strip()}",
                      file=sys.stderr)
        return 1
    _summary(cfg, sources)
    return 0


def _takes_params(job: dg.JobDefinition, op: str) -> bool:
    return job.graph.node_named(op).definition.config_schema is not None


def _summary(cfg, sources: list[str]) -> None:
    print(f"{'source':<20} {'read':>10} {'valid':>10} {'rejected':>10}")
    for row in extract.conservation(cfg.warehouse_path, sources):
        print(f"{row.source:<20} {row.read:>10,} {row.valid:>10,} {row.rejected:>10,}")
    print(f"warehouse: {cfg.warehouse_path} (tables reports, rejected_reports)")


if __name__ == "__main__":
    sys.exit(main())
