"""The pyramid's compiled loops give the bits of the NumPy operations they replace.

A cell's sums are published to the bit, and a sharded build must publish
the bytes a single process does, so each loop is checked against NumPy
itself (``ufunc.reduceat``, ``argmax``, the NumPy ``on_grid``, the tile
maths cross-checked with mercantile in ``test_tiles.py``) over random input
chosen to hit the edges: runs of one value and of thousands (NumPy's
pairwise summation changes its order at 8 and 128 values), signed zeros,
NaN, and magnitudes far apart.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import kernels, pyramid, tilemath

FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0.0, -0.0, 1e-300, -1e300, 5e-324]),
    st.floats(-1e3, 1e3),
)


@st.composite
def runs(draw, elements=FLOATS, dtype=np.float64, most=600):
    """Values and the starts of their runs: short runs, and long ones past NumPy's block sizes."""
    lengths = draw(
        st.lists(st.one_of(st.integers(1, 9), st.integers(120, 140), st.integers(250, most)), min_size=1, max_size=8)
    )
    values = draw(hnp.arrays(dtype, sum(lengths), elements=elements))
    starts = np.cumsum([0, *lengths[:-1]]).astype(np.int64)
    return values, starts


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@settings(max_examples=300, deadline=None)
@given(runs())
def test_a_sum_of_floats_has_numpys_bits_whatever_the_run_lengths(data):
    values, starts = data
    with np.errstate(over="ignore"):  # sums past the largest double are inf, in both
        assert same_bits(kernels.segment_sum(values, starts), np.add.reduceat(values, starts))


@settings(max_examples=200, deadline=None)
@given(runs(elements=st.one_of(FLOATS, st.just(np.nan)), most=300), st.randoms(use_true_random=False))
def test_runs_of_values_taken_in_an_order_are_those_of_the_reordered_values(data, rnd):
    """The finest level sums reports in their sorted order without making the sorted copy."""
    values, starts = data
    order = np.arange(len(values))
    rnd.shuffle(order)
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.add.reduceat(values[order], starts)
        assert same_bits(kernels.segment_sum(values, starts, order), want)
    for ours, numpys in ((kernels.segment_max, np.maximum), (kernels.segment_min, np.minimum)):
        assert same_bits(ours(values, starts, order), ours(values[order], starts))
        assert np.array_equal(ours(values, starts, order), numpys.reduceat(values[order], starts), equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(runs(elements=st.integers(-(2**62), 2**62), dtype=np.int64))
def test_a_sum_of_integers_is_numpys(data):
    values, starts = data
    assert same_bits(kernels.segment_sum(values, starts), np.add.reduceat(values, starts))


@settings(max_examples=200, deadline=None)
@given(runs(elements=st.one_of(FLOATS, st.just(np.nan)), most=300))
def test_max_and_min_are_numpys_with_nan(data):
    values, starts = data
    for ours, numpys in ((kernels.segment_max, np.maximum), (kernels.segment_min, np.minimum)):
        got, want = ours(values, starts), numpys.reduceat(values, starts)
        # NumPy's vector loops settle a tie of 0.0 and -0.0 by their layout; ours keeps the
        # first (a weight is never -0.0); every other value has NumPy's bits
        assert np.array_equal(got, want, equal_nan=True)
        if not np.any((values == 0) & np.signbit(values)):
            assert same_bits(got, want)
        times = values.view(np.int64)  # any 64-bit integers
        assert same_bits(ours(times, starts), numpys.reduceat(times, starts))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_category_words_add_as_numpy_adds_them(data):
    _, starts = data.draw(runs(most=260))
    rows = int(starts[-1]) + data.draw(st.integers(1, 9))
    words = data.draw(hnp.arrays(np.uint64, (rows, 2), elements=st.integers(0, 2**64 - 1)))
    assert same_bits(kernels.segment_rows(words, starts), np.add.reduceat(words, starts, axis=0))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 14)), min_size=1, max_size=400),
    st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]),
    st.integers(0, 20),
)
def test_runs_and_category_counts_are_those_numpy_finds(reports, lanes, shift):
    """The finest cells' runs (of tile keys shifted to the cells' level) and their category counts."""
    cell_code = np.array(sorted(reports), dtype=np.uint64)
    cell, code = cell_code[:, 0], cell_code[:, 1].astype(np.uint32)
    rng = np.random.default_rng(len(reports))  # tile keys: the cell's bits, then finer bits of any value
    keys = cell << np.uint64(shift) | (rng.integers(0, 2**shift, len(cell), dtype=np.uint64) if shift else 0)
    starts, lengths = kernels.run_starts(keys, shift)
    want = np.flatnonzero(np.concatenate([[True], cell[1:] != cell[:-1]]))
    assert np.array_equal(starts, want) and np.array_equal(lengths, np.diff(want, append=len(cell)))
    counts = np.zeros((len(starts), 16), lanes)
    kernels.count_codes(code, starts, counts)
    for k, (s, n) in enumerate(zip(starts, lengths)):
        assert np.array_equal(counts[k], np.bincount(code[s : s + n].astype(np.intp), minlength=16))


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 300), st.integers(2, 24)), elements=st.integers(0, 9)),
    st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]),
)
def test_the_top_category_is_the_first_of_the_largest_or_none(counts, lanes):
    counts = counts.astype(lanes)
    categories = counts.shape[1] - 1  # the last lane: reports without a category
    report_count = counts.sum(axis=1, dtype=np.int64)
    want = np.where(counts[:, categories] == report_count, categories, np.argmax(counts[:, :categories], axis=1))
    assert np.array_equal(kernels.top_lane(counts, categories, report_count), want)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(-(2**62), 2**62)))
