"""Compiled loops of the cell pyramid (Numba), each giving the bits of the NumPy it replaces.

A zoom of a world-spread tileset has millions of cells, most with one or two
children: NumPy's ``ufunc.reduceat`` pays a call per cell, and a 2-D one a
call per cell and column, which made the roll-up most of a shard's time.
These loops do the same arithmetic in the same order, in one pass each:

- a float sum is NumPy's: the first value plus the pairwise sum of the rest
  (``pairwise_sum`` in NumPy's ``loops_utils.h.src``), so every cell's sum
  has the bits ``np.add.reduceat`` gives it;
- no fast-math: each operation is the IEEE one NumPy does;
- ``tests/test_kernels.py`` checks each loop against the NumPy it replaces.

Every loop releases the GIL (the roll-up builds a zoom's frame in a second
thread) and is cached on disk (``__pycache__``), compiled once per machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"cache": True, "nogil": True}


@njit(**_JIT)
def _at(a, order, i):
    # the i-th value in the run order: a[i], or a[order[i]] (a None order is pruned when compiled)
    return a[i] if order is None else a[order[i]]


@njit(**_JIT)
def _pairwise(a, order, lo, n):
    # NumPy's pairwise sum of values lo .. lo + n - 1 (n >= 1): under 8 values in order
    # (from -0.0, which leaves the first value's bits as they are), blocks of
    # up to 128 in 8 lanes, larger runs halved at a multiple of 8
    if n < 8:
        res = _at(a, order, lo)
        for i in range(lo + 1, lo + n):
            res += _at(a, order, i)
        return res
    if n <= 128:
        r0, r1, r2, r3 = _at(a, order, lo), _at(a, order, lo + 1), _at(a, order, lo + 2), _at(a, order, lo + 3)
        r4, r5, r6, r7 = _at(a, order, lo + 4), _at(a, order, lo + 5), _at(a, order, lo + 6), _at(a, order, lo + 7)
        i, whole = 8, n - n % 8
        while i < whole:
            j = lo + i
            r0 += _at(a, order, j)
            r1 += _at(a, order, j + 1)
            r2 += _at(a, order, j + 2)
            r3 += _at(a, order, j + 3)
            r4 += _at(a, order, j + 4)
            r5 += _at(a, order, j + 5)
            r6 += _at(a, order, j + 6)
            r7 += _at(a, order, j + 7)
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += _at(a, order, lo + i)
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _pairwise(a, order, lo, half) + _pairwise(a, order, lo + half, n - half)


@njit(**_JIT)
def segment_sum(a, starts, order=None):
    """``np.add.reduceat(a, starts)`` (``starts`` ascending, the first 0), to the bit.

    ``order``: the values taken as ``a[order]`` (the runs are runs of it), without making that array.
    """
    out = np.empty(len(starts), a.dtype)
    last = len(starts) - 1
    end = len(a) if order is None else len(order)
    for k in range(last + 1):
        s, e = starts[k], starts[k + 1] if k < last else end
        acc = _at(a, order, s)
        if e - s > 8:
            acc += _pairwise(a, order, s + 1, e - s - 1)
        elif e - s > 1:  # (the short runs inline: most cells have a child or two)
            rest = _at(a, order, s + 1)
            for i in range(s + 2, e):
                rest += _at(a, order, i)
            acc += rest
        out[k] = acc
    return out


@njit(**_JIT)
def _extremes(a, starts, most, order):
    out = np.empty(len(starts), a.dtype)
    end = len(a) if order is None else len(order)
    for k in range(len(starts)):
        e = starts[k + 1] if k + 1 < len(starts) else end
        m = _at(a, order, starts[k])
        for i in range(starts[k] + 1, e):
            v = _at(a, order, i)
            if (v > m if most else v < m) or v != v:  # (once m is NaN, neither holds)
                m = v
        out[k] = m
    return out


@njit(**_JIT)
def segment_max(a, starts, order=None):
    """``np.maximum.reduceat(a, starts)``: a NaN wins, as in NumPy; of 0.0 and -0.0 the first.
    ``order``: as for :func:`segment_sum`."""
    return _extremes(a, starts, True, order)


@njit(**_JIT)
def segment_min(a, starts, order=None):
    """``np.minimum.reduceat(a, starts)``: a NaN wins, as in NumPy; of 0.0 and -0.0 the first.
    ``order``: as for :func:`segment_sum`."""
    return _extremes(a, starts, False, order)


@njit(**_JIT)
def run_starts(values, shift):
    """Where each run of equal ``values >> shift`` starts (the values sorted), and each run's length."""
    s, found = np.uint64(shift), 0
    for i in range(len(values)):  # counted first: the arrays are made to size, no larger
        found += i == 0 or values[i] >> s != values[i - 1] >> s
    starts, lengths = np.empty(found, np.int64), np.empty(found, np.int64)
    k = -1
    for i in range(len(values)):
        if i == 0 or values[i] >> s != values[i - 1] >> s:
            k += 1
            starts[k] = i
            lengths[k] = 0
        lengths[k] += 1
    return starts, lengths


