"""Arrow's allocator for the ``shopmtl`` command: jemalloc instead of pyarrow's default
mimalloc, unless the user chose one.

Reading and encoding a split keeps about half as much memory on jemalloc (mimalloc holds its
arenas), which puts shopmtl's benchmark peak below torch-rechub's (bench/peers/rss_probe.py,
which runs bench/peers/run_shopmtl.py with this same choice; numbers in docs/BENCHMARKS.md).

Only a program's entry point calls ``prefer_jemalloc`` (the CLI, the benchmark runner):
``import shopmtl`` changes nothing in the importing process. A Python user who wants the same
calls it first thing, or sets ``ARROW_DEFAULT_MEMORY_POOL=jemalloc`` in the environment.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV = "ARROW_DEFAULT_MEMORY_POOL"  # Arrow's own variable, read when pyarrow first allocates


def prefer_jemalloc(environ: MutableMapping[str, str] = os.environ) -> None:
    """Choose jemalloc for this process unless a pool is chosen already. Call it before
    pyarrow allocates anything (the variable is read once, at the first allocation)."""
    environ.setdefault(ENV, "jemalloc")
