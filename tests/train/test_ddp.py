"""Device and several processes (``train.distributed``): device resolution, pinning, bf16 on
CPU, each rank's shard of a batch, refusals, and a real torchrun job of two CPU processes
(gloo on loopback) that matches one process at the same global batch, and resumes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shopmtl.config import ConfigError, load_config
from shopmtl.data.pipeline import prepare_data
from shopmtl.train.distributed import Dist, check_batch_size, pin_memory, resolve_device
from shopmtl.train.loop import Loop, Schedule
from shopmtl.train.select import MetricSelector
from shopmtl.train.table import TableSource
from shopmtl.train.trainer import Trainer
from shopmtl.weighting import WEIGHTINGS, build_weighting
from tests.helpers import cli, small_world, world_config_yaml

TASKS = ("click", "conversion", "ad_click")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("world")
    small_world(d, rows=20_000)
    return d


def _prepared(world: Path, tmp_path: Path, **train):
    cfg = load_config(world_config_yaml(world, tmp_path / "exp.yaml", **train))
    return cfg, prepare_data(cfg.data, cfg.data.schema.build())


# -- device -------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_auto_is_cpu_without_cuda_and_cuda_is_refused() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="cuda requested"):
        resolve_device("cuda")


def test_unknown_device_or_precision_is_a_config_error(world: Path, tmp_path: Path) -> None:
    for key, value in (("device", "tpu"), ("precision", "fp16")):
        with pytest.raises(ConfigError, match=key):
            load_config(world_config_yaml(world, tmp_path / "exp.yaml", **{key: value}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_with_cuda_requested_fails_in_one_line(world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", device="cuda")
    proc = cli("train", str(cfg), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuda requested" in lines[0], proc.stderr


def test_pin_memory_only_for_cuda() -> None:
    assert not pin_memory(torch.device("cpu"))
    assert pin_memory(torch.device("cuda"))


def test_batches_stay_unpinned_cpu_tensors_on_cpu(world: Path, tmp_path: Path) -> None:
    _, data = _prepared(world, tmp_path)
    source = TableSource(data, 256, device="cpu")
    assert not source.pin
    batch = next(source.batches(0, 0))
    for t in (batch.cat, batch.num, batch.labels, batch.mask):
        assert t.device.type == "cpu" and not t.is_pinned()
    assert batch.to("cpu") is batch


def test_bf16_on_cpu_trains_to_finite_loss(world: Path, tmp_path: Path) -> None:
    cfg, data = _prepared(world, tmp_path, precision="bf16", device="cpu")
    trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
    assert trainer.schedule.precision == "bf16"
    it = trainer.source.batches(0, 0)
    first = trainer.step(next(it))
    for _ in range(20):
        last = trainer.step(next(it))
    assert all(torch.isfinite(torch.tensor(list(last.values()))))
    assert last["click"] < first["click"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


# -- each rank's shard ----------------------------------------------------------------------
def test_ranks_split_every_batch_of_the_epoch(world: Path, tmp_path: Path) -> None:
    _, data = _prepared(world, tmp_path)
    table, bs = data.train, 256
    one = list(table.batches(bs, 1, 7))
    shards = [list(table.batches(bs, 1, 7, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == table.num_batches(bs, 2)
    for i, (a, b) in enumerate(zip(*shards, strict=True)):
        assert len(a) == len(b) == bs // 2 or i == len(one) - 1
        union = torch.cat([a.group, b.group]).sort().values
        assert torch.equal(union, one[i].group.sort().values)
    # resume mid-epoch: the same shard
    skipped = list(table.batches(bs, 1, 7, skip=3, rank=1, world=2))
    assert torch.equal(skipped[0].cat, shards[1][3].cat)


def test_a_last_batch_smaller_than_the_world_is_dropped(world: Path, tmp_path: Path) -> None:
    _, data = _prepared(world, tmp_path)
    n = len(data.train)
    bs = n - 1  # one full batch and a last batch of one row
    assert data.train.num_batches(bs) == 2
    assert data.train.num_batches(bs, world=2) == 1


def test_global_batch_must_divide_by_the_world() -> None:
    check_batch_size(256, 2)
    with pytest.raises(ConfigError, match="divisible"):
        check_batch_size(255, 2)


def test_gradient_aggregators_are_refused_across_processes(world: Path, tmp_path: Path) -> None:
    from shopmtl.registry import build_model

    cfg, data = _prepared(world, tmp_path)
    name = next(n for n, c in WEIGHTINGS.items() if c.needs_gradients)
    model = build_model(cfg.model.name, cfg.model.args, data.schema, data.vocab_sizes, None)
    source = TableSource(data, 256)
    weighting = build_weighting(name, {}, data.schema.task_names)
    fake = Dist(rank=0, world=2, device=torch.device("cpu"))  # no collective is reached
    with pytest.raises(ConfigError, match="several processes"):
        Loop(model, [source], weighting, Schedule(steps=1, lr=1e-3),
             MetricSelector("valid.all_tasks.all.auc", "max", source.name), dist=fake)


# -- torchrun -----------------------------------------------------------------------------------
def _torchrun(args: list[str], nproc: int, timeout: float = 400) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (rendezvous on a free loopback port) in its own process
    group, killed whole on a timeout; afterwards no process of the job is left."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "shopmtl", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun hung past {timeout}s:\n{out}\n{err}") from None
    try:  # the launcher and every worker are gone
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        pass
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("processes of the torchrun job outlived it")
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _test_auc(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {t: metrics["test"][t]["all"]["auc"] for t in TASKS}


def test_two_processes_match_one_at_the_same_global_batch(world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", epochs=2, batch_size=256,
                            log_every=0)
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", str(cfg), "--out", str(one), check=True)
    _torchrun(["train", str(cfg), "--out", str(two)], nproc=2)
    # rank 0 wrote the run's files
    for name in ("metrics.json", "history.json", "report.md", "config.yaml"):
        assert (two / name).is_file(), name
    assert (two / "model" / "model.safetensors").is_file()
    assert (two / "checkpoints" / "latest").is_file()
    a, b = _test_auc(one), _test_auc(two)
    gap = max(abs(a[t] - b[t]) for t in TASKS)
    assert gap <= 0.002, (a, b)
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for r1, r2 in zip(h1, h2, strict=True):  # the world's training losses are one process's
        for t in TASKS:
            assert r2["train_loss"][t] == pytest.approx(r1["train_loss"][t], rel=1e-4)

    # resume: a 1-epoch job continued to 2 epochs by a new job ends where the 2-epoch job did
    cut = tmp_path / "cut"
    _torchrun(["train", str(cfg), "--out", str(cut), "--set", "train.epochs=1"], nproc=2)
    _torchrun(["train", str(cfg), "--out", str(cut), "--resume"], nproc=2)
    h3 = json.loads((cut / "history.json").read_text())
    assert [r["step"] for r in h3] == [r["step"] for r in h2]
    c = _test_auc(cut)
    assert max(abs(b[t] - c[t]) for t in TASKS) <= 1e-6, (b, c)


def test_unshardable_streaming_or_baselines_are_refused_across_processes(
        world: Path, tmp_path: Path) -> None:
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", epochs=1)
    # the world's train.parquet is one row group: rank 1 would have nothing to stream
    for k, (extra, needle) in enumerate(((["--set", "data.streaming=true"], "row group"),
                                         (["--baselines"], "baselines"))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "shopmtl", "train", str(cfg), "--out",
               str(tmp_path / f"run{k}"), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0
        assert needle in proc.stderr and "error: " in proc.stderr, proc.stderr


def test_collectives_in_a_one_process_group(tmp_path: Path) -> None:
    """``Dist``'s collectives on a real (gloo, world of one) group: the metrics travel as JSON
    with NaN and numpy values, count-weighted losses keep their value and zero a task no row
    labels, a parameter without a gradient keeps none."""
    import numpy as np

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        d = Dist(rank=0, world=1, device=torch.device("cpu"))
        got = d.broadcast_json({"a": {"auc": float("nan"), "n": np.int64(3),
                                      "x": np.float32(0.5)}})
        assert np.isnan(got["a"]["auc"]) and got["a"]["n"] == 3 and got["a"]["x"] == 0.5
        vec = torch.tensor([0.5, 0.7, 0.0], requires_grad=True)
        out = d.global_values(vec, torch.tensor([4.0, 2.0, 0.0]))
        assert torch.allclose(out.detach(), torch.tensor([0.5, 0.7, 0.0]))
        out.sum().backward()
        assert torch.allclose(vec.grad, torch.tensor([1.0, 1.0, 0.0]))
        a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
        a.grad = torch.tensor([2.0, 4.0])
        d.average_gradients([a, b])
        assert torch.equal(a.grad, torch.tensor([2.0, 4.0])) and b.grad is None
    finally:
        torch.distributed.destroy_process_group()


def test_config_checks_refuse_what_several_processes_cannot_do(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shopmtl.checks import load_experiment

    cfg = world_config_yaml(world, tmp_path / "exp.yaml")
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_experiment(cfg)  # batch 256, a loss weighting, in memory: fine
    for sets, needle in ((["weighting.name=pcgrad"], "per-task gradients"),
                         (["data.streaming=true", f"data.train={tmp_path / 'train.csv'}"],
                          "must be Parquet"),
                         (["train.batch_size=255"], "divisible")):
        with pytest.raises(ConfigError, match=needle):
            load_experiment(cfg, sets)


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (``/proc/PID/task/*/children``); none once it is gone."""
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return kids
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@dataclass
class Signalled:
    rc: int  # torchrun's exit status
    took: float  # seconds from the signal to torchrun's exit
    pids: list[int]  # the launcher's workers
    launcher: int  # its pid (and process group)
    log: str  # torchrun's output


