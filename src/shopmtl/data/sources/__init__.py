"""Real datasets with a ready example config: name -> a function that returns that config.

Each function prepares whatever derived file its config reads (only MovieLens needs one) and
returns the path of ``examples/<name>.yaml``, to be used as ``shopmtl train <that path>``. The
raw files are expected in ``DATASETS_ROOT`` = ``<repo>/../shared/datasets`` (read-only; each
folder has a SOURCE.md with licence and column meanings); the example configs name them by
paths relative to themselves, so they work from any working directory.

These helpers work from a source checkout (the example configs are not installed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]
EXAMPLES = REPO_ROOT / "examples"
DATASETS_ROOT = REPO_ROOT.parent / "shared" / "datasets"


def require_dataset(name: str) -> Path:
    """The folder of dataset ``name``; raises with the expected location if it is missing."""
    path = DATASETS_ROOT / name
    if not (path / "SOURCE.md").is_file():
        raise FileNotFoundError(
            f"dataset '{name}' not found at {path}: the real datasets must be checked out as "
            f"'shared/datasets/' beside the repository ({REPO_ROOT})"
        )
    return path


def _example(name: str) -> Path:
    path = EXAMPLES / name
    if not path.is_file():
        raise FileNotFoundError(f"example config not found: {path}")
    return path


def census_income_kdd() -> Path:
    """Raw UCI CSV read as is (string labels via ``positive``): income > 50K + never married."""
    require_dataset("census_income_kdd")
    return _example("census.yaml")


def movielens_latest_small() -> Path:
    """Write the ratings x movies Parquet where ``examples/movielens.yaml`` reads it."""
    from shopmtl.config import load_config
    from shopmtl.data.sources.movielens import FILE_NAME, prepare_movielens

    config = _example("movielens.yaml")
    target = Path(load_config(config).data.train)
    if target.name != FILE_NAME:
        raise ValueError(f"{config}: data.train must name a file called {FILE_NAME}")
    prepare_movielens(require_dataset("movielens_latest_small"), target.parent)
    return config


def ali_ccp() -> Path:
    """Ali-CCP sample (200 rows, format only): click + purchase given click."""
    require_dataset("ali_ccp")
    return _example("ali_ccp.yaml")


def aliexpress_us() -> Path:
    """AliExpress US sample (120 rows, format only): click + conversion given click."""
    require_dataset("aliexpress_us")
    return _example("aliexpress_us.yaml")


DATASETS: dict[str, Callable[[], Path]] = {
    "census_income_kdd": census_income_kdd,
    "movielens_latest_small": movielens_latest_small,
    "ali_ccp": ali_ccp,
    "aliexpress_us": aliexpress_us,
}

__all__ = ["DATASETS", "DATASETS_ROOT", "EXAMPLES", "REPO_ROOT", "require_dataset"]
