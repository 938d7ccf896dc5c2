"""The joint run's device, precision and torchrun parts that one CPU process can check: the
device keys are read and resolved before any data (``device: cuda`` without CUDA stops in one
line), bf16 autocast trains every stage of the joint run on CPU, each rank's rows of every
source's batches recombine into one process's batch and loss, the sampler draws the same
sources whatever the process, and the torchrun refusals that remain
(tests/joint/test_torchrun.py runs the job itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shopmtl.checks import check_joint
from shopmtl.config import ConfigError
from shopmtl.joint.config import joint_config_from_dict
from shopmtl.joint.parts import load_parts, text_bank, text_width
from shopmtl.joint.train import build_joint_model, join, train_joint
from shopmtl.train.distributed import resolve_device
from shopmtl.train.sampling import SourceSampler

CONFIG = Path(__file__).parent / "ddp_tiny.yaml"

# every source on the slices of ddp_tiny.yaml (and examples/joint_tiny.yaml: the session's
# text cache embeds their texts once), a smaller rec world; even batch sizes, no dropout
RAW: dict[str, Any] = {
    "sources": [
        {"name": "rec", "batch_size": 64, "args": {"rows": 6000}},
        {"name": "search", "batch_size": 8, "args": {"n_train": 80, "n_valid": 30,
                                                     "n_test": 30}},
        {"name": "bitext", "batch_size": 16, "max_examples": 150},
        {"name": "reviews", "batch_size": 16, "max_examples": 150},
        {"name": "retail", "batch_size": 16, "max_examples": 300},
    ],
    "text": {"ngram_buckets": 1024},
    "model": {"adapter_hidden": 16, "text_dim": 8, "hidden": [8], "id_dim": 16,
              "wide_vector": True, "dropout": 0.0, "share_ids": {"item": "item_id"}},
    "sampling": {"method": "round_robin"},
    "train": {"steps": 10, "lr": 0.003, "threads": 1, "log_every": 0},
}


def _quiet(*_: Any) -> None:
    pass


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Any]:
    cfg = joint_config_from_dict(RAW)
    parts, texts, _ = load_parts(cfg, tmp_path_factory.mktemp("parts"), _quiet)
    return parts, texts


# -- the device -------------------------------------------------------------------------------
def test_cuda_without_cuda_stops_in_one_line_before_any_data(tmp_path: Path) -> None:
    """CUDA hidden from torch (CUDA_VISIBLE_DEVICES empty: no mock, the real check), so the
    test means the same on a machine with a GPU."""
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "shopmtl.cli", "train", str(CONFIG), "--out",
                           str(out), "--set", "train.device=cuda"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuda requested" in lines[0], proc.stderr
    # nothing was generated or read: no rec world, no joint run
    assert not (out / "rec").exists() and not (out / "joint").exists()


def test_device_and_precision_are_checked_joint_keys() -> None:
    for key, value in (("device", "tpu"), ("precision", "fp16"), ("dist_timeout", 0)):
        raw = {**RAW, "train": {**RAW["train"], key: value}}
        with pytest.raises(ConfigError, match=key):
            joint_config_from_dict(raw)
    cfg = joint_config_from_dict(RAW)
    assert (cfg.train.device, cfg.train.precision, cfg.train.dist_timeout) == ("auto", "fp32",
                                                                               300.0)
    device, dist = join(cfg)  # one process: no job, the device ``auto`` resolves to
    assert dist is None and device == resolve_device("auto")


def test_bf16_trains_every_stage_of_the_joint_run_on_cpu(loaded: tuple[list[Any], Any],
                                                         tmp_path: Path) -> None:
    """bf16 autocast on CPU through the joint, refit and solve stages: finite metrics, float32
    weights written, and the shared adapter not where the fp32 joint steps leave it (the
    refits and the solve never move it: autocast really ran)."""
    parts, texts = loaded
    train = {**RAW["train"], "device": "cpu", "precision": "bf16", "refit_steps": 4,
             "refit_eval_every": 2, "solve_heads": True, "solve_l2": [0.001], "solve_iters": 5}
    cfg = joint_config_from_dict({**RAW, "train": train})
    m = train_joint(cfg, tmp_path / "bf16", log=_quiet, shared=(parts, texts))
    assert set(m["refit"]) == {p.name for p in parts} and m["solve"]
    assert all(v is not None and np.isfinite(v) for v in m["summary"].values()), m["summary"]
    # every source trained on the device the config resolved to, in one process
    assert all(p.device == torch.device("cpu") and p.world == 1 for p in parts)
    bf16 = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert all(v.dtype in (torch.float32, torch.int64) for v in bf16.values())
    fp32_cfg = joint_config_from_dict({**RAW, "train": {**RAW["train"], "device": "cpu"}})
    train_joint(fp32_cfg, tmp_path / "fp32", log=_quiet, shared=(parts, texts))
    fp32 = load_file(str(tmp_path / "fp32" / "model" / "model.safetensors"))
    key = "text.vec_in.weight"
    assert not torch.equal(bf16[key], fp32[key])
    assert torch.allclose(bf16[key], fp32[key], atol=0.05)  # the same training, rounded


# -- each rank's rows -------------------------------------------------------------------------
def _loss_values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items() if not k.startswith("_")}


def test_two_ranks_rows_recombine_into_one_process_batch_and_loss(
        loaded: tuple[list[Any], Any]) -> None:
    """For every source (rec, search's lists, the text and demand tables) and every task
    type: the two ranks' shards of a global batch are halves of one process's batch, and
    their losses weighted by ``loss_counts`` (what ``Dist.global_values`` all-reduces) are the
    one process's loss of the whole batch."""
    parts, texts = loaded
    cfg = joint_config_from_dict(RAW)
    bank = text_bank(cfg, texts.texts)
    torch.manual_seed(0)
    model = build_joint_model(cfg, parts, text_width(cfg), _quiet)
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    model.eval()
    try:
        for p in parts:
            p.place(torch.device("cpu"))
            n_one = p.num_batches()
            one = list(p.batches(2, 5))[1]
            full = _loss_values(p.losses(model, one))
            shards, counts = [], []
            for r in range(2):
                p.place(torch.device("cpu"), r, 2)
                assert p.num_batches() == n_one, p.name  # no remainder smaller than 2 here
                shards.append(list(p.batches(2, 5))[1])
                counts.append(p.loss_counts(shards[-1]))
            size = [len(s) if hasattr(s, "numeric") else len(s.labels) for s in shards]
            assert size == [p.cfg.batch_size // 2] * 2, (p.name, size)
            per_rank = [_loss_values(p.losses(model, s)) for s in shards]
            for j, task in enumerate(p.task_names):
                c = torch.stack([counts[0][j], counts[1][j]])
                assert c.sum() > 0, (p.name, task)
                got = float((c * torch.tensor([per_rank[0][task], per_rank[1][task]])).sum()
                            / c.sum())
                assert got == pytest.approx(full[task], rel=1e-5, abs=1e-6), (p.name, task)
    finally:
        for p in parts:
            p.place(torch.device("cpu"))


def test_a_last_batch_smaller_than_the_world_is_dropped_by_every_rank(
        loaded: tuple[list[Any], Any]) -> None:
    import dataclasses

    parts, _ = loaded
    bitext = next(p for p in parts if p.name == "bitext")
    n = len(bitext.splits["train"])
    # a global batch size divisible by the world that leaves a last batch of fewer rows
    world, bs = next((w, b) for w in (2, 3, 4) for b in range(w, n, w) if 0 < n % b < w)
    old = bitext.cfg
    try:
        bitext.cfg = dataclasses.replace(old, batch_size=bs)
        bitext.place(torch.device("cpu"))
        assert bitext.num_batches() == n // bs + 1  # one process keeps it
        for r in range(world):
            bitext.place(torch.device("cpu"), r, world)
            assert bitext.num_batches() == n // bs == len(list(bitext.batches(0, 0)))
    finally:
        bitext.cfg = old
        bitext.place(torch.device("cpu"))


def test_the_sampler_draws_the_same_sources_in_every_process() -> None:
    """Which source feeds step s depends on (sizes, seed, s) alone: not on the process's
    global RNG state nor on where it started (a resumed rank), so every rank of a job takes
    the same source's batch at every step."""
    sizes = [19, 3, 5, 5, 10]
    a = SourceSampler(sizes, "temperature", 2.0, seed=3)
    torch.manual_seed(123)
    np.random.seed(7)
    first = a.schedule(3000)
    torch.manual_seed(0)
    np.random.seed(0)
    b = SourceSampler(sizes, "temperature", 2.0, seed=3)
    assert np.array_equal(first, b.schedule(3000))
    assert np.array_equal(first[1500:], SourceSampler(sizes, "temperature", 2.0, 3)
                          .schedule(1500, start=1500))
    assert len(set(first.tolist())) == len(sizes)


# -- what torchrun still refuses ----------------------------------------------------------------
def test_a_joint_config_under_torchrun_is_checked_not_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_joint(joint_config_from_dict(RAW))  # even batches, a loss weighting: fine
    odd = {**RAW, "sources": [*RAW["sources"][:2], {**RAW["sources"][2], "batch_size": 15},
                              *RAW["sources"][3:]]}
    with pytest.raises(ConfigError, match=r"sources\[2\] \(bitext\)\.batch_size: 15 .*"
                                          r"divisible by the number of processes \(2\)"):
        check_joint(joint_config_from_dict(odd))
    # one source may name a gradient aggregator in one process, not across processes
    alone = {**RAW, "sources": [RAW["sources"][2]], "weighting": {"name": "pcgrad"}}
    with pytest.raises(ConfigError, match=r"per-task gradients.*torchrun"):
        check_joint(joint_config_from_dict(alone))
    monkeypatch.delenv("WORLD_SIZE")
    check_joint(joint_config_from_dict(alone))
