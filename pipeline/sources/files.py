"""File sources: a glob of CSV, Parquet, NDJSON, or anything ``ST_Read`` opens.

Each file is read on its own. A record that does not parse (a CSV line, an
NDJSON line, a GeoJSON feature) becomes a ``malformed_line`` row and the rest
of the file is read; a file that cannot be read at all is a per-file error,
which fails the source unless it says ``on_unreadable_file: skip``. Rows are
staged into ``raw_reports`` as text, exactly as given, for
:mod:`pipeline.validate` to judge.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa

from ..config import FileSource
from ..errors import ConfigError
from .staging import FileIdentity, FileResult, literal, numbered_table, quote, stage_relation

SPATIAL_FORMATS = ("geojson", "gpkg", "shp", "fgb", "spatial")


def list_files(src: FileSource) -> list[str]:
    """Files the source's glob matches, sorted (the order rows count as 'first')."""
    return sorted(p for p in glob.glob(src.path, recursive=True) if Path(p).is_file())


def reads_spatially(src: FileSource) -> bool:
    """Whether the source's files are read with ``ST_Read`` (DuckDB's spatial extension)."""
    return src.format not in ("csv", "parquet", "ndjson")


def reader_sql(src: FileSource) -> str:
    """A DuckDB table function reading one file (the path is parameter ``$path``)."""
    if src.format == "csv":
        # RFC 4180 unless told otherwise: guessing the dialect from hostile
        # rows (a stray ';') can turn a whole file into one column.
        delim = f", delim = {literal(src.delimiter or ',')}, quote = '\"', escape = '\"'"
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


# One row per non-blank line of a text file, numbered from 1 as an editor would.
_LINES = (
    "(SELECT n AS _row, line FROM (SELECT unnest(lines) AS line, generate_subscripts(lines, 1) AS n "
    "FROM (SELECT string_split(content, chr(10)) AS lines FROM read_text($path))) "
    "WHERE trim(line, chr(32) || chr(9) || chr(13)) <> '')"
)
_IS_RECORD = "(json_valid(line) AND CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' END)"


def _ndjson_columns(con: duckdb.DuckDBPyConnection, path: str) -> list[str]:
    """The keys the file's JSON objects have (an NDJSON file has no header)."""
    return _record_keys(con, f"(SELECT line FROM {_LINES} WHERE {_IS_RECORD})", {"path": path})


def _record_keys(con: duckdb.DuckDBPyConnection, records: str, params: dict | None = None) -> list[str]:
    rows = con.execute(f"SELECT DISTINCT unnest(json_keys(line)) AS k FROM {records} ORDER BY k", params).fetchall()
    return [k for (k,) in rows]


def _fetch_ndjson(con: duckdb.DuckDBPyConnection, table: str, path: str, columns: list[str]) -> None:
    """Read NDJSON line by line into ``table``: ``_row`` (the line number),
    ``_malformed`` (the line is not a JSON object) and each mapped column as text.

    The file is read once; its keys match the mapping in any case, as a header's names would.
    """
    lines = f"{table}_lines"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {lines} AS SELECT *, {_IS_RECORD} AS _ok FROM {_LINES}", {"path": path})
    try:
        have = _record_keys(con, f"(SELECT line FROM {lines} WHERE _ok)")
        keys = {k.lower(): k for k in reversed(have)}
        keys.update({c.lower(): c for c in columns if c in have})  # an exact match wins
        fields = "".join(
            f", CASE WHEN _ok THEN json_extract_string(line, {literal('$.' + json.dumps(keys.get(c.lower(), c)))}) "
            f"END AS {quote(c)}"
            for c in columns
        )
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT _row, NOT _ok AS _malformed{fields} "
            f"FROM {lines} ORDER BY _row"
        )
    finally:
        con.execute(f"DROP TABLE IF EXISTS {lines}")


