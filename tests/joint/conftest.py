"""The joint run several test modules read: examples/joint_tiny.yaml (every source on a small
slice) trained once per session with ``--alone`` (``tiny_joint_run``, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = Path(__file__).parents[2] / "examples" / "joint_tiny.yaml"


@pytest.fixture(scope="session")
def small_cfg() -> Path:
    return TINY


@pytest.fixture(scope="session")
def run(tiny_joint_run: Path) -> Path:
    """The tiny joint run (tests/conftest.py: shared with tests/serve, trained once)."""
    return tiny_joint_run
