"""Trainer behaviour: resume after SIGKILL is bitwise identical, non-finite losses stop cleanly,
checkpoints are verified on load."""

from __future__ import annotations

import dataclasses
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

from shopmtl.config import ConfigError, load_config
from shopmtl.data.pipeline import prepare_data
from shopmtl.train.checkpoint import CheckpointError, verify_dir
from shopmtl.train.loop import NonFiniteError
from shopmtl.train.trainer import Trainer, load_model_dir
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
        if latest.is_file() and latest.read_text() >= "ckpt-00-000000014":  # >= 2 checkpoints
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
    assert proc.returncode == 1  # CheckpointError: a runtime error
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
    assert proc.returncode == 1  # NonFiniteError: a runtime error
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
        assert proc.returncode == 1, proc.stderr  # CheckpointError: a runtime error
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


def test_content_model_round_trips_through_its_directory(tmp_path: Path) -> None:
    """A model with text + image fields: the model directory holds the catalog matrices once
    (content.safetensors, not in the weights), and a reloaded model predicts identically."""
    from shopmtl.config import DataConfig, EarlyStopping, ExperimentConfig, ModelConfig, TrainConfig
    from shopmtl.predict import evaluate_file
    from shopmtl.run import run_experiment
    from shopmtl.train.evaluate import predict_table

    world = {"rows": 8_000, "n_users": 100, "n_items": 60, "chunk_rows": 8_000,
             "cold_start_share": 0.3}
    cfg = ExperimentConfig(
        data=DataConfig(synthetic=world, content=("title", "image")),
        model=ModelConfig("mmoe", {"embed_dim": 8, "n_experts": 2, "expert": [16], "tower": [8]}),
        train=TrainConfig(epochs=2, batch_size=256, threads=1,
                          early_stopping=EarlyStopping("valid.click.all.auc", "max", 2)),
    )
    out = tmp_path / "run"
    metrics = run_experiment(cfg, out, progress=False, log=lambda *_: None)
    cold = metrics["slices"]["is_new_item"]["click"]["all"]
    assert cold["n"] > 0 and cold["auc"] is not None
    assert "slice `is_new_item`" in (out / "report.md").read_text()
    weights = _weights(out / "model")
    assert not any("content__" in k for k in weights)  # the matrices are saved once, beside
    content = load_file(str(out / "model" / "content.safetensors"))
    assert content["image.values"].dtype == torch.uint8 and content["title.values"].shape[1] == 384

    model, _, schema, encoders = load_model_dir(out / "model")
    again = evaluate_file(out / "model", out / "data" / "test.parquet")
    assert again["click"]["all"]["auc"] == pytest.approx(metrics["test"]["click"]["all"]["auc"])
    data = prepare_data(cfg.data.__class__(test=str(out / "data" / "test.parquet"),
                                           train=str(out / "data" / "train.parquet"),
                                           valid=str(out / "data" / "valid.parquet")),
                        schema, encoders=encoders)
    first = predict_table(model, data.test)
    reloaded, *_ = load_model_dir(out / "model")
    second = predict_table(reloaded, data.test)
    for task in first:
        assert torch.equal(torch.from_numpy(first[task]), torch.from_numpy(second[task]))


def test_id_dropout_replaces_ids_by_oov_at_its_rate() -> None:
    from shopmtl.config import ConfigError
    from shopmtl.data.dataset import Batch
    from shopmtl.data.schema import FeatureSpec, Schema, TaskSpec
    from shopmtl.train.table import drop_ids
    from shopmtl.train.table import id_dropout_table as _id_dropout_table

    schema = Schema((FeatureSpec("user_id", "categorical"), FeatureSpec("item_id", "categorical")),
                    (TaskSpec("click"),))
    probs = _id_dropout_table({"item_id": 0.3}, schema)
    assert probs.tolist() == pytest.approx([0.0, 0.3])
    n = 20_000
    batch = Batch(torch.ones(n, 2, dtype=torch.long), torch.zeros(n, 0),
                  torch.zeros(n, 0, 0, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                  torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool))
    torch.manual_seed(0)
    dropped = drop_ids(batch, probs)
    assert (dropped.cat[:, 0] == 1).all()
    assert (dropped.cat[:, 1] == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert (batch.cat == 1).all()  # the table's rows are not modified
    with pytest.raises(ConfigError, match="not categorical"):
        _id_dropout_table({"price": 0.1}, schema)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        _id_dropout_table({"item_id": 1.0}, schema)


def test_output_bias_starts_at_each_task_label_prior(world: Path, tmp_path: Path) -> None:
    import math

    from shopmtl.train.trainer import label_priors

    cfg = load_config(world_config_yaml(world, tmp_path / "exp.yaml", epochs=1))
    data = prepare_data(cfg.data, cfg.data.schema.build(), tmp_path / "prep")
    priors = label_priors(data.train, data.schema)
    for j, task in enumerate(data.schema.tasks):
        m = data.train.mask[:, j]
        rate = float(data.train.labels[m, j].double().mean())
        assert 0.0 < rate < 0.5
        assert priors[task.name] == pytest.approx(math.log(rate / (1 - rate)), abs=1e-9)
    trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
    layers = trainer.model.output_layers()
    assert set(layers) == set(data.schema.task_names)
    for name, layer in layers.items():
        assert layer.bias.item() == pytest.approx(priors[name], abs=1e-6)
    # the untrained model already predicts each task's base rate on average
    batch = data.train.slice(0, 4096)
    trainer.model.eval()
    probs = trainer.model.predict(batch)
    for j, name in enumerate(data.schema.task_names):
        m = batch.mask[:, j]
        assert probs[name][m].mean().item() == pytest.approx(batch.labels[m, j].mean().item(),
                                                             abs=0.05)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_bias_prior=False))
    plain = Trainer(off, data, tmp_path / "plain", progress=False).model.output_layers()
    assert all(abs(plain[n].bias.item() - priors[n]) > 0.5 for n in priors)