def _signal_rank_1(world: Path, tmp_path: Path, sig: int, dist_timeout: float,
                   wait: float = 120, extra: tuple[str, ...] = (), **train: Any
                   ) -> tuple[Signalled, Path, Path]:
    """A 2-process job on the world; once its first checkpoint exists, ``sig`` goes to rank 1;
    then wait for torchrun to end (an AssertionError if it hangs past ``wait`` s). Every
    process of the job is gone afterwards (stopped ones continued, the group SIGKILLed).
    ``extra``: more arguments of ``shopmtl train`` (``--set`` overrides); ``train``: config
    keys replacing the defaults below."""
    import time

    keys = {"epochs": 3, "batch_size": 32, "log_every": 0, "checkpoint_every": 50,
            "dist_timeout": dist_timeout, **train}
    cfg = world_config_yaml(world, tmp_path / "exp.yaml", **keys)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", "-m", "shopmtl", "train", str(cfg), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    pids: list[int] = []
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 240  # data, rendezvous, 50 steps; a busy machine
            while not (out / "checkpoints" / "latest").exists():
                assert proc.poll() is None, f"ended before training:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no checkpoint:\n{log.read_text()}"
                time.sleep(0.2)
            pids = _children(proc.pid)
            ranks = {p: _rank_of(p) for p in pids}
            assert sorted(r for r in ranks.values() if r is not None) == [0, 1], ranks
            victim = next(p for p, r in ranks.items() if r == 1)
            sent = time.monotonic()
            os.kill(victim, sig)
            try:
                rc = proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"job hung after signal {sig} to rank 1:\n"
                                     f"{log.read_text()}") from None
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for p in pids:  # a stopped process ignores everything but SIGKILL and SIGCONT
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGCONT)
    return Signalled(rc, took, pids, proc.pid, log.read_text()), cfg, out


