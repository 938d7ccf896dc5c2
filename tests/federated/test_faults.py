"""Faulty clients and a killed server (issue #21, must-show 5).

- 2 of 5 clients fail (one raises every round, one sends NaNs in round 1 and is late in
  round 2): the run completes on Flower's simulation engine, the log lines and metrics.json
  name who was dropped and why, and no engine process is left.
- The server's reply checks and the min_clients rule, on hand-made replies: with too few
  valid replies the previous global model is kept.
- ``shopmtl federate`` SIGKILLed after round 1's checkpoint resumes with ``--resume`` from
  round 2 and ends with every round in metrics.json; a corrupt checkpoint is a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from shopmtl.config import ConfigError
from shopmtl.federated.config import federated_from_dict
from shopmtl.federated.faults import Guard, check_reply, fault_for, inject_after
from shopmtl.federated.server import run_federated
from shopmtl.train.checkpoint import CheckpointError
from tests.federated.conftest import TINY

FIVE = {**copy.deepcopy(TINY), "data": {"synthetic": {"rows": 12000, "seed": 0,
                                                      "n_users": 200, "n_items": 100}}}
FIVE["federated"] = {"silos": {"by": "user_hash", "count": 5}, "strategy": "fedavg",
                     "rounds": 2, "local_epochs": 0.5, "min_clients": 3}


def five(**federated: Any) -> dict[str, Any]:
    raw = copy.deepcopy(FIVE)
    raw["federated"].update(federated)
    return raw


# -- 2 of 5 clients fail; the run completes ------------------------------------------------

def test_two_of_five_clients_fail_and_the_run_completes(tmp_path: Path) -> None:
    faults = {"silos": {"users_1": ["exception", "exception"], "users_3": ["nan", "timeout"]},
              "delay": 10.5}
    lines: list[str] = []
    metrics = run_federated(federated_from_dict(five(faults=faults, round_timeout=10.0)),
                            tmp_path / "run", log=lines.append)
    assert psutil.Process().children(recursive=True) == []  # the engine is gone
    back = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert back == json.loads(json.dumps(metrics))
    r1, r2 = back["rounds"]
    assert set(r1["dropped"]) == {"users_1", "users_3"}
    assert r1["dropped"]["users_1"] == "crashed (CLIENT_APP_RAISED_EXCEPTION: InjectedFault)"
    nan_in = r1["dropped"]["users_3"].removeprefix("non-finite values in ")
    assert nan_in in _sent_names(tmp_path / "run")  # names the array, never a value
    assert set(r2["dropped"]) == {"users_1", "users_3"}
    assert r2["dropped"]["users_3"] == "timed out (no reply within 10 s)"
    for r in (r1, r2):  # the round went on with the 3 healthy clients
        assert r["clients"] == ["users_0", "users_2", "users_4"]
    assert back["final"]["pooled"]["click"]["all"] > back["initial_pooled"]["click"]["all"]
    assert ("round 1: dropped users_1: crashed (CLIENT_APP_RAISED_EXCEPTION: "
            "InjectedFault)") in lines
    assert "round 2: dropped users_3: timed out (no reply within 10 s)" in lines
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| 2 | users_3 | timed out (no reply within 10 s) |" in report
    # two checkpoints kept, the latest is round 2's
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "ckpt-00-000000002"
    assert sorted(p.name for p in ckpts.glob("ckpt-*")) == ["ckpt-00-000000001",
                                                             "ckpt-00-000000002"]


def _sent_names(out: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "ckpt-00-000000002" / "arrays.safetensors"),
                   "numpy") as f:
        return list(f.keys())


# -- the checks, on hand-made replies -------------------------------------------------------

SENT = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _reply(node: int, arrays: dict[str, np.ndarray], n: int = 10) -> Any:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    m = Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                           arrays.items()}),
                                    "metrics": MetricRecord({"num-examples": n})}),
                dst_node_id=node, message_type="train")
    m.metadata.__dict__["_src_node_id"] = node  # a reply comes from its node
    return m


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4, 5]


def _guard(min_replies: int, log: list[str]) -> Guard:
    from flwr.app import Array, ArrayRecord

    from shopmtl.federated.config import FederatedConfig
    from shopmtl.federated.server import make_strategy

    def keep(replies, key):
        from flwr.app import MetricRecord

        return MetricRecord({"clients": len(replies)})

    g = Guard(make_strategy(FederatedConfig(strategy="fedavg", row_aware=False), 5, keep,
                            keep), min_replies, 5.0, log.append)
    g.names = {1: "a", 2: "b", 3: "c", 4: "d"}  # node 5 never answered the roll call
    list(g.configure_train(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}), _config(),
                           _Grid()))
    return g


def _config() -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord()


def test_each_bad_reply_is_named_with_its_reason(identity) -> None:
    from flwr.app import Error, Message

    from shopmtl.federated.faults import spec_of

    spec = spec_of(SENT)
    good = {k: v + 1 for k, v in SENT.items()}
    assert check_reply(_reply(1, good), spec) is None
    assert check_reply(_reply(1, inject_after("nan", good)), spec) == \
        "non-finite values in w"
    assert check_reply(_reply(1, inject_after("shape", good)), spec) == \
        "wrong shape: w is (3, 3) float32, (4, 3) float32 sent"
    assert check_reply(_reply(1, inject_after("oversized", good)), spec) == \
        "oversized: 300 bytes of arrays, 60 sent"
    assert check_reply(_reply(1, {"w": good["w"].astype(np.float64), "b": good["b"]}),
                       spec) == "oversized: 108 bytes of arrays, 60 sent"
    assert check_reply(_reply(1, {"w": good["w"]}), spec) == \
        "wrong arrays: 1 missing, 0 unexpected"
    assert check_reply(_reply(1, good, n=0), spec) == "no positive num-examples"
    trace = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'Traceback:\n"
             "  File \"client.py\", line 3, in train\nValueError: user 4711 is bad\n\n"
             "The above exception was the direct cause of the following exception:\n"
             "flwr.clientapp.client_app.ClientAppException: user 4711 is bad'>")
    err = Message(Error(code=2, reason=trace), reply_to=_reply(1, good))
    reason = check_reply(err, spec)
    assert reason == "crashed (CLIENT_APP_RAISED_EXCEPTION: ValueError)"
    err = Message(Error(code=8, reason="<class 'KeyError'>:<'4711'>"), reply_to=_reply(1, good))
    assert check_reply(err, spec) == "crashed (CLIENT_APP_CRASHED: KeyError)"
    assert fault_for(federated_from_dict(five(faults={"silos": {"x": ["ok", "nan"]}}))
                     .federated.faults, "x", 2) == "nan"


def test_enough_valid_replies_are_aggregated_and_the_bad_ones_dropped(identity) -> None:
    log: list[str] = []
    g = _guard(3, log)
    replies = [_reply(1, {k: v + 1 for k, v in SENT.items()}),
               _reply(2, {k: v + 3 for k, v in SENT.items()}),
               _reply(3, {k: v + 2 for k, v in SENT.items()}),
               _reply(4, inject_after("nan", SENT))]  # node 5: no reply (late)
    arrays, _ = g.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 2.0)  # the mean of the 3 valid ones
    assert g.dropped[1] == {"d": "non-finite values in w",
                            "node 5": "timed out (no reply within 5 s)"}
    assert "round 1: dropped node 5: timed out (no reply within 5 s)" in log


def test_too_few_valid_replies_keep_the_previous_global_model(identity) -> None:
    from flwr.app import Array, ArrayRecord

    from shopmtl.federated.resume import run_rounds

    log: list[str] = []
    g = _guard(4, log)
    replies = [_reply(1, {k: v + 1 for k, v in SENT.items()}),
               _reply(2, inject_after("shape", SENT)),
               _reply(3, {k: v + 2 for k, v in SENT.items()})]
    assert g.aggregate_train(1, replies) == (None, None)
    assert log[-1] == ("round 1: 2 valid replies, fewer than federated.min_clients = 4: "
                       "the previous global model is kept")

    class Grid(_Grid):  # every round: those replies, for training; none for evaluation
        def send_and_receive(self, messages, timeout):
            return replies if any(m.metadata.message_type == "train" for m in messages) \
                else []

    seen: list[tuple[int, float]] = []
    start = ArrayRecord({k: Array(v + 7) for k, v in SENT.items()})
    final = run_rounds(g, Grid(), start, first=1, last=2, timeout=5.0,
                       evaluate_fn=lambda r, a: seen.append((r, float(a["w"].numpy()[0, 0]))),
                       after_round=lambda r, a: None)
    assert seen == [(0, 7.0), (1, 7.0), (2, 7.0)]  # unchanged: the previous model kept
    assert np.array_equal(final["w"].numpy(), SENT["w"] + 7)


# -- a killed server resumes ------------------------------------------------------------------

def _federate(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shopmtl.cli", "federate", str(cfg),
                             "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkilled_server_resumes_after_its_last_round(tmp_path: Path) -> None:
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(yaml.safe_dump(five(rounds=2)))
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest"
    proc = _federate(cfg, out)
    tree: list[psutil.Process] = []
    reaped = False
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not latest.is_file():
            time.sleep(0.005)
        tree = psutil.Process(proc.pid).children(recursive=True)  # the engine's processes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stdout.read() if proc.stdout else ""
        reaped = True
        _reap(tree)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not reaped:  # a failure above: still leave nothing behind
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
    killed_at = latest.read_text()
    assert killed_at == "ckpt-00-000000001"  # round 2 takes seconds; we poll every 5 ms
    assert not (out / "metrics.json").exists()
    before = json.loads((out / "checkpoints" / killed_at / "run.json").read_text())

    # the resume runs in this process (the CLI through typer's runner: no second start-up)
    from typer.testing import CliRunner

    from shopmtl.cli import app

    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(out), "--resume"])
    text = res.output
    assert res.exit_code == 0, text[-3000:]
    assert psutil.Process().children(recursive=True) == []
    assert "resuming after round 1" in text
    assert "round 1/2: pooled test AUC" not in text  # not run again
    assert "round 2/2: pooled test AUC" in text
    back = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in back["rounds"]] == [1, 2]
    # the rounds before the kill are the checkpoint's records, untouched
    assert back["rounds"][0]["pooled"] == before["records"]["pooled"]["1"]["auc"]
    # every client went on from its own state of round 1 (its file beside its silo's)...
    assert back["rounds"][1]["restored"] == {s: 1 for s in back["rounds"][1]["clients"]}
    assert "restored" not in back["rounds"][0]
    # ... so the resumed run ends where an uninterrupted one does (only the order in which
    # the replies were summed may differ)
    whole = tmp_path / "whole"
    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(whole)])
    assert res.exit_code == 0, res.output[-3000:]
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(whole / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    again = json.loads((whole / "metrics.json").read_text())["final"]["pooled"]
    for task, per in back["final"]["pooled"].items():
        assert again[task] == pytest.approx(per, abs=1e-4), task
    assert latest.read_text() == "ckpt-00-000000002"
    marker = json.loads((out / "shopmtl-run.json").read_text())
    assert before["run_id"] == marker["run_id"]  # one run, resumed
    # the command names a corrupt checkpoint and stops before the engine starts
    arrays = out / "checkpoints" / "ckpt-00-000000002" / "arrays.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-8])
    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(out), "--resume"])
    assert res.exit_code == 1
    assert "ckpt-00-000000002: file 'arrays.safetensors' is corrupt" in res.output


# Ray's two agents: after the raylet dies they try to report it to the (dead) GCS, with a
# 60 s timeout, before exiting (ray/_private/process_watcher.py); docs/FEDERATED.md
LINGER = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _reap(tree: list[psutil.Process]) -> None:
    """The killed server's engine processes end by themselves (Ray's workers, raylet, GCS),
    but Ray's two agents, which are killed here; anything else left is killed and fails
    the test."""
    named = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            named.append((p, p.name()))
    # Ray's workers notice their raylet's death by polling it: seconds on a quiet machine,
    # more than 15 s once in a loaded CI run (2 cores, the suite beside it). Ray's head
    # processes that are Python scripts (named "python3") end when a call to the dead GCS
    # fails, and a GCS client retries for up to 60 s by default (Ray's
    # gcs_rpc_server_reconnect_timeout_s): two outlived a 60 s wait once in a loaded CI run
    _, alive = psutil.wait_procs([p for p, n in named if n not in LINGER], timeout=150)
    left = [n for p, n in named if p in alive]
    for p, _ in named:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs([p for p, _ in named], timeout=10)
    assert not left, f"engine processes outlived the killed server: {left}"


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from shopmtl.federated.resume import load_round, save_round
    from shopmtl.train.stages import Checkpointer

    ck = Checkpointer(tmp_path / "checkpoints", run_id="r1")
    cfg = {"federated": {"strategy": "fedavg"}}
    save_round(ck, 1, {"w": np.ones((2, 2), np.float32)}, {}, {"pooled": {}}, cfg)
    rnd, arrays, _, _, _ = load_round(Checkpointer(tmp_path / "checkpoints"), cfg)
    assert rnd == 1 and np.array_equal(arrays["w"], np.ones((2, 2)))
    with pytest.raises(ConfigError, match=r"--resume: federated.strategy differs"):
        load_round(Checkpointer(tmp_path / "checkpoints"),
                   {"federated": {"strategy": "krum"}})
    f = tmp_path / "checkpoints" / "ckpt-00-000000001" / "arrays.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt-00-000000001: file 'arrays.safetensors' "
                                              r"is corrupt \(SHA-256 mismatch\)"):
        load_round(Checkpointer(tmp_path / "checkpoints"), cfg)
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="--resume: no round checkpoint"):
        load_round(Checkpointer(tmp_path / "checkpoints"), cfg)
