"""PostgreSQL / PostGIS sources, read through DuckDB's postgres extension (Arrow-speed, no Python rows).

A source is one of the four seed *adapters* (ready-made SQL over the seeds'
schemas), a ``table`` with a column mapping, or a ``query``. Queries run on
the server (``postgres_query``), so PostGIS turns geography into lat/lng
there. The password comes from the environment variable ``password_env``
and appears in no message, log, metadata or file.

Incremental runs read rows whose watermark column is at or after the last
run's (``>=``: rows sharing the boundary time are read again and replace
themselves by id); a full refresh replaces the source's rows, so rows
deleted upstream disappear.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from typing import NamedTuple

import duckdb

from ..config import PostgresSource
from ..errors import SourceError
from .staging import FileResult, literal, numbered_table, quote, stage_relation

# Seed 000: notes on any locatable entity; legacy post_locations where locationables lacks the post.
COMMUNITY_NEEDS = """
SELECT n.id::text || '@' || loc.location_id::text AS report_id,
       loc.locatable_type AS entity_type, loc.locatable_id::text AS entity_id,
       l.latitude AS lat, l.longitude AS lng,
       n.created_at AS observed_at, n.expired_at AS expires_at,
       n.severity AS category,
       CASE n.severity WHEN 'urgent' THEN 10 WHEN 'notice' THEN 5 ELSE 1 END AS severity,
       n.is_public,
       GREATEST(n.updated_at, nb_added, loc.added_at) AS _watermark
FROM (
    SELECT location_id, locatable_type, locatable_id, added_at FROM locationables
    UNION ALL
    SELECT pl.location_id, 'post', pl.post_id, pl.created_at FROM post_locations pl
    WHERE NOT EXISTS (SELECT 1 FROM locationables x
                      WHERE x.locatable_type = 'post' AND x.locatable_id = pl.post_id)
) loc
JOIN locations l ON l.id = loc.location_id
JOIN (SELECT *, created_at AS nb_added FROM noteables) nb
  ON nb.noteable_type = loc.locatable_type AND nb.noteable_id = loc.locatable_id
JOIN notes n ON n.id = nb.note_id
{where}
ORDER BY report_id
"""
COMMUNITY_WATERMARK = "GREATEST(n.updated_at, nb.nb_added, loc.added_at)"

# Seed 001: condition_reports with a geography point.
ROAD_CONDITIONS = """
SELECT id::text AS report_id, ST_Y(location::geometry) AS lat, ST_X(location::geometry) AS lng,
       submitted_at AS observed_at, condition_type AS category, severity,
       description, session_token, activity_context AS activity, upvotes,
       submitted_at AS _watermark
FROM condition_reports
{where}
ORDER BY submitted_at, id
"""
ROAD_WATERMARK = "submitted_at"

# Seed 002: campus issues.
CAMPUS_ISSUES = """
SELECT id::text AS report_id, latitude AS lat, longitude AS lng, created_at AS observed_at,
       category, severity, priority, status, organization_id AS organization, building_id AS building,
       updated_at AS _watermark
FROM issues
{where}
ORDER BY created_at, id
"""
CAMPUS_WATERMARK = "updated_at"

# Seed 003: GTFS stops joined to their realtime stats over the last time_range_hours.
RAIL_DISRUPTIONS = """
SELECT s.stop_id AS report_id, 'station' AS entity_type, s.stop_id AS entity_id,
       s.stop_lat AS lat, s.stop_lon AS lng, 'station' AS category,
       max(r.period_end) AS observed_at,
       sum(r.departures) AS departures, sum(r.cancellations) AS cancellations, sum(r.delays) AS delays,
       max(r.updated_at) AS _watermark
FROM stops s
JOIN realtime_station_stats r ON r.stop_id = s.stop_id
WHERE r.period_end > TIMESTAMPTZ {as_of} - make_interval(secs => {range_s})
  AND r.period_end <= TIMESTAMPTZ {as_of}
  {and_where}