@njit(**_JIT)
def nondecreasing(values, shift):
    """True when ``values >> shift`` never falls from one value to the next."""
    s = np.uint64(shift)
    for i in range(1, len(values)):
        if values[i] >> s < values[i - 1] >> s:
            return False
    return True


@njit(**_JIT)
def count_codes(codes, starts, counts):
    """Add one to ``counts[k, codes[i]]`` for every value ``i`` of run ``k`` (runs from ``starts``)."""
    for k in range(len(starts)):
        e = starts[k + 1] if k + 1 < len(starts) else len(codes)
        for i in range(starts[k], e):
            counts[k, codes[i]] += 1


@njit(**_JIT)
def segment_rows(a, starts):
    """``np.add.reduceat(a, starts, axis=0)`` of a 2-D unsigned array (wrapping, as NumPy's)."""
    out = np.empty((len(starts), a.shape[1]), a.dtype)
    for k in range(len(starts)):
        e = starts[k + 1] if k + 1 < len(starts) else a.shape[0]
        for j in range(a.shape[1]):
            acc = a[starts[k], j]
            for i in range(starts[k] + 1, e):
                acc += a[i, j]
            out[k, j] = acc
    return out


@njit(**_JIT)
def top_lane(counts, categories, report_count):
    """Per row, the first of the lanes ``0..categories-1`` with the largest count; ``categories``
    where lane ``categories`` (reports without a category) holds all of the row's reports."""
    out = np.empty(counts.shape[0], np.intp)
    for k in range(counts.shape[0]):
        if counts[k, categories] == report_count[k]:
            out[k] = categories
            continue
        best, at = counts[k, 0], 0
        for lane in range(1, categories):
            if counts[k, lane] > best:
                best, at = counts[k, lane], lane
        out[k] = at
    return out


