"""Tile math, cross-checked with mercantile: tiles, quadkeys, Morton keys, bounds."""

from __future__ import annotations

import mercantile
import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import tilemath

MAX_LAT = tilemath.MERCATOR_MAX_LAT
lngs = st.floats(-180.0, 180.0, allow_nan=False)
lats = st.floats(-MAX_LAT, MAX_LAT, allow_nan=False)
levels = st.integers(0, 30)
points = st.lists(st.tuples(lngs, lats), min_size=1, max_size=40)


def _tiles(pts, level):
    frame = pl.DataFrame(pts, schema=["lng", "lat"], orient="row")
    out = frame.select(
        tilemath.tile_x(pl.col("lng"), level).alias("x"),
        tilemath.tile_y(pl.col("lat"), level).alias("y"),
    ).with_columns(tilemath.morton(pl.col("x"), pl.col("y")).alias("key"))
    return out


@settings(max_examples=300, deadline=None)
@given(points, levels)
def test_tile_of_a_point_is_mercantiles(pts, level):
    got = _tiles(pts, level)
    expected = [mercantile.tile(lng, lat, level) for lng, lat in pts]
    assert got.get_column("x").to_list() == [t.x for t in expected]
    assert got.get_column("y").to_list() == [t.y for t in expected]


@settings(max_examples=300, deadline=None)
@given(points, levels)
def test_morton_key_is_the_quadkey_and_inverts(pts, level):
    got = _tiles(pts, level)
    keys = got.get_column("key").to_numpy()
    qk = tilemath.quadkeys(keys, level).to_list()
    assert qk == [mercantile.quadkey(mercantile.tile(lng, lat, level)) for lng, lat in pts]
    x, y = tilemath.cell_xy(keys)
    assert x.tolist() == got.get_column("x").to_list() and y.tolist() == got.get_column("y").to_list()
    # the parent is key // 4: the quadkey less its last digit
    parent = tilemath.quadkeys(keys >> np.uint64(2), max(level - 1, 0)).to_list()
    assert parent == [q[:-1] for q in qk] if level else True


@settings(max_examples=300, deadline=None)
@given(points, levels)
def test_morton_keys_of_columns_and_rows_are_the_quadkeys(pts, level):
    got = _tiles(pts, level)
    x, y = (got.get_column(c).to_numpy() for c in ("x", "y"))
    keys = tilemath.morton_keys(x, y)
    assert keys.dtype == np.uint64 and keys.tolist() == got.get_column("key").to_list()
    assert tilemath.quadkeys(keys, level).to_list() == [mercantile.quadkey(int(a), int(b), level) for a, b in zip(x, y)]


tiles_at = st.integers(0, 30).flatmap(
    lambda z: st.tuples(st.just(z), st.lists(st.tuples(st.integers(0, 2**z - 1), st.integers(0, 2**z - 1)), max_size=8))
)


@settings(max_examples=300, deadline=None)
@given(tiles_at)
def test_a_neighbourhood_is_each_tile_and_mercantiles_neighbours(tiles):
    """The tiles and their eight neighbours inside the world (mercantile's, which do not wrap at the
    antimeridian either), as sorted unique keys."""
    z, xy = tiles
    keys = tilemath.morton_keys(np.array([x for x, _ in xy], np.int64), np.array([y for _, y in xy], np.int64))
    got = tilemath.neighbourhood(keys, z)
    around = {(x, y) for x, y in xy} | {(t.x, t.y) for x, y in xy for t in mercantile.neighbors(x, y, z)}
    expected = sorted(int(tilemath.morton_keys(np.array([x]), np.array([y]))[0]) for x, y in around)
    assert got.dtype == np.uint64 and got.tolist() == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 26).flatmap(lambda z: st.tuples(st.just(z), st.integers(0, 2**z - 1), st.integers(0, 2**z - 1))))
def test_cell_bounds_are_mercantiles(tile):
    z, x, y = tile
    west, south, east, north = tilemath.cell_bounds(np.array([x]), np.array([y]), z)
    b = mercantile.bounds(x, y, z)
    # NumPy's and libm's sinh may differ in the last bit; centroids keep 1e-9 degrees inside
    assert np.allclose([west[0], south[0], east[0], north[0]], [b.west, b.south, b.east, b.north], rtol=0, atol=1e-12)


def test_edges_follow_mercantile_epsilon():
    # a point 1e-15 (in tile units) left of an edge lands in the next tile, as in mercantile
    level = 10
    edge_lng = mercantile.bounds(5, 5, level).east
    pts = [(edge_lng - 1e-13, 0.0), (edge_lng, 0.0), (180.0, 0.0), (-180.0, 0.0)]
    got = _tiles(pts, level).get_column("x").to_list()
    assert got == [mercantile.tile(lng, lat, level).x for lng, lat in pts]
    assert got[-2:] == [2**level - 1, 0]


@settings(max_examples=300, deadline=None)
@given(points)
def test_the_projection_is_mercantiles(pts):
    # every module projects through tilemath (pyramid, with_buffer's pixel positions)
    frame = pl.DataFrame(pts, schema=["lng", "lat"], orient="row")
    got = frame.select(tilemath.mercator_x(pl.col("lng")).alias("x"), tilemath.mercator_y(pl.col("lat")).alias("y"))
    expected = [mercantile._xy(lng, lat) for lng, lat in pts]
    assert np.allclose(got.get_column("x").to_numpy(), [x for x, _ in expected], rtol=0, atol=1e-15)
    assert np.allclose(got.get_column("y").to_numpy(), [y for _, y in expected], rtol=0, atol=1e-15)
