"""Judge staged rows: each becomes a canonical report or a rejection with a reason.

Rules run in a fixed order and a row takes the first that fails, so every
rejected row has exactly one reason and ``read = valid + rejected`` holds:

======================  =====================================================
reason                  rule
======================  =====================================================
malformed_line          a CSV line the reader could not read (e.g. bad encoding)
invalid_geometry        a geometry column that does not parse
empty_geometry          an empty geometry
non_point_geometry      a line, polygon, ... (only points have a position)
missing_report_id       the id column is mapped but blank
missing_coordinates     latitude or longitude blank
non_numeric_coordinates latitude or longitude is not a number
nan_coordinates         NaN
infinite_coordinates    +-Infinity (or 1e999, which overflows to it)
latitude_out_of_range   beyond +-90
longitude_out_of_range  beyond +-180
outside_mercator        beyond Web Mercator's +-85.05113 (no tile holds it)
missing_timestamp       observed_at blank
unparseable_timestamp   not ISO 8601, epoch s/ms, nor a given timestamp_format
future_timestamp        more than ``future_tolerance_hours`` after as_of
unparseable_expires_at  expires_at given but not a time
missing_severity        severity mapped but blank
non_numeric_severity    severity not a finite number
invalid_upvotes         not a non-negative integer
invalid_metric          departures / cancellations / delays not >= 0
invalid_is_public       not true/false/t/f/1/0/yes/no
description_too_long    over ``max_description_chars`` (seed 001: 280)
duplicate_report_id     a later row with the id of an accepted row (first kept)
rate_limited            over ``rate_limit_per_hour`` per session token in any
                        rolling hour; the excess, as seed 001's trigger would
======================  =====================================================

Time- and tileset-dependent rules (expired, too old, unknown category, ...)
are *not* rejections: such rows stay in ``reports`` and are excluded at
scoring time, per tileset.
"""

from __future__ import annotations

import json
from collections import deque
from datetime import datetime, timedelta
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa

from . import tilemath
from .config import FileSource, PostgresSource, Rules
from .schema import METRICS, REPORT_COLUMNS
from .sources.staging import literal, quote
from .tilemath import MERCATOR_MAX_LAT

EPOCH_RANGE = (1e8, 1e14)  # |number| read as epoch seconds (< 1e11) or ms (>= 1e11)
INSERT_PART_ROWS = 8_000_000  # valid rows sorted into ``reports`` at a time (see _key_ranges)

REASONS = (
    "malformed_line",
    "invalid_geometry",
    "empty_geometry",
    "non_point_geometry",
    "missing_report_id",
    "missing_coordinates",
    "non_numeric_coordinates",
    "nan_coordinates",
    "infinite_coordinates",
    "latitude_out_of_range",
    "longitude_out_of_range",
    "outside_mercator",
    "missing_timestamp",
    "unparseable_timestamp",
    "future_timestamp",
    "unparseable_expires_at",
    "missing_severity",
    "non_numeric_severity",
    "invalid_upvotes",
    "invalid_metric",
    "invalid_is_public",
    "description_too_long",
    "duplicate_report_id",
    "rate_limited",
)


class ValidationResult(NamedTuple):
    """Counts of one source's validation: ``read == valid + sum(rejected)``."""

    source: str
    read: int
    valid: int
    rejected: dict[str, int]

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def _blank(col: str) -> str:
    return f"(NULLIF(trim({col}), '') IS NULL)"


def _text(col: str) -> str:
    return f"NULLIF(trim({col}), '')"


def _number(col: str) -> str:
    return f"TRY_CAST(trim({col}) AS DOUBLE)"


