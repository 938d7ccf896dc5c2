"""Shared fixtures: a seed, and a tiny, valid e-commerce CSV with its matching schema.

The data has three scenarios (home, search, ad) and three binary tasks: click (everywhere),
conversion (only given a click: the cell is empty when click=0) and ad_click (only in the ad slot:
the cell is empty elsewhere). Every expected value in the tests is derived from ``ECOM_ROWS``.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec

ECOM_HEADER = ["user_id", "item_id", "price", "hist", "scenario", "click", "conversion", "ad_click"]
SCENARIOS = ("home", "search", "ad")
N_ECOM_ROWS = 30


def _ecom_row(i: int) -> list[str]:
    scenario = SCENARIOS[i % 3]
    click = 1 if i % 4 in (0, 1) else 0
    return [
        f"u{i % 7}",
        f"i{(i * 5) % 13}",
        f"{(i % 6) * 1.25 + 0.5}",
        "|".join(f"i{(i + k) % 13}" for k in range(i % 5)),  # empty for i % 5 == 0
        scenario,
        str(click),
        str(i % 2) if click else "",
        str((i // 3) % 2) if scenario == "ad" else "",
    ]


ECOM_ROWS: list[list[str]] = [_ecom_row(i) for i in range(N_ECOM_ROWS)]


def ecom_schema() -> Schema:
    return Schema(
        features=(
            FeatureSpec("user_id", "categorical"),
            FeatureSpec("item_id", "categorical"),
            FeatureSpec("price", "numeric"),
            FeatureSpec("hist", "sequence", vocab_from="item_id", max_len=3),
        ),
        tasks=(
            TaskSpec("click"),
            TaskSpec("conversion", given="click"),
            TaskSpec("ad_click", scenarios=("ad",)),
        ),
        scenario=ScenarioSpec("scenario", SCENARIOS),
        group="user_id",
    )


def expected_labels_and_mask(rows: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """What ingestion must produce for valid ECOM-format rows (labels 0 where masked)."""
    labels = np.zeros((len(rows), 3), np.float32)
    mask = np.zeros((len(rows), 3), bool)
    for r, row in enumerate(rows):
        scen, click, conv, ad = row[4], row[5], row[6], row[7]
        mask[r] = [True, click == "1" and conv != "", scen == "ad" and ad != ""]
        labels[r, 0] = float(click)
        if mask[r, 1]:
            labels[r, 1] = float(conv)
        if mask[r, 2]:
            labels[r, 2] = float(ad)
    return labels, mask


def write_csv_file(path: Path, header: Sequence[str], rows: Sequence[Sequence[str] | str]) -> Path:
    """Write ``rows``; a row given as a plain string is written verbatim (for malformed lines)."""
    with path.open("w", newline="") as f:
        f.write(",".join(header) + "\n")
        w = csv.writer(f, lineterminator="\n")
        for row in rows:
            if isinstance(row, str):
                f.write(row + "\n")
            else:
                w.writerow(row)
    return path


@dataclass(frozen=True)
class Ecom:
    """The fixture data: header, rows (as written), schema, the CSV path, and expectations."""

    header: list[str]
    rows: list[list[str]]
    schema: Schema
    path: Path

    @staticmethod
    def expected(rows: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        return expected_labels_and_mask(rows)


@pytest.fixture(scope="session", autouse=True)
def _offline_text_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No hub access ever (a hub id must fail fast), and text vectors cached in a session
    folder instead of the user's cache."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["SHOPMTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("shopmtl_cache"))


@pytest.fixture(autouse=True)
def _thawed_heap() -> Iterator[None]:
    """A service started in this process freezes its heap once warm (``serve.reload.
    settle_heap``): thawed after each test, so no later test finds its garbage frozen."""
    yield
    import gc

    gc.unfreeze()


@pytest.fixture
def seed() -> int:
    """Seed every RNG the code under test might touch; returns the seed."""
    value = 1234
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


@pytest.fixture
def schema() -> Schema:
    return ecom_schema()


@pytest.fixture
def ecom_rows() -> list[list[str]]:
    return [list(r) for r in ECOM_ROWS]


@pytest.fixture
def ecom_csv(tmp_path: Path) -> Path:
    """A small valid e-commerce CSV (header + 30 rows) matching the ``schema`` fixture."""
    return write_csv_file(tmp_path / "ecom.csv", ECOM_HEADER, ECOM_ROWS)


@pytest.fixture
def ecom(ecom_csv: Path) -> Ecom:
    return Ecom(list(ECOM_HEADER), [list(r) for r in ECOM_ROWS], ecom_schema(), ecom_csv)


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    """``write_csv(name, rows, header=ECOM_HEADER)`` -> path under tmp_path."""

    def _write(
        name: str, rows: Sequence[Sequence[str] | str], header: Sequence[str] = ECOM_HEADER
    ) -> Path:
        return write_csv_file(tmp_path / name, header, rows)

    return _write


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny batches on a shared machine), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_joint_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/joint_tiny.yaml trained once per session with ``--alone`` (about a minute):
    the joint run tests/joint and tests/serve read (its model: ``RUN/joint/model``)."""
    from tests.helpers import cli

    out = tmp_path_factory.mktemp("joint")
    cli("train", str(Path(__file__).parents[1] / "examples" / "joint_tiny.yaml"), "--out",
        str(out), "--alone", check=True)
    return out
