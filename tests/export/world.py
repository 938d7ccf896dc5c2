"""The export tests' one trained model: a small zoo model of the synthetic world."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from shopmtl.api import run_training
from tests.helpers import small_world, world_config_yaml


def trained_zoo(root: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A model trained one epoch on a 20,000-row synthetic world written to ``root/w``
    (``train.parquet``, ``test.parquet``); its model directory. ``edit`` changes the config
    (its YAML as data) before training."""
    small_world(root / "w", rows=20_000)
    cfg = world_config_yaml(root / "w", root / "zoo.yaml", epochs=1)
    if edit is not None:
        raw = yaml.safe_load(cfg.read_text())
        edit(raw)
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_training(cfg, root / "run", log=lambda *a, **k: None)
    return root / "run" / "model"
