"""``hotspots serve``: the publish root over HTTP, as a static host or CDN would serve it.

Correct ``Content-Type``; ``Content-Encoding: gzip`` for MVT tiles (stored
gzip-compressed); byte ranges (PMTiles clients read archives by range);
CORS; long cache lifetimes for immutable snapshot files and none for
``latest.json``. The viewer and its libraries (``_lib/``) are published files
like the others, so it works offline.
"""

from __future__ import annotations

import os
import re
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TYPES = {
    ".geojson": "application/geo+json",
    ".json": "application/json",
    ".mvt": "application/vnd.mapbox-vector-tile",
    ".pmtiles": "application/vnd.pmtiles",
    ".parquet": "application/vnd.apache.parquet",
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".css": "text/css",
}
MUTABLE = ("latest.json", "tilesets.json", "viewer.json", "index.html", "viewer.js", "viewer.css")
RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class Handler(SimpleHTTPRequestHandler):
    """Static files with ranges, CORS, tile encodings and cache headers."""

    def list_directory(self, path):  # a CDN lists nothing
        self.send_error(HTTPStatus.NOT_FOUND)
        return None

    def guess_type(self, path) -> str:
        return TYPES.get(Path(str(path)).suffix, super().guess_type(path))

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, ETag")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        size = path.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        match = RANGE.match(self.headers.get("Range", ""))
        if match and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            else:  # the last n bytes
                start, end = max(size - int(match[2]), 0), size - 1
            if start > end or start >= size:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return None
            status = HTTPStatus.PARTIAL_CONTENT
        handle = open(path, "rb")
        handle.seek(start)
        self.send_response(status)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if path.suffix == ".mvt":
            self.send_header("Content-Encoding", "gzip")
        immutable = "/snapshots/" in self.path and path.name not in MUTABLE
        self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache")
        self.send_header("ETag", f'"{int(path.stat().st_mtime_ns)}-{size}"')
        self.end_headers()
        self._remaining = end - start + 1
        return handle

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        while remaining is None or remaining > 0:
            block = source.read(min(1 << 16, remaining) if remaining is not None else 1 << 16)
            if not block:
                break
            outputfile.write(block)
            if remaining is not None:
                remaining -= len(block)

    def log_message(self, format, *args) -> None:  # quiet unless asked
        if os.environ.get("HOTSPOTS_SERVE_LOG"):
            super().log_message(format, *args)


def serve(root: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server over ``root`` (call ``serve_forever``)."""
    return ThreadingHTTPServer((host, port), partial(Handler, directory=str(root)))