def test_streamed_splits_score_exactly_as_in_memory(world: Path, tmp_path: Path) -> None:
    """data.streaming keeps valid and test on disk too (flat memory): the run reads them chunk
    by chunk, keeps only their label columns, and its metrics equal an in-memory evaluation of
    the same saved model."""
    from shopmtl.data.dataset import StreamingSource
    from shopmtl.run import run_experiment
    from shopmtl.train.evaluate import metrics_by_scenario, predict_split, predict_table

    cfg = load_config(
        world_config_yaml(world, tmp_path / "exp.yaml", epochs=1, batch_size=512),
        ["data.streaming=true", "data.chunk_rows=2500"],
    )
    metrics = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    model, _, schema, encoders = load_model_dir(tmp_path / "run" / "model")

    streamed = prepare_data(cfg.data, schema, encoders=encoders)
    assert isinstance(streamed.valid, StreamingSource)
    assert isinstance(streamed.test, StreamingSource)
    preds, scored = predict_split(model, streamed.test, batch_size=1000)
    assert scored.cat.shape[1] == 0 and scored.num.shape[1] == 0  # labels only, no features

    memory = prepare_data(dataclasses.replace(cfg.data, streaming=False), schema,
                          encoders=encoders)
    assert len(scored) == len(memory.test) == streamed.test.rows
    assert sum(1 for _ in streamed.test.tables()) == -(-len(scored) // 2500) > 1
    ref = predict_table(model, memory.test)
    for task in schema.task_names:
        torch.testing.assert_close(torch.from_numpy(preds[task]), torch.from_numpy(ref[task]))
    assert torch.equal(scored.labels, memory.test.labels)
    expected = metrics_by_scenario(schema, memory.test, ref)
    for task, per in expected.items():
        for scenario, m in per.items():
            assert metrics["test"][task][scenario]["auc"] == pytest.approx(m["auc"], abs=1e-12)
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["valid_auc"]


def test_sqrt_lr_scaling_sets_the_rate_of_each_batch_size(world: Path, tmp_path: Path) -> None:
    # one lr for every batch size: lr is the rate at lr_base_batch, sqrt-scaled to the batch
    path = world_config_yaml(world, tmp_path / "exp.yaml", epochs=2, batch_size=1024, lr=1e-3,
                             lr_decay=0.5, lr_scaling="sqrt", lr_base_batch=256)
    cfg = load_config(path)
    assert cfg.train.batch_lr() == pytest.approx(2e-3)
    data = prepare_data(cfg.data, cfg.data.schema.build(), tmp_path / "prep")
    trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    trainer.fit()
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5)  # epoch 2's rate
    # "none" (the default) keeps lr as given at any batch size; a bad base batch is refused
    plain = dataclasses.replace(cfg.train, lr_scaling="none")
    assert plain.batch_lr() == 1e-3
    assert dataclasses.replace(cfg.train, batch_size=256).batch_lr() == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"train\.lr_base_batch: must be >= 1, got 0"):
        load_config(world_config_yaml(world, tmp_path / "bad.yaml", lr_base_batch=0))
    with pytest.raises(ConfigError, match="lr_scaling"):
        load_config(world_config_yaml(world, tmp_path / "bad2.yaml", lr_scaling="linear"))