def test_times_go_to_the_whole_second_before(micros):
    want = micros // 1_000_000 * 1_000
    assert same_bits(kernels.whole_seconds(micros), want) and same_bits(micros, want)  # in place


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.lists(st.integers(0, 4**30 - 1), min_size=1, max_size=200))
def test_keys_give_the_tile_maths_answers(level, raw):
    key = np.sort(np.array(raw, dtype=np.uint64) >> np.uint64(2 * (30 - level)))
    quadkeys = pyramid._quadkeys(key, level)  # Arrow string views: held in the view up to 12 digits
    quadkeys.to_arrow().validate(full=True)
    assert quadkeys.to_list() == tilemath.quadkeys(key, level).to_list()
    views, _ = kernels.quadkey_views(key, level)
    if level <= kernels.INLINE:  # an inline string is zero-padded (views compare as bytes)
        assert not views.view(np.uint8)[:, 4 + level :].any()
    x, y = kernels.cell_xy(key)
    want_x, want_y = tilemath.cell_xy(key)
    assert same_bits(x, want_x) and same_bits(y, want_y)
    up = key >> np.uint64(2)
    assert np.array_equal(kernels.parent_runs(key), np.flatnonzero(np.r_[True, up[1:] != up[:-1]]))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 24),
    st.lists(
        st.tuples(st.integers(0, 2**24 - 1), st.integers(0, 2**24 - 1), st.floats(0, 1), st.floats(0, 1)),
        min_size=1,
        max_size=100,
    ),
    st.integers(1, 50),
)
def test_centroids_go_on_the_grid_as_numpy_puts_them(level, cells, count):
    side = 2**level
    x = np.array([c[0] % side for c in cells], np.int64)
    y = np.sort(np.array([c[1] % side for c in cells], np.int64))
    n = np.full(len(cells), count, np.int64)
    west, south, east, north = tilemath.cell_bounds(x, y, level)
    # means anywhere in their cell and a little outside it (rounding can put them there)
    lng = (west + np.array([c[2] for c in cells]) * (east - west) * 1.02 - (east - west) * 0.01) * n
    lat = (south + np.array([c[3] for c in cells]) * (north - south) * 1.02 - (north - south) * 0.01) * n
    inside = pyramid.INSIDE
    want_lng = pyramid.on_grid(lng / n, west + inside, east - inside)
    want_lat = pyramid.on_grid(lat / n, south + inside, north - inside)
    assert same_bits(kernels.mean_lng_on_grid(lng, n, x, 2.0**level, inside, pyramid.GRID), want_lng)
    assert same_bits(kernels.mean_on_grid(lat, n, south + inside, north - inside, pyramid.GRID), want_lat)
    assert same_bits(pyramid._mean_lat(lat, n, x, y, level), want_lat)  # shared row edges, or not


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint64, st.integers(0, 60), elements=st.integers(0, 40)), st.integers(0, 5))
def test_values_are_nondecreasing_as_numpy_says(values, shift):
    shifted = values >> np.uint64(shift)
    assert kernels.nondecreasing(values, shift) == bool(np.all(shifted[1:] >= shifted[:-1]))
    ordered = np.sort(values)
    assert kernels.nondecreasing(ordered, shift)
