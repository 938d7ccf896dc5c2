"""Robust aggregation drops an attacker's influence: 4 honest updates near 1.0 and one
sign-flipped x10 update, aggregated by Flower's strategies as a round would."""

from __future__ import annotations

import numpy as np
import pytest

from shopmtl.federated.config import FederatedConfig
from shopmtl.federated.server import make_strategy


@pytest.fixture
def identity():
    """The identity a ServerApp's process has during a run (Flower stamps it on messages);
    put back afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _replies(values: list[np.ndarray]) -> list:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    return [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(v)}),
                                        "metrics": MetricRecord({"num-examples": 100})}),
                    dst_node_id=i + 1, message_type="train")
            for i, v in enumerate(values)]


@pytest.mark.parametrize(("strategy", "robust"), [
    ("fedavg", False), ("trimmed_mean", True), ("median", True), ("krum", True),
    ("multikrum", True)])
def test_one_attacker_of_five(identity, strategy: str, robust: bool) -> None:
    rng = np.random.default_rng(0)
    start = np.zeros(50, np.float32)
    honest = [(1.0 + 0.05 * rng.standard_normal(50)).astype(np.float32) for _ in range(4)]
    attacker = start - 10 * (honest[0] - start)  # sign-flipped, scaled x10
    cfg = FederatedConfig(strategy=strategy, trim=0.2, malicious=1)

    def keep(replies, key):
        from flwr.app import MetricRecord

        return MetricRecord({"clients": len(replies)})

    s = make_strategy(cfg, 5, keep, keep)
    arrays, _ = s.aggregate_train(1, _replies([*honest, attacker]))
    got = arrays["w"].numpy()
    clean = np.mean(honest, axis=0)
    err = float(np.abs(got - clean).mean())
    if robust:
        assert err < 0.1, err
    else:  # the attack works on plain averaging: the mean is pulled far below zero
        assert err > 1.5 and float(got.mean()) < -1.0, err


def test_row_mean_averages_each_row_over_the_clients_that_moved_it() -> None:
    from shopmtl.federated.server import row_mean

    sent = np.zeros((3, 2), np.float32)
    a = np.array([[1, 1], [0, 0], [2, 2]], np.float32)  # moved rows 0 and 2
    b = np.array([[3, 3], [0, 0], [0, 0]], np.float32)  # moved row 0
    got = row_mean(sent, [(a, 1.0), (b, 3.0)])
    # row 0: both moved it, weighted 1:3; row 1: nobody; row 2: a alone, not halved
    assert np.allclose(got, [[2.5, 2.5], [0, 0], [2, 2]])
