"""Digests of a frame's rows, per tile: what tells a tile whose input is unchanged since the last build."""

from __future__ import annotations

import numpy as np
import polars as pl

_M1, _M2, _STEP = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(v: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit moves every output bit."""
    v = (v ^ (v >> np.uint64(30))) * _M1
    v = (v ^ (v >> np.uint64(27))) * _M2
    return v ^ (v >> np.uint64(31))


def _words(column: pl.Series) -> np.ndarray:
    """A column as 64-bit words: numbers by their bits (0.0 and -0.0 differ), text by polars' hash."""
    if column.dtype == pl.String:
        return column.hash(seed=7).to_numpy()  # a null hashes apart from every text
    values = column.to_physical()
    if values.dtype == pl.Boolean:
        values = values.cast(pl.UInt8)
    if values.dtype.is_float():
        words = values.cast(pl.Float64).fill_null(0.0).to_numpy().view(np.uint64)
    else:
        words = values.fill_null(0).to_numpy().astype(np.uint64)
    if column.null_count():
        words = words ^ _mix(column.is_null().to_numpy().astype(np.uint64) * _STEP)
    return words


def tile_digests(rows: pl.DataFrame, columns: list[str], starts: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each tile's rows, in order (rows sorted by tile; ``starts``: where each tile's begin).

    A row's digest folds its ``columns``' words (see :func:`_words`); a
    tile's sums its rows', each mixed with its place in the tile, so the same
    rows in another order differ. Not cryptographic: two different tiles
    collide by accident with chance 2**-64.
    """
    n = rows.height
    if not n:
        return np.empty(0, np.uint64)
    h = np.full(n, len(columns), np.uint64)
    with np.errstate(over="ignore"):
        for name in columns:
            h = _mix(h * _STEP + _words(rows.get_column(name)))
        place = np.arange(n, dtype=np.uint64) - np.repeat(starts, np.diff(np.r_[starts, n])).astype(np.uint64)
        return np.add.reduceat(_mix(h ^ (place * _STEP)), starts)
