"""The training layer: the one loop, its sources, checkpoints, output folders.

``shopmtl.train`` is also callable, ``shopmtl.train(config, out, ...)``: the Python API's
training call (``shopmtl.api.train``; the root package makes this package callable)."""
