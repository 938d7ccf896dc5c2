"""A joint run killed anywhere resumes to the same end, bit for bit on CPU: the joint stage,
each refit stage and the solve stage all go through the one loop's checkpoints
(``train.stages``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import cli

CFG = {
    "sources": [
        {"name": "rec", "batch_size": 256, "args": {"rows": 20000}},
        {"name": "bitext", "batch_size": 32, "max_examples": 120},
        {"name": "reviews", "batch_size": 32, "max_examples": 120},
    ],
    "model": {"adapter_hidden": 32, "text_dim": 16, "hidden": [16], "id_dim": 8,
              "dropout": 0.2},
    "sampling": {"method": "temperature"},
    "weighting": {"name": "uncertainty"},
    "train": {"steps": 90, "lr": 0.003, "threads": 1, "log_every": 0, "eval_every": 15,
              "lr_decay": 0.5, "decay_every": 40, "refit_steps": 30, "refit_eval_every": 10,
              "solve_heads": True, "solve_l2": [1e-3], "solve_iters": 10},
}


def _run(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shopmtl.cli", "train", str(cfg), "--out",
                             str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_at(proc: subprocess.Popen, latest: Path, wanted: str) -> str:
    """SIGKILL ``proc`` once its latest checkpoint is ``wanted`` or later."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() >= wanted:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before {wanted}: {proc.stderr}"
    return latest.read_text()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "joint.yaml"
    path.write_text(yaml.safe_dump(CFG))
    return path


def test_joint_run_resumes_after_sigkill_bitwise(cfg: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    cli("train", str(cfg), "--out", str(full), check=True)
    cut = tmp_path / "cut"
    latest = cut / "joint" / "checkpoints" / "latest"
    # killed inside the joint stage (after its 2nd evaluation), then inside the refit stages
    first = _kill_at(_run(cfg, cut), latest, "ckpt-00-000000030")
    assert first.startswith("ckpt-00-") and not (cut / "metrics.json").exists()
    second = _kill_at(_run(cfg, cut, "--resume"), latest, "ckpt-01-end")
    assert second > first
    proc = _run(cfg, cut, "--resume")
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    a = load_file(str(full / "joint" / "model" / "model.safetensors"))
    b = load_file(str(cut / "joint" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from {first}, {second}"
    ma = json.loads((full / "metrics.json").read_text())["joint"]
    mb = json.loads((cut / "metrics.json").read_text())["joint"]
    assert ma["test"] == mb["test"] and ma["valid_history"] == mb["valid_history"]
    assert ma["refit"] == mb["refit"] and ma["best_step"] == mb["best_step"]
    # stages: joint, refit rec / bitext / reviews, solve (no boundary after the last one);
    # the last two checkpoints are kept
    ckpts = sorted(p.name for p in (full / "joint" / "checkpoints").glob("ckpt-*"))
    assert ckpts == ["ckpt-02-end", "ckpt-03-end"]


def test_resume_without_a_checkpoint_is_one_clear_line(cfg: Path, tmp_path: Path) -> None:
    proc = cli("train", str(cfg), "--out", str(tmp_path / "none"), "--resume")
    assert proc.returncode == 1  # CheckpointError: a runtime error
    assert "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr
