"""shopmtl.

``shopmtl.load(path)`` loads a trained model directory (``shopmtl.modeldir``; imported on first
use, so ``import shopmtl`` stays light); ``shopmtl.__version__`` is the installed
distribution's version ("0+unknown" when shopmtl runs from a source tree it was not installed
from).
"""

import os as _os

# Arrow's allocator for everything shopmtl reads (CSV, Parquet, compute): jemalloc instead of
# pyarrow's default mimalloc, unless the user chose one (the variable is Arrow's own, read when
# pyarrow first allocates). Reading and encoding a split keeps about half as much memory
# (mimalloc holds its arenas), which puts shopmtl's benchmark peak below torch-rechub's
# (bench/peers/rss_probe.py; numbers in docs/BENCHMARKS.md).
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shopmtl")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str):
    if name in ("load", "Model"):
        from shopmtl import modeldir

        return getattr(modeldir, name)
    raise AttributeError(f"module 'shopmtl' has no attribute {name!r}")
