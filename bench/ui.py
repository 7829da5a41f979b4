"""`python -m bench ui`: "Materialize all" in the Dagster UI against `hotspots run`, on the demo.

The UI's button launches an asset backfill of every asset and every
partition (tileset); this bench launches the same backfill through the
webserver's GraphQL API of a `dagster dev` (webserver and daemon, as `make
dev` starts them), and times it from launch to the last tileset published.
The daemon picks a new backfill up on its fixed 30 s cycle, so what a user
waits depends on the moment of the click: the bench reports the part that
is Hotspots' (runs created -> every tileset published) and the expected wait
(half a cycle more). Target: no more than about twice `hotspots run`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET = 2.0
DAEMON_S = 30.0  # Dagster's backfill daemon starts new backfills' runs on this cycle (not configurable)
LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
}"""
ASSETS = """{ assetNodes { assetKey { path } isPartitioned } }"""
RUNS = """
query($id: String!) {
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) { ... on Runs { results { creationTime } } }
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dagster_dev(folder: Path, env: dict, port: int) -> subprocess.Popen:
    """``dagster dev`` (webserver and daemon, as ``make dev``) in its own session: end it with ``os.killpg``."""
    return subprocess.Popen(
        [BIN / "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


def _config(folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(REPO / "hotspots.yaml", folder / "hotspots.yaml")
    return folder / "hotspots.yaml"


def cli(folder: Path) -> float:
    config = _config(folder)
    started = time.perf_counter()
    subprocess.run([BIN / "hotspots", "run", "--config", str(config)], check=True, capture_output=True)
    return time.perf_counter() - started


def ui(folder: Path) -> tuple[float, float, float, list[str]]:
    """Seconds from launching the backfill until the daemon creates its runs, until every
    tileset is published, and until the backfill is done; and the tilesets it published."""
    config = _config(folder)
    env = {**os.environ, "HOTSPOTS_CONFIG": str(config), "DAGSTER_HOME": str(folder / "dagster")}
    # the reports are extracted (as the hourly schedule does); the UI user then materializes the tilesets
    subprocess.run([BIN / "hotspots", "run", "--config", str(config)], check=True, capture_output=True, env=env)
    latest = {p: p.stat().st_mtime for p in (folder / "output").glob("*/latest.json")}
    port = _free_port()
    server = dagster_dev(folder, env, port)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                nodes = _graphql(port, ASSETS)["assetNodes"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("dagster dev did not answer in 180 s") from None
                time.sleep(1)
        keys = [n["assetKey"] for n in nodes if n["isPartitioned"]]
        started, launched_at = time.perf_counter(), time.time()
        launched = _graphql(port, LAUNCH, {"params": {"assetSelection": keys, "allPartitions": True}})
        backfill = launched["launchPartitionBackfill"]
        if "backfillId" not in backfill:
            raise RuntimeError(f"backfill not launched: {backfill}")
        published_s = None
        while True:
            if published_s is None and all(p.stat().st_mtime > before for p, before in latest.items()):
                published_s = time.perf_counter() - started
            status = _graphql(port, STATUS, {"id": backfill["backfillId"]})["partitionBackfillOrError"]["status"]
            if status not in ("REQUESTED", "CANCELING"):
                break
            time.sleep(0.25)
        done_s = time.perf_counter() - started
        runs = _graphql(port, RUNS, {"id": backfill["backfillId"]})["runsOrError"]["results"]
        first_s = min(r["creationTime"] for r in runs) - launched_at
        if status not in ("COMPLETED", "COMPLETED_SUCCESS") or published_s is None:
            raise RuntimeError(f"backfill ended {status}")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    return first_s, published_s, done_s, sorted(p.parent.name for p in latest)


def main() -> bool:
    with tempfile.TemporaryDirectory(prefix="hotspots-ui-bench-") as tmp:
        cli_s = cli(Path(tmp) / "cli")
        first_s, ui_s, done_s, published = ui(Path(tmp) / "ui")
    runs_s = ui_s - first_s  # from the daemon's runs to the last tileset published: Hotspots' part
    expected_s = DAEMON_S / 2 + runs_s  # a click at a random moment waits half the daemon's cycle
    ratio = expected_s / cli_s
    print("ui: materialize every tileset (an asset backfill of all partitions) against `hotspots run`, demo")
    print(f"  hotspots run                       {cli_s:7.1f} s")
    print(f"  UI: backfill daemon made the runs  {first_s:7.1f} s   (it looks every {DAEMON_S:.0f} s)")
    print(f"  UI: every tileset published       {ui_s:7.1f} s   ({', '.join(published)})")
    print(f"  UI: backfill marked done          {done_s:7.1f} s")
    print(f"  runs: created -> published        {runs_s:7.1f} s   ({runs_s / cli_s:.2f}x hotspots run)")
    print(f"  a click at a random moment        {expected_s:7.1f} s   (worst moment {DAEMON_S + runs_s:.1f} s)")
    ok = ratio <= TARGET and len(published) == 4
    print(f"  ratio                             {ratio:7.2f}x  (target <= {TARGET}x) {'ok' if ok else 'MISSED'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
