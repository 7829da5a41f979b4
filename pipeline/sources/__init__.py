"""Sources: where reports come from, each staged into ``raw_reports`` as text."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import duck, paths
from ..config import Config, FileSource, PostgresSource, SyntheticSource
from .files import FetchedFile, check_columns, fetch_files, reads_spatially, stage_files
from .files import column_mapping as file_columns
from .postgres import Fetched, fetch, stage_fetched
from .postgres import column_mapping as query_columns
from .staging import FileResult, literal, positions_from_geometry, stage_relation
from .synthetic import batches

__all__ = ["FileResult", "check_source_columns", "needs_spatial", "prefetch", "stage_source"]


def needs_spatial(src: FileSource | PostgresSource | SyntheticSource) -> bool:
    """Whether staging ``src`` needs DuckDB's spatial extension: its files are read with ``ST_Read``,
    or its positions are decoded from a geometry column. Loading it costs a connection about a
    fifth of a second, so the warehouse's writer loads it only for such a source."""
    if isinstance(src, FileSource):
        return reads_spatially(src) or positions_from_geometry(file_columns(src))
    if isinstance(src, PostgresSource):
        return positions_from_geometry(query_columns(src))
    return False  # a synthetic source's batches have lat and lng


def prefetch(
    con: duckdb.DuckDBPyConnection, name: str, cfg: Config, as_of: datetime, full_refresh: bool = False
) -> Fetched | list[FetchedFile] | SyntheticFiles | None:
    """Read a source before the write transaction, so that a failing read
    cannot abort it: each file into a temporary table, or a database's rows
    (changed since its last read, unless ``full_refresh``), a synthetic source's
    batches into Parquet files."""
    src = cfg.sources[name]
    if isinstance(src, FileSource):
        return fetch_files(con, name, src, full_refresh)
    if isinstance(src, SyntheticSource):
        return write_batches(src, as_of, paths.scratch(cfg.home))
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
    fetched: Fetched | list[FetchedFile] | SyntheticFiles | None = None,
) -> list[FileResult]:
    """Replace the source's rows in ``raw_reports`` with a fresh read
    (a database source: with what :func:`prefetch` read; a file source:
    the rows of its new and changed files, its unchanged files' rows kept).

    Returns one :class:`FileResult` per file (or synthetic source, or query).
    """
    src = cfg.sources[name]
    if isinstance(src, PostgresSource):
        results, mark = stage_fetched(con, name, src, fetched, as_of)
        con.execute("DELETE FROM source_state WHERE source = ?", [name])
        con.execute("INSERT INTO source_state VALUES (?, ?, ?)", [name, mark, as_of])
        con.execute(f"DROP TABLE {fetched.table}")
        return results
    if isinstance(src, FileSource):  # the rows of files unchanged since the last extraction stay
        kept = [f.path for f in fetched if f.kept_rows is not None]
        con.execute("DELETE FROM raw_reports WHERE source = ? AND NOT list_contains(?, file)", [name, kept])
        return stage_files(con, name, src, fetched)
    con.execute("DELETE FROM raw_reports WHERE source = ?", [name])
    if isinstance(src, SyntheticSource):
        batches_written = fetched if isinstance(fetched, SyntheticFiles) else write_batches(src, as_of, None)
        try:
            files = ", ".join(literal(str(f)) for f in batches_written.files)
            # one statement: DuckDB streams the files in (a batch may lack a column another has)
            relation = f"(SELECT * FROM read_parquet([{files}], union_by_name = true))"
            mapping = {c: c for c in batches_written.columns}
            label = f"synthetic:{src.domain}:seed={src.seed}:count={src.count}"
            return [stage_relation(con, name, label, relation, mapping, src.entity_type or name)]
        finally:
            shutil.rmtree(batches_written.folder, ignore_errors=True)
    raise TypeError(f"unknown source kind {type(src).__name__}")


class SyntheticFiles(NamedTuple):
    """A synthetic source's batches as Parquet files (with ``_row``), ready to stage in one statement."""

    folder: Path
    files: list[Path]
    columns: list[str]  # every column some batch has (less ``_row``)


def write_batches(src: SyntheticSource, as_of: datetime, under: Path | None) -> SyntheticFiles:
    """Generate the source a batch at a time into Parquet files in a fresh folder under ``under``.

    Never more than a batch of rows in memory; DuckDB then reads the files
    itself (a registered Python table would stay in memory until the
    transaction ends: duckdb-python#469).
    """
    if under is not None:  # the warehouse's writer runs alone: what is there was left by a killed run
        for left in under.glob("synthetic-*"):
            shutil.rmtree(left, ignore_errors=True)
        under.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="synthetic-", dir=under))
    files, columns = [], {}
    try:
        for first, table in batches(src, as_of):
            numbers = pa.array(np.arange(first + 1, first + 1 + table.num_rows))  # rows numbered in order
            files.append(folder / f"{first:012d}.parquet")
            columns.update(dict.fromkeys(table.column_names))
            pq.write_table(table.append_column("_row", numbers), files[-1], compression="zstd")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return SyntheticFiles(folder, files, list(columns))


def check_source_columns(con: duckdb.DuckDBPyConnection, cfg: Config, names: list[str]) -> None:
    """Raise :class:`~pipeline.errors.ConfigError` for a mapped column no file has."""
    for name in names:
        src = cfg.sources[name]
        if isinstance(src, FileSource):
            check_columns(con, name, src)
