"""Trainer behaviour: resume after SIGKILL is bitwise identical, non-finite losses stop cleanly,
checkpoints are verified on load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shopmtl.config import load_config
from shopmtl.data.pipeline import prepare_data
from shopmtl.train.checkpoint import CheckpointError, verify_dir
from shopmtl.train.trainer import NonFiniteError, Trainer, load_model_dir
from tests.helpers import cli, small_world, world_config_yaml


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("world")
    small_world(d, rows=60_000)
    return d


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_resume_after_sigkill_matches_uninterrupted_run(world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(
        world, tmp_path / "exp.yaml", epochs=3, checkpoint_every=7, batch_size=128
    )
    full = tmp_path / "full"
    cli("train", str(cfg), "--out", str(full), check=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shopmtl.cli", "train", str(cfg), "--out", str(cut)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() >= "ckpt-000000014":  # >= 2 checkpoints
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "metrics.json").exists()
    killed_at = latest.read_text()

    cli("train", str(cfg), "--out", str(cut), "--resume", check=True)
    a, b = _weights(full / "model"), _weights(cut / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {killed_at}"
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((cut / "metrics.json").read_text())
    assert ma["test"] == mb["test"]


def test_resume_without_checkpoint_is_a_clear_error(world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(world, tmp_path / "exp.yaml")
    proc = cli("train", str(cfg), "--out", str(tmp_path / "none"), "--resume")
    assert proc.returncode == 2
    assert "no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_finite_loss_stops_and_never_saves_non_finite_weights(
    world: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        world_config_yaml(world, tmp_path / "exp.yaml", lr=1e12, checkpoint_every=1, epochs=1)
    )
    data = prepare_data(cfg.data, cfg.data.schema.build())
    trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
    with pytest.raises(NonFiniteError, match="non-finite"):
        trainer.fit()
    assert trainer.state.global_step < 20  # stopped within a few steps
    for ckpt in (tmp_path / "run" / "checkpoints").glob("ckpt-*"):
        for name, t in load_file(str(ckpt / "weights.safetensors")).items():
            assert torch.isfinite(t).all(), f"non-finite {name} in {ckpt.name}"


def test_non_finite_loss_cli_exit_code(world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", lr=1e12, epochs=1)
    proc = cli("train", str(cfg), "--out", str(tmp_path / "nan"))
    assert proc.returncode == 2
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_checkpoint_is_refused(world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", epochs=1)
    out = tmp_path / "run"
    cli("train", str(cfg), "--out", str(out), check=True)
    model_dir = out / "model"
    verify_dir(model_dir)
    load_model_dir(model_dir)  # loads fine before tampering
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model_dir(model_dir)
    for cmd in ("evaluate", "predict"):
        proc = cli(cmd, str(model_dir), str(world / "test.parquet"))
        assert proc.returncode == 2, proc.stderr
        assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_interrupted_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    from shopmtl.train import checkpoint as ck

    good = ck.write_dir(tmp_path / "a", {"w": {"x": torch.ones(3)}}, {"meta": {"k": 1}})

    class Boom:
        def __iter__(self):  # json.dumps cannot serialise this: the write fails midway
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        ck.write_dir(tmp_path / "b", {"w": {"x": torch.ones(3)}}, {"meta": {"bad": Boom()}})
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp directory left behind
    verify_dir(good)


def test_env_has_no_unsafe_loading() -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "import pickle" not in text and "pickle.load" not in text
    assert "weights_only=False" not in text
    assert "torch.load(" not in text
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") is None
