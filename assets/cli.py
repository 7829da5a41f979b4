"""``hotspots``: run the pipeline from the command line.

``hotspots run [--config F] [--tileset T] [--as-of ISO] [--force]`` runs the
Dagster asset jobs in-process; ``hotspots serve`` serves the publish root;
``hotspots rejected SOURCE`` shows rejected rows. Exit codes: 0 ok, 2 bad
config or input path, 1 any other failure (a source or tileset that lost its
data included). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import multiprocessing
import os
import secrets
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from pipeline import build, extract, guard, paths, plan, publish, warehouse
from pipeline.config import ConfigError, check_inputs, load_config, parse_as_of
from pipeline.errors import HotspotsError, InputPathError, PlanError

from .extraction import REJECTED_SHARE_STEP
from .location import EXTRACT_JOB, MERGE_JOB, PLAN_JOB, PUBLISH_JOB, SHARD_JOB, SHARD_TILES_JOB, build_definitions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotspots", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="extract, validate and publish (the whole asset job)")
    run.add_argument("--config", help="config file (default: $HOTSPOTS_CONFIG or ./hotspots.yaml)")
    run.add_argument("--tileset", action="append", default=[], help="only this tileset (repeatable)")
    run.add_argument("--as-of", help="ISO 8601 time the run is computed at (default: now)")
    run.add_argument(
        "--full-refresh",
        action="store_true",
        help="read every file and every database row again (by default only new and changed ones)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="publish even if a source or tileset lost its data (see max_rejected_fraction)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's step logs")
    serve = sub.add_parser("serve", help="serve the publish root (viewer at /index.html) like a static host")
    serve.add_argument("--config", help="config file (default: $HOTSPOTS_CONFIG or ./hotspots.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    rejected = sub.add_parser("rejected", help="sample rejected rows of a source: file, line, reason, raw fields")
    rejected.add_argument("source")
    rejected.add_argument("--config", help="config file (default: $HOTSPOTS_CONFIG or ./hotspots.yaml)")
    rejected.add_argument("--reason", help="only rows rejected for this reason")
    rejected.add_argument("--limit", type=int, default=10, help="rows to show (default 10)")
    args = parser.parse_args(argv)
    commands = {"run": _run, "serve": _serve, "rejected": _rejected}
    try:
        return commands[args.command](args)
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
    with _instance(cfg) as instance:
        return _run_jobs(args, cfg, defs, instance, tilesets, sources, as_of)


def _instance(cfg) -> dg.DagsterInstance:
    """The Dagster instance `make dev` shows: ``$DAGSTER_HOME``, else ``<home>/dagster``.

    Every CLI run is recorded there, with its metadata and check results.
    """
    home = os.environ.get("DAGSTER_HOME")
    folder = Path(home) if home else paths.dagster_instance(cfg.home)
    folder.mkdir(parents=True, exist_ok=True)
    # Dagster creates its SQLite schema on first open without a lock: two commands
    # opening a new instance at once can both stamp it and leave it unusable
    with open(folder / ".hotspots-open.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dg.DagsterInstance.get() if home else dg.DagsterInstance.local_temp(str(folder))


def _run_jobs(args, cfg, defs, instance, tilesets: list[str], sources: list[str], as_of) -> int:
    now = as_of or datetime.now(UTC).replace(microsecond=0)
    # one time for the whole command: extraction and every tileset (unless its YAML says)
    params = {
        "as_of": as_of.isoformat() if as_of else None,
        "default_as_of": now.isoformat(),
        "tilesets": tilesets,
        "full_refresh": args.full_refresh,
        "force": args.force,
    }
    ok, _, failures = _execute(defs, EXTRACT_JOB, params, instance, args.verbose)
    # a source that lost its data fails the `rejected_share` check after validation:
    # its tilesets are not published, the others are
    if not ok and (not failures or any(step != REJECTED_SHARE_STEP for step, _ in failures)):
        _say_failures(failures)
        return 1
    lost = {} if args.force else _lost_sources(cfg, sources)
    _print_extraction(cfg, sources)
    for loss in lost.values():
        print(f"hotspots: {loss}", file=sys.stderr)
    failed = bool(lost)
    with ExitStack() as stack:
        shard_runner = _ShardRunner(cfg, args.verbose, stack)
        for name in tilesets:
            if cfg.tilesets[name].source in lost:
                continue
            ok, failures = _build(defs, cfg, name, params, instance, args.verbose, shard_runner)
            if not ok:
                loss = None if args.force else _tileset_loss(cfg, name)
                if loss is None:
                    _say_failures(failures)
                    return 1
                print(f"hotspots: {loss}", file=sys.stderr)
                failed = True
                continue
            _print_tileset(cfg, name)
    if not failed:
        print(f"map: `hotspots serve{_config_flag(args)}` (make serve), then open http://127.0.0.1:8000/index.html")
    return 1 if failed else 0


def _build(defs, cfg, name: str, params: dict, instance, verbose: bool, shard_runner) -> tuple[bool, list]:
    """One tileset's build: its plan, its shards (side by side), the merge and selection, the shards' tiles
    (side by side), then the publication.

    The runs hold the tileset's lease under one build name (the merge's
    run, and the shards' tiles after it, under the merge run's), so another
    build of it (another command, a scheduled run) waits for the whole build;
    a build that stops early hands the lease back here instead of letting it expire.
    """
    params = {**params, "build": f"cli-{secrets.token_hex(8)}"}
    lease, holders = cfg.work(name).lease, [params["build"]]
    try:
        ok, run_id, failures = _execute(defs, PLAN_JOB, params, instance, verbose, partition=name)
        if not ok:
            return False, failures
        shards = [dg.MultiPartitionKey({"tileset": name, "shard": str(i)}) for i in range(_shard_count(cfg, name))]
        for job in (SHARD_JOB, MERGE_JOB, SHARD_TILES_JOB, PUBLISH_JOB):
            if job in (SHARD_JOB, SHARD_TILES_JOB):
                results = shard_runner.run(defs, job, params, instance, shards)
            else:
                results = [_execute(defs, job, params, instance, verbose, partition=name)]
                holders.append(results[0][1])  # the lease passes to it
            if not all(ok for ok, _, _ in results):
                return False, [f for ok, _, fs in results for f in fs]
        return True, []
    finally:
        for holder in holders:
            warehouse.release(lease, holder)


def _shard_count(cfg, name: str) -> int:
    return len(plan.read(cfg.work(name).plan).shards)


class _ShardRunner:
    """Runs a build's shards: one in this process, more side by side in worker processes (one per core).

    Each shard is a run of the ``shard`` job (a partition), recorded in the
    same Dagster instance, as a deployment's run launcher would run them.
    """

    def __init__(self, cfg, verbose: bool, stack: ExitStack) -> None:
        self.cfg, self.verbose, self.stack, self.pool = cfg, verbose, stack, None

    def run(self, defs, job: str, params: dict, instance, keys: list) -> list[tuple[bool, str, list]]:
        workers = min(len(keys), os.cpu_count() or 1)
        if workers <= 1:
            return [_execute(defs, job, params, instance, self.verbose, partition=k) for k in keys]
        if self.pool is None:  # started once per command: each worker loads the definitions once
            context = multiprocessing.get_context("spawn")  # no fork of a process holding DuckDB and Dagster
            self.pool = self.stack.enter_context(
                ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_worker_start, initargs=(str(self.cfg.file),)
                )
            )
        return list(self.pool.map(_worker_shard, [(job, params, k, self.verbose) for k in keys]))


_WORKER: dict = {}


def _worker_start(config: str) -> None:
    cfg = load_config(config)
    _WORKER.update(defs=build_definitions(cfg.file), instance=_instance(cfg))


def _worker_shard(task: tuple) -> tuple[bool, str, list]:
    job, params, key, verbose = task
    return _execute(_WORKER["defs"], job, params, _WORKER["instance"], verbose, partition=key)


def _lost_sources(cfg, sources: list[str]) -> dict:
    lost = {}
    for name in sources:
        counts = extract.source_counts(cfg.warehouse_path, name)
        loss = guard.source_loss(cfg, name, counts["read"], counts["rejected"])
        if loss:
            lost[name] = loss
    return lost


def _tileset_loss(cfg, name: str):
    work = cfg.work(name)
    try:
        return guard.guard_tileset(plan.read(work.plan), build.read_scoring(work))
    except (OSError, ValueError, KeyError, PlanError):
        return None  # scoring did not finish: the step failure says why


def _config_flag(args: argparse.Namespace) -> str:
    return f" --config {args.config}" if args.config else ""


def _rejected(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.source not in cfg.sources:
        raise ConfigError("source", f"unknown source {args.source!r} (known: {', '.join(cfg.sources)})")
    if args.limit < 0:
        raise ConfigError("--limit", f"must be >= 0, got {args.limit}")
    if not cfg.warehouse_path.exists():
        raise InputPathError(f"no warehouse at {cfg.warehouse_path}: run `hotspots run` first")
    counts = extract.source_counts(cfg.warehouse_path, args.source)
    reasons = counts["rejected"]
    if args.reason and args.reason not in reasons:
        known = ", ".join(f"{r} {n:,}" for r, n in guard.top_reasons(reasons, len(reasons))) or "none"
        raise ConfigError(
            "--reason", f"no row of source {args.source} was rejected for {args.reason!r} (reasons: {known})"
        )
    total = sum(reasons.values())
    print(f"source {args.source}: {total:,} of {counts['read']:,} rows rejected")
    for reason, n in guard.top_reasons(reasons, len(reasons)):
        print(f"  {reason:<28} {n:>10,}")
    for file, error in extract.unreadable_files(cfg.warehouse_path, args.source):
        print(f"  unreadable file {_printable(file)}: {_printable(error)}")
    rows = extract.rejected_rows(cfg.warehouse_path, args.source, args.reason, args.limit)
    if rows:
        print(f"{'file':<40} {'line':>7}  {'reason':<24} fields")
    for row in rows:
        fields = ", ".join(f"{k}={_printable(v, 60)}" for k, v in row.fields.items())
        print(f"{_printable(row.file, 40, tail=True):<40} {row.line:>7}  {row.reason:<24} {fields}")
    return 0


def _printable(value: object, width: int | None = None, tail: bool = False) -> str:
    """Untrusted text for a terminal: control characters escaped (no escape
    sequence from the data reaches the terminal), long values cut (``tail``:
    keep the end, as for a path)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    if width and len(text) > width:
        text = "…" + text[len(text) - width + 1 :] if tail else text[: width - 1] + "…"
    return text


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


