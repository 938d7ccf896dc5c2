"""shopmtl."""

import os as _os

# Arrow's allocator for everything shopmtl reads (CSV, Parquet, compute): jemalloc instead of
# pyarrow's default mimalloc, unless the user chose one (the variable is Arrow's own, read when
# pyarrow first allocates). Measured with bench/peers/rss_probe.py: reading and encoding the
# census split raised the process's peak by 108 MB with mimalloc and 50 MB with jemalloc, and
# the whole benchmark run peaked at 529 MB instead of 453 MB (torch-rechub: 483 MB).
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
