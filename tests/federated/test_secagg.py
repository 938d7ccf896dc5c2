"""Secure aggregation (SecAgg+): the combinations it cannot serve are refused at config time,
and a SecAgg+ round's aggregate equals plain FedAvg's on the same clients and seed, within
the protocol's quantisation error (and not exactly: the update did go through it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from shopmtl.config import ConfigError
from shopmtl.federated.config import federated_from_dict
from shopmtl.federated.secure import QUANTIZATION
from tests.federated.conftest import tiny_raw
from tests.federated.test_deployment import TWO_SILOS


@pytest.mark.parametrize("federated, needle", [
    ({"strategy": "trimmed_mean"}, "strategy 'trimmed_mean' needs each client's update"),
    ({"strategy": "median"}, "strategy 'median'"),
    ({"strategy": "krum"}, "strategy 'krum'"),
    ({"strategy": "multikrum"}, "strategy 'multikrum'"),
    ({"strategy": "fedavg", "row_aware": True}, "set row_aware: false"),
    ({"strategy": "fedprox", "row_aware": True}, "set row_aware: false"),
])
def test_secagg_refuses_what_needs_each_update(federated: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        federated_from_dict(tiny_raw(secagg=True, **federated))
    msg = str(e.value)
    assert "federated.secagg: " in msg and needle in msg and "\n" not in msg


def test_secagg_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="secagg_clip"):
        federated_from_dict(tiny_raw(secagg=True, strategy="fedavg", row_aware=False,
                                     secagg_clip=0))
    # what combines with it is accepted
    for s in ("fedavg", "fedprox", "fedadam"):
        run = federated_from_dict(tiny_raw(secagg=True, strategy=s, row_aware=False))
        assert run.federated.secagg


def test_secagg_aggregate_equals_fedavg(tiny_world: Path, tmp_path: Path) -> None:
    from shopmtl.federated.server import initial_model, prepare, simulate
    from shopmtl.federated.wire import pack

    finals = {}
    for secagg in (False, True):
        out = tmp_path / f"secagg_{secagg}"
        shutil.copytree(tiny_world / "data", out / "data")
        run = federated_from_dict(tiny_raw(silos=TWO_SILOS, strategy="fedavg",
                                           row_aware=False, rounds=1, local_epochs=0.25,
                                           secagg=secagg))
        data, fed, _ = prepare(run, out, log=lambda s: None)
        model, recorder, _, _ = simulate(fed, data, log=lambda s: None)
        shared, _ = fed.layout(model)
        finals[secagg] = pack(model, shared)
        assert sorted(recorder.train[1]) == ["ads", "feeds"]  # both clients' metrics came
    start = pack(initial_model(data, fed), fed.layout(initial_model(data, fed))[0])
    plain, secure = finals[False], finals[True]
    assert plain.keys() == secure.keys()
    diff = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    moved = max(float(np.abs(plain[k] - start[k]).max()) for k in plain)
    # per weight: one quantisation step of [-8, 8] per client, 2 clients
    step = 2 * 8.0 / QUANTIZATION
    assert 0 < diff < 4 * step, diff
    assert moved > 1000 * step  # the round did move the model: the equality says something
