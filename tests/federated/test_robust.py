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


def _yogi_step(x: np.ndarray, m: np.ndarray, v: np.ndarray, mean: np.ndarray, eta: float,
               b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One server step of Yogi (Reddi et al. 2021, Algorithm 2), written out here."""
    d = mean - x
    m = b1 * m + (1 - b1) * d
    v = v - (1 - b2) * d**2 * np.sign(v - d**2)
    return x + eta * m / (np.sqrt(v) + tau), m, v


def test_fedyogi_aggregates_by_the_yogi_rule(identity) -> None:
    from flwr.serverapp import strategy as st

    def keep(replies, key):
        from flwr.app import MetricRecord

        return MetricRecord({"clients": len(replies)})

    cfg = FederatedConfig(strategy="fedyogi", server_lr=0.05)
    s = make_strategy(cfg, 2, keep, keep)
    assert isinstance(s, st.FedYogi) and s.eta == 0.05
    adam = make_strategy(FederatedConfig(strategy="fedadam", server_lr=0.05), 2, keep, keep)
    x = np.array([0.0, 1.0, -2.0, 0.5], np.float32)
    m = v = np.zeros(4)
    # two rounds: the second update is smaller than the first in coordinates 0-1 and larger
    # in 2-3, where Yogi's additive second moment departs from Adam's moving average
    for rnd, (a, b, big) in enumerate([(0.2, 0.4, 0.0), (0.01, 0.03, 1.0)], start=1):
        updates = [(x + a).astype(np.float32), (x + b).astype(np.float32)]
        updates[1][2:] += big  # coordinates 2-3: a bigger move in round 2
        for strat in (s, adam):  # the arrays the round sent (configure_train keeps them)
            strat.current_arrays = {"w": x.copy()}
        got = s.aggregate_train(rnd, _replies(updates))[0]["w"].numpy()
        adam_got = adam.aggregate_train(rnd, _replies(updates))[0]["w"].numpy()
        mean = np.mean(updates, axis=0)  # equal num-examples: the plain mean
        want, m, v = _yogi_step(x.astype(np.float64), m, v, mean, eta=0.05)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (rnd, got, want)
        assert np.all(np.sign(got - x) == np.sign(mean - x))  # it moves towards the mean
        if rnd == 2:  # Adam's v = b2 v + (1 - b2) d^2 gives another step
            assert np.abs(got - adam_got).max() > 1e-3
        x = got
    assert np.allclose(s.v_t["w"], v, rtol=1e-5)


def test_fedyogi_config() -> None:
    from shopmtl.config import ConfigError
    from shopmtl.federated.config import federated_from_dict

    from .conftest import tiny_raw

    run = federated_from_dict(tiny_raw(strategy="fedyogi", server_lr=0.03))
    assert (run.federated.strategy, run.federated.server_lr) == ("fedyogi", 0.03)
    # a server optimiser on the mean: SecAgg+ gives it the mean, row_aware is not used
    assert federated_from_dict(tiny_raw(strategy="fedyogi", secagg=True)).federated.secagg
    with pytest.raises(ConfigError, match="server_step"):
        federated_from_dict(tiny_raw(strategy="fedyogi", server_step=2.0))
    with pytest.raises(ConfigError, match=r"federated\.strategy"):
        federated_from_dict(tiny_raw(strategy="fedyoghurt"))
