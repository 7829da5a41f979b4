"""The warehouse file: who may open it, and when.

Connections come from :func:`pipeline.duck.connect` (one set of settings in
every process). Across processes, :func:`writer` and :func:`reader` serialise access with an
advisory lock beside the database file (exclusive for writers, shared for
readers), so a Dagster run beside a CLI run waits instead of failing on
DuckDB's own lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from . import atomic, tilemath
from .defaults import DEFAULTS
from .duck import connect
from .errors import WarehouseBusyError
from .schema import TABLES, ddl


@contextmanager
def file_lock(path: Path, exclusive: bool = True, timeout: float = DEFAULTS.lock_timeout_s) -> Iterator[None]:
    """An advisory lock on ``path`` (created), across processes; waits up to ``timeout``."""
    with _locked(path.with_suffix(".db"), exclusive, timeout):
        yield


LEASE_S = 60.0  # longer than the gap between two steps of a run; a killed run frees it after this


@contextmanager
def run_step(
    path: Path,
    run_id: str,
    *,
    last: bool = False,
    joins: str | None = None,
    timeout: float = DEFAULTS.lock_timeout_s,
) -> Iterator[None]:
    """Run one step of run ``run_id`` on something all the steps of a run share.

    A run's steps hand files to each other (a tileset's work folder), so the
    steps of two runs must not interleave. The step holds ``path``'s lock
    while it works, and a *lease* (``path``, naming the run) bridges the gaps
    between the run's steps: other runs wait until the run's ``last`` step
    or a failing step releases it, or until it expires (a killed run).

    ``joins`` names the holder whose work this run continues (a build's
    plan and shard runs hold the lease under the build's name; its publish
    run joins it): the lease passes to ``run_id`` instead of waiting.

    Raises
    ------
    WarehouseBusyError
        If another run kept it for longer than ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        with file_lock(path, timeout=max(deadline - time.monotonic(), 0.0)):
            holder = _read_lease(path)
            ours = holder is not None and holder.get("run_id") in (run_id, joins)
            if holder is None or ours or holder.get("expires", 0) < time.time():
                _write_lease(path, run_id)
                try:
                    yield
                except BaseException:
                    path.unlink(missing_ok=True)  # the run stops here: its later steps will not come
                    raise
                if last:
                    path.unlink(missing_ok=True)
                else:
                    _write_lease(path, run_id)  # the gap to the next step starts now
                return
        if time.monotonic() >= deadline:
            who = holder.get("run_id")
            raise WarehouseBusyError(f"{path.with_suffix('')} is busy: run {who} held it for {timeout:.0f} s")
        time.sleep(0.2)


def release(path: Path, run_id: str) -> None:
    """Release ``run_id``'s lease on ``path`` (a run that ends before its last step)."""
    with file_lock(path):
        holder = _read_lease(path)
        if holder is not None and holder.get("run_id") == run_id:
            path.unlink(missing_ok=True)


def _read_lease(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # not a lease we wrote: nobody's
        return None


def _write_lease(path: Path, run_id: str) -> None:
    lease = {"run_id": run_id, "pid": os.getpid(), "expires": time.time() + LEASE_S}
    atomic.write_bytes(path, json.dumps(lease).encode())


@contextmanager
def _locked(db: Path, exclusive: bool, timeout: float) -> Iterator[None]:
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_suffix(".lock"), "a+") as fh:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WarehouseBusyError(
                        f"{db.with_suffix('')} is busy: another run held its lock for {timeout:.0f} s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def writer(
    db: str | Path, timeout: float = DEFAULTS.lock_timeout_s, spatial: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Exclusive read-write connection to the warehouse, tables created; with the spatial extension
    only if asked (staging a source that needs it, see :func:`pipeline.sources.needs_spatial`)."""
    db = Path(db)
    with _locked(db, exclusive=True, timeout=timeout):
        con = connect(db, spatial=spatial)
        try:
            for table, columns in TABLES.items():
                con.execute(ddl(table))
                for name, typ in columns.items():  # a warehouse from an older version
                    con.execute(f'ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "{name}" {typ}')
            _fill_tile_keys(con)
            yield con
        finally:
            con.close()


def _fill_tile_keys(con: duckdb.DuckDBPyConnection) -> None:
    """Key the reports an older version wrote without one (a no-op once done)."""
    if con.execute("SELECT count(*) FROM reports WHERE tile_key IS NULL").fetchone()[0]:
        x, y, key = tilemath.tile_key_sql("lng", "lat")
        con.execute(
            f"""UPDATE reports SET tile_key = k.key FROM
                (SELECT rowid AS r, {key} AS key FROM (SELECT rowid, {x} AS _x, {y} AS _y FROM reports
                 WHERE tile_key IS NULL)) AS k WHERE reports.rowid = k.r"""
        )


@contextmanager
def reader(db: str | Path, timeout: float = DEFAULTS.lock_timeout_s) -> Iterator[duckdb.DuckDBPyConnection]:
    """Shared read-only connection to the warehouse (waits for writers), without the spatial extension."""
    db = Path(db)
    if not db.exists():
        raise FileNotFoundError(f"no warehouse at {db}: run the extraction first")
    with _locked(db, exclusive=False, timeout=timeout):
        con = connect(db, read_only=True, spatial=False)
        try:
            yield con
        finally:
            con.close()