# The CLI publishes its own extraction: the publishing sensors (when `make dev`'s
# daemon runs on the same instance) leave runs with this tag alone.
CLI_TAGS = {"hotspots/launched_by": "cli"}


def _execute(defs, job_name, params, instance, verbose, partition=None) -> tuple[bool, str, list]:
    """Run a job in-process; (success, run id, [(failed step, its root cause)])."""
    job = defs.resolve_job_def(job_name)
    run_config = {
        "ops": {node.name: {"config": params} for node in job.graph.node_defs if node.config_schema is not None},
        # failures are reported in one line; -v shows Dagster's own logs
        "loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}},
    }
    result = job.execute_in_process(
        run_config=run_config, instance=instance, partition_key=partition, raise_on_error=False, tags=CLI_TAGS
    )
    failures = [
        (event.step_key, _root_cause(event.step_failure_data.error))
        for event in result.all_events
        if event.is_step_failure
    ]
    return result.success, result.run_id, failures


def _say_failures(failures: list) -> None:
    for step, cause in failures:
        print(f"hotspots: step {step} failed: {cause}", file=sys.stderr)


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
        reasons = extract.source_counts(cfg.warehouse_path, row.source)["rejected"]
        if reasons:
            print(f"  rejected: {guard.reasons_text(reasons)} (`hotspots rejected {row.source}` shows them)")
        for file, error in extract.unreadable_files(cfg.warehouse_path, row.source):
            print(f"  skipped unreadable file {_printable(file)}: {_printable(error)}")
    print(f"warehouse: {cfg.warehouse_path} (tables reports, rejected_reports)")


def _print_tileset(cfg, name: str) -> None:
    work, published = cfg.work(name), cfg.published(name)
    s = build.read_scoring(work)
    excluded = ", ".join(f"{r} {n:,}" for r, n in guard.top_reasons(s["excluded"], len(s["excluded"]))) or "none"
    zooms = build.read_cells(work)
    print(f"tileset {name}: {s['scored']:,} scored, excluded: {excluded}; as_of {s['as_of']}")
    if zooms:
        print(
            f"  cells z{zooms[0]['z']}-z{zooms[-1]['z']}: {sum(z['cells'] for z in zooms):,} cells -> {work.cells_root}"
        )
    latest = publish.read_latest(published)
    if latest:
        print(f"  published: {published.root / latest['path']} (latest: {published.latest})")


def command() -> None:
    """The ``hotspots`` command: :func:`main`, then exit with its code.

    The objects a build made are left to the operating system: the
    interpreter's last garbage collection would walk every one of them first
    (two thirds of a second after a world build) for a process that is ending.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
