"""Extraction and validation of sources into the warehouse.

Two steps, each one write transaction per source under the warehouse lock:

* :func:`stage` reads each source into ``raw_reports`` (text, as given) and
  logs each file read into ``source_files``;
* :func:`validate` turns ``raw_reports`` into ``reports`` and
  ``rejected_reports`` (see :mod:`pipeline.validate`).

Re-running either replaces the source's rows, so runs are idempotent.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from . import duck, warehouse
from .config import Config, FileSource
from .errors import SourceError
from .sources import FileResult, check_source_columns, needs_spatial, prefetch, stage_source
from .sources.files import reads_spatially
from .validate import CHECKED_TABLES, ValidationResult, source_flags, validate_source


class Conservation(NamedTuple):
    """``read = valid + rejected`` for one source, as found in the warehouse."""

    source: str
    read: int
    valid: int
    rejected: int

    @property
    def holds(self) -> bool:
        return self.read == self.valid + self.rejected


def preflight(cfg: Config, sources: list[str]) -> None:
    """Check mapped columns against the files' headers before any write.

    Raises
    ------
    ConfigError
        Naming ``sources.<name>.columns.<column>``.
    """
    files = [cfg.sources[n] for n in sources if isinstance(cfg.sources[n], FileSource)]
    # spatial only where a file is read with ST_Read (loading it takes a quarter to half a second)
    con = duck.connect(spatial=any(reads_spatially(src) for src in files))
    try:
        check_source_columns(con, cfg, sources)
    finally:
        con.close()


def stage(
    cfg: Config, sources: list[str], as_of: datetime, full_refresh: bool = False, force: bool = False
) -> dict[str, list[FileResult]]:
    """Read each source into ``raw_reports``; one :class:`FileResult` per file.

    A source that fails raises; what it had staged before stays as it was. A
    file that cannot be read fails its source unless the source says
    ``on_unreadable_file: skip`` or ``force`` is given (the file is then
    recorded in ``source_files`` and skipped).
    """
    results: dict[str, list[FileResult]] = {}
    spatial = any(needs_spatial(cfg.sources[name]) for name in sources)
    with warehouse.writer(cfg.warehouse_path, spatial=spatial) as con:
        _forget_removed_sources(con, cfg)
        for name in sources:
            fetched = prefetch(con, name, cfg, as_of, full_refresh)  # a database's rows, read first
            con.execute("BEGIN TRANSACTION")
            try:
                files = stage_source(con, name, cfg, as_of, fetched)
                if not force:
                    _fail_on_unreadable(name, cfg.sources[name], files)
                con.execute("DELETE FROM source_files WHERE source = ?", [name])
                if files:  # a glob may match none (yet)
                    con.executemany(
                        "INSERT INTO source_files (source, file, rows, error, extracted_at, size, mtime_ns, digest, "
                        "reader) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [[name, f.file, f.rows, f.error, as_of, *(f.identity or (None,) * 4)] for f in files],
                    )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            results[name] = files
    return results


def _fail_on_unreadable(name: str, src, files: list[FileResult]) -> None:
    """A file that could not be read at all fails its source, unless it says ``on_unreadable_file: skip``."""
    bad = [f for f in files if f.error]
    if not bad or getattr(src, "on_unreadable_file", "fail") == "skip":
        return
    more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
    raise SourceError(
        f"source {name}: cannot read {bad[0].file}: {bad[0].error}{more}; the warehouse keeps the "
        "source's previous rows (`on_unreadable_file: skip` reads the other files)"
    )


def validate(
    cfg: Config, sources: list[str], as_of: datetime, full_refresh: bool = False
) -> dict[str, ValidationResult]:
    """Validate each source's staged rows into ``reports`` / ``rejected_reports``.

    ``full_refresh``: every row is checked again (not only new files' rows).
    """
    results = {}
    with warehouse.writer(cfg.warehouse_path) as con:
        if full_refresh:
            _forget_checked(con, sources)
        for name in sources:
            src = cfg.sources[name]
            formats = src.formats() if isinstance(src, FileSource) else []
            files = isinstance(src, FileSource)
            results[name] = validate_source(con, name, src.rules, formats, as_of, **source_flags(src), files=files)
    return results


def conservation(db: Path, sources: list[str]) -> list[Conservation]:
    """Per source: rows staged, valid and rejected, read back from the warehouse."""
    with warehouse.reader(db) as con:
        return [
            Conservation(
                name,
                *con.execute(
                    """
                    SELECT (SELECT count(*) FROM raw_reports WHERE source = $s),
                           (SELECT count(*) FROM reports WHERE source = $s),
                           (SELECT count(*) FROM rejected_reports WHERE source = $s)
                    """,
                    {"s": name},
                ).fetchone(),
            )
            for name in sources
        ]


def source_counts(db: Path, source: str) -> dict:
    """Rows read, valid and rejected (by reason) for one source, from the warehouse."""
    with warehouse.reader(db) as con:
        read = con.execute("SELECT count(*) FROM raw_reports WHERE source = ?", [source]).fetchone()[0]
        valid = con.execute("SELECT count(*) FROM reports WHERE source = ?", [source]).fetchone()[0]
        rejected = dict(
            con.execute(
                "SELECT reason, count(*) FROM rejected_reports WHERE source = ? GROUP BY reason ORDER BY reason",
                [source],
            ).fetchall()
        )
    return {"read": read, "valid": valid, "rejected": rejected}


def _forget_removed_sources(con, cfg: Config) -> None:
    keep = list(cfg.sources)
    for table in ("raw_reports", "reports", "rejected_reports", "source_files", "source_state", *_checked(con)):
        con.execute(f"DELETE FROM {table} WHERE NOT list_contains($keep, source)", {"keep": keep})


def _checked(con) -> list[str]:
    """The tables where validation keeps what it found of file sources' rows, once it has made them."""
    made = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    return [t for t in CHECKED_TABLES if t in made]


def _forget_checked(con, sources: list[str]) -> None:
    """What validation kept of these sources' rows (see ``validate._check_new_files``) is gone."""
    for table in _checked(con):
        con.execute(f"DELETE FROM {table} WHERE list_contains($sources, source)", {"sources": sources})


class RejectedRow(NamedTuple):
    """One rejected row as ``hotspots rejected`` shows it."""

    file: str
    line: int
    reason: str
    fields: dict  # the raw text of the mapped fields that were given


def rejected_rows(db: Path, source: str, reason: str | None = None, limit: int = 10) -> list[RejectedRow]:
    """Sample rejected rows of a source (first by file and line), optionally of one reason."""
    with warehouse.reader(db) as con:
        rows = con.execute(
            "SELECT file, row_number, reason, fields FROM rejected_reports "
            "WHERE source = $s AND ($r IS NULL OR reason = $r) ORDER BY file, row_number LIMIT $n",
            {"s": source, "r": reason, "n": limit},
        ).fetchall()
    return [
        RejectedRow(file, line, why, {k: v for k, v in json.loads(fields or "{}").items() if v is not None})
        for file, line, why, fields in rows
    ]


def unreadable_files(db: Path, source: str) -> list[tuple[str, str]]:
    """Files of a source that could not be read in its last extraction, and why."""
    with warehouse.reader(db) as con:
        return con.execute(
            "SELECT file, error FROM source_files WHERE source = ? AND error IS NOT NULL ORDER BY file", [source]
        ).fetchall()