def timestamp_expr(col: str, formats: list[str]) -> str:
    """SQL parsing text to TIMESTAMPTZ: given formats, then ISO 8601, then epoch s/ms.

    Naive times are UTC (the connection's time zone).
    """
    text = f"trim({col})"
    parts = []
    if formats:
        fmts = "[" + ", ".join(literal(f) for f in formats) + "]"
        parts.append(f"CAST(try_strptime({text}, {fmts}) AS TIMESTAMPTZ)")
    parts.append(f"TRY_CAST({text} AS TIMESTAMPTZ)")
    num = _number(col)
    lo, hi = EPOCH_RANGE
    parts.append(
        f"CASE WHEN abs({num}) BETWEEN {lo} AND {hi} THEN "
        f"to_timestamp(CASE WHEN abs({num}) >= 1e11 THEN {num} / 1000 ELSE {num} END) END"
    )
    return f"COALESCE({', '.join(parts)})"


def _boolean(col: str) -> str:
    v = f"lower(trim({col}))"
    return (
        f"CASE WHEN {v} IN ('true', 't', '1', 'yes', 'y') THEN true "
        f"WHEN {v} IN ('false', 'f', '0', 'no', 'n') THEN false END"
    )


def _typed_select(formats: list[str], time_mapped: bool) -> str:
    """Typed copies (prefixed ``_``) of the raw text columns.

    A source without ``observed_at`` dates every report at the run's ``as_of``.
    """
    exprs = {
        "_lat": _number("lat"),
        "_lng": _number("lng"),
        "_observed_at": timestamp_expr("observed_at", formats) if time_mapped else "CAST($as_of AS TIMESTAMPTZ)",
        "_expires_at": timestamp_expr("expires_at", formats),
        "_severity": _number("severity"),
        "_upvotes": _number("upvotes"),
        "_is_public": _boolean("is_public"),
        **{f"_{m}": _number(m) for m in METRICS},
    }
    return ", ".join(f"{sql} AS {name}" for name, sql in exprs.items())


def _reason_case(id_mapped: bool, severity_mapped: bool, time_mapped: bool, part: str = "all") -> str:
    """The first rule a row fails, as SQL: of all rules, or of those ``before`` or ``after`` the one
    that depends on the run's time (``future_timestamp``)."""
    metric_bad = " OR ".join(f"(NOT {_blank(m)} AND (_{m} IS NULL OR NOT isfinite(_{m}) OR _{m} < 0))" for m in METRICS)
    rules = [
        ("issue IS NOT NULL", "issue"),
        (f"{id_mapped} AND {_blank('report_id')}", "'missing_report_id'"),
        (f"{_blank('lat')} OR {_blank('lng')}", "'missing_coordinates'"),
        ("_lat IS NULL OR _lng IS NULL", "'non_numeric_coordinates'"),
        ("isnan(_lat) OR isnan(_lng)", "'nan_coordinates'"),
        ("isinf(_lat) OR isinf(_lng)", "'infinite_coordinates'"),
        ("abs(_lat) > 90", "'latitude_out_of_range'"),
        ("abs(_lng) > 180", "'longitude_out_of_range'"),
        (f"abs(_lat) > {MERCATOR_MAX_LAT}", "'outside_mercator'"),
        (f"{time_mapped} AND {_blank('observed_at')}", "'missing_timestamp'"),
        ("_observed_at IS NULL OR NOT isfinite(_observed_at)", "'unparseable_timestamp'"),
        ("_observed_at > $future_limit", "'future_timestamp'"),
        (
            f"NOT {_blank('expires_at')} AND (_expires_at IS NULL OR NOT isfinite(_expires_at))",
            "'unparseable_expires_at'",
        ),
        (f"{severity_mapped} AND {_blank('severity')}", "'missing_severity'"),
        (
            f"NOT {_blank('severity')} AND (_severity IS NULL OR NOT isfinite(_severity))",
            "'non_numeric_severity'",
        ),
        (
            f"NOT {_blank('upvotes')} AND (_upvotes IS NULL OR NOT isfinite(_upvotes) "
            "OR _upvotes < 0 OR _upvotes <> floor(_upvotes) OR _upvotes > 2147483647)",
            "'invalid_upvotes'",
        ),
        (metric_bad, "'invalid_metric'"),
        (f"NOT {_blank('is_public')} AND _is_public IS NULL", "'invalid_is_public'"),
        ("length(description) > $max_description", "'description_too_long'"),
    ]
    at = next(i for i, (_, reason) in enumerate(rules) if reason == "'future_timestamp'")
    rules = {"all": rules, "before": rules[:at], "after": rules[at + 1 :]}[part]
    whens = " ".join(f"WHEN {cond} THEN {reason}" for cond, reason in rules)
    return f"CASE {whens} END"