def test_a_rank_that_dies_ends_the_job_at_once_and_resume_continues(
        world: Path, tmp_path: Path) -> None:
    """SIGKILL rank 1 mid-epoch: torchrun exits non-zero within seconds (rank 0's next
    collective fails on the closed connection, torchrun stops it), its summary names rank 1,
    rank 0 prints at most one ``error:`` line (no traceback of shopmtl, no locals), no
    ``model/`` is saved, no process of the job is left, and ``--resume`` from the last
    checkpoint completes the run."""
    job, cfg, out = _signal_rank_1(world, tmp_path, signal.SIGKILL, dist_timeout=30)
    rc, took, pids, text = job.rc, job.took, job.pids, job.log
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    print(f"rank 1 killed -> torchrun exited {rc} after {took:.1f}s; rank 0: {errors}")
    assert rc != 0, text
    assert took < 120, text
    # torchrun's summary names the rank that died and how
    root = text.split("Root Cause", 1)[1]
    assert "rank      : 1" in root and "exitcode  : -9" in root, text
    # rank 0: at most one error line, never a traceback of its own (or its locals)
    assert not [ln for ln in text.splitlines() if 'File "' in ln and "shopmtl" in ln], text
    assert "locals" not in text.lower() and "internal error" not in text, text
    for ln in text.splitlines():
        if ln.startswith("error:"):
            assert "rank 0 of 2" in ln and "died or stopped answering" in ln, ln
    # nothing of the job is left
    for pid in [job.launcher, *pids]:
        assert not _alive(pid), f"pid {pid} outlived the job"
    with pytest.raises(ProcessLookupError):
        os.killpg(job.launcher, 0)
    # no model saved as if complete; the last checkpoint resumes the run to its end
    assert not (out / "model").exists()
    assert not (out / "metrics.json").exists()
    _torchrun(["train", str(cfg), "--out", str(out), "--resume"], nproc=2)
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "metrics.json").is_file()
    steps = [r["step"] for r in json.loads((out / "history.json").read_text())]
    assert steps and steps == sorted(steps)