@njit(**_JIT)
def view_rows(table, rows, none):
    """Arrow string views ``table[rows]`` (a row: two 64-bit words), how many are ``none`` (null), and
    the validity bitmap (none when no row is null)."""
    out = np.empty((len(rows), 2), np.uint64)
    nulls = 0
    for i in range(len(rows)):
        j = rows[i]
        out[i, 0], out[i, 1] = table[j, 0], table[j, 1]
        nulls += j == none
    valid = np.zeros((len(rows) + 7) // 8 if nulls else 0, np.uint8)
    if nulls:
        for i in range(len(rows)):
            if rows[i] != none:
                valid[i >> 3] |= np.uint8(1 << (i & 7))
    return out, valid, nulls


@njit(**_JIT)
def whole_seconds(micros):
    """Microseconds since the epoch to the whole second before, in milliseconds: in place, and returned."""
    for i in range(len(micros)):
        micros[i] = micros[i] // 1_000_000 * 1_000
    return micros


@njit(**_JIT)
def _held(v, lo, hi, grid):
    # pipeline.pyramid.on_grid's rule for one value, each step the operation NumPy does there
    first, last = np.ceil(lo * grid), np.floor(hi * grid)
    if first > last:  # no grid point inside: v clipped, as np.clip does
        v = v if v > lo else lo
        return v if v < hi else hi
    g = np.rint(v * grid)
    g = g if g >= first else first  # np.maximum and np.minimum, without NaN
    g = g if g <= last else last
    return g * (1.0 / grid)


@njit(**_JIT)
def mean_on_grid(total, n, lo, hi, grid):
    """``on_grid(total / n, lo, hi)`` (:func:`pipeline.pyramid.on_grid`), to the bit."""
    out = np.empty(len(total))
    for i in range(len(total)):
        out[i] = _held(total[i] / n[i], lo[i], hi[i], grid)
    return out


@njit(**_JIT)
def mean_lng_on_grid(total, n, x, tiles, inside, grid):
    """Mean longitudes on the grid inside their cells, the cells' edges computed as
    :func:`pipeline.tilemath.cell_bounds` computes them (``tiles``: 2 ** level)."""
    out = np.empty(len(total))
    for i in range(len(total)):
        west = x[i] / tiles * 360.0 - 180.0
        east = (x[i] + 1) / tiles * 360.0 - 180.0
        out[i] = _held(total[i] / n[i], west + inside, east - inside, grid)
    return out


@njit(**_JIT)
def mean_lat_on_grid(total, n, y, edges, row0, inside, grid):
    """Mean latitudes on the grid inside their cells: ``edges[r - row0]`` is row ``r``'s north edge."""
    out = np.empty(len(total))
    for i in range(len(total)):
        r = y[i] - row0
        out[i] = _held(total[i] / n[i], edges[r + 1] + inside, edges[r] - inside, grid)
    return out


@njit(**_JIT)
def parent_runs(key):
    """Where each run of cells sharing a parent (``key >> 2``; keys ascending) starts."""
    starts = np.empty(len(key), np.int64)
    found, before = 0, np.uint64(0)
    for i in range(len(key)):
        up = key[i] >> np.uint64(2)
        if i == 0 or up != before:
            starts[found] = i
            found += 1
            before = up
    return starts[:found]


INLINE = 12  # an Arrow string view holds a string of up to 12 bytes itself
# the four quadkey digits of a byte of a key (its bit pairs from the top) as four ASCII bytes, the first lowest
_DIGITS = np.array([sum((48 | (b >> 6 - 2 * d) & 3) << 8 * d for d in range(4)) for b in range(256)], np.uint32)


@njit(**_JIT)
def quadkey_views(key, level):
    """The quadkeys of cell keys at ``level`` as an Arrow string view array's buffers: the views
    (16 bytes a cell) and the data (none when a view holds the digits).

    A view is the length (int32), then the string itself when it is short
    (zero-padded), else its first 4 bytes, buffer 0 and where it starts
    there (int32). Digits are written four at a time (a byte of the key:
    :data:`_DIGITS`), so a cell's data takes ``level`` rounded up to 4 bytes.
    """
    n, inline = len(key), level <= INLINE
    words = (level + 3) // 4
    pad = np.uint64(2 * (4 * words - level))  # digits "0" after the last: whole words
    last = np.uint32(0xFFFFFFFF >> 8 * (4 * words - level))  # an inline string's last word, zero-padded
    views = np.zeros((n, 4), np.uint32)
    data = np.empty(0 if inline else n * words, np.uint32)
    for i in range(n):
        k = key[i] << pad
        views[i, 0] = level
        if inline:
            for j in range(words):
                views[i, 1 + j] = _DIGITS[(k >> np.uint64(8 * (words - 1 - j))) & np.uint64(0xFF)]
            if words:
                views[i, words] &= last
        else:
            at = i * words
            for j in range(words):
                data[at + j] = _DIGITS[(k >> np.uint64(8 * (words - 1 - j))) & np.uint64(0xFF)]
            views[i, 1] = data[at]
            views[i, 3] = 4 * at
    return views, data.view(np.uint8)


@njit(**_JIT)
def _compact(v):
    # bits 0, 2, 4, ... of v packed together (pipeline.tilemath._compact, a value at a time)
    v &= np.uint64(0x5555555555555555)
    v = (v | (v >> np.uint64(1))) & np.uint64(0x3333333333333333)
    v = (v | (v >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    return (v | (v >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)


@njit(**_JIT)
def cell_xy(key):
    """Tile column and row of cell keys (:func:`pipeline.tilemath.cell_xy`)."""
    x, y = np.empty(len(key), np.int64), np.empty(len(key), np.int64)
    for i in range(len(key)):
        x[i] = _compact(key[i])
        y[i] = _compact(key[i] >> np.uint64(1))
    return x, y


def warm() -> None:
    """Call each loop on a few values of each type the pyramid gives it.

    A process's first call costs about a fifth of a second (LLVM, then the
    loop's machine code read from the cache, or compiled once per machine):
    :func:`pipeline.pyramid.warm_up` pays it while a shard reads its reports.
    """
    starts, order = np.zeros(1, np.int64), np.zeros(2, np.int64)
    for dtype in (np.float64, np.int64, np.uint64):
        for writeable in (True, False):  # NumPy's own arrays, and polars' (read-only) views
            a = np.zeros(2, dtype)
            a.flags.writeable = writeable
            segment_sum(a, starts), segment_max(a, starts), segment_min(a, starts)
            segment_sum(a, starts, order), segment_max(a, starts, order), segment_min(a, starts, order)
            if dtype is np.int64 and writeable:  # (in place: the extremes' own arrays)
                whole_seconds(a)
            if dtype is np.uint64:  # the reports' tile keys: polars' as they are, or sorted by NumPy
                nondecreasing(a, 0)
                run_starts(a, 0)
    for writeable in (True, False):  # the category codes: polars' (read-only), or sorted by NumPy
        codes = np.zeros(2, np.uint32)
        codes.flags.writeable = writeable
        for lanes in (np.uint8, np.uint16, np.uint32, np.uint64):
            count_codes(codes, starts, np.zeros((1, 8), lanes))
    key, n, v = np.zeros(2, np.uint64), np.ones(2, np.int64), np.zeros(2)
    parent_runs(key), cell_xy(key), quadkey_views(key, 1), quadkey_views(key, INLINE + 1)
    segment_rows(np.zeros((2, 2), np.uint64), starts)
    for lanes in (np.uint8, np.uint16, np.uint32, np.uint64):
        top_lane(np.zeros((2, 8), lanes), 1, n)
    view_rows(np.zeros((2, 2), np.uint64), np.zeros(2, np.intp), 1)
    mean_on_grid(v, n, v, v, 1.0), mean_lng_on_grid(v, n, n, 1.0, 0.0, 1.0)
    mean_lat_on_grid(v, n, n, np.zeros(3), 0, 0.0, 1.0)