def _fetch_geojson_features(con: duckdb.DuckDBPyConnection, table: str, path: str) -> None:
    """Read a GeoJSON file that ``ST_Read`` refused, feature by feature, into ``table``.

    Every feature that parses becomes a row (its properties as text, its
    geometry as ``geom``); one that does not is kept as ``_malformed`` with its
    feature number, and reading goes on with the next feature.

    Raises
    ------
    ValueError
        If the file is not a FeatureCollection at all.
    """
    text = Path(path).read_text(encoding="utf-8")
    features = _scan_features(text)
    keys = sorted({k for f in features if f is not None for k in (f.get("properties") or {})})
    value = lambda v: v if v is None or isinstance(v, str) else json.dumps(v)  # noqa: E731
    columns = {
        "_row": pa.array(range(1, len(features) + 1), pa.int64()),
        "_malformed": pa.array([f is None for f in features]),
        "_geometry": pa.array(
            [None if f is None or f.get("geometry") is None else json.dumps(f["geometry"]) for f in features],
            pa.string(),
        ),
        **{
            k: pa.array(
                [None if f is None else value((f.get("properties") or {}).get(k)) for f in features], pa.string()
            )
            for k in keys
        },
    }
    con.register("_features", pa.table(columns))
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * EXCLUDE (_geometry), "
            "TRY(ST_GeomFromGeoJSON(_geometry)) AS geom FROM _features ORDER BY _row"
        )
    finally:
        con.unregister("_features")


_FEATURE_START = re.compile(r'\{\s*"(?:type|properties|geometry|id|bbox)"\s*:')


def _scan_features(text: str) -> list[dict | None]:
    """The features of a FeatureCollection's text, None for each one that does not parse."""
    start = re.search(r'"features"\s*:\s*\[', text)
    if start is None:
        raise ValueError("not a GeoJSON FeatureCollection (no features array)")
    decoder, pos, found = json.JSONDecoder(), start.end(), []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            if not any(found):
                raise ValueError("not valid GeoJSON, and no feature in it could be read")
            return found
        try:
            feature, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            feature, pos = None, _next_feature(text, decoder, pos + 1)
        found.append(feature if isinstance(feature, dict) and feature.get("type") == "Feature" else None)


def _next_feature(text: str, decoder: json.JSONDecoder, pos: int) -> int:
    """Where the next whole feature after a broken one begins (the end of text if none does)."""
    for match in _FEATURE_START.finditer(text, pos):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("type") == "Feature":
            return match.start()
    return len(text)


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
            if src.format == "ndjson":
                columns = _ndjson_columns(con, path)
            else:
                columns = con.sql(f"SELECT * FROM {reader_sql(src)} LIMIT 0", params={"path": path}).columns
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
    """One file read into a temporary table (``table``), or why it could not be (``error``).

    ``malformed`` says the table numbers its rows by line or feature in
    ``_row`` and flags records that did not parse in ``_malformed``.
    ``kept_rows``: the file is unchanged since the last extraction; its
    staged rows (this many) stay, and it was not read.
    """

    path: str
    table: str | None
    error: str | None = None
    unreadable_lines: int = 0
    malformed: bool = False
    identity: FileIdentity | None = None
    kept_rows: int | None = None


READER_VERSION = 1  # bump when staging would stage a file's rows differently: every file is read again
RACY_NS = 2_000_000_000  # a file modified this recently may change again within its timestamp: hash it