GROUP BY s.stop_id, s.stop_lat, s.stop_lon
ORDER BY s.stop_id
"""
RAIL_WATERMARK = "s.stop_id IN (SELECT stop_id FROM realtime_station_stats WHERE updated_at >= {mark})"

ADAPTERS = {
    "community_needs": (COMMUNITY_NEEDS, COMMUNITY_WATERMARK),
    "road_conditions": (ROAD_CONDITIONS, ROAD_WATERMARK),
    "campus_issues": (CAMPUS_ISSUES, CAMPUS_WATERMARK),
    "rail_disruptions": (RAIL_DISRUPTIONS, RAIL_WATERMARK),
}


def server_sql(src: PostgresSource, since: str | None, as_of: datetime) -> str:
    """The SQL the server runs; ``since`` is the last watermark (None: everything)."""
    mark = None if since is None else literal(since)
    if src.adapter == "rail_disruptions":
        template, condition = ADAPTERS[src.adapter]
        and_where = "" if mark is None else "AND " + condition.format(mark=mark)
        return template.format(
            as_of=literal(as_of.isoformat()), range_s=float(src.time_range_hours) * 3600, and_where=and_where
        )
    if src.adapter is not None:
        template, column = ADAPTERS[src.adapter]
        return template.format(where="" if mark is None else f"WHERE {column} >= {mark}")
    if src.table is not None:
        mapped = src.columns.mapped() if src.columns else {}
        cols = []
        for canonical, column in mapped.items():
            if canonical == "geometry":  # geography / geometry -> WKB, decoded by DuckDB spatial
                cols.append(f"ST_AsBinary({quote(column)}::geometry) AS {quote(column)}")
            else:
                cols.append(quote(column))
        if src.watermark:
            cols.append(f"{quote(src.watermark)} AS _watermark")
        table = ".".join(quote(part) for part in src.table.split("."))
        where = "" if mark is None or not src.watermark else f" WHERE {quote(src.watermark)} >= {mark}"
        return f"SELECT {', '.join(dict.fromkeys(cols))} FROM {table}{where}"
    where = "" if mark is None or not src.watermark else f" WHERE {quote(src.watermark)} >= {mark}"
    extra = f", {quote(src.watermark)} AS _watermark" if src.watermark else ""
    return f"SELECT q.*{extra} FROM ({src.query}) q{where}"


def column_mapping(src: PostgresSource) -> dict[str, str]:
    """Canonical -> result column: adapters already speak canonical names."""
    if src.adapter is not None:
        return {c: c for c in ADAPTER_COLUMNS[src.adapter]}
    return src.columns.mapped()


_REPORT = ("report_id", "lat", "lng", "observed_at", "category", "severity")
_ENTITY = ("report_id", "entity_type", "entity_id", "lat", "lng")
ADAPTER_COLUMNS = {
    "community_needs": (*_ENTITY, "observed_at", "expires_at", "category", "severity", "is_public"),
    "road_conditions": (*_REPORT, "description", "session_token", "activity", "upvotes"),
    "campus_issues": (*_REPORT, "priority", "status", "organization", "building"),
    "rail_disruptions": (*_ENTITY, "category", "observed_at", "departures", "cancellations", "delays"),
}


def dsn(src: PostgresSource) -> tuple[str, str | None]:
    """The libpq connection string and the password in it (to keep out of messages)."""
    password = os.environ.get(src.password_env) if src.password_env else None
    if src.password_env and password is None:
        raise SourceError(f"environment variable {src.password_env} (password_env) is not set")
    parts = {
        "host": src.host,
        "port": src.port,
        "dbname": src.database,
        "user": src.user,
        "password": password,
        "connect_timeout": 10,
    }
    text = " ".join(f"{k}={_libpq_value(v)}" for k, v in parts.items() if v is not None)
    return text, password


def _libpq_value(value) -> str:
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'" if re.search(r"[\s'\\]", text) else text


def where(src: PostgresSource) -> str:
    """Where the source is, for messages and logs (never the password)."""
    return f"postgresql://{src.user}@{src.host}:{src.port}/{src.database}"


def explain(exc: Exception, password: str | None) -> str:
    """One line saying what failed, with the password and connection string removed."""
    text = str(exc)
    if password:
        text = text.replace(password, "***")
    text = re.sub(r'Unable to connect to Postgres at "[^"]*": ', "", text)
    text = re.sub(r"^[A-Za-z ]+ Error: ", "", text)
    text = re.sub(r'^Failed to prepare query "[^"]*": ', "", text, flags=re.S)
    first = " ".join(line.strip() for line in text.strip().splitlines()[:1])
    return first.replace("ERROR:  ", "").replace("FATAL:  ", "")[:400]


class Fetched(NamedTuple):
    """A database source's rows, read into the temporary table ``_pg_<source>``."""

    table: str
    incremental: bool
    since: str | None
    label: str


