"""Whether a source has something new: a cheap token of its current state, compared between looks.

The ``fresh_sources`` sensor takes a token per source every
``freshness_interval_s`` seconds and launches an extraction of the sources
whose token changed. A token is cheap to take, whatever the source's size:

* a file source: its files' paths, sizes and modification times (a stat each,
  no file opened; what extraction then reads is decided by content, see
  :mod:`pipeline.sources.files`);
* a PostgreSQL source: the largest watermark and how many rows have it
  (without a watermark: the row count), computed on the server over the rows
  at or after the previous look's largest, through the watermark's index;
* a synthetic source has no token: it changes only with ``as_of``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime

from . import duck, paths
from .config import Config, FileSource, PostgresSource
from .sources.files import list_files
from .sources.postgres import query, server_sql
from .sources.staging import literal


def token(cfg: Config, name: str, previous: str | None = None) -> str | None:
    """The state of source ``name`` now, as a short string; None: the source is not watched.

    ``previous`` is the last look's token: a database then reads only the
    rows at or after the largest watermark it saw.

    Raises
    ------
    SourceError
        A database that cannot be reached or queried (one line, no password).
    """
    src = cfg.sources[name]
    if isinstance(src, FileSource):
        return _files_token(src)
    if isinstance(src, PostgresSource):
        return _server_token(cfg, name, src, previous)
    return None


def _files_token(src: FileSource) -> str:
    seen = []
    for path in list_files(src):
        try:
            st = os.stat(path)
        except OSError:  # gone since the listing: the next look sees the folder as it is then
            continue
        seen.append((path, st.st_size, st.st_mtime_ns))
    return hashlib.blake2b(json.dumps(seen).encode(), digest_size=16).hexdigest()


SEP = "\t"  # between the token's largest watermark and its count


def _server_token(cfg: Config, name: str, src: PostgresSource, previous: str | None) -> str:
    marked = bool(src.adapter or src.watermark)
    since = ((previous or "").split(SEP)[0] or None) if marked else None  # the last look's largest watermark
    rows = server_sql(src, since, datetime.now(UTC))
    sep = literal(SEP)
    if marked:  # the largest watermark and how many rows have it: the same token whatever `since` was
        sql = (
            f"WITH q AS ({rows}) SELECT coalesce(CAST(m AS text), '') || {sep} || "
            "(SELECT count(*) FROM q WHERE _watermark >= m) FROM (SELECT max(_watermark) AS m FROM q) t"
        )
    else:  # no watermark: the row count
        sql = f"SELECT {sep} || count(*) FROM ({rows}) q"
    con = duck.connect(spatial=False)  # the query runs on the server and gives text
    try:
        duck.load_postgres(con, paths.duckdb_extensions(cfg.home))
        [(state,)] = query(con, name, src, sql)
    finally:
        con.close()
    return state or ""
