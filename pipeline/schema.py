"""The canonical report and the warehouse tables (DESIGN.md, "Canonical report")."""

from __future__ import annotations

# Canonical column -> DuckDB type. Every source maps into these.
REPORT_COLUMNS: dict[str, str] = {
    "report_id": "VARCHAR",  # `source:id`, unique
    "source": "VARCHAR",
    "entity_type": "VARCHAR",  # seed 000's polymorphic type
    "entity_id": "VARCHAR",
    "lat": "DOUBLE",
    "lng": "DOUBLE",
    "observed_at": "TIMESTAMPTZ",
    "expires_at": "TIMESTAMPTZ",  # seed 000 notes
    "category": "VARCHAR",  # condition type / issue category / note severity label
    "severity": "DOUBLE",  # on the profile's scale
    "priority": "VARCHAR",  # seed 002
    "status": "VARCHAR",  # seed 002
    "organization": "VARCHAR",  # seed 002 filter
    "building": "VARCHAR",  # seed 002 filter
    "activity": "VARCHAR",  # seed 001 activity_context
    "upvotes": "INTEGER",  # seed 001
    "departures": "DOUBLE",  # seed 003 metrics
    "cancellations": "DOUBLE",
    "delays": "DOUBLE",
    "is_public": "BOOLEAN",  # non-public rows never reach output/
    "session_token": "VARCHAR",  # rate limit only; never published
    "description": "VARCHAR",  # never published
}

# Where each report came from, kept beside the canonical columns (not mappable).
PROVENANCE: dict[str, str] = {"file": "VARCHAR", "row_number": "BIGINT"}

# The report's tile key (Morton, level 30; see tilemath.tile_key): shards read
# their ranges of it, and every cell key is a shift of it.
KEYS: dict[str, str] = {"tile_key": "UBIGINT"}

# Columns a source may map (`columns:` in the config). `geometry` is not
# canonical: a point geometry column gives lat/lng.
MAPPABLE = tuple(c for c in REPORT_COLUMNS if c != "source") + ("geometry",)
METRICS = ("departures", "cancellations", "delays")
PRIVATE = ("session_token", "description")  # never published, whatever the tileset

# Text-typed staging copy of what a source gave, before validation.
RAW_COLUMNS: dict[str, str] = {
    "source": "VARCHAR",
    "file": "VARCHAR",
    "row_number": "BIGINT",
    "issue": "VARCHAR",  # a reason found while reading (e.g. non_point_geometry)
    **{c: "VARCHAR" for c in REPORT_COLUMNS if c != "source"},
}

REJECTED_COLUMNS: dict[str, str] = {
    "source": "VARCHAR",
    "file": "VARCHAR",
    "row_number": "BIGINT",
    "report_id": "VARCHAR",  # the source's id as given, if any
    "reason": "VARCHAR",
    "fields": "VARCHAR",  # JSON object of the raw mapped fields, as text
}

# One row per file (or synthetic batch) read, per source and run.
SOURCE_FILES_COLUMNS: dict[str, str] = {
    "source": "VARCHAR",
    "file": "VARCHAR",
    "rows": "BIGINT",
    "error": "VARCHAR",  # why the file could not be read, else NULL
    "extracted_at": "TIMESTAMPTZ",
    # what the next extraction compares (a file source's file): unchanged, its rows are kept
    "size": "BIGINT",
    "mtime_ns": "BIGINT",
    "digest": "VARCHAR",  # BLAKE2b of the file's bytes
    "reader": "VARCHAR",  # a digest of the settings the file was read with (format, columns, ...)
}

# The last watermark read per database source (incremental extraction).
SOURCE_STATE_COLUMNS: dict[str, str] = {
    "source": "VARCHAR",
    "watermark": "VARCHAR",
    "extracted_at": "TIMESTAMPTZ",
}

TABLES = {
    "raw_reports": RAW_COLUMNS,
    "reports": {**REPORT_COLUMNS, **PROVENANCE, **KEYS},
    "rejected_reports": REJECTED_COLUMNS,
    "source_files": SOURCE_FILES_COLUMNS,
    "source_state": SOURCE_STATE_COLUMNS,
}


def ddl(table: str) -> str:
    """``CREATE TABLE IF NOT EXISTS`` statement of a warehouse table."""
    cols = ", ".join(f'"{name}" {typ}' for name, typ in TABLES[table].items())
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"
