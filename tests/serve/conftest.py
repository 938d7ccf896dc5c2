"""Fixtures of the service tests: the tiny joint model and the format-1 zoo model, each served
once per module by a real ``shopmtl serve`` process, and loaded in-process (the reference
answers: ``shopmtl.load(dir).predict``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import shopmtl
from tests.serve.server import Server, serving

ZOO = Path(__file__).parents[1] / "fixtures" / "format1" / "zoo_model"


@pytest.fixture(scope="session")
def joint_dir(tiny_joint_run: Path) -> Path:
    return tiny_joint_run / "joint" / "model"


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    return ZOO


@pytest.fixture(scope="session")
def joint_model(joint_dir: Path) -> shopmtl.Model:
    return shopmtl.load(joint_dir)


@pytest.fixture(scope="session")
def zoo_model(zoo_dir: Path) -> shopmtl.Model:
    return shopmtl.load(zoo_dir)


@pytest.fixture(scope="module")
def joint_server(joint_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    with serving(joint_dir, tmp_path_factory.mktemp("serve") / "joint.log") as server:
        yield server


@pytest.fixture(scope="module")
def zoo_server(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(zoo_dir, tmp_path_factory.mktemp("serve") / "zoo.log") as server:
        yield server
