"""`python -m bench ui`: "Materialize all" in the Dagster UI against `hotspots run`, on the demo.

The UI's button launches an asset backfill of every asset and every
partition (tileset); this bench launches the same backfill through the
webserver's GraphQL API of a `dagster dev` (webserver and daemon, as `make
dev` starts them), and times it from launch to the last tileset published.
Target: no more than about twice `hotspots run` on the same config.
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
ASSETS = """{ assetNodes { assetKey { path } } }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def ui(folder: Path) -> tuple[float, list[str]]:
    """Seconds from launching the backfill to its end, and the tilesets it published."""
    config = _config(folder)
    port = _free_port()
    env = {**os.environ, "HOTSPOTS_CONFIG": str(config), "DAGSTER_HOME": str(folder / "dagster")}
    (folder / "dagster").mkdir()
    server = subprocess.Popen(
        [BIN / "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                keys = [n["assetKey"] for n in _graphql(port, ASSETS)["assetNodes"]]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("dagster dev did not answer in 180 s") from None
                time.sleep(1)
        started = time.perf_counter()
        launched = _graphql(port, LAUNCH, {"params": {"assetSelection": keys, "allPartitions": True}})
        backfill = launched["launchPartitionBackfill"]
        if "backfillId" not in backfill:
            raise RuntimeError(f"backfill not launched: {backfill}")
        while True:
            status = _graphql(port, STATUS, {"id": backfill["backfillId"]})["partitionBackfillOrError"]["status"]
            if status not in ("REQUESTED", "CANCELING"):
                break
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        if status not in ("COMPLETED", "COMPLETED_SUCCESS"):
            raise RuntimeError(f"backfill ended {status}")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    return seconds, sorted(p.parent.name for p in (folder / "output").glob("*/latest.json"))


def main() -> bool:
    with tempfile.TemporaryDirectory(prefix="hotspots-ui-bench-") as tmp:
        cli_s = cli(Path(tmp) / "cli")
        ui_s, published = ui(Path(tmp) / "ui")
    ratio = ui_s / cli_s
    print("ui: 'Materialize all' (asset backfill, every partition) against `hotspots run`, demo config")
    print(f"  hotspots run           {cli_s:7.1f} s")
    print(f"  UI backfill            {ui_s:7.1f} s   published: {', '.join(published)}")
    ok = ratio <= TARGET and len(published) == 4
    print(f"  ratio                  {ratio:7.2f}x  (target <= {TARGET}x) {'ok' if ok else 'MISSED'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
