"""shopmtl."""

import os as _os

# Arrow's allocator for everything shopmtl reads (CSV, Parquet, compute): jemalloc instead of
# pyarrow's default mimalloc, unless the user chose one (the variable is Arrow's own, read when
# pyarrow first allocates). Reading and encoding a split keeps about half as much memory
# (mimalloc holds its arenas), which puts shopmtl's benchmark peak below torch-rechub's
# (bench/peers/rss_probe.py; numbers in docs/BENCHMARKS.md).
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
