"""Sources: where reports come from, each staged into ``raw_reports`` as text."""

from __future__ import annotations

from datetime import datetime

import duckdb

from ..config import Config, FileSource, SyntheticSource
from .files import check_columns, stage_files
from .staging import FileResult, numbered_table, stage_relation
from .synthetic import generate

__all__ = ["FileResult", "check_source_columns", "stage_source"]


def stage_source(
    con: duckdb.DuckDBPyConnection, name: str, cfg: Config, as_of: datetime
) -> list[FileResult]:
    """Replace the source's rows in ``raw_reports`` with a fresh read.

    Returns one :class:`FileResult` per file (or synthetic batch).
    """
    src = cfg.sources[name]
    con.execute("DELETE FROM raw_reports WHERE source = ?", [name])
    if isinstance(src, SyntheticSource):
        table = generate(src, as_of)
        con.register("_synthetic", table)
        try:  # a table, not a view: staging numbers rows by rowid
            con.execute("CREATE OR REPLACE TEMP TABLE _file AS SELECT * FROM _synthetic")
        finally:
            con.unregister("_synthetic")
        mapping = {c: c for c in table.column_names}
        label = f"synthetic:{src.domain}:seed={src.seed}:count={src.count}"
        result = stage_relation(con, name, label, numbered_table("_file"), mapping, src.entity_type or name)
        con.execute("DROP TABLE _file")
        return [result]
    return stage_files(con, name, src)


def check_source_columns(con: duckdb.DuckDBPyConnection, cfg: Config, names: list[str]) -> None:
    """Raise :class:`~pipeline.errors.ConfigError` for a mapped column no file has."""
    for name in names:
        src = cfg.sources[name]
        if isinstance(src, FileSource):
            check_columns(con, name, src)
