"""The viewer and `hotspots serve`: HTTP like a static host, and a real Chromium rendering published runs.

Chromium runs offline (no host name resolves); every request the page makes is recorded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pipeline import strictjson
from pipeline.config import load_config

from .conftest import AS_OF, IN_CI, REPO

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]  # offline: no name resolves


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(root: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "hotspots"), "serve", "--port", str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/tilesets.json", timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    return proc, url


def _hotspots_run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "hotspots"), "run", "--as-of", AS_OF.isoformat()],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The default hotspots.yaml, run and served on loopback."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(REPO / "hotspots.yaml", root / "hotspots.yaml")
    run = _hotspots_run(root)
    assert run.returncode == 0, run.stderr
    assert "map: `hotspots serve` (make serve), then open http://127.0.0.1:8000/index.html" in run.stdout
    proc, url = _serve(root)
    try:
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
    assert page.headers["Access-Control-Allow-Origin"] == "*" and page.headers["X-Content-Type-Options"] == "nosniff"
    assert _get(f"{url}/road_conditions/latest.json").headers["Cache-Control"] == "no-cache"
    part = _get(f"{snap}heatmap.pmtiles", Range="bytes=0-126")
    assert part.status == 206 and part.headers["Content-Range"].startswith("bytes 0-126/")
    assert part.read()[:7] == b"PMTiles" and part.headers["Cache-Control"].endswith("immutable")
    assert part.headers["Content-Type"] == "application/vnd.pmtiles"
    tile = next((cfg.output / "road_conditions" / latest["path"] / "mvt").rglob("*.mvt"))
    rel = tile.relative_to(cfg.output).as_posix()
    mvt = _get(f"{url}/{rel}")
    assert (
        mvt.headers["Content-Encoding"] == "gzip"
        and mvt.headers["Content-Type"] == "application/vnd.mapbox-vector-tile"
    )
    assert _get(f"{snap}tiles/0/0/0.geojson").headers["Content-Type"] == "application/geo+json"
    if (REPO / "web" / "node_modules" / "maplibre-gl").exists() or IN_CI:  # published beside the page
        for lib in ("maplibre-gl-csp.js", "maplibre-gl-csp-worker.js", "pmtiles.js", "countries-50m.json"):
            assert _get(f"{url}/_lib/{lib}").status == 200
    for bad in ("/road_conditions/", "/../hotspots.yaml", "/.hotspots/warehouse.duckdb"):
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(url + bad)
        assert info.value.code == 404


def test_every_public_json_file_of_the_default_run_is_strict_json(site):
    _, cfg = site
    files = [p for p in cfg.output.rglob("*") if p.suffix in (".json", ".geojson") and "_lib" not in p.parts]
    kinds = {p.name if p.suffix == ".json" else p.relative_to(cfg.output).parts[3] for p in files}
    # manifests, TileJSON, latest.json, tilesets.json, viewer.json; tiles/<z>/<x>/<y>.geojson, overview/<z>.geojson
    assert kinds == {"manifest.json", "tiles.json", "latest.json", "tilesets.json", "viewer.json", "tiles", "overview"}
    for path in files:
        strictjson.load(path)  # NaN / Infinity raise


def test_the_page_ships_a_content_security_policy(site):
    url, _ = site
    page = _get(f"{url}/index.html").read().decode()
    [csp] = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert "script-src 'self';" in csp and "default-src 'none';" in csp and "unsafe" not in csp
    assert "<script>" not in page and not re.search(r"<[^>]*\son[a-z]+\s*=", page)  # no inline script or handler


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
        f"Promise.race([{promise}, new Promise((_, no) => "
        f"setTimeout(() => no(new Error('timed out: {promise[:40]}')), {seconds * 1000}))])"
    )


class Visit:
    """A page of the viewer with everything it did recorded: console errors, requests, dialogs."""

    def __init__(self, browser, site_url: str, path: str, allow: tuple[str, ...] = ()):
        self.page = browser.new_page(viewport={"width": 900, "height": 700})
        self.problems, self.requests, self.dialogs, self.tiles = [], [], [], []
        self.site = site_url
        page = self.page
        page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(str(e)))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("response", lambda r: self.tiles.append((r.url, r.status)) if "heatmap.pmtiles" in r.url else None)

        # (recorded, not intercepted: routing every request through Python slows each frame by seconds)
        page.on("request", lambda r: self.requests.append(r.url))
        page.add_init_script(
            "window.__violations = []; document.addEventListener('securitypolicyviolation', "
            "(e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        page.goto(f"{site_url}/{path}")
        self.map = _await(page, "window.hotspotsReady.then((m) => !!m)", 60)

    @property
    def elsewhere(self) -> list[str]:
        """Requests for anything but the site itself (and what the page made in memory)."""
        return [r for r in self.requests if not r.startswith((self.site + "/", "data:", "blob:"))]

    def idle(self):
        # (never return the map or an event from evaluate: serialising its object graph takes seconds)
        _await(
            self.page,
            "new Promise((r) => { window.hotspotsMap.once('idle', () => r(true)); "
            "window.hotspotsMap.triggerRepaint(); })",
        )

    def jump(self, lng: float, lat: float, zoom: float):
        self.page.evaluate(f"window.hotspotsMap.jumpTo({{center: [{lng}, {lat}], zoom: {zoom}}}) && null")
        # (wait_for_function evaluates a string: the page's policy refuses that, as it should)
        _await(
            self.page,
            "new Promise((r) => { const m = window.hotspotsMap; "
            "const check = () => (m.loaded() && m.areTilesLoaded() ? r(true) : setTimeout(check, 50)); check(); })",
        )
        self.idle()

    def popup_at_center(self) -> str:
        """Click the middle of the map; the popup's text ('' if none opened)."""
        self.page.evaluate("document.querySelectorAll('.maplibregl-popup').forEach((p) => p.remove())")
        self.page.mouse.click(450, 350)
        try:
            self.page.wait_for_selector(".maplibregl-popup-content", timeout=5000)
        except Exception:
            return ""
        return self.page.inner_text(".maplibregl-popup-content")

    def rendered(self, layer: str = "hit") -> list[dict]:
        return self.page.evaluate(
            f"window.hotspotsMap.queryRenderedFeatures(undefined, {{layers: ['{layer}']}}).map((f) => f.properties)"
        )

    def status(self) -> str:
        return self.page.inner_text("#status")