def _canonical_select() -> str:
    """Typed canonical columns from ``_checked``, in :data:`REPORT_COLUMNS` order."""
    exprs = {
        "report_id": "_key",
        "source": "source",
        "lat": "_lat",
        "lng": "_lng",
        "observed_at": "_observed_at",
        "expires_at": "_expires_at",
        "severity": "COALESCE(_severity, 1.0)",
        "upvotes": "CAST(COALESCE(_upvotes, 0) AS INTEGER)",
        "is_public": "COALESCE(_is_public, true)",
        "description": "description",
        **{m: f"_{m}" for m in METRICS},
    }
    cols = [exprs.get(c, _text(c)) for c in REPORT_COLUMNS]
    canonical = ", ".join(f"{sql} AS {quote(c)}" for sql, c in zip(cols, REPORT_COLUMNS))
    return canonical + ", file, row_number"  # provenance


def validate_source(
    con: duckdb.DuckDBPyConnection,
    name: str,
    rules: Rules,
    formats: list[str],
    as_of: datetime,
    *,
    id_mapped: bool,
    severity_mapped: bool,
    time_mapped: bool = True,
    files: bool = False,
) -> ValidationResult:
    """Replace a source's ``reports`` and ``rejected_reports`` rows from ``raw_reports``.

    Parameters
    ----------
    con : DuckDBPyConnection
        A writer connection to the warehouse.
    name : str
        The source.
    rules : Rules
        Its extraction rules (tolerances, description length, rate limit).
    formats : list of str
        ``strptime`` formats tried before ISO 8601 and epoch numbers.
    as_of : datetime
        The run's time, for the future-timestamp rule.
    id_mapped, severity_mapped : bool
        Whether the source maps these columns (a blank value is then a reason).
    time_mapped : bool
        Whether it maps ``observed_at``; if not, every report is dated ``as_of``.
    files : bool
        A file source: each file's checked rows are kept (``checked_rows``)
        while the file is unchanged, and only new files' rows are checked;
        the rules that depend on other rows (duplicates, rate limits) and on
        the run's time (future timestamps) still run over every row.

    Returns
    -------
    ValidationResult
    """
    params = {
        "source": name,
        "future_limit": as_of + timedelta(hours=rules.future_tolerance_hours),
        "max_description": rules.max_description_chars,
        **({} if time_mapped else {"as_of": as_of}),  # the time of an untimed source's reports
    }
    # The fallback id (file name and row) is stable while the file is unchanged.
    key = (
        "$source || ':' || COALESCE(trim(report_id), "
        "regexp_extract(file, '[^/]*$') || ':' || CAST(row_number AS VARCHAR))"
    )
    # A table in the warehouse, not a temporary one: it is stored compressed, where a
    # temporary table of 100M rows spilled uncompressed (tens of GB). Only valid rows
    # have a tile key (the projection of a rejected latitude may not be defined).
    x, y, tile_key = tilemath.tile_key_sql("_lng", "_lat")
    flags = (id_mapped, severity_mapped, time_mapped)
    con.execute("DROP TABLE IF EXISTS _checked")  # a table of older versions, left by a crash
    try:
        # _base: every row with the first per-row rule it fails; _checked: with the rules that
        # weigh rows against each other (duplicates, rate limits: rows in _overrides) on top
        if files and time_mapped:  # each unchanged file's checked rows are kept: only new ones are checked
            _check_new_files(con, name, key, formats, flags, rules)
            limit = literal(params["future_limit"].isoformat())
            con.execute(
                f"""
                CREATE OR REPLACE TEMP VIEW _base AS
                SELECT * EXCLUDE (reason_before, reason_after, digest, reader),
                       COALESCE(reason_before,
                                CASE WHEN _observed_at > CAST({limit} AS TIMESTAMPTZ) THEN 'future_timestamp' END,
                                reason_after) AS reason
                FROM checked_rows WHERE source = {literal(name)}
                """
            )
        else:
            con.execute(
                f"""
                CREATE OR REPLACE TABLE _base AS
                SELECT *, CASE WHEN reason IS NULL THEN {tile_key} END AS tile_key
                FROM (SELECT *, CASE WHEN reason IS NULL THEN {x} END AS _x, CASE WHEN reason IS NULL THEN {y} END AS _y
                      FROM (SELECT *, {_reason_case(*flags)} AS reason
                            FROM (SELECT *, {key} AS _key, {_typed_select(formats, time_mapped)}
                                  FROM raw_reports WHERE source = $source)))
                """,
                params,
            )
        con.execute("CREATE OR REPLACE TEMP TABLE _overrides (file VARCHAR, row_number BIGINT, reason VARCHAR)")
        con.execute(
            """
            CREATE OR REPLACE TEMP VIEW _checked AS
            SELECT * EXCLUDE (reason, _x, _y, tile_key, _override), _override AS reason,
                   CASE WHEN _override IS NULL THEN _x END AS _x, CASE WHEN _override IS NULL THEN _y END AS _y,
                   CASE WHEN _override IS NULL THEN tile_key END AS tile_key
            FROM (SELECT b.*, COALESCE(o.reason, b.reason) AS _override
                  FROM _base b LEFT JOIN _overrides o ON o.file = b.file AND o.row_number = b.row_number)
            """
        )
        con.execute(
            """
            INSERT INTO _overrides
            SELECT file, row_number, 'duplicate_report_id' FROM (
                SELECT file, row_number, row_number() OVER (PARTITION BY _key ORDER BY file, row_number) AS nth
                FROM _checked WHERE reason IS NULL)
            WHERE nth > 1
            """
        )
        if rules.rate_limit_per_hour is not None:
            _apply_rate_limit(con, rules.rate_limit_per_hour)

        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM reports WHERE source = $source", {"source": name})
            con.execute("DELETE FROM rejected_reports WHERE source = $source", {"source": name})
            # In a fixed order (a parallel insert's is not): a cell's sums add its
            # reports in this order, so the same input gives the same bits. By tile
            # key first: a shard's range of keys is a run of row groups, which
            # DuckDB's zone maps find without reading the others. A range of keys
            # at a time, so no sort holds more than INSERT_PART_ROWS rows.
            for where in _key_ranges(con):
                con.execute(
                    f"""INSERT INTO reports SELECT {_canonical_select()}, tile_key
                        FROM _checked WHERE reason IS NULL{where}
                        ORDER BY tile_key, file, row_number"""
                )
            fields = ", ".join(f"'{c}', {quote(c)}" for c in REPORT_COLUMNS if c != "source")
            con.execute(
                f"""
                INSERT INTO rejected_reports
                SELECT source, file, row_number, report_id, reason, CAST(json_object({fields}) AS VARCHAR)
                FROM _checked WHERE reason IS NOT NULL ORDER BY file, row_number
                """
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        read, valid = con.execute("SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM _checked").fetchone()
        rejected = dict(
            con.execute(
                "SELECT reason, count(*) FROM _checked WHERE reason IS NOT NULL "
                "GROUP BY reason ORDER BY count(*) DESC, reason"
            ).fetchall()
        )
    finally:
        con.execute("DROP VIEW IF EXISTS _checked")
        con.execute("DROP TABLE IF EXISTS _overrides")
        if con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = '_base'").fetchone()[0]:
            con.execute("DROP VIEW _base")
        con.execute("DROP TABLE IF EXISTS _base")
    return ValidationResult(name, read, valid, rejected)


CHECK_VERSION = 1  # a change to what a row's checks give: add one (every file's rows are checked again)
CHECKED_TABLES = ("checked_rows", "checked_files")  # made by the first validation of a file source


def _check_new_files(
    con: duckdb.DuckDBPyConnection,
    name: str,
    key: str,
    formats: list[str],
    flags: tuple[bool, bool, bool],
    rules: Rules,
) -> None:
    """Bring ``checked_rows`` up to the source's staged files: rows of a file version (its digest and
    reader) already checked with the same settings stay; a removed or changed file's rows leave; new
    files' rows are typed and checked. Every check but ``future_timestamp`` (which depends on the
    run's time) is in ``reason_before`` / ``reason_after``, and a valid position's tile key is kept.
    """
    salt = json.dumps([CHECK_VERSION, formats, flags, rules.max_description_chars, key])
    x, y, tile_key = tilemath.tile_key_sql("_lng", "_lat")
    select = f"""
        SELECT *, CASE WHEN reason_before IS NULL THEN {tile_key} END AS tile_key
        FROM (SELECT *, CASE WHEN reason_before IS NULL THEN {x} END AS _x,
                     CASE WHEN reason_before IS NULL THEN {y} END AS _y
              FROM (SELECT *, {_reason_case(*flags, "before")} AS reason_before,
                           {_reason_case(*flags, "after")} AS reason_after
                    FROM (SELECT *, {key} AS _key, {_typed_select(formats, True)}
                          FROM (SELECT r.*, f.digest, f.reader
                                FROM raw_reports r JOIN source_files f ON f.source = r.source AND f.file = r.file
                                WHERE r.source = $source AND f.file IN (SELECT file FROM _new_files)))))
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS checked_files (source VARCHAR, file VARCHAR, digest VARCHAR, "
        "reader VARCHAR, salt VARCHAR)"
    )
    con.execute("CREATE OR REPLACE TEMP TABLE _new_files (file VARCHAR)")
    sample = {"source": name, "max_description": rules.max_description_chars}
    wanted = [d[0] for d in con.execute(f"{select} LIMIT 0", sample).description]
    have = [
        c
        for (c,) in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'checked_rows' "
            "AND database_name = current_database() AND schema_name = 'main' "
            "ORDER BY column_index"
        ).fetchall()
    ]
    if have and have != wanted:  # written by another version: every file is checked again
        con.execute("DROP TABLE checked_rows")
        con.execute("DELETE FROM checked_files")
    if have != wanted:
        con.execute(f"CREATE TABLE checked_rows AS {select} LIMIT 0", sample)
    params = {"source": name, "salt": salt}
    # the file versions already checked, with these settings
    kept = """SELECT c.file FROM checked_files c JOIN source_files f
              ON f.source = c.source AND f.file = c.file AND f.digest = c.digest AND f.reader = c.reader
              WHERE c.source = $source AND c.salt = $salt"""
    con.execute(f"DELETE FROM checked_rows WHERE source = $source AND file NOT IN ({kept})", params)
    con.execute(f"DELETE FROM checked_files WHERE source = $source AND file NOT IN ({kept})", params)
    con.execute(
        "INSERT INTO _new_files SELECT file FROM source_files WHERE source = $source AND file NOT IN "
        "(SELECT file FROM checked_files WHERE source = $source)",
        {"source": name},
    )
    con.execute(f"INSERT INTO checked_rows {select}", sample)
    con.execute(
        "INSERT INTO checked_files SELECT source, file, digest, reader, $salt FROM source_files "
        "WHERE source = $source AND file IN (SELECT file FROM _new_files)",
        params,
    )
    con.execute("DROP TABLE _new_files")


def _key_ranges(con: duckdb.DuckDBPyConnection) -> list[str]:
    """``AND`` clauses cutting ``_checked``'s valid rows into ranges of tile keys, in key order."""
    valid = con.execute("SELECT count(*) FROM _checked WHERE reason IS NULL").fetchone()[0]
    parts = -(-valid // INSERT_PART_ROWS)
    if parts <= 1:
        return [""]
    cuts = con.execute(
        "SELECT quantile_disc(tile_key, $q) FROM _checked WHERE reason IS NULL",
        {"q": [i / parts for i in range(1, parts)]},
    ).fetchone()[0]
    cuts = sorted(set(cuts))
    bounds = [None, *cuts, None]
    return [
        (f" AND tile_key >= {lo}" if lo is not None else "") + (f" AND tile_key < {hi}" if hi is not None else "")
        for lo, hi in zip(bounds, bounds[1:])
    ]


def _apply_rate_limit(con: duckdb.DuckDBPyConnection, limit: int) -> None:
    # A window count over *all* rows finds the tokens that may be over the
    # limit cheaply; which rows are the excess depends on which earlier ones
    # were accepted, so those few tokens are replayed in order, as seed 001's
    # BEFORE INSERT trigger sees them.
    suspects = con.execute(
        f"""
        SELECT session_token, epoch_us(_observed_at) AS t, file, row_number
        FROM _checked WHERE reason IS NULL AND session_token IN (
            SELECT DISTINCT session_token FROM (
                SELECT session_token, count(*) OVER (
                    PARTITION BY session_token ORDER BY _observed_at
                    RANGE BETWEEN INTERVAL 1 HOUR PRECEDING AND CURRENT ROW) AS c
                FROM _checked WHERE reason IS NULL AND session_token IS NOT NULL)
            WHERE c > {int(limit)})
        ORDER BY session_token, t, file, row_number
        """
    ).fetch_arrow_table()
    if suspects.num_rows == 0:
        return
    tokens = suspects["session_token"].to_numpy(zero_copy_only=False)
    excess = rate_limit_excess(tokens, suspects["t"].to_numpy(), limit, 3600 * 10**6)
    con.register("_excess", suspects.filter(pa.array(excess)).select(["file", "row_number"]))
    try:
        con.execute("INSERT INTO _overrides SELECT file, row_number, 'rate_limited' FROM _excess")
    finally:
        con.unregister("_excess")


def rate_limit_excess(tokens: np.ndarray, times: np.ndarray, limit: int, window: int) -> np.ndarray:
    """Which submissions a per-token "at most ``limit`` per window" trigger refuses.

    Parameters
    ----------
    tokens, times : ndarray
        Sorted by token, then time. A submission at ``t`` is refused when
        ``limit`` *accepted* ones of its token lie in ``(t - window, t]``.

    Returns
    -------
    ndarray of bool
        True for the refused (rate-limited) submissions.
    """
    refused = np.zeros(len(times), bool)
    accepted: deque[int] = deque()
    previous = None
    for i, (token, t) in enumerate(zip(tokens, times)):
        if token != previous:
            accepted.clear()
            previous = token
        while accepted and accepted[0] <= t - window:
            accepted.popleft()
        if len(accepted) >= limit:
            refused[i] = True
        else:
            accepted.append(t)
    return refused


def source_flags(src: object) -> dict[str, bool]:
    """Whether a source maps ``report_id``, ``severity`` and ``observed_at`` (see :func:`validate_source`)."""
    from .sources.postgres import column_mapping

    if isinstance(src, FileSource):
        mapped = src.columns.mapped()
    elif isinstance(src, PostgresSource):
        mapped = column_mapping(src)
    else:  # synthetic: ids always, severity where the domain has one
        return {"id_mapped": True, "severity_mapped": False, "time_mapped": True}
    return {
        "id_mapped": "report_id" in mapped,
        "severity_mapped": "severity" in mapped,
        "time_mapped": "observed_at" in mapped,
    }