def test_a_diverging_run_is_a_named_error_and_saves_no_model(world: Path, tmp_path: Path
                                                               ) -> None:
    """lr 1e6 used to reach loss 8e31 and AUC 0.50, exit 0 and be saved as best."""
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", lr=1e6, epochs=2)
    out = tmp_path / "run"
    proc = cli("train", str(cfg), "--out", str(out))
    assert proc.returncode == 1, proc.stderr  # DivergenceError: a runtime error
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: training diverged at step ")
    assert "over 100x its first value" in lines[0]
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_a_run_no_better_than_the_label_prior_is_a_named_error_and_saves_no_model(
        world: Path, tmp_path: Path) -> None:
    """lr 0.3 kills the network without a runaway loss: every row gets one score, AUC 0.5 on
    every task, which the label prior (a constant) scores too; that used to exit 0 with the
    constant model saved as best."""
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", lr=0.3, epochs=2)
    out = tmp_path / "run"
    proc = cli("train", str(cfg), "--out", str(out))
    assert proc.returncode == 1, proc.stderr  # NoBetterThanPriorError: a runtime error
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: no evaluation beat the label prior: the best "
                               "valid.all_tasks.auc 0.5 is no better than the label prior's 0.5")
    assert "lower train.lr, check the labels" in lines[0]
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    history = json.loads((out / "history.json").read_text())
    assert [r["valid_metric"] for r in history] == [0.5, 0.5]

    # train.prior_guard false: the same run finishes and saves its (constant) model
    off = world_config_yaml(world, tmp_path / "off.yaml", lr=0.3, epochs=2, prior_guard=False)
    proc = cli("train", str(off), "--out", str(tmp_path / "off"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "off" / "model" / "model.safetensors").is_file()


def test_a_learnable_run_saves_only_evaluations_better_than_the_prior(
        world: Path, tmp_path: Path) -> None:
    from shopmtl.metrics import logloss
    from shopmtl.train.loop import NoBetterThanPriorError

    assert issubclass(NoBetterThanPriorError, NonFiniteError)  # the CLI's exit 1
    cfg = load_config(world_config_yaml(
        world, tmp_path / "exp.yaml", epochs=2,
        early_stopping={"metric": "valid.click.all.logloss", "mode": "min"}))
    data = prepare_data(cfg.data, cfg.data.schema.build())
    trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
    state = trainer.fit()
    # the prior: the training click rate predicted for every validation row
    click = data.schema.task_names.index("click")
    train_rate = float(data.train.labels[data.train.mask[:, click], click].double().mean())
    valid = data.valid.labels[data.valid.mask[:, click], click].numpy()
    want = logloss(valid, [train_rate] * len(valid))
    assert state.prior["metric"] == pytest.approx(want, rel=1e-6)
    assert state.prior["score"] == pytest.approx(-want, rel=1e-6)
    assert state.best_metric is not None and state.best_metric < want
    assert state.best_score > state.prior["score"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    # AUC: the prior's is 0.5 (a constant ranks nothing)
    auc_cfg = load_config(world_config_yaml(world, tmp_path / "auc.yaml", epochs=1))
    trainer = Trainer(auc_cfg, data, tmp_path / "auc", progress=False)
    state = trainer.fit()
    assert state.prior == {"score": 0.5, "metric": 0.5}
    assert state.best_metric > 0.5


def test_prefetching_a_streamed_file_trains_the_same_model(world: Path, tmp_path: Path) -> None:
    """data.prefetch makes the streamed batches in a background thread: the same batches in
    the same order, so the same weights as without it (id dropout, drawn from torch's global
    generator, stays on the training thread)."""
    import threading

    from shopmtl.run import run_experiment

    path = world_config_yaml(world, tmp_path / "exp.yaml", epochs=1, batch_size=512)
    sets = ["data.streaming=true", "data.chunk_rows=5000", "train.id_dropout={user_id: 0.1}"]
    weights = {}
    for depth in (0, 3):
        cfg = load_config(path, [*sets, f"data.prefetch={depth}"])
        run_experiment(cfg, tmp_path / f"run{depth}", progress=False, log=lambda *_: None)
        weights[depth] = _weights(tmp_path / f"run{depth}" / "model")
    assert weights[0].keys() == weights[3].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[3][k]), k
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch-")]


def test_a_table_kept_on_a_device_gathers_its_batches_there(world: Path, tmp_path: Path
                                                            ) -> None:
    """train.resident: the decision, the table's size, and ``TensorTable.to``: every column
    moved, batches gathered on the device with the host's row order. No GPU here: the
    'meta' device (shapes, no data) stands in for one; bench/gpu_throughput.py runs the same
    path with train.device=cuda."""
    from shopmtl.train.table import keep_resident

    assert keep_resident(100, 200, "auto") and not keep_resident(101, 200, "auto")
    assert keep_resident(10**12, 0, "on") and not keep_resident(1, 10**12, "off")
    cfg = load_config(world_config_yaml(world, tmp_path / "exp.yaml", epochs=1))
    table = prepare_data(cfg.data, cfg.data.schema.build(), tmp_path / "prep").train
    cols = ("cat", "num", "seq", "scenario", "labels", "mask", "group", "content", "slices")
    assert table.nbytes() == sum(getattr(table, n).numel() * getattr(table, n).element_size()
                                 for n in cols) + (
        0 if table.oracle is None else table.oracle.numel() * table.oracle.element_size())
    assert table.to("cpu") is table
    moved = table.to("meta")
    assert len(moved) == len(table)
    assert all(getattr(moved, n).device.type == "meta" for n in cols)
    host = list(table.batches(512, epoch=1, seed=3))
    there = list(moved.batches(512, epoch=1, seed=3))
    assert len(there) == len(host)
    assert all(b.cat.device.type == "meta" and b.cat.shape == h.cat.shape
               for b, h in zip(there, host, strict=True))
