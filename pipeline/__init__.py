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

# NumPy asks for transparent huge pages on every large array, and pyarrow's
# default allocator (mimalloc) hands memory back to the kernel within
# milliseconds and takes huge pages again. Where the kernel grants them on
# request (`madvise`, the default on common distributions), each fresh 2 MB
# page is compacted for and zeroed on first touch, and the steps allocate and
# free arrays of millions of cells per zoom: the kernel took a fifth to a half
# of their time. Measured on the world benchmark: without huge pages for
# NumPy, a 5M-report shard's scoring and pyramid spent 2.4-3.1 s in the
# kernel instead of 4.0-5.3 s; with the C library's allocator for pyarrow,
# the whole snapshot's peak RSS was 1.17-1.29 GB instead of 1.36-1.43 GB, in
# the same time.
# Both are read when the library loads, and applied here too in case it is
# loaded already; a value set by the user wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import numpy  # noqa: E402
import pyarrow  # noqa: E402

_multiarray = getattr(getattr(numpy, "_core", None), "multiarray", None)
if os.environ["NUMPY_MADVISE_HUGEPAGE"] == "0" and hasattr(_multiarray, "_set_madvise_hugepage"):
    _multiarray._set_madvise_hugepage(False)
if os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system" and pyarrow.default_memory_pool().backend_name != "system":
    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
