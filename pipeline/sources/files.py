"""File sources: a glob of CSV, Parquet, NDJSON, or anything ``ST_Read`` opens.

Each file is read on its own, so one unreadable file is a per-file error that
does not stop the others. Its rows are staged into ``raw_reports`` as text,
exactly as given, for :mod:`pipeline.validate` to judge.
"""

from __future__ import annotations

import glob
from pathlib import Path

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
        delim = "" if src.delimiter is None else f", delim = {_literal(src.delimiter)}"
        return f"read_csv($path, all_varchar = true, header = true{delim})"
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
    """Check the mapped columns against the first readable file's header.

    Raises
    ------
    ConfigError
        Naming ``sources.<name>.columns.<canonical>`` and the columns the file has.
    """
    for path in list_files(src):
        try:
            rel = con.sql(f"SELECT * FROM {reader_sql(src)} LIMIT 0", params={"path": path})
        except duckdb.Error:
            continue  # an unreadable file is reported per file at extraction
        have = {c.lower() for c in rel.columns}
        for canonical, column in column_mapping(src).items():
            if column.lower() not in have:
                raise ConfigError(
                    f"sources.{name}.columns.{canonical}",
                    f"column {column!r} is not in {path} (it has: {', '.join(rel.columns)})",
                )
        return


def stage_files(con: duckdb.DuckDBPyConnection, name: str, src: FileSource) -> list[FileResult]:
    """Stage every file of a source into ``raw_reports``; one result per file."""
    mapping = column_mapping(src)
    results = []
    for path in list_files(src):
        try:
            if src.format == "parquet":  # numbered by the reader: no copy needed
                relation = "(SELECT *, file_row_number + 1 AS _row FROM read_parquet($path, file_row_number = true))"
                params = {"path": path}
            else:
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE _file AS SELECT * FROM {reader_sql(src)}",
                    {"path": path},
                )
                relation, params = numbered_table("_file"), {}
            results.append(
                stage_relation(con, name, path, relation, mapping, src.entity_type or name, params)
            )
        except duckdb.Error as exc:
            results.append(FileResult(path, 0, _first_line(exc)))
    con.execute("DROP TABLE IF EXISTS _file")
    return results


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:500]
