"""The published map page: ``output/index.html`` and what it loads, all from ``output/``.

The page, its script and stylesheet, ``tilesets.json`` (what it offers),
``viewer.json`` (its settings) and ``_lib/`` (MapLibre GL's CSP build, the
PMTiles protocol, topojson-client and Natural Earth's land and borders from
npm's world-atlas) are copied into the publish root, so the page runs on any
static host, offline, under a Content-Security-Policy that allows scripts
from its own files only.
"""

from __future__ import annotations

import filecmp
import html
from pathlib import Path

from . import atomic, scoring, strictjson
from .config import Viewer
from .profiles import Profile

PAGE = Path(__file__).parent / "viewer"
NODE_MODULES = Path(__file__).resolve().parents[1] / "web" / "node_modules"
# output/_lib/<name> <- web/node_modules/<path> (installed from npm by `make install`)
LIBS = {
    "maplibre-gl-csp.js": "maplibre-gl/dist/maplibre-gl-csp.js",
    "maplibre-gl-csp-worker.js": "maplibre-gl/dist/maplibre-gl-csp-worker.js",
    "maplibre-gl.css": "maplibre-gl/dist/maplibre-gl.css",
    "pmtiles.js": "pmtiles/dist/pmtiles.js",
    "topojson-client.min.js": "topojson-client/dist/topojson-client.min.js",
    "countries-50m.json": "world-atlas/countries-50m.json",
}
PAGE_FILES = ("viewer.js", "viewer.css")


def content_security_policy(origins: list[str]) -> str:
    """The page's policy: scripts, styles, workers and fonts from its own files only; no inline
    script or event handler; requests to its own origin and the basemap's ``origins``."""
    remote = "".join(f" {o}" for o in origins)
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; worker-src 'self'; child-src 'self'; "
        f"img-src 'self' data: blob:{remote}; font-src 'self'; connect-src 'self'{remote}; "
        "base-uri 'none'; form-action 'none'; object-src 'none'"
    )


def write_site(out: Path, viewer: Viewer, published: list[dict]) -> None:
    """Write the page, its settings and libraries into ``out`` (each file atomically).

    Parameters
    ----------
    out : Path
        The publish root (``output``).
    viewer : Viewer
        The page's settings (basemap style, allowed origins).
    published : list of dict
        ``tilesets.json``: one entry per tileset with a live snapshot.
    """
    csp = content_security_policy(viewer.origins())
    page = (
        (PAGE / "index.html")
        .read_text(encoding="utf-8")
        .replace("{{CSP}}", html.escape(csp, quote=False).replace('"', "&quot;"))
    )
    atomic.write_bytes(out / "index.html", page.encode())
    for name in PAGE_FILES:
        atomic.write_bytes(out / name, (PAGE / name).read_bytes())
    atomic.write_bytes(out / "tilesets.json", (strictjson.dumps(published, indent=2) + "\n").encode())
    settings = {"style": viewer.style}
    atomic.write_bytes(out / "viewer.json", (strictjson.dumps(settings, indent=2) + "\n").encode())
    for name, rel in LIBS.items():
        src = NODE_MODULES / rel
        if src.exists():  # else the page says `_lib/` is missing (run `make install` with npm)
            dst = out / "_lib" / name
            if not (dst.exists() and filecmp.cmp(src, dst, shallow=False)):
                atomic.write_bytes(dst, src.read_bytes())


def tileset_entry(name: str, profile: Profile) -> dict:
    """What the page needs to know of a tileset: its name, profile (resolved), metrics and legend."""
    return {
        "name": name,
        "profile": profile.name,
        "metrics": list(profile.metrics),
        "legend": scoring.describe(profile),
    }