def _features_at(visit: Visit, lng: float, lat: float, zoom: int) -> int:
    visit.jump(lng, lat, zoom)
    page = visit.page
    visible = page.evaluate(
        f"(() => {{ const l = window.hotspotsMap.getLayer('heatmap'); "
        f"return {zoom} >= (l.minzoom ?? 0) && {zoom} < (l.maxzoom ?? 24) "
        "&& window.hotspotsMap.getLayoutProperty('heatmap', 'visibility') !== 'none'; })()"
    )
    assert visible, zoom
    return page.evaluate("window.hotspotsMap.querySourceFeatures('cells', {sourceLayer: 'cells'}).length")


def _densest(url: str, tileset: str, z: int = 8) -> list[float]:
    latest = json.loads(_get(f"{url}/{tileset}/latest.json").read())
    overview = json.loads(_get(f"{url}/{tileset}/{latest['path']}overview/{z}.geojson").read())
    return max(overview["features"], key=lambda f: f["properties"]["count"])["geometry"]["coordinates"]


def _colour_share(shot, rgb: tuple[int, int, int]) -> float:
    pixels = list(shot.getdata())
    return sum(1 for p in pixels if all(abs(a - b) <= 3 for a, b in zip(p, rgb))) / len(pixels)


def test_the_viewer_renders_the_default_run_in_chromium(site, browser, tmp_path):
    from PIL import Image

    url, cfg = site
    densest = _densest(url, "road_conditions")
    visit = Visit(browser, url, "index.html?tileset=road_conditions")
    page = visit.page
    # opened fitted to the data: all of it in view, and not zoomed far out
    view = page.evaluate(
        "(() => { const b = window.hotspotsMap.getBounds(); "
        "return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth(), window.hotspotsMap.getZoom()]; })()"
    )
    bbox = json.loads(
        _get(
            f"{url}/road_conditions/{json.loads(_get(f'{url}/road_conditions/latest.json').read())['path']}tiles.json"
        ).read()
    )["bounds"]
    assert (
        view[0] <= bbox[0] + 0.01
        and view[2] >= bbox[2] - 0.01
        and view[1] <= bbox[1] + 0.01
        and view[3] >= bbox[3] - 0.01
    )
    assert view[4] >= 9, view  # a city opens as a city
    assert re.fullmatch(r"#[\d.]+/[-\d.]+/[-\d.]+", page.evaluate("location.hash"))  # the view is in the URL
    assert page.query_selector(".maplibregl-ctrl-zoom-in") and page.query_selector(".maplibregl-ctrl-scale")
    assert page.evaluate("window.hotspotsBasemap") == "offline" and page.evaluate(
        "!!window.hotspotsMap.getLayer('land')"
    )
    assert "halve every" in page.inner_text("#legend") and "As of 2026-11-01T12:00:00+00:00" in page.inner_text(
        "#legend"
    )
    assert visit.status().startswith("snapshot ") and "reports" in visit.status()
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    assert len(shot.getcolors(maxcolors=1 << 20) or []) > 50, "the screenshot is (nearly) blank"
    assert _colour_share(shot, (0xF6, 0xF4, 0xEE)) > 0.05  # the offline basemap's land is drawn
    shot.save(tmp_path / "viewer.png")

    assert _features_at(visit, *densest, 3) > 0
    assert _features_at(visit, *densest, 12) > 0
    for zoom in (3, 8, 11, 14):  # popups at every zoom, on the heatmap too
        visit.jump(*densest, zoom)
        text = visit.popup_at_center()
        assert re.search(r"\d+ reports?", text) and "top category" in text and "last seen" in text, (zoom, text)
    assert visit.tiles and all(status in (200, 206) for _, status in visit.tiles)
    assert visit.problems == [] and visit.elsewhere == [] and visit.dialogs == []
    assert page.evaluate("window.__violations") == []  # the page keeps its own policy
    page.close()

    # the hash restores the view
    again = Visit(browser, url, "index.html?tileset=road_conditions#13.5/51.5/-0.12")
    center = again.page.evaluate(
        "[window.hotspotsMap.getZoom(), window.hotspotsMap.getCenter().lat, window.hotspotsMap.getCenter().lng]"
    )
    assert abs(center[0] - 13.5) < 0.01 and abs(center[1] - 51.5) < 1e-3 and abs(center[2] + 0.12) < 1e-3
    again.page.close()


