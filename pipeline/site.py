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
import os
from pathlib import Path

from . import scoring, strictjson
from .config import Config

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


def write_site(cfg: Config, published: list[dict]) -> None:
    """Write the page, its settings and libraries into ``cfg.output`` (each file atomically).

    Parameters
    ----------
    published : list of dict
        ``tilesets.json``: one entry per tileset with a live snapshot.
    """
    out = cfg.output
    csp = content_security_policy(cfg.viewer.origins())
    page = (
        (PAGE / "index.html")
        .read_text(encoding="utf-8")
        .replace("{{CSP}}", html.escape(csp, quote=False).replace('"', "&quot;"))
    )
    _replace(out / "index.html", page.encode())
    for name in PAGE_FILES:
        _replace(out / name, (PAGE / name).read_bytes())
    _replace(out / "tilesets.json", (strictjson.dumps(published, indent=2) + "\n").encode())
    settings = {"style": cfg.viewer.style}
    _replace(out / "viewer.json", (strictjson.dumps(settings, indent=2) + "\n").encode())
    for name, rel in LIBS.items():
        src = NODE_MODULES / rel
        if src.exists():  # else the page says `_lib/` is missing (run `make install` with npm)
            dst = out / "_lib" / name
            if not (dst.exists() and filecmp.cmp(src, dst, shallow=False)):
                _replace(dst, src.read_bytes())


def tileset_entry(cfg: Config, name: str) -> dict:
    """What the page needs to know of a tileset: its name, profile, metrics and legend."""
    ts = cfg.tilesets[name]
    profile, _ = scoring.resolve(ts)
    return {"name": name, "profile": ts.profile, "metrics": list(profile.metrics), "legend": scoring.describe(profile)}


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
