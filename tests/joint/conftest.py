"""The joint run several test modules read: examples/joint_tiny.yaml (every source on a small
slice) trained once per session with ``--alone``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import cli

TINY = Path(__file__).parents[2] / "examples" / "joint_tiny.yaml"


@pytest.fixture(scope="session")
def small_cfg() -> Path:
    return TINY


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("joint")
    cli("train", str(TINY), "--out", str(out), "--alone", check=True)
    return out
