"""Client-level differential privacy for a federated run (``federated.dp``).

The mechanism is Flower's DP-FedAvg with fixed clipping (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963): every sampled client's update (its shared arrays minus
the global ones) is clipped to L2 norm ``clip``, by the client (``mode: client``, Flower's
``fixedclipping_mod``: the server never sees an unclipped update) or by the server
(``mode: server``); the server takes the uniform mean of the clipped updates and adds
Gaussian noise of std ``z * clip / m`` (m: the clients sampled in a round) to every
coordinate (Flower's ``DifferentialPrivacy{Client,Server}SideFixedClipping``).

The accountant is Flower's RDP accountant (``flwr.supercore.privacy_accounting``, on Google's
``dp-accounting``): each round is one Gaussian release of noise multiplier z with respect to
adding or removing one client, composed over the rounds; client sampling is given no
amplification credit (Flower's fixed-clipping accounting supports only that), so the
epsilon is an upper bound when ``fraction`` < 1 and exact accounting when it is 1.

What it protects: the released global models (every round's) change little whether or not
any one silo took part, whatever its rows. What it does not: the metrics a client reports
(train loss, its AUC per round, its row count), the pieces a silo keeps (user rows, which
never leave it), and the silo's own model: they are not DP.
"""

from __future__ import annotations

from typing import Any

from shopmtl.config import ConfigError
from shopmtl.federated.config import DPConfig, FederatedConfig

# the weighting key of a DP run: every client sends 1, so the mean is uniform and one
# client moves it by at most clip / m (a mean weighted by rows would not bound that)
UNIT_WEIGHT = "dp-weight"


def sample_size(fed: FederatedConfig, n_clients: int) -> int:
    """The clients Flower's FedAvg samples each round (``FedAvg.configure_train``)."""
    return max(int(n_clients * fed.fraction), min(fed.min_clients, n_clients))


def _rdp_epsilon(noise: float, rounds: int, delta: float) -> float:
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise), rounds))
    return float(acc.get_epsilon(delta))


def epsilon_of(noise: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` Gaussian releases of multiplier ``noise`` (RDP,
    no sampling amplification), the same accounting as the run's accountant."""
    if noise <= 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise}")
    return _rdp_epsilon(noise, rounds, delta)


def calibrate_noise(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose ``rounds`` releases spend at most ``epsilon``
    at ``delta`` (dp-accounting's calibration: Brent's method on the RDP epsilon)."""
    from dp_accounting import dp_event, mechanism_calibration, rdp

    z = float(mechanism_calibration.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda v: dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(v), rounds),
        epsilon, delta, tol=1e-6))
    # Brent's answer is within tol of the boundary, on either side: step up until within budget
    while _rdp_epsilon(z, rounds, delta) > epsilon:
        z *= 1 + 1e-6
    return z


def noise_multiplier(dp: DPConfig, rounds: int) -> float:
    """The run's z: ``dp.noise``, or calibrated to ``dp.epsilon`` over ``rounds``."""
    return dp.noise if dp.noise > 0 else calibrate_noise(dp.epsilon, rounds, dp.delta)


def make_accountant(dp: DPConfig, n_clients: int) -> Any:
    """Flower's RDP accountant of a run: client-level, add or remove one client, no
    sampling amplification."""
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(PrivacyConfig(
        target_delta=dp.delta, population_size=n_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))


def wrap(strategy: Any, fed: FederatedConfig, n_clients: int) -> Any:
    """``strategy`` (FedAvg or FedProx, uniform weights) inside Flower's fixed-clipping DP
    wrapper of ``fed.dp.mode``, with the accountant."""
    from flwr.serverapp import strategy as st

    dp = fed.dp
    cls = {"client": st.DifferentialPrivacyClientSideFixedClipping,
           "server": st.DifferentialPrivacyServerSideFixedClipping}.get(dp.mode)
    if cls is None:
        raise ConfigError(f"federated.dp.mode: '{dp.mode}' does not wrap a strategy")
    return cls(strategy, noise_multiplier(dp, fed.rounds), dp.clip,
               sample_size(fed, n_clients), accountant=make_accountant(dp, n_clients))


def spent(strategy: Any) -> dict[str, float] | None:
    """The (epsilon, delta) spent so far by a wrapped strategy (None: not a DP run)."""
    fn = getattr(strategy, "privacy_spent", None)
    got = fn() if fn is not None else None
    if got is None:
        return None
    return {"epsilon": float(got.epsilon), "delta": float(got.delta),
            "releases": int(got.num_releases)}


def client_mods(dp: DPConfig) -> list[Any]:
    """The train mods of a client: Flower's clipping mod in ``mode: client``."""
    if dp.mode != "client":
        return []
    from flwr.clientapp.mod import fixedclipping_mod

    return [fixedclipping_mod]


def describe(strategy: Any, fed: FederatedConfig, n_clients: int) -> dict[str, Any]:
    """The DP settings of a run as metrics.json records them (empty when none)."""
    if fed.dp.mode == "none":
        return {}
    m = sample_size(fed, n_clients)
    z = float(strategy.noise_multiplier)
    return {"mode": fed.dp.mode, "clip": fed.dp.clip, "noise_multiplier": z,
            "noise_std": z * fed.dp.clip / m, "clients_per_round": m,
            "target_epsilon": fed.dp.epsilon or None, "delta": fed.dp.delta,
            "accounting": "RDP (dp-accounting via Flower), client-level add/remove-one, "
                          "no sampling amplification"}
