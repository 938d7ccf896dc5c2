"""A tiny synthetic world cut into silos, prepared once for the federated tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# as `shopmtl federate` does (cli.federate): Flower reads it when first imported, and the
# tests that run the engine in-process import it after this
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

TINY = {
    "data": {"synthetic": {"rows": 30000, "seed": 0, "n_users": 300, "n_items": 200}},
    "model": {"name": "shared_bottom",
              "args": {"embed_dim": 8, "interaction": "dot", "bottom": [32], "tower": [16],
                       "dropout": 0.0, "input_norm": "none"}},
    "train": {"batch_size": 512, "lr": 0.005, "seed": 0, "threads": 1,
              "alpha": {"click": 1.0, "conversion": 0.1, "ad_click": 0.1}},
    "federated": {"silos": {"by": "scenario"}, "strategy": "fedprox", "mu": 1e-4,
                  "rounds": 2, "local_epochs": 1.0},
}


def tiny_raw(**federated: Any) -> dict[str, Any]:
    """The tiny run's config dict, with ``federated`` keys replaced."""
    import copy

    raw = copy.deepcopy(TINY)
    raw["federated"].update(federated)
    return raw


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world's folder (generated once; ``prepare`` reuses it)."""
    from shopmtl.federated.config import federated_from_dict
    from shopmtl.federated.server import prepare

    out = tmp_path_factory.mktemp("fed_world")
    prepare(federated_from_dict(tiny_raw()), out, log=lambda s: None)
    return out


@pytest.fixture
def prepared(tiny_world: Path, tmp_path: Path) -> Any:
    """(data, federation, info) of the tiny world split by scenario."""
    import shutil

    from shopmtl.federated.config import federated_from_dict
    from shopmtl.federated.server import prepare

    shutil.copytree(tiny_world / "data", tmp_path / "data")
    return prepare(federated_from_dict(tiny_raw()), tmp_path, log=lambda s: None)


@pytest.fixture
def identity():
    """The identity a ServerApp's process has during a run (Flower stamps it on messages);
    put back afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