def test_metric_toggles_coverage_and_rail_popups(site, browser):
    from PIL import Image

    url, _ = site
    visit = Visit(browser, url, "index.html?tileset=rail_disruptions")
    page = visit.page
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    assert (
        _colour_share(shot, (0xDF, 0xE9, 0xF0)) > 0.01 and _colour_share(shot, (0xF6, 0xF4, 0xEE)) > 0.05
    )  # sea, land
    swatches = page.evaluate(
        "[...document.querySelectorAll('#toggles .swatch')].map((s) => getComputedStyle(s).backgroundColor)"
    )
    assert len(swatches) == 3 and len(set(swatches)) == 3  # cancellations, delays, coverage: each its colour
    visit.jump(*_densest(url, "rail_disruptions"), 9)
    text = visit.popup_at_center()
    assert all(word in text for word in ("departures", "cancellations", "delays", "score")), text

    def shown() -> list[dict]:
        visit.idle()
        return visit.rendered()

    everything = shown()
    assert any(f.get("healthy") for f in everything) and any(
        f.get("delays", 0) > 0 and not f.get("cancellations") for f in everything
    )
    page.click("#toggle-coverage")
    assert shown() and not any(f.get("healthy") for f in shown())
    page.click("#toggle-metric-delays")
    assert page.evaluate("window.hotspotsMap.getLayoutProperty('metric-delays', 'visibility')") == "none"
    assert all(f.get("cancellations", 0) > 0 for f in shown())  # delay-only cells are hidden too
    page.click("#toggle-metric-cancellations")
    assert page.evaluate("window.hotspotsMap.getLayoutProperty('metric-cancellations', 'visibility')") == "none"
    assert shown() == []
    page.click("#toggle-coverage")
    assert shown() and all(f.get("healthy") for f in shown())
    assert page.evaluate("document.querySelectorAll('#tileset option').length") == 4
    assert visit.problems == [] and visit.elsewhere == []
    page.close()


