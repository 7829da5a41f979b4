"""The viewer and `hotspots serve`: HTTP like a static host, and a real Chromium rendering the default run."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import load_config

from .conftest import AS_OF, IN_CI, REPO

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The default hotspots.yaml, run and served on loopback."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(REPO / "hotspots.yaml", root / "hotspots.yaml")
    run = subprocess.run([str(BIN / "hotspots"), "run", "--as-of", AS_OF.isoformat()], cwd=root,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "hotspots"), "serve", "--port", str(port)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/tilesets.json", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        yield url, load_config(root / "hotspots.yaml")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _get(url: str, **headers):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)


def test_serve_speaks_like_a_static_host(site):
    url, cfg = site
    latest = json.loads(_get(f"{url}/road_conditions/latest.json").read())
    snap = f"{url}/road_conditions/{latest['path']}"
    page = _get(f"{url}/index.html")
    assert page.headers["Content-Type"].startswith("text/html") and page.headers["Cache-Control"] == "no-cache"
    assert page.headers["Access-Control-Allow-Origin"] == "*"
    assert _get(f"{url}/road_conditions/latest.json").headers["Cache-Control"] == "no-cache"
    part = _get(f"{snap}heatmap.pmtiles", Range="bytes=0-126")
    assert part.status == 206 and part.headers["Content-Range"].startswith("bytes 0-126/")
    assert part.read()[:7] == b"PMTiles" and part.headers["Cache-Control"].endswith("immutable")
    assert part.headers["Content-Type"] == "application/vnd.pmtiles"
    tile = next((cfg.output / "road_conditions" / latest["path"] / "mvt").rglob("*.mvt"))
    rel = tile.relative_to(cfg.output).as_posix()
    mvt = _get(f"{url}/{rel}")
    assert mvt.headers["Content-Encoding"] == "gzip" and mvt.headers["Content-Type"] == "application/vnd.mapbox-vector-tile"
    assert _get(f"{snap}tiles/0/0/0.geojson").headers["Content-Type"] == "application/geo+json"
    if (REPO / "web" / "node_modules" / "maplibre-gl").exists() or IN_CI:
        assert _get(f"{url}/_lib/maplibre-gl.js").status == 200 and _get(f"{url}/_lib/pmtiles.js").status == 200
    for bad in ("/road_conditions/", "/../hotspots.yaml", "/.hotspots/warehouse.duckdb"):
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(url + bad)
        assert info.value.code == 404


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("no /usr/bin/chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def _await(page, promise: str, seconds: int = 30):
    """Evaluate a JS promise, failing (not hanging) after ``seconds``."""
    return page.evaluate(
        f"Promise.race([{promise}, new Promise((_, no) => setTimeout(() => no(new Error('timed out: {promise[:40]}')), {seconds * 1000}))])"
    )


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    problems, tiles = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfinished", lambda r: tiles.append((r.url, r.response().status)) if "heatmap.pmtiles" in r.url else None)
    page.goto(url)
    _await(page, "window.hotspotsReady", 60)
    return page, problems, tiles


def _features_at(page, lng: float, lat: float, zoom: int) -> int:
    page.evaluate(f"window.hotspotsMap.jumpTo({{center: [{lng}, {lat}], zoom: {zoom}}})")
    page.wait_for_function("window.hotspotsMap.loaded() && window.hotspotsMap.areTilesLoaded()", timeout=30000)
    # wait for a fresh render; repaint explicitly, since an idle map fires no new 'idle'
    _await(page, "new Promise((r) => { window.hotspotsMap.once('idle', r); window.hotspotsMap.triggerRepaint(); })")
    visible = page.evaluate(
        f"(() => {{ const l = window.hotspotsMap.getLayer('heatmap'); return {zoom} >= (l.minzoom ?? 0) && {zoom} < (l.maxzoom ?? 24) "
        "&& window.hotspotsMap.getLayoutProperty('heatmap', 'visibility') !== 'none'; })()"
    )
    assert visible, zoom
    return page.evaluate("window.hotspotsMap.querySourceFeatures('cells', {sourceLayer: 'cells'}).length")


def test_the_viewer_renders_the_default_run_in_chromium(site, browser, tmp_path):
    from PIL import Image

    url, cfg = site
    latest = json.loads(_get(f"{url}/road_conditions/latest.json").read())
    overview = json.loads(_get(f"{url}/road_conditions/{latest['path']}overview/8.geojson").read())
    densest = max(overview["features"], key=lambda f: f["properties"]["count"])["geometry"]["coordinates"]
    page, problems, tiles = _open(browser, f"{url}/index.html?tileset=road_conditions")
    assert _features_at(page, *densest, 3) > 0
    assert _features_at(page, *densest, 12) > 0
    assert tiles and all(status in (200, 206) for _, status in tiles)
    assert problems == []
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    colours = shot.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    shot.save(tmp_path / "viewer.png")
    page.close()


def test_metric_toggles_hide_their_layers(site, browser):
    url, _ = site
    page, problems, _ = _open(browser, f"{url}/index.html?tileset=rail_disruptions")
    for metric in ("delays", "cancellations"):
        assert page.evaluate(f"window.hotspotsMap.getLayoutProperty('metric-{metric}', 'visibility')") in (None, "visible")
        page.click(f"#toggle-metric-{metric}")
        assert page.evaluate(f"window.hotspotsMap.getLayoutProperty('metric-{metric}', 'visibility')") == "none"
    assert page.evaluate("document.querySelectorAll('#tileset option').length") == 4
    assert problems == []
    page.close()
