"""Client-level differential privacy (``federated.dp``): the accountant's epsilon against
closed forms for the Gaussian mechanism, Flower's clipping bounding every update's norm
(client side and server side), the server's noise having the configured std, a tiny DP run
writing its epsilon per round to metrics.json, and bad DP configs refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import norm

from shopmtl.config import ConfigError
from shopmtl.federated import dp as fdp
from shopmtl.federated.config import DPConfig, FederatedConfig, federated_from_dict
from tests.federated.conftest import tiny_raw


def _exact_delta(eps: float, mu: float) -> float:
    """The exact delta(eps) of a Gaussian mechanism of sensitivity / std = mu (Balle & Wang
    2018, Theorem 8); ``rounds`` releases of multiplier z compose to mu = sqrt(rounds) / z."""
    return float(norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu))


def _rdp_closed_form(z: float, rounds: int, delta: float) -> float:
    """RDP of the Gaussian, rounds * a / (2 z^2), through the conversion dp-accounting uses
    (Canonne, Kamath, Steinke 2020, Prop. 12), minimised over a continuous order a."""
    def eps(a: float) -> float:
        return (rounds * a / (2 * z * z) + math.log((a - 1) / a)
                - (math.log(delta) + math.log(a)) / (a - 1))
    return float(minimize_scalar(eps, bounds=(1.01, 1e4), method="bounded").fun)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 8), (5.0, 50)])
def test_accountant_epsilon_matches_closed_forms(z: float, rounds: int) -> None:
    delta = 1e-5
    got = fdp.epsilon_of(z, rounds, delta)
    # the accountant's discrete orders: at or just above the continuous optimum
    closed = _rdp_closed_form(z, rounds, delta)
    assert closed <= got <= closed * 1.02, (got, closed)
    # RDP is an upper bound: the exact Gaussian delta at that epsilon is below the target,
    # and not absurdly so (the exact epsilon is within 35% below)
    mu = math.sqrt(rounds) / z
    assert _exact_delta(got, mu) <= delta
    assert _exact_delta(got / 1.35, mu) > delta
    # the run's accountant (Flower's, on the same library) composes to the same number
    acc = fdp.make_accountant(DPConfig(mode="client", noise=z, delta=delta), 10)
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    acc.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=4, population_size=10),
                rounds)
    assert acc.get_privacy_spent().epsilon == pytest.approx(got, rel=1e-9)


def test_a_published_value() -> None:
    # z = 1, one release, delta 1e-5: eps = 4.7285 (the same conversion in tensorflow-privacy
    # and Opacus' RDP accountant gives the same orders' bound); the closed form says so too
    assert fdp.epsilon_of(1.0, 1, 1e-5) == pytest.approx(4.7285, abs=1e-3)


@pytest.mark.parametrize("eps", [1.0, 4.0, 8.0])
def test_noise_is_calibrated_to_the_target_epsilon(eps: float) -> None:
    z = fdp.calibrate_noise(eps, 8, 1e-5)
    assert fdp.epsilon_of(z, 8, 1e-5) <= eps
    assert fdp.epsilon_of(z * 0.999, 8, 1e-5) > eps  # the smallest such z, within 0.1%


def _replies(values: list[np.ndarray]) -> list:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    return [Message(content=RecordDict({"arrays": ArrayRecord({"a": Array(v[:10]),
                                                               "b": Array(v[10:])}),
                                        "metrics": MetricRecord({fdp.UNIT_WEIGHT: 1})}),
                    dst_node_id=i + 1, message_type="train")
            for i, v in enumerate(values)]


def _strategy(mode: str, noise: float, clip: float, n: int):
    from flwr.serverapp import strategy as st

    fed = FederatedConfig(strategy="fedavg", row_aware=False,
                          dp=DPConfig(mode=mode, clip=clip, noise=noise))
    inner = st.FedAvg(fraction_train=1.0, min_train_nodes=n, min_available_nodes=n,
                      weighted_by_key=fdp.UNIT_WEIGHT)
    return fdp.wrap(inner, fed, n)


def _flat(record) -> np.ndarray:
    return np.concatenate([record["a"].numpy(), record["b"].numpy()])


def test_server_side_clipping_bounds_every_update(identity) -> None:
    from flwr.app import Array, ArrayRecord

    rng = np.random.default_rng(0)
    glob = rng.standard_normal(40).astype(np.float32)
    # update norms 0.2 (under the clip: untouched), 3 and 50 (clipped to 1)
    ups = [u / np.linalg.norm(u) * s for u, s in
           zip(rng.standard_normal((3, 40)), (0.2, 3.0, 50.0), strict=True)]
    s = _strategy("server", 1e-9, 1.0, 3)  # noise ~0: the mean of the clipped updates
    list(s.configure_train(1, ArrayRecord({"a": Array(glob[:10]), "b": Array(glob[10:])}),
                           _config(), _Grid(3)))
    replies = _replies([(glob + u).astype(np.float32) for u in ups])
    arrays, _ = s.aggregate_train(1, replies)
    clipped = [_flat(r.content["arrays"]) - glob for r in replies]
    norms = [float(np.linalg.norm(c)) for c in clipped]
    assert norms == pytest.approx([0.2, 1.0, 1.0], rel=1e-4)
    assert np.allclose(clipped[2], ups[2] / 50.0, atol=1e-5)  # scaled, direction kept
    assert np.allclose(_flat(arrays), glob + np.mean(clipped, axis=0), atol=1e-5)
    assert s.privacy_spent().num_releases == 1


def test_client_side_clipping_mod_bounds_the_update_sent(identity) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    (mod,) = fdp.client_mods(DPConfig(mode="client", clip=0.5, noise=1.0))
    glob = np.ones(30, np.float32)
    local = glob + 7.0  # a local update of norm 7 * sqrt(30)
    msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(glob)}),
                              "config": ConfigRecord({"clipping_norm": 0.5})}),
                  dst_node_id=1, message_type="train")

    def train(m, ctx):
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(local)})}), reply_to=m)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = mod(msg, ctx, train)
    sent = out.content["arrays"]["w"].numpy()
    assert float(np.linalg.norm(sent - glob)) == pytest.approx(0.5, rel=1e-5)
    assert fdp.client_mods(DPConfig()) == []


def test_server_noise_has_the_configured_std(identity) -> None:
    from flwr.app import Array, ArrayRecord

    z, clip, m = 2.0, 0.5, 4
    glob = np.zeros(200_000, np.float32)
    s = _strategy("client", z, clip, m)
    list(s.configure_train(1, ArrayRecord({"a": Array(glob[:10]), "b": Array(glob[10:])}),
                           _config(), _Grid(m)))
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    arrays, _ = s.aggregate_train(1, _replies([glob.copy() for _ in range(m)]))
    noise = _flat(arrays)
    want = z * clip / m  # std of the noise on the mean: z * clip / clients
    # the std of 200k draws is within 1% of sigma (its standard error is sigma / 632)
    assert float(noise.std()) == pytest.approx(want, rel=0.01)
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(noise.size)
    spent = s.privacy_spent()
    assert spent.epsilon == pytest.approx(fdp.epsilon_of(z, 1, 1e-5), rel=1e-9)


class _Grid:
    """The two calls FedAvg.configure_train makes of a Grid: the node ids, the run."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord()


