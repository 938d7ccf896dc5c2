"""Robust aggregation drops an attacker's influence: 4 honest updates near 1.0 and one
sign-flipped x10 update, aggregated by Flower's strategies as a round would."""

from __future__ import annotations

import numpy as np
import pytest

from shopmtl.federated.config import FederatedConfig
from shopmtl.federated.server import make_strategy


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


def test_the_config_reaches_flowers_strategies() -> None:
    from flwr.serverapp import strategy as st

    def keep(replies, key):  # pragma: no cover - not called here
        return None

    prox = make_strategy(FederatedConfig(strategy="fedprox", mu=0.5, fraction=0.5,
                                         min_clients=3), 8, keep, keep)
    assert isinstance(prox, st.FedProx) and type(prox).__name__ == "RowAwareFedProx"
    assert (prox.proximal_mu, prox.fraction_train, prox.min_train_nodes) == (0.5, 0.5, 3)
    plain = make_strategy(FederatedConfig(strategy="fedavg", row_aware=False), 4, keep, keep)
    assert type(plain) is st.FedAvg
    adam = make_strategy(FederatedConfig(strategy="fedadam", server_lr=0.05), 4, keep, keep)
    assert isinstance(adam, st.FedAdam) and adam.eta == 0.05
    trimmed = make_strategy(FederatedConfig(strategy="trimmed_mean", trim=0.25), 4, keep, keep)
    assert isinstance(trimmed, st.FedTrimmedAvg) and trimmed.beta == 0.25
    multi = make_strategy(FederatedConfig(strategy="multikrum", malicious=1), 5, keep, keep)
    assert isinstance(multi, st.MultiKrum) and multi.num_nodes_to_select == 4


def _configured(s, start: np.ndarray) -> None:
    """What ``configure_train`` records of the arrays it sends (no grid needed)."""
    s._start = {"w": start}


@pytest.mark.parametrize("row_aware", [False, True])
def test_server_step_scales_the_mean_update(identity, row_aware: bool) -> None:
    def keep(replies, key):
        from flwr.app import MetricRecord

        return MetricRecord({"clients": len(replies)})

    start = np.full(4, 1.0, np.float32)
    updates = [np.array([2, 1, 1, 3], np.float32), np.array([2, 1, 3, 1], np.float32)]
    s = make_strategy(FederatedConfig(strategy="fedavg", row_aware=row_aware, server_step=3),
                      2, keep, keep)
    assert type(s).__name__.startswith("Stepped")
    _configured(s, start)
    got = s.aggregate_train(1, _replies(updates))[0]["w"].numpy()
    # mean [2, 1, 2, 2]: 1 + 3 * (mean - 1)
    assert np.allclose(got, [4, 1, 4, 4])


def test_server_momentum_accumulates_the_updates(identity) -> None:
    def keep(replies, key):
        from flwr.app import MetricRecord

        return MetricRecord({"clients": len(replies)})

    s = make_strategy(FederatedConfig(strategy="fedprox", row_aware=False,
                                      server_momentum=0.5), 2, keep, keep)
    start = np.zeros(3, np.float32)
    _configured(s, start)
    first = s.aggregate_train(1, _replies([start + 1, start + 1]))[0]["w"].numpy()
    assert np.allclose(first, 1.0)  # v = 1
    _configured(s, first)
    second = s.aggregate_train(2, _replies([first + 1, first + 1]))[0]["w"].numpy()
    assert np.allclose(second, 1.0 + 0.5 * 1 + 1)  # v = 0.5 * 1 + 1
    assert np.allclose(s.velocity["w"], 1.5)


def test_server_step_is_refused_for_other_strategies() -> None:
    with pytest.raises(ValueError, match="server_step"):
        FederatedConfig(strategy="median", server_step=2)
    with pytest.raises(ValueError, match="server_step"):
        FederatedConfig(strategy="krum", server_momentum=0.9)