def reader_digest(name: str, src: FileSource) -> str:
    """A digest of what decides how a file's rows are staged: its rows, kept, are valid while this holds."""
    settings = {
        "version": READER_VERSION,
        "format": src.format,
        "delimiter": src.delimiter,
        "columns": column_mapping(src),
        "entity_type": src.entity_type or name,
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def file_digest(path: str) -> str:
    """BLAKE2b of a file's bytes (streamed)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


class _Known(NamedTuple):
    identity: FileIdentity
    rows: int


def _known_files(con: duckdb.DuckDBPyConnection, name: str, reader: str) -> dict[str, _Known]:
    """The source's files as its last extraction staged them, read with the same settings,
    whose rows are all still staged (a count that does not match: read the file again)."""
    rows = con.execute(
        """
        SELECT f.file, f.size, f.mtime_ns, f.digest, f.reader, f.rows
        FROM source_files f
        LEFT JOIN (SELECT file, count(*) AS n FROM raw_reports WHERE source = $s GROUP BY file) r USING (file)
        WHERE f.source = $s AND f.error IS NULL AND f.digest IS NOT NULL AND f.reader = $reader
          AND f.rows = coalesce(r.n, 0)
        """,
        {"s": name, "reader": reader},
    ).fetchall()
    return {file: _Known(FileIdentity(size, mtime, digest, rd), n) for file, size, mtime, digest, rd, n in rows}


def _identify(path: str, reader: str, known: _Known | None) -> tuple[FileIdentity, int | None]:
    """The file's identity, and its staged row count if it has not changed since (else None).

    Size and modification time decide, as for ``make`` and ``rsync``; a file
    whose time changed (or was modified within :data:`RACY_NS` of now) is
    hashed, and one with the same bytes is unchanged all the same.
    """
    st = os.stat(path)
    if known is not None and (known.identity.size, known.identity.mtime_ns) == (st.st_size, st.st_mtime_ns):
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            return known.identity, known.rows
    identity = FileIdentity(st.st_size, st.st_mtime_ns, file_digest(path), reader)
    if known is not None and (known.identity.size, known.identity.digest) == (identity.size, identity.digest):
        return identity, known.rows
    return identity, None


def fetch_files(
    con: duckdb.DuckDBPyConnection, name: str, src: FileSource, full_refresh: bool = False
) -> list[FetchedFile]:
    """Read every new or changed file of a source into its own temporary table, before any write.

    A file unchanged since the last extraction (same size and time, or same
    bytes) is not read: its staged rows are kept. ``full_refresh`` reads
    every file. A file that cannot be read is a per-file error; it cannot
    abort the warehouse's write transaction, which has not begun.
    """
    reader = reader_digest(name, src)
    known = {} if full_refresh else _known_files(con, name, reader)
    fetched = []
    for i, path in enumerate(list_files(src)):
        table = f"_file_{i}"
        try:
            identity, kept = _identify(path, reader, known.get(path))
            if kept is not None:
                fetched.append(FetchedFile(path, None, identity=identity, kept_rows=kept))
                continue
            if identity.size == 0:  # an empty export: no rows, nothing wrong
                fetched.append(FetchedFile(path, None, identity=identity))
                continue
            if src.format == "ndjson":
                _fetch_ndjson(con, table, path, sorted(set(column_mapping(src).values())))
                fetched.append(FetchedFile(path, table, malformed=True, identity=identity))
                continue
            if src.format == "parquet":  # numbered by the reader
                sql = "SELECT *, file_row_number + 1 AS _row FROM read_parquet($path, file_row_number = true)"
            else:
                sql = f"SELECT * FROM {reader_sql(src)}"
            try:
                con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {sql}", {"path": path})
            except duckdb.Error:
                if src.format != "geojson":
                    raise
                _fetch_geojson_features(con, table, path)  # GDAL refused it: feature by feature
                fetched.append(FetchedFile(path, table, malformed=True, identity=identity))
                continue
            lines = _unreadable_lines(con) if src.format == "csv" else 0
            fetched.append(FetchedFile(path, table, None, lines, identity=identity))
        except (duckdb.Error, OSError, UnicodeDecodeError, ValueError) as exc:
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
        if f.kept_rows is not None:
            results.append(FileResult(f.path, f.kept_rows, identity=f.identity, kept=True))
            continue
        if f.table is None:
            results.append(FileResult(f.path, 0, f.error, f.identity if f.error is None else None))
            continue
        if f.malformed:  # numbered by line / feature; records that did not parse flagged
            relation = f"(SELECT * EXCLUDE (_malformed) FROM {f.table} WHERE NOT _malformed)"
        elif src.format == "parquet":
            relation = f"(SELECT * FROM {f.table})"
        else:
            relation = numbered_table(f.table)
        result = stage_relation(con, name, f.path, relation, mapping, src.entity_type or name)
        result = result._replace(identity=f.identity) if result.error is None else result
        if f.malformed and result.error is None:
            [(bad,)] = con.execute(
                "INSERT INTO raw_reports (source, file, row_number, issue) "
                f"SELECT ?, ?, _row, 'malformed_line' FROM {f.table} WHERE _malformed",
                [name, f.path],
            ).fetchall()
            result = result._replace(rows=result.rows + bad)
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


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:500]