def fetch(
    con: duckdb.DuckDBPyConnection,
    name: str,
    src: PostgresSource,
    as_of: datetime,
    full_refresh: bool,
    since: str | None,
) -> Fetched:
    """Read the source's rows from the server into a temporary table.

    Runs outside the warehouse's write transaction (DuckDB cannot detach a
    database a transaction used), and writes nothing to the warehouse.

    Raises
    ------
    SourceError
        One line naming the source and what failed: connection, password,
        table or column. The password never appears in it.
    """
    incremental = src.incremental and not full_refresh and since is not None
    table = f"_pg_{re.sub(r'[^a-z0-9_]', '_', name)}"
    query(con, name, src, server_sql(src, since if incremental else None, as_of), into=table)
    mapping = column_mapping(src)
    have = {c.lower() for c, *_ in con.execute(f"DESCRIBE {table}").fetchall()}
    missing = [c for c in mapping.values() if c.lower() not in have]
    if missing:
        raise SourceError(f"source {name}: {where(src)} returned no column(s) {', '.join(missing)}")
    label = f"{where(src)} ({'incremental since ' + since if incremental else 'full refresh'})"
    return Fetched(table, incremental, since, label)


def query(
    con: duckdb.DuckDBPyConnection, name: str, src: PostgresSource, sql: str, into: str | None = None
) -> list[tuple]:
    """Run ``sql`` on the source's server (attached to ``con`` read-only, detached after): its rows,
    or, given ``into``, none and a temporary table of them by that name.

    Raises
    ------
    SourceError
        One line naming the source and what failed (connection or query); never the password.
    """
    conninfo, password = dsn(src)
    alias = f"pg_{re.sub(r'[^a-z0-9_]', '_', name)}"
    try:
        con.execute(f"ATTACH {literal(conninfo)} AS {alias} (TYPE postgres, READ_ONLY)")
    except duckdb.Error as exc:
        raise SourceError(f"source {name}: cannot connect to {where(src)}: {explain(exc, password)}") from None
    rows = f"SELECT * FROM postgres_query({literal(alias)}, {literal(sql)})"
    try:
        if into is None:
            return con.execute(rows).fetchall()
        con.execute(f"CREATE OR REPLACE TEMP TABLE {into} AS {rows}")
        return []
    except duckdb.Error as exc:
        raise SourceError(f"source {name}: query failed on {where(src)}: {explain(exc, password)}") from None
    finally:
        con.execute(f"DETACH {alias}")


def stage_fetched(
    con: duckdb.DuckDBPyConnection, name: str, src: PostgresSource, fetched: Fetched, as_of: datetime
) -> tuple[list[FileResult], str | None]:
    """Stage fetched rows into ``raw_reports`` (upserting by id when incremental).

    Returns one result for the run and the new watermark (the largest read).
    """
    mapping = column_mapping(src)
    table = fetched.table
    if fetched.incremental:  # upsert: changed rows replace themselves by id
        id_column = quote(mapping["report_id"])
        con.execute(
            "DELETE FROM raw_reports WHERE source = ? AND report_id IN "
            f"(SELECT CAST({id_column} AS VARCHAR) FROM {table})",
            [name],
        )
        start = con.execute(
            "SELECT coalesce(max(row_number), 0) + 1 FROM raw_reports WHERE source = ? AND file = ?", [name, where(src)]
        ).fetchone()[0]
    else:
        con.execute("DELETE FROM raw_reports WHERE source = ?", [name])
        start = 1
    result = stage_relation(con, name, where(src), numbered_table(table, start), mapping, src.entity_type or name)
    watermark = fetched.since
    types = dict((c, t) for c, t, *_ in con.execute(f"DESCRIBE {table}").fetchall())
    if "_watermark" in types:
        # A time watermark never passes as_of: rows dated in the future (a clock
        # gone wrong) are read again until their time, not let leap the mark.
        bounded = "WHERE _watermark <= $as_of" if types["_watermark"].startswith("TIMESTAMP") else ""
        newest = con.execute(
            f"SELECT CAST(max(_watermark) AS VARCHAR) FROM {table} {bounded}", {"as_of": as_of} if bounded else {}
        ).fetchone()[0]
        watermark = newest if newest is not None else fetched.since
    return [result._replace(file=fetched.label)], watermark
