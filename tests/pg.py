"""A real PostgreSQL 15 + PostGIS server for tests and benchmarks: loopback, temp dir, killed after.

Debian's packages (``postgresql-15-postgis-3``, installed by ``.ci/run``). The
server runs as the ``postgres`` user in its own session and is ended with
SIGKILL to its process group, since background processes here ignore SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

BIN = Path("/usr/lib/postgresql/15/bin")
POSTGIS = Path("/usr/share/postgresql/15/extension/postgis.control")
PASSWORD = "s3cret-pw-for-tests"


class Server(NamedTuple):
    host: str
    port: int
    user: str
    password: str

    def dsn(self, database: str) -> str:
        return f"host={self.host} port={self.port} dbname={database} user={self.user} password={self.password}"


def missing() -> str | None:
    """Why a server cannot start here, or None."""
    if not (BIN / "postgres").exists():
        return f"no PostgreSQL 15 server at {BIN} (apt-get install postgresql-15-postgis-3)"
    if not POSTGIS.exists():
        return "no PostGIS for PostgreSQL 15 (apt-get install postgresql-15-postgis-3)"
    return None


def _as_postgres(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server() -> Iterator[Server]:
    """Start a throwaway server with a password-protected role ``hotspots``."""
    root = Path(tempfile.mkdtemp(prefix="hotspots-pg-"))
    shutil.chown(root, "postgres")
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    shutil.chown(sockets, "postgres")
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    shutil.chown(pwfile, "postgres")
    _as_postgres(
        str(BIN / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth=scram-sha-256",
        f"--pwfile={pwfile}",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    )
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(BIN / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(sockets),
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "synchronous_commit=off",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        for _ in range(200):
            ready = subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
            if ready.returncode == 0:
                break
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text())
            time.sleep(0.1)
        psql = [str(BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        subprocess.run(
            [*psql, "-c", f"CREATE ROLE hotspots LOGIN SUPERUSER PASSWORD '{PASSWORD}'"],
            env=env,
            check=True,
            capture_output=True,
        )
        yield Server("127.0.0.1", port, "hotspots", PASSWORD)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def create_database(srv: Server, name: str, ddl: str) -> None:
    """A database with PostGIS and the given schema."""
    import psycopg

    with psycopg.connect(srv.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(srv.dsn(name), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        conn.execute(ddl)
