"""``shopmtl serve`` refuses what cannot work in one line, before it listens: a missing serve
extra, a directory that is no model, an option out of range."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import assert_one_error_line, cli
from tests.test_extras import cli_without


def test_without_the_serve_extra_it_is_one_line(zoo_dir: Path) -> None:
    proc = cli_without(["fastapi"], "serve", str(zoo_dir))
    assert_one_error_line(proc, "shopmtl serve", "fastapi is not installed",
                          "pip install 'shopmtl[serve]'", code=1)


def test_no_model_directory_is_one_line(tmp_path: Path) -> None:
    proc = cli("serve", str(tmp_path / "nothing"))
    assert_one_error_line(proc, str(tmp_path / "nothing"), code=1)


def test_at_least_one_request_in_flight(zoo_dir: Path) -> None:
    proc = cli("serve", str(zoo_dir), "--max-in-flight", "0")
    assert proc.returncode == 2 and "--max-in-flight" in proc.stderr