# --- hostile data -------------------------------------------------------------------------------

HOSTILE = [
    "<img src=x onerror=\"document.title='XSS'\">",
    '<img src="{canary}/img" onerror="window.__pwned=1">',
    "<script>window.__pwned=1</script>",
    '"><svg onload="window.__pwned=1"><x a="',
    "javascript:window.__pwned=1",
    '<iframe src="{canary}/frame"></iframe>',
    '<a href="{canary}/link"><b>click</b></a>',
    "<style>@import url({canary}/css);</style>",
    "{{{{constructor.constructor('window.__pwned=1')()}}}}",
    '<meta http-equiv="refresh" content="0;url={canary}/meta">',
    "<details open ontoggle=alert(1)>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(2)>",
    "&lt;b&gt;entity&lt;/b&gt; \u202egnirts\u202c",
]


class Canary(BaseHTTPRequestHandler):
    """Records any request: data must never make the page fetch a URL it names."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        Canary.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    canary = ThreadingHTTPServer(("127.0.0.1", 0), Canary)
    threading.Thread(target=canary.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{canary.server_address[1]}"
    strings = [h.format(canary=base) for h in HOSTILE]
    rows = ["id,lat,lng,t,category"]
    for i, category in enumerate(strings):  # each string rules its own place, 3° apart
        lat, lng = -30 + 5 * (i // 6), -60 + 8 * (i % 6)
        rows += [
            f'{i}-{k},{lat + k / 1e4},{lng},2026-10-30T00:00:00Z,"{category.replace(chr(34), chr(34) * 2)}"'
            for k in range(3)
        ]
    rows.append("lonely,48.8566,2.3522,2026-10-30T00:00:00Z,lonely")
    (root / "hostile.csv").write_text("\n".join(rows) + "\n")
    style = f"http://127.0.0.1:{_free_port()}/style.json"  # nothing listens there
    source = {
        "kind": "file",
        "path": "hostile.csv",
        "columns": {"report_id": "id", "lat": "lat", "lng": "lng", "observed_at": "t", "category": "category"},
    }
    (root / "hotspots.yaml").write_text(
        yaml.safe_dump(
            {
                "output": "output",
                "home": ".hotspots",
                "viewer": {"style": style},  # unreachable: the offline basemap is drawn
                "sources": {"hostile": source},
                "tilesets": {
                    "hostile": {"source": "hostile", "maxzoom": 14},
                    "one": {"source": "hostile", "filters": {"categories": ["lonely"]}, "maxzoom": 14},
                    "empty": {"source": "hostile", "filters": {"categories": ["no such category"]}, "maxzoom": 4},
                },
            }
        )
    )
    run = _hotspots_run(root)
    assert run.returncode == 0, run.stderr
    # every other string the viewer shows, made hostile by hand: names, legends, ids, times
    out = root / "output"
    offered = json.loads((out / "tilesets.json").read_text())
    [entry] = [t for t in offered if t["name"] == "hostile"]
    entry.update(legend=strings[0], profile=strings[2], metrics=[strings[3]])
    offered += [{"name": strings[1], "profile": "generic", "metrics": []}, {"name": "../../x", "metrics": []}]
    (out / "tilesets.json").write_text(json.dumps(offered))
    latest_path = out / "hostile" / "latest.json"
    latest = json.loads(latest_path.read_text())
    latest["snapshot_id"] = strings[5]
    latest_path.write_text(json.dumps(latest))
    manifest_path = out / "hostile" / latest["path"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["as_of"] = strings[6]
    manifest_path.write_text(json.dumps(manifest))
    proc, url = _serve(root)
    try:
        yield url, strings, base, style
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        canary.shutdown()


def test_hostile_strings_are_shown_as_text_and_never_run(hostile_site, browser):
    url, strings, canary, style = hostile_site
    Canary.hits.clear()
    visit = Visit(browser, url, "index.html?tileset=hostile")
    page = visit.page
    assert visit.map, visit.status()
    assert page.evaluate("window.hotspotsBasemap") == "offline"  # the configured style is unreachable
    legend = page.inner_text("#legend")
    assert strings[0] in legend and strings[6] in legend  # markup shown as the text it is
    assert strings[5] in visit.status()
    options = page.evaluate("[...document.querySelectorAll('#tileset option')].map((o) => [o.textContent, o.disabled])")
    assert [strings[1], True] in options and ["../../x", True] in options
    toggles = page.inner_text("#toggles")
    assert "coverage" in toggles and strings[3] not in toggles  # only known metrics become controls

    for i, category in enumerate(strings):
        lat, lng = -30 + 5 * (i // 6), -60 + 8 * (i % 6)
        for zoom in (4, 9, 14):
            visit.jump(lng, lat + 1 / 1e4, zoom)
            text = visit.popup_at_center()
            assert category in text, (i, zoom, text)
            tags = page.evaluate("[...document.querySelectorAll('.maplibregl-popup-content *')].map((e) => e.tagName)")
            assert set(tags) <= {"STRONG", "DL", "DT", "DD", "DIV", "BUTTON"}, tags

    assert page.evaluate("typeof window.__pwned") == "undefined" and page.title() == "Hotspots"
    assert visit.dialogs == [] and Canary.hits == []
    assert not [r for r in visit.requests if r.startswith(canary)]  # no request for a URL the data named
    assert visit.elsewhere == [style]  # only the configured basemap was tried
    assert page.evaluate("window.__violations") == []  # nothing even tried to run
    dangerous = "#panel img, #panel script, #panel iframe, #panel svg, #panel a, #panel style, body > script:not([src])"
    assert page.evaluate(f"document.querySelectorAll('{dangerous}').length") == 0
    assert visit.problems == ["Failed to load resource: net::ERR_CONNECTION_REFUSED"]  # the unreachable basemap

    # and the policy itself stops inline handlers should markup ever slip through
    page.evaluate("document.getElementById('legend').innerHTML = '<img src=x onerror=\"window.__pwned=1\">'")
    page.wait_for_timeout(300)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert any("script-src" in v for v in page.evaluate("window.__violations"))
    page.close()


def test_single_point_and_empty_snapshots_open_sensibly(hostile_site, browser):
    url, *_ = hostile_site
    one = Visit(browser, url, "index.html?tileset=one")
    zoom, lat, lng = one.page.evaluate(
        "[window.hotspotsMap.getZoom(), window.hotspotsMap.getCenter().lat, window.hotspotsMap.getCenter().lng]"
    )
    assert 10 <= zoom <= 15 and abs(lat - 48.8566) < 0.01 and abs(lng - 2.3522) < 0.01
    assert one.problems == ["Failed to load resource: net::ERR_CONNECTION_REFUSED"]  # the unreachable basemap
    one.page.close()
    empty = Visit(browser, url, "index.html?tileset=empty")
    assert empty.status().startswith("no reports in this snapshot (as of 2026-11-01T12:00:00+00:00)")
    assert empty.problems == ["Failed to load resource: net::ERR_CONNECTION_REFUSED"]
    assert empty.page.evaluate("window.hotspotsMap.getZoom()") < 3
    empty.page.close()
