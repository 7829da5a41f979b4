"""Copy a table a source produced into ``raw_reports``, as text, untouched.

Validation judges the text later, so every row read lands here exactly once:
that is what makes ``read = valid + rejected`` checkable.
"""

from __future__ import annotations

from typing import NamedTuple

import duckdb

from ..schema import RAW_COLUMNS


class FileResult(NamedTuple):
    """What reading one file (or one synthetic batch) gave."""

    file: str
    rows: int
    error: str | None = None


def quote(identifier: str) -> str:
    """A SQL identifier, quoted (never string-concatenate a raw name)."""
    return '"' + identifier.replace('"', '""') + '"'


def _geometry_expr(column: str, duck_type: str) -> str:
    col = quote(column)
    if duck_type.startswith("GEOMETRY"):
        return col
    if duck_type == "BLOB":
        return f"TRY(ST_GeomFromWKB({col}))"
    return f"TRY(ST_GeomFromText(CAST({col} AS VARCHAR)))"


def stage_relation(
    con: duckdb.DuckDBPyConnection,
    source: str,
    file: str,
    table: str,
    mapping: dict[str, str],
    entity_type: str,
) -> FileResult:
    """Append the rows of ``table`` to ``raw_reports`` for ``source``.

    Parameters
    ----------
    con : DuckDBPyConnection
        Connection holding both tables.
    source, file : str
        Provenance written on every row; ``row_number`` counts from 1 in
        the table's insertion order.
    table : str
        The (temporary) table holding one file's rows.
    mapping : dict
        Canonical column -> column of ``table`` (``geometry`` allowed).
    entity_type : str
        Constant entity type when ``entity_type`` is not mapped.
    """
    described = con.execute(f"DESCRIBE {quote(table)}").fetchall()
    names = {name.lower(): name for name, *_ in described}
    types = {name.lower(): typ for name, typ, *_ in described}
    missing = [c for c in mapping.values() if c.lower() not in names]
    if missing:
        return FileResult(file, 0, f"missing column(s): {', '.join(missing)}")

    def col(canonical: str) -> str:
        return quote(names[mapping[canonical].lower()])

    select: dict[str, str] = {
        "source": "$source",
        "file": "$file",
        "row_number": "rowid + 1",
        "issue": "NULL",
    }
    for canonical in RAW_COLUMNS:
        if canonical in select:
            continue
        select[canonical] = f"CAST({col(canonical)} AS VARCHAR)" if canonical in mapping else "NULL"
    if "entity_type" not in mapping:
        select["entity_type"] = "$entity_type"

    from_ = quote(table)
    if "geometry" in mapping and not ("lat" in mapping and "lng" in mapping):
        gcol = names[mapping["geometry"].lower()]
        from_ = f"(SELECT *, {_geometry_expr(gcol, types[gcol.lower()])} AS _g FROM {quote(table)})"
        # A point gives lat/lng; anything else is a reason, not a crash.
        select["lat"] = "CASE WHEN ST_GeometryType(_g) = 'POINT' AND NOT ST_IsEmpty(_g) THEN CAST(ST_Y(_g) AS VARCHAR) END"
        select["lng"] = "CASE WHEN ST_GeometryType(_g) = 'POINT' AND NOT ST_IsEmpty(_g) THEN CAST(ST_X(_g) AS VARCHAR) END"
        raw = quote(gcol)
        select["issue"] = (
            f"CASE WHEN {raw} IS NOT NULL AND _g IS NULL THEN 'invalid_geometry' "
            "WHEN _g IS NULL THEN NULL "
            "WHEN ST_IsEmpty(_g) THEN 'empty_geometry' "
            "WHEN ST_GeometryType(_g) <> 'POINT' THEN 'non_point_geometry' END"
        )

    cols = ", ".join(quote(c) for c in select)
    exprs = ", ".join(select.values())
    params = {"source": source, "file": file}
    if "entity_type" not in mapping:
        params["entity_type"] = entity_type
    con.execute(f"INSERT INTO raw_reports ({cols}) SELECT {exprs} FROM {from_}", params)
    rows = con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()[0]
    return FileResult(file, rows)