def test_a_tiny_dp_run_writes_its_epsilon(tiny_world: Path, tmp_path: Path) -> None:
    from shopmtl.federated.server import run_federated

    out = tmp_path / "run"
    shutil.copytree(tiny_world / "data", out / "data")
    raw = tiny_raw(strategy="fedavg", row_aware=False,
                   dp={"mode": "client", "clip": 0.5, "epsilon": 4.0})
    lines: list[str] = []
    run_federated(federated_from_dict(raw), out, log=lines.append)
    back = json.loads((out / "metrics.json").read_text())
    eps = [r["privacy"]["epsilon"] for r in back["rounds"]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 4.0
    assert eps[1] == pytest.approx(4.0, abs=1e-3)  # the budget is spent by the last round
    assert eps[0] == pytest.approx(fdp.epsilon_of(back["dp"]["noise_multiplier"], 1, 1e-5))
    assert back["dp"]["spent"]["releases"] == 2
    assert back["dp"]["noise_std"] == pytest.approx(back["dp"]["noise_multiplier"] * 0.5 / 4)
    assert any("DP epsilon 4.000 at delta 1e-05" in line for line in lines)


@pytest.mark.parametrize(("dp", "extra", "where"), [
    ({"mode": "client", "noise": 1.0, "epsilon": 4.0}, {}, "federated.dp"),
    ({"mode": "server"}, {}, "federated.dp"),  # neither noise nor epsilon
    ({"mode": "client", "noise": 1.0, "clip": 0.0}, {}, "federated.dp.clip"),
    ({"mode": "client", "epsilon": 1.0, "delta": 1.0}, {}, "federated.dp.delta"),
    ({"mode": "laplace", "noise": 1.0}, {}, "federated.dp.mode"),
    ({"mode": "client", "noise": 1.0}, {"strategy": "median"}, "strategy fedavg or fedprox"),
    ({"mode": "client", "noise": 1.0}, {"row_aware": True}, "row_aware: false"),
    ({"mode": "client", "noise": 1.0, "sigma": 2}, {}, "sigma"),
])
def test_bad_dp_config_is_refused(dp: dict, extra: dict, where: str) -> None:
    raw = tiny_raw(**{"strategy": "fedavg", "row_aware": False, **extra, "dp": dp})
    with pytest.raises(ConfigError) as e:
        federated_from_dict(raw)
    assert where in str(e.value)


def test_a_yaml_dp_section_loads(tmp_path: Path) -> None:
    from shopmtl.federated.config import load_federated

    cfg = tmp_path / "f.yaml"
    cfg.write_text("data: {synthetic: {rows: 2000}}\nfederated:\n  strategy: fedavg\n"
                   "  row_aware: false\n  dp: {mode: server, clip: 0.2, noise: 1.5}\n")
    dp = load_federated(cfg).federated.dp
    assert (dp.mode, dp.clip, dp.noise, dp.epsilon, dp.delta) == ("server", 0.2, 1.5, 0, 1e-5)
    assert load_federated(cfg, ["federated.dp.mode=none"]).federated.dp.mode == "none"
