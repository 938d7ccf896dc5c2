"""shopmtl.

``shopmtl.train(config, out)`` trains a config (a YAML path or a dict) into an output folder as
``shopmtl train`` does and returns the model (``shopmtl.api``); ``shopmtl.load(path)`` loads a
trained model directory (``shopmtl.modeldir``). Both are imported on first use, so
``import shopmtl`` stays light, and it changes nothing in the process (no environment
variable, no global library setting). ``shopmtl.__version__`` is the installed distribution's
version ("0+unknown" when shopmtl runs from a source tree it was not installed from).
"""

import types as _types

# ``shopmtl.train`` is the training package and also the training call of the Python API
# (``shopmtl.api.train``): the import system binds the package to that name whenever any of its
# modules is imported, so the package itself is made callable (nothing heavy is imported here:
# the package's __init__ is empty; the API is imported on the first call).
from shopmtl import train as _train_package


class _TrainPackage(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``shopmtl.train(config, out, *, overrides=(), resume=False, overwrite=False)``: see
        ``shopmtl.api.train``."""
        from shopmtl.api import train

        return train(*args, **kwargs)


_train_package.__class__ = _TrainPackage


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
