"""Strict JSON (RFC 8259) for every public file: no ``NaN``, no ``Infinity``.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, and browsers'
``JSON.parse`` refuses them; a published file must parse everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def finite(value):
    """``value`` with every non-finite float (NaN, ±Infinity) replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` that refuses to write a non-finite number (a bug upstream, not data)."""
    return json.dumps(value, allow_nan=False, **kwargs)


def loads(text: str | bytes):
    """Parse as RFC 8259 says: ``NaN`` / ``Infinity`` are errors, not numbers."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON (RFC 8259)")

    return json.loads(text, parse_constant=refuse)


def load(path: Path):
    """:func:`loads` of a file."""
    return loads(Path(path).read_bytes())
