"""Sources: where reports come from, each staged into ``raw_reports`` as text."""

from __future__ import annotations

import tempfile
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import duck, paths
from ..config import Config, FileSource, PostgresSource, SyntheticSource
from .files import FetchedFile, check_columns, fetch_files, stage_files
from .postgres import Fetched, fetch, stage_fetched
from .staging import FileResult, literal, stage_relation
from .synthetic import batches

__all__ = ["FileResult", "check_source_columns", "prefetch", "stage_source"]


def prefetch(
    con: duckdb.DuckDBPyConnection, name: str, cfg: Config, as_of: datetime, full_refresh: bool = False
) -> Fetched | list[FetchedFile] | None:
    """Read a source before the write transaction, so that a failing read
    cannot abort it: each file into a temporary table, or a database's rows
    (changed since its last read, unless ``full_refresh``); None for synthetic."""
    src = cfg.sources[name]
    if isinstance(src, FileSource):
        return fetch_files(con, name, src)
    if not isinstance(src, PostgresSource):
        return None
    duck.load_postgres(con, paths.duckdb_extensions(cfg.home))
    row = con.execute("SELECT watermark FROM source_state WHERE source = ?", [name]).fetchone()
    return fetch(con, name, src, as_of, full_refresh, row[0] if row else None)


def stage_source(
    con: duckdb.DuckDBPyConnection,
    name: str,
    cfg: Config,
    as_of: datetime,
    fetched: Fetched | list[FetchedFile] | None = None,
) -> list[FileResult]:
    """Replace the source's rows in ``raw_reports`` with a fresh read
    (a database source: with what :func:`prefetch` read).

    Returns one :class:`FileResult` per file (or synthetic batch, or query).
    """
    src = cfg.sources[name]
    if isinstance(src, PostgresSource):
        results, mark = stage_fetched(con, name, src, fetched, as_of)
        con.execute("DELETE FROM source_state WHERE source = ?", [name])
        con.execute("INSERT INTO source_state VALUES (?, ?, ?)", [name, mark, as_of])
        con.execute(f"DROP TABLE {fetched.table}")
        return results
    con.execute("DELETE FROM raw_reports WHERE source = ?", [name])
    if isinstance(src, FileSource):
        return stage_files(con, name, src, fetched)
    if isinstance(src, SyntheticSource):
        results = []
        label = f"synthetic:{src.domain}:seed={src.seed}:count={src.count}"
        with tempfile.TemporaryDirectory(prefix="hotspots-synthetic-") as tmp:
            for first, table in batches(src, as_of):  # a batch at a time: never every row in memory
                # through a file: a registered Python table would stay in memory until the
                # transaction ends (duckdb-python#469); rows numbered in the batch's order
                path = f"{tmp}/batch.parquet"
                numbers = pa.array(np.arange(first + 1, first + 1 + table.num_rows))
                pq.write_table(table.append_column("_row", numbers), path, compression="none")
                rows = table.num_rows
                part = label if rows == src.count else f"{label}:rows={first + 1}-{first + rows}"
                mapping = {c: c for c in table.column_names}
                del table
                relation = f"(SELECT * FROM read_parquet({literal(path)}))"
                results.append(stage_relation(con, name, part, relation, mapping, src.entity_type or name))
        return results
    raise TypeError(f"unknown source kind {type(src).__name__}")


def check_source_columns(con: duckdb.DuckDBPyConnection, cfg: Config, names: list[str]) -> None:
    """Raise :class:`~pipeline.errors.ConfigError` for a mapped column no file has."""
    for name in names:
        src = cfg.sources[name]
        if isinstance(src, FileSource):
            check_columns(con, name, src)
