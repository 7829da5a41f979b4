"""File sources: a glob of CSV, Parquet, NDJSON, or anything ``ST_Read`` opens.

Each file is read on its own, so one unreadable file is a per-file error that
does not stop the others. Its rows are staged into ``raw_reports`` as text,
exactly as given, for :mod:`pipeline.validate` to judge.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import NamedTuple

import duckdb

from ..config import FileSource
from ..errors import ConfigError
from .staging import FileResult, numbered_table, stage_relation

SPATIAL_FORMATS = ("geojson", "gpkg", "shp", "fgb", "spatial")


def list_files(src: FileSource) -> list[str]:
    """Files the source's glob matches, sorted (the order rows count as 'first')."""
    return sorted(p for p in glob.glob(src.path, recursive=True) if Path(p).is_file())


def reader_sql(src: FileSource) -> str:
    """A DuckDB table function reading one file (the path is parameter ``$path``)."""
    if src.format == "csv":
        # RFC 4180 unless told otherwise: guessing the dialect from hostile
        # rows (a stray ';') can turn a whole file into one column.
        delim = f", delim = {_literal(src.delimiter or ',')}, quote = '\"', escape = '\"'"
        # Ragged rows are padded, not fatal; lines that cannot be read (bad
        # encoding, say) go to a rejects table and become `malformed_line` rows.
        return (
            f"read_csv($path, all_varchar = true, header = true{delim}, strict_mode = false, "
            "null_padding = true, max_line_size = 67108864, store_rejects = true, "
            "rejects_table = '_csv_rejects', rejects_scan = '_csv_scans')"
        )
    if src.format == "parquet":
        return "read_parquet($path)"
    if src.format == "ndjson":
        return "read_json($path, format = 'newline_delimited')"
    return "ST_Read($path)"


def column_mapping(src: FileSource) -> dict[str, str]:
    """Canonical -> source column, with ST_Read's ``geom`` as the default geometry."""
    mapping = src.columns.mapped()
    if src.format in SPATIAL_FORMATS and "geometry" not in mapping:
        if "lat" not in mapping or "lng" not in mapping:
            mapping["geometry"] = "geom"
    return mapping


def check_columns(con: duckdb.DuckDBPyConnection, name: str, src: FileSource) -> None:
    """Check the mapped columns against the files' headers: some file must have them all.

    A file that lacks them while others have them is a per-file error at
    extraction, not a config error.

    Raises
    ------
    ConfigError
        Naming ``sources.<name>.columns.<canonical>`` and the columns the
        first readable file has.
    """
    first = None
    for path in list_files(src):
        try:
            rel = con.sql(f"SELECT * FROM {reader_sql(src)} LIMIT 0", params={"path": path})
            columns = rel.columns
        except duckdb.Error:
            continue  # an unreadable file is reported per file at extraction
        finally:
            con.execute("DROP TABLE IF EXISTS _csv_rejects")
            con.execute("DROP TABLE IF EXISTS _csv_scans")
        have = {c.lower() for c in columns}
        missing = [(k, c) for k, c in column_mapping(src).items() if c.lower() not in have]
        if not missing:
            return
        first = first or (path, columns, missing[0])
    if first:
        path, columns, (canonical, column) = first
        raise ConfigError(
            f"sources.{name}.columns.{canonical}",
            f"column {column!r} is not in {path} (it has: {', '.join(columns)})",
        )


class FetchedFile(NamedTuple):
    """One file read into a temporary table (``table``), or why it could not be (``error``)."""

    path: str
    table: str | None
    error: str | None = None
    unreadable_lines: int = 0


def fetch_files(con: duckdb.DuckDBPyConnection, name: str, src: FileSource) -> list[FetchedFile]:
    """Read every file of a source into its own temporary table, before any write.

    A file that cannot be read is a per-file error; it cannot abort the
    warehouse's write transaction, which has not begun.
    """
    fetched = []
    for i, path in enumerate(list_files(src)):
        table = f"_file_{i}"
        try:
            if src.format == "parquet":  # numbered by the reader
                sql = "SELECT *, file_row_number + 1 AS _row FROM read_parquet($path, file_row_number = true)"
            else:
                sql = f"SELECT * FROM {reader_sql(src)}"
            con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {sql}", {"path": path})
            lines = _unreadable_lines(con) if src.format == "csv" else 0
            fetched.append(FetchedFile(path, table, None, lines))
        except duckdb.Error as exc:
            con.execute(f"DROP TABLE IF EXISTS {table}")
            fetched.append(FetchedFile(path, None, _first_line(exc)))
    return fetched


def stage_files(
    con: duckdb.DuckDBPyConnection, name: str, src: FileSource, fetched: list[FetchedFile]
) -> list[FileResult]:
    """Stage fetched files into ``raw_reports``; one result per file."""
    mapping = column_mapping(src)
    results = []
    for f in fetched:
        if f.table is None:
            results.append(FileResult(f.path, 0, f.error))
            continue
        relation = f"(SELECT * FROM {f.table})" if src.format == "parquet" else numbered_table(f.table)
        result = stage_relation(con, name, f.path, relation, mapping, src.entity_type or name)
        if f.unreadable_lines and result.error is None:
            _stage_unreadable_lines(con, name, f.path, result.rows, f.unreadable_lines)
            result = result._replace(rows=result.rows + f.unreadable_lines)
        results.append(result)
        con.execute(f"DROP TABLE {f.table}")
    return results


def _unreadable_lines(con: duckdb.DuckDBPyConnection) -> int:
    lines = con.execute("SELECT count(*) FROM _csv_rejects").fetchone()[0]
    con.execute("DROP TABLE IF EXISTS _csv_rejects")
    con.execute("DROP TABLE IF EXISTS _csv_scans")
    return lines


def _stage_unreadable_lines(con: duckdb.DuckDBPyConnection, source: str, path: str, after: int, lines: int) -> None:
    """Lines DuckDB could not read, staged as rows whose reason is ``malformed_line``."""
    con.execute(
        "INSERT INTO raw_reports (source, file, row_number, issue) "
        "SELECT ?, ?, ? + i, 'malformed_line' FROM range(1, ? + 1) t(i)",
        [source, path, after, lines],
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:500]
