"""Every DuckDB connection Hotspots opens is made here.

DuckDB lets one process write a database file, and a process that opens the
same file twice with different settings fails; so connections are made here,
always with the same settings, and the spatial extension loaded (where it is
needed) from the installed ``duckdb-extension-spatial`` wheel (never downloaded). The
warehouse (:mod:`pipeline.warehouse`) and the in-memory encoders
(:mod:`pipeline.vector`) both connect through :func:`connect`.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import duckdb

# no progress bar: DuckDB draws one on stdout for a query of over 2 s, into a batch job's logs
SETTINGS = {"TimeZone": "UTC", "enable_progress_bar": "false"}
# a warehouse connection's memory: beyond it DuckDB spills to <warehouse>.tmp/ (a 100M-report
# extraction then stays within a process's share of the machine); HOTSPOTS_DUCKDB_MEMORY overrides
WAREHOUSE_MEMORY = os.environ.get("HOTSPOTS_DUCKDB_MEMORY", "4GB")


@cache
def spatial_extension_path() -> Path:
    """Path of the spatial extension shipped in the installed wheel."""
    import duckdb_extension_spatial

    root = Path(duckdb_extension_spatial.__file__).parent / "extensions"
    found = sorted(root.glob(f"v{duckdb.__version__}/spatial.duckdb_extension"))
    if not found:
        raise RuntimeError(
            f"no spatial extension for duckdb {duckdb.__version__} under {root}; "
            "install duckdb-extension-spatial with the same version as duckdb"
        )
    return found[0]


@cache
def _wheel_extension(package: str, name: str) -> Path:
    module = __import__(package)
    root = Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    path = root / f"{name}.duckdb_extension"
    if not path.exists():
        raise RuntimeError(f"no {name} extension for duckdb {duckdb.__version__} under {root}")
    return path


def load_postgres(con: duckdb.DuckDBPyConnection, extension_dir: Path) -> None:
    """Load the postgres extension from the ``duckdb-extension-postgres`` wheel.

    DuckDB names an extension's entry point after its file, so it is
    installed from the wheel's file (a local copy into ``extension_dir``,
    no download) and loaded by name.
    """
    extension_dir.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET extension_directory = '{extension_dir}'")
    con.execute(f"INSTALL '{_wheel_extension('duckdb_extension_postgres', 'postgres')}'")
    con.execute("LOAD postgres")


def connect(
    path: str | Path | None = None, *, read_only: bool = False, spatial: bool = True
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB connection with Hotspots' settings (and spatial loaded).

    Parameters
    ----------
    path : path-like, optional
        Database file; in-memory when omitted.
    read_only : bool
        Open the file read-only.
    spatial : bool
        Load the spatial extension (a quarter to half a second a connection).
        The warehouse stores no geometry: a connection that only reads it
        needs none.
    """
    con = duckdb.connect(str(path) if path else ":memory:", read_only=read_only)
    try:
        if spatial:
            con.execute(f"LOAD '{spatial_extension_path()}'")
        for key, value in SETTINGS.items():
            con.execute(f"SET {key} = '{value}'")
        if path:
            con.execute("SET memory_limit = ?", [WAREHOUSE_MEMORY])
    except Exception:
        con.close()
        raise
    return con
