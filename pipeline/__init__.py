"""Hotspots engine: pure functions from reports to heatmap cells and tiles.

Nothing in this package imports dagster; ``assets/`` wires these functions
into Dagster assets, and ``tests/test_purity.py`` keeps it that way.
"""

import os

# polars allocates through jemalloc, which by default keeps freed pages for
# seconds: a run's peak RSS then sums every step's high-water mark. A
# background thread returning them within half a second keeps RSS to what is
# held (1.36 GB instead of 1.63 GB on the world benchmark) at no cost in
# time. Read once, when polars loads; a value set by the user wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0")
