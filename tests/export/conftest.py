"""Export tests run on one thread: the models are tiny and the machine is shared."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:  # tests/conftest.py
    return None