def test_a_stuck_rank_ends_the_job_after_dist_timeout(world: Path, tmp_path: Path) -> None:
    """SIGSTOP rank 1 (alive, never answering: a hung host, a full-GC pause gone wrong): rank
    0's next collective gives up after ``train.dist_timeout`` seconds with its one error line,
    torchrun then stops the stuck rank, and the job ends: no hang, nothing left running."""
    timeout = 15
    job, _, out = _signal_rank_1(world, tmp_path, signal.SIGSTOP, dist_timeout=timeout,
                                 wait=180)
    rc, took, pids, text = job.rc, job.took, job.pids, job.log
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    print(f"rank 1 stopped -> torchrun exited {rc} after {took:.1f}s; rank 0: {errors}")
    assert rc != 0, text
    assert took >= timeout - 1, text  # rank 0 waited the configured time, not less
    assert took < timeout + 120, text  # ... and then the job ended
    assert errors and all("rank 0 of 2" in ln and "stopped answering" in ln for ln in errors), text
    assert "internal error" not in text, text
    for pid in [job.launcher, *pids]:
        assert not _alive(pid), f"pid {pid} outlived the job"
    assert not (out / "model").exists()


def test_two_nodes_on_loopback_match_one_process(world: Path, tmp_path: Path) -> None:
    """Several machines, as docs/SCALING.md runs them: one torchrun launcher per node, a c10d
    rendezvous on a shared endpoint (here two launchers on loopback, one process each): the
    same test AUC as one process at the same global batch, rank 0's files, nothing left."""
    import socket

    cfg = world_config_yaml(world, tmp_path / "exp.yaml", epochs=2, batch_size=256,
                            log_every=0)
    one, two = tmp_path / "one", tmp_path / "nodes"
    cli("train", str(cfg), "--out", str(one), check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "shopmtl-test", "-m", "shopmtl", "train", str(cfg), "--out", str(two)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outputs)
    for p in nodes:  # every launcher and its worker are gone
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)
    assert (two / "model" / "model.safetensors").is_file()
    a, b = _test_auc(one), _test_auc(two)
    assert max(abs(a[t] - b[t]) for t in TASKS) <= 0.002, (a, b)
