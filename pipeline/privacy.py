"""Privacy by coarsening: no published position stands for fewer than ``min_count`` reports.

A cell's position is the mean of its members' positions; for a cell of one
report that *is* the report's position (someone's address, on a community
map). So at each zoom, a cell with fewer than ``min_count`` reports is
generalised to its **stratum** (the tile at ``z + strata_detail``, at least
2× coarser than the cell since ``strata_detail < cell_detail``):

* its position becomes the stratum's centre (a fixed grid point, which says
  nothing about where in the stratum its members are);
* its published ``quadkey`` becomes the stratum's quadkey;
* its counts, weights, metrics and times are kept, so sums still balance.

Only the published files see the result; the private work folder keeps the
exact cells.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .tilemath import cell_bounds, cell_xy


def stratum_centres(cell_key: np.ndarray, level: int, stratum_level: int) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude of the centre (in Web Mercator) of each cell's stratum tile."""
    x, y = cell_xy(cell_key)
    shift = level - stratum_level
    # a tile's centre is the north-west corner of its south-east child
    west, _, _, north = cell_bounds(((x >> shift) << 1) + 1, ((y >> shift) << 1) + 1, stratum_level + 1)
    return west, north


def coarsen(cells: pl.DataFrame, *, z: int, detail: int, strata_detail: int, min_count: int) -> pl.DataFrame:
    """Generalise the cells of one zoom that hold fewer than ``min_count`` reports.

    Parameters
    ----------
    cells : DataFrame
        One zoom of the pyramid (``cell_key``, ``quadkey``, ``report_count``,
        ``lng``, ``lat``).
    z, detail, strata_detail : int
        The zoom, its cell detail and its strata's detail.
    min_count : int
        Fewest reports a published position may stand for; 1 changes nothing.

    Returns
    -------
    DataFrame
        ``cells`` with ``lng``, ``lat`` and ``quadkey`` generalised where
        ``report_count < min_count``, and a boolean ``coarsened`` column.
    """
    if min_count <= 1 or cells.height == 0:
        return cells.with_columns(pl.lit(False).alias("coarsened"))
    sparse = pl.col("report_count") < min_count
    stratum_level = z + strata_detail  # coarser than the cell: the config keeps strata_detail < cell_detail
    lng, lat = stratum_centres(cells.get_column("cell_key").to_numpy(), z + detail, stratum_level)
    return cells.with_columns(
        pl.when(sparse).then(pl.Series(lng)).otherwise(pl.col("lng")).alias("lng"),
        pl.when(sparse).then(pl.Series(lat)).otherwise(pl.col("lat")).alias("lat"),
        pl.when(sparse).then(pl.col("quadkey").str.head(stratum_level)).otherwise(pl.col("quadkey")).alias("quadkey"),
        sparse.alias("coarsened"),
    )
