"""Shared parts of the adversarial tests: a small raw CSV the way a user exports it, its
config, and the invariants every failure must keep (one line, the right exit code, no
traceback, no cell value printed).

Every data row carries ``SECRET`` in a cell (a secret-looking user id): no message may ever
print it, whatever goes wrong."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.helpers import assert_one_error_line

SECRET = "tok_9f2c7d1e5b"  # in every row's user_id: must never reach stdout or stderr
HEADER = ["user_id", "item_id", "price", "scenario", "click", "conversion"]


def good_row(i: int) -> list[str]:
    click = i % 3 == 0
    return [f"{SECRET}{i % 11}", f"i{(i * 7) % 17}", f"{1.5 + (i % 9) * 0.75}",
            ("feed", "search")[i % 2], str(int(click)), str(i % 2) if click else ""]


def good_lines(n: int, start: int = 0) -> list[str]:
    return [",".join(good_row(i)) for i in range(start, start + n)]


def write_csv(path: Path, body: list[str], header: list[str] = HEADER) -> Path:
    path.write_text("\n".join([",".join(header), *body]) + "\n")
    return path


def config(tmp_path: Path, data: str = "shop.csv", policy: str = "quarantine", **train) -> Path:
    """A zoo experiment over ``data`` (relative to the config), as a user would write it."""
    cfg = {
        "data": {
            "train": data, "bad_rows": policy, "max_bad_fraction": 0.3,
            "valid_fraction": 0.2, "test_fraction": 0.0,
            "schema": {
                "features": [{"name": "user_id", "kind": "categorical"},
                             {"name": "item_id", "kind": "categorical"},
                             {"name": "price", "kind": "numeric", "transform": "log1p"}],
                "tasks": [{"name": "click"}, {"name": "conversion", "given": "click"}],
                "scenario": {"column": "scenario", "values": ["feed", "search"]},
                "group": "user_id",
            },
        },
        "model": {"name": "shared_bottom", "args": {"bottom": [8], "tower": [4],
                                                   "embed_dim": 4}},
        # a few hundred rows, one short epoch: what is under test is the files, not the model,
        # which may rank at chance, so the label-prior guard is off (train.prior_guard)
        "train": {"epochs": 1, "batch_size": 16, "threads": 1, "prior_guard": False, **train},
    }
    path = tmp_path / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str, code: int,
                         secrets: tuple[str, ...] = (SECRET,)) -> str:
    """Exit ``code``, one ``error: ...`` line holding every needle, no traceback, and no
    secret cell value anywhere in the output."""
    line = assert_one_error_line(proc, *needles, code=code)
    for s in secrets:
        assert s not in proc.stderr and s not in proc.stdout, proc.stderr
    return line
