"""Copy a table a source produced into ``raw_reports``, as text, untouched.

Validation judges the text later, so every row read lands here exactly once:
that is what makes ``read = valid + rejected`` checkable.
"""

from __future__ import annotations

from typing import NamedTuple

import duckdb

from ..schema import RAW_COLUMNS


class FileIdentity(NamedTuple):
    """What the warehouse remembers of a file it staged, to know it unchanged next time."""

    size: int
    mtime_ns: int
    digest: str  # BLAKE2b of the bytes
    reader: str  # a digest of the settings it was read with (see files.reader_digest)


class FileResult(NamedTuple):
    """What reading one file (or one synthetic batch) gave.

    ``kept``: the file had not changed since the last extraction, and its
    staged rows (``rows`` of them) were kept, not read again.
    """

    file: str
    rows: int
    error: str | None = None
    identity: FileIdentity | None = None
    kept: bool = False


def quote(identifier: str) -> str:
    """A SQL identifier, quoted (never string-concatenate a raw name)."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal (standard quoting, as DuckDB and PostgreSQL read it)."""
    return "'" + text.replace("'", "''") + "'"


def _geometry_expr(column: str, duck_type: str) -> str:
    col = quote(column)
    if duck_type.startswith("GEOMETRY"):
        return col
    if duck_type == "BLOB":
        return f"TRY(ST_GeomFromWKB({col}))"
    text = f"CAST({col} AS VARCHAR)"  # WKT, or PostGIS's hex EWKB
    return f"COALESCE(TRY(ST_GeomFromText({text})), TRY(ST_GeomFromHEXEWKB({text})))"


def positions_from_geometry(mapping: dict[str, str]) -> bool:
    """Whether a source's positions come from its geometry column (it maps no lat and lng), which
    DuckDB's spatial extension decodes."""
    return "geometry" in mapping and not ("lat" in mapping and "lng" in mapping)


def numbered_table(table: str, start: int = 1) -> str:
    """A temporary table's rows with ``_row`` counting from ``start`` in insertion order.

    Rowids follow insertion order but need not start at 0 (they do not in a
    transaction's local storage): rows are numbered from the first one.
    """
    t = quote(table)
    return f"(SELECT *, rowid - (SELECT min(rowid) FROM {t}) + {int(start)} AS _row FROM {t})"


def stage_relation(
    con: duckdb.DuckDBPyConnection,
    source: str,
    file: str,
    relation: str,
    mapping: dict[str, str],
    entity_type: str,
    params: dict | None = None,
) -> FileResult:
    """Append the rows of ``relation`` to ``raw_reports`` for ``source``.

    Parameters
    ----------
    con : DuckDBPyConnection
        Connection holding ``raw_reports``.
    source, file : str
        Provenance written on every row.
    relation : str
        A parenthesised query of one file's rows with a column ``_row``
        numbering them from 1 in file order (see :func:`numbered_table`).
    mapping : dict
        Canonical column -> column of ``relation`` (``geometry`` allowed).
    entity_type : str
        Constant entity type when ``entity_type`` is not mapped.
    params : dict, optional
        Parameters ``relation`` refers to.
    """
    params = dict(params or {})
    described = con.execute(f"DESCRIBE SELECT * FROM {relation}", params).fetchall()
    names = {name.lower(): name for name, *_ in described}
    types = {name.lower(): typ for name, typ, *_ in described}
    missing = [c for c in mapping.values() if c.lower() not in names]
    if missing:
        return FileResult(file, 0, f"missing column(s): {', '.join(missing)}")

    def col(canonical: str) -> str:
        return quote(names[mapping[canonical].lower()])

    def text(canonical: str) -> str:
        # JSON values (NDJSON fields of mixed types) as their text, not JSON: "x" -> x
        if types[mapping[canonical].lower()] == "JSON":
            return f"({col(canonical)} ->> '$')"
        return f"CAST({col(canonical)} AS VARCHAR)"

    select: dict[str, str] = {
        "source": "$source",
        "file": "$file",
        "row_number": "_row",
        "issue": "NULL",
    }
    for canonical in RAW_COLUMNS:
        if canonical in select:
            continue
        select[canonical] = text(canonical) if canonical in mapping else "NULL"
    if "entity_type" not in mapping:
        select["entity_type"] = "$entity_type"

    if positions_from_geometry(mapping):
        gcol = names[mapping["geometry"].lower()]
        relation = f"(SELECT *, {_geometry_expr(gcol, types[gcol.lower()])} AS _g FROM {relation})"
        # A point gives lat/lng; anything else is a reason, not a crash.
        select["lat"] = (
            "CASE WHEN ST_GeometryType(_g) = 'POINT' AND NOT ST_IsEmpty(_g) THEN CAST(ST_Y(_g) AS VARCHAR) END"
        )
        select["lng"] = (
            "CASE WHEN ST_GeometryType(_g) = 'POINT' AND NOT ST_IsEmpty(_g) THEN CAST(ST_X(_g) AS VARCHAR) END"
        )
        raw = quote(gcol)
        select["issue"] = (
            f"CASE WHEN {raw} IS NOT NULL AND _g IS NULL THEN 'invalid_geometry' "
            "WHEN _g IS NULL THEN NULL "
            "WHEN ST_IsEmpty(_g) THEN 'empty_geometry' "
            "WHEN ST_GeometryType(_g) <> 'POINT' THEN 'non_point_geometry' END"
        )

    cols = ", ".join(quote(c) for c in select)
    exprs = ", ".join(select.values())
    params.update(source=source, file=file)
    if "entity_type" not in mapping:
        params["entity_type"] = entity_type
    [(rows,)] = con.execute(f"INSERT INTO raw_reports ({cols}) SELECT {exprs} FROM {relation}", params).fetchall()
    return FileResult(file, rows)
