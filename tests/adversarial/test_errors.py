"""Runtime failures: the command was right but the run could not finish. Each one is one line,
exit status 1 (a usage error would be 2), no traceback, no cell value: a missing data file, a
full disk, a corrupt model directory, a bug."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adversarial.common import SECRET, assert_clean_failure, config, good_lines, write_csv
from tests.helpers import cli

RUNTIME = 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a model directory trained on the scaffold's CSV, that CSV)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_csv(root / "shop.csv", good_lines(80))
    cli("train", str(config(root)), "--out", str(root / "run"), check=True)
    return root / "run" / "model", data


def test_a_missing_data_file_is_a_runtime_error(tmp_path: Path) -> None:
    """The config is fine (its `train` path is a path); the file is not there when the run
    reads it: exit 1, naming the file, like any other data problem."""
    proc = cli("train", str(config(tmp_path, data="gone.csv")), "--out", str(tmp_path / "o"))
    assert_clean_failure(proc, "gone.csv", "not found", code=RUNTIME)


def test_a_missing_file_to_predict_is_a_runtime_error(trained: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    model, _ = trained
    proc = cli("predict", str(model), str(tmp_path / "gone.csv"), "--out",
               str(tmp_path / "p.csv"))
    assert_clean_failure(proc, "gone.csv", "not found", code=RUNTIME)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_full_disk_is_one_line(trained: tuple[Path, Path], command: str) -> None:
    """/dev/full accepts the open and fails every write with ENOSPC, as a full disk does."""
    model, data = trained
    proc = cli(command, str(model), str(data), "--out", "/dev/full")
    assert_clean_failure(proc, "No space left on device", code=RUNTIME)
    # written in place: an atomic rename over it would have replaced the device with a file
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def _copy(model: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(model, d)
    return d


def test_a_corrupt_model_file_is_a_runtime_error(trained: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    model, data = trained
    d = _copy(model, tmp_path)
    weights = d / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the manifest's SHA-256 no longer matches
    weights.write_bytes(bytes(raw))
    for command in ("predict", "evaluate"):
        proc = cli(command, str(d), str(data), "--out", str(tmp_path / "p.out"))
        assert_clean_failure(proc, "model.safetensors", "corrupt", code=RUNTIME)
    assert not (tmp_path / "p.out").exists()


def test_a_truncated_model_directory_is_a_runtime_error(trained: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    model, data = trained
    d = _copy(model, tmp_path)
    (d / "manifest.json").write_text('{"model.safetensors": "')  # cut mid-write
    proc = cli("predict", str(d), str(data), "--out", str(tmp_path / "p.csv"))
    assert_clean_failure(proc, "manifest.json", "corrupt manifest", code=RUNTIME)


def _with_a_bug(*args: str) -> subprocess.CompletedProcess:
    """`shopmtl ARGS` where loading a model hits a bug: an exception no handler expects,
    whose message and locals hold a secret cell value."""
    code = (
        "import sys, shopmtl.modeldir, shopmtl.cli\n"
        "def load(path):\n"
        f"    cell = {SECRET!r}\n"
        "    raise RuntimeError('bad cell ' + cell)\n"
        "shopmtl.modeldir.load = load\n"
        "sys.argv = ['shopmtl', *sys.argv[1:]]\n"
        "shopmtl.cli.app()\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)


def test_an_internal_error_is_one_line_with_the_debug_hint(trained: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    model, data = trained
    proc = _with_a_bug("predict", str(model), str(data), "--out", str(tmp_path / "p.csv"))
    line = assert_clean_failure(proc, code=RUNTIME)
    assert line == ("error: internal error (RuntimeError); rerun with --debug for the "
                    "traceback")


def test_debug_shows_the_traceback_without_local_variables(trained: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    """--debug is the user asking for the traceback (its message included); the locals,
    where cell values live, stay hidden."""
    model, data = trained
    proc = _with_a_bug("--debug", "predict", str(model), str(data), "--out",
                       str(tmp_path / "p.csv"))
    assert proc.returncode == RUNTIME
    assert "Traceback" in proc.stderr and "RuntimeError" in proc.stderr
    assert "─ locals ─" not in proc.stderr and f"cell = '{SECRET}'" not in proc.stderr
