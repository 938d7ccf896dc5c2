"""``federated.cyclic``: cyclic weight transfer. In each round the silos train one after
another (a seeded order of their names, new each round), each from the model the one before
returned; nothing is averaged. The end-to-end test replays round 1 by hand, silo after silo
through ``client.train_silo``, lands on the run's global model, and resumes the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shopmtl.config import ConfigError
from shopmtl.federated.config import federated_from_dict, load_federated
from shopmtl.federated.resume import cyclic_order
from shopmtl.federated.server import run_federated
from shopmtl.train.stages import Checkpointer
from tests.federated.conftest import tiny_raw

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL_SHARED = ["dense", "items", "towers", "users"]


def test_the_order_is_seeded_new_each_round_and_every_silo_once() -> None:
    silos = ["search", "ad_slot", "home_feed", "product_page"]
    orders = [cyclic_order(silos, rnd, seed=0) for rnd in range(1, 9)]
    assert all(sorted(o) == sorted(silos) for o in orders)
    assert orders == [cyclic_order(list(reversed(silos)), rnd, 0) for rnd in range(1, 9)]
    assert len({tuple(o) for o in orders}) > 3  # not one fixed order
    assert orders != [cyclic_order(silos, rnd, seed=1) for rnd in range(1, 9)]


@pytest.mark.parametrize(("federated", "message"), [
    ({"strategy": "krum"}, r"federated\.cyclic: needs strategy fedavg or fedprox"),
    ({"fraction": 0.5}, r"federated\.fraction: not with federated\.cyclic"),
    ({"server_step": 2.0}, r"federated\.server_step: not with federated\.cyclic"),
    ({"strategy": "fedavg", "mu": 0.0, "row_aware": False,
      "dp": {"mode": "client", "clip": 1.0, "noise": 1.0}},
     r"federated\.dp: not with federated\.cyclic"),
    ({"strategy": "fedavg", "mu": 0.0, "row_aware": False, "secagg": True},
     r"federated\.secagg: not with federated\.cyclic"),
])
def test_what_cannot_combine_with_cyclic_is_refused(federated: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        federated_from_dict(tiny_raw(cyclic=True, **federated))


def test_a_joint_federation_refuses_cyclic() -> None:
    with pytest.raises(ConfigError, match=r"federated\.cyclic: not built for a joint model"):
        load_federated(EXAMPLES / "federated_joint.yaml", ["federated.cyclic=true"])


def test_the_example_config_is_the_default_example_made_cyclic() -> None:
    base = load_federated(EXAMPLES / "federated.yaml")
    cyc = load_federated(EXAMPLES / "federated_cyclic.yaml")
    assert cyc.experiment == base.experiment
    assert cyc.federated.cyclic and cyc.federated.keep_optimizer
    assert not base.federated.cyclic


def test_round_one_is_the_silos_one_after_another_and_a_resume_continues(
        tiny_world: Path, tmp_path: Path) -> None:
    from shopmtl.federated import client
    from shopmtl.federated.client import local_steps, round_lr, train_silo
    from shopmtl.federated.server import initial_model, prepare
    from shopmtl.federated.wire import pack, unpack

    raw = tiny_raw(cyclic=True, rounds=1, local_epochs=0.5, share=ALL_SHARED)
    out = tmp_path / "run"
    shutil.copytree(tiny_world / "data", out / "data")
    lines: list[str] = []
    metrics = run_federated(federated_from_dict(raw), out, log=lines.append)
    silos = list(metrics["silos"])
    order = cyclic_order(silos, 1, seed=0)
    assert f"round 1: cyclic order {' -> '.join(order)}" in lines
    assert sorted(metrics["rounds"][-1]["clients"]) == sorted(silos)  # every silo trained
    ck = Checkpointer(out / "checkpoints")
    tensors, _ = ck.load(ck.latest())
    got = {k: v.numpy() for k, v in tensors["arrays"].items()}

    # by hand, in this process: the server's initial model, then each silo in turn from the
    # model the one before it left, with the client's seed, steps, lr and proximal term
    torch.set_num_threads(1)
    replay = tmp_path / "replay"
    shutil.copytree(tiny_world / "data", replay / "data")
    run = federated_from_dict(raw)
    data, fed, _ = prepare(run, replay, log=lambda s: None)
    exp, cfg = fed.experiment, fed.federated
    start = initial_model(data, fed)
    shared, local = fed.layout(start)
    assert local == []  # every part shared: no silo keeps a piece of its own
    arrays = first = pack(start, shared)

    def train(name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        i = fed.silo_names.index(name)
        part = client._silo(fed, i)
        model = fed.build()
        unpack(model, shared, arrays)
        train_silo(model, part, exp, steps=local_steps(cfg, part, exp.train.batch_size),
                   lr=round_lr(exp, 0), seed=cfg.seed * 1009 + i, mu=cfg.mu, anchor=shared)
        return pack(model, shared)

    for name in order:
        arrays = train(name, arrays)
    assert got.keys() == arrays.keys()
    for k in got:
        np.testing.assert_allclose(got[k], arrays[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # the tolerance tells the two apart: FedAvg's round, the silos' mean from one model, is
    # far from it
    parallel = [train(name, first) for name in order]
    mean = {k: np.mean([p[k] for p in parallel], axis=0) for k in got}
    far = max(float(np.abs(got[k] - mean[k]).max()) for k in got)
    assert far > 1e-2, far

    # resumed: the finished 1-round run continued to 2 rounds ends where an uninterrupted
    # 2-round run does (each silo goes on from the state file it wrote after round 1)
    raw2 = tiny_raw(cyclic=True, rounds=2, local_epochs=0.5, share=ALL_SHARED)
    resumed = run_federated(federated_from_dict(raw2), out, log=lines.append, resume=True)
    assert "resuming after round 1" in " ".join(lines)
    assert f"round 2: cyclic order {' -> '.join(cyclic_order(silos, 2, seed=0))}" in lines
    assert resumed["rounds"][-1]["restored"] == {s: 1 for s in silos}
    whole = tmp_path / "whole"
    shutil.copytree(tiny_world / "data", whole / "data")
    run_federated(federated_from_dict(raw2), whole, log=lambda s: None)
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(whole / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
