"""The ``federated`` section of a federated run's config, and the loader of the whole file.

A federated config is an experiment config (``data``, ``model``, ``train``, ``weighting``:
what each silo trains, read by ``config.config_from_dict`` with all its checks) plus one
``federated`` section: how the rows are split into silos, what crosses the wire, the server's
strategy and the rounds. Every key is declared once with its meaning and range (``keys.key``);
unknown keys, wrong types and out-of-range numbers are one-line ConfigErrors naming the key,
raised before any data is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shopmtl.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    from_dict,
    read_yaml_mapping,
)
from shopmtl.federated.faults import FaultConfig
from shopmtl.keys import check_fields, key

if TYPE_CHECKING:  # the zoo path does not import the joint model's config
    from shopmtl.joint.config import JointConfig


@dataclass(frozen=True)
class SiloConfig:
    """How the pooled rows become silos (each keeps only its rows)."""

    by: Literal["scenario", "column", "user_hash", "source"] = key(
        "scenario", "one silo per scenario (or per group of scenarios), per group of a "
                    "categorical column's values, by a hash of the user (an IID control), "
                    "or (a joint config) per group of data sources")
    column: str | None = key(None, "by: column: the categorical column (e.g. a market)")
    # silo name -> the scenarios (by: scenario), column values (by: column) or joint sources
    # (by: source) it holds; empty with by: scenario: one silo per scenario
    groups: dict[str, tuple[str, ...]] = key(factory=dict, doc="silo name -> its scenarios, "
                                             "column values or sources ({}: one silo per "
                                             "scenario)")
    # 1 is a control, not a federation: every row in one silo, so the rounds must reproduce
    # centralised training (bench/federated_tuning.py)
    count: int = key(4, "by: user_hash: the number of silos (1: the one-silo control)", ge=1)
    # silo name -> the only tasks whose labels it keeps (a silo that does not log conversions)
    tasks: dict[str, tuple[str, ...]] = key(factory=dict, doc="silo name -> the tasks it has "
                                            "labels for ({}: all its rows have)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.by == "column" and not self.column:
            raise ValueError("federated.silos.column: by: column needs the column's name")
        if self.by == "column" and not self.groups:
            raise ValueError("federated.silos.groups: by: column needs the silos' values")
        if self.by == "source" and not self.groups:
            raise ValueError("federated.silos.groups: by: source needs each silo's sources")
        if self.by == "user_hash" and self.groups:
            raise ValueError("federated.silos.groups: not used with by: user_hash (use count)")


@dataclass(frozen=True)
class AttackConfig:
    """A measurement harness (docs/FEDERATED.md, must-show 2): these silos send their update
    sign-flipped and scaled, ``global - scale * (local - global)``."""

    silos: tuple[str, ...] = key((), "the attacking silos' names (empty: no attack)")
    scale: float = key(10.0, "the factor of the flipped update", gt=0)


@dataclass(frozen=True)
class DPConfig:
    """Client-level differential privacy (``federated.dp``, docs/FEDERATED.md): each client's
    update is clipped to L2 norm ``clip`` and the server adds Gaussian noise of std
    ``noise * clip / clients`` to their (uniform) mean, through Flower's DP strategy wrappers;
    Flower's RDP accountant (Google's dp-accounting) tracks the (epsilon, delta) spent."""

    mode: Literal["none", "client", "server"] = key(
        "none", "none: no DP; else who clips each update: the client (Flower's "
                "fixedclipping_mod: the server never sees an unclipped update) or the server; "
                "the server adds the noise either way")
    # 1.0: must-show 3's setting (docs/FEDERATED.md); the noise scales with it
    clip: float = key(1.0, "the L2 norm a client's update (all its shared arrays) is "
                           "clipped to", gt=0, finite=True)
    # one of the two: the noise multiplier itself, or the epsilon it is calibrated to reach
    # after all the rounds
    noise: float = key(0.0, "the noise multiplier z (std / clip of the summed updates); 0: "
                            "calibrated from epsilon", ge=0, finite=True)
    epsilon: float = key(0.0, "the target epsilon after all rounds (z is calibrated to it); "
                              "0: use noise", ge=0, finite=True)
    delta: float = key(1e-5, "the delta of the (epsilon, delta) reported", gt=0, lt=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mode != "none" and (self.noise > 0) == (self.epsilon > 0):
            raise ValueError("federated.dp: set exactly one of noise (the multiplier) and "
                             f"epsilon (the target), got noise {self.noise}, epsilon "
                             f"{self.epsilon}")


@dataclass(frozen=True)
class FederatedConfig:
    silos: SiloConfig = key(factory=SiloConfig, doc="how the rows are split into silos")
    share: tuple[Literal["dense", "items", "towers", "users", "text"], ...] = key(
        ("dense", "items", "towers"), "the parts of the model that cross the wire; users "
        "(the user-id embedding rows) stay in their silo unless listed; a joint config "
        "shares text (the shared text adapter, its default) and keeps every head local")
    strategy: Literal["fedavg", "fedprox", "fedadam", "trimmed_mean", "median", "krum",
                      "multikrum", "fedyogi"] = key("fedprox", "the server's aggregation")
    # small: under Adam the term is normalised like any gradient, so mu 0.01 already pins the
    # weights whose own gradients are small to the global model (docs/FEDERATED.md)
    mu: float = key(1e-4, "fedprox: weight of the proximal term mu/2 ||w - w_global||^2",
                    ge=0)
    row_aware: bool = key(True, "fedavg / fedprox: average each embedding row over the "
                                "clients that updated it (not over all clients)")
    server_lr: float = key(0.01, "fedadam, fedyogi: the server optimiser's step (eta)", gt=0)
    # FedAvg with a server learning rate (Reddi et al. 2021): a mean of K clients' updates is
    # about 1/K of the progress of the same local steps taken one after another (one epoch of
    # centralised training), so a step above 1 makes up for it
    server_step: float = key(1.0, "fedavg / fedprox: the new global model is global + "
                                  "server_step * (the clients' mean - global); 1 is the mean",
                             gt=0, le=16)
    server_momentum: float = key(0.0, "fedavg / fedprox: FedAvgM's server momentum on the "
                                      "mean update (0: none)", ge=0, lt=1)
    # Adam restarted every round takes its first steps as sign steps of one batch's gradient
    # (bias correction), which moves the weights of sparse, low-weight tasks by a full lr
    keep_optimizer: bool = key(False, "each client keeps its optimizer's state (Adam's "
                                      "moments) between rounds, in its own state; never sent")
    # averaging K clients' parallel steps moves the model about as far as one client's
    # (docs/FEDERATED.md, must-show 1); taking them one after another does not average
    cyclic: bool = key(False, "fedavg / fedprox: in each round the silos train one after "
                              "another (a seeded order, new each round), each from the model "
                              "the one before returned (cyclic weight transfer), instead of "
                              "in parallel from one model and averaged")
    trim: float = key(0.2, "trimmed_mean: the fraction cut from each end", ge=0, lt=0.5)
    malicious: int = key(1, "krum, multikrum: the number of attackers tolerated (multikrum "
                            "averages the clients - malicious updates Krum scores best)", ge=0)
    rounds: int = key(8, "rounds of training", ge=1)
    # the one-table run keeps its best epoch; a federation's server sees no rows, so it ranks
    # rounds by what the silos report of their own validation rows (federated.server)
    select: Literal["last", "best"] = key(
        "last", "the global model written: the last round's, or the round's with the best "
        "validation score (the silos' mean task AUC on their validation rows, weighted by "
        "those rows)")
    local_epochs: float = key(0.5, "each client's local training per round, in epochs of "
                                   "its own rows", gt=0)
    fraction: float = key(1.0, "the fraction of clients sampled each round", gt=0, le=1)
    min_clients: int = key(2, "the fewest clients a round trains on, and the fewest valid "
                              "replies it aggregates (fewer: the previous global model is "
                              "kept)", ge=1)
    client_cpus: float = key(1.0, "CPUs the simulation engine reserves per client", gt=0)
    engine_cpus: int = key(2, "CPUs the simulation engine may use", ge=1)
    seed: int = key(0, "seed of the split, the sampling and every client", ge=0)
    attack: AttackConfig = key(factory=AttackConfig, doc="a test harness: silos that send "
                                                         "sign-flipped updates")
    dp: DPConfig = key(factory=DPConfig, doc="client-level differential privacy: clipping, "
                                             "Gaussian noise, the accountant")
    # Flower's Grid timeout (``send_and_receive``); the engine's start and the clients'
    # imports happen in a roll call before round 1, not inside it
    round_timeout: float = key(3600.0, "seconds the server waits for a round's replies; a "
                                       "client not answered by then is dropped from the round",
                               gt=0)
    faults: FaultConfig = key(factory=FaultConfig, doc="a TEST TOOL: silos that fail on "
                                                       "purpose (federated.faults)")
    # secure aggregation (federated/secure.py): the server sees only the sum of the updates
    secagg: bool = key(False, "aggregate with Flower's SecAgg+ protocol: the server sees only "
                              "the clients' weighted sum (fedavg, fedprox, fedadam, fedyogi; "
                              "row_aware false)")
    secagg_clip: float = key(8.0, "secagg: every shared weight is clipped to [-clip, clip] "
                                  "before quantisation (2**22 levels)", gt=0)
    secagg_shares: float = key(1.0, "secagg: the fraction of the round's clients each client "
                                    "shares its secret keys with", gt=0, le=1)
    secagg_threshold: float = key(0.5, "secagg: the fraction of those shares needed to "
                                       "reconstruct a dropped client's mask", gt=0, le=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if len(set(self.share)) != len(self.share):
            raise ValueError(f"federated.share: a part is listed twice: {list(self.share)}")
        if not self.share:
            raise ValueError("federated.share: share at least one part of the model")
        if self.strategy == "fedprox" and self.mu == 0:
            raise ValueError("federated.mu: fedprox needs mu > 0 (mu 0 is fedavg)")
        if ((self.server_step != 1.0 or self.server_momentum > 0)
                and self.strategy not in ("fedavg", "fedprox")):
            raise ValueError(f"federated.server_step: only fedavg and fedprox take a server "
                             f"step, got strategy {self.strategy}")
        if self.dp.mode != "none":
            # the accountant's sensitivity is clip / clients: a uniform mean of the clipped
            # updates. A row mean over the clients that moved a row, a weighted mean or a
            # server optimiser would give one client more weight than that.
            if self.strategy not in ("fedavg", "fedprox"):
                raise ValueError(f"federated.dp: needs strategy fedavg or fedprox (a uniform "
                                 f"mean of clipped updates), got {self.strategy}")
            if self.row_aware:
                raise ValueError("federated.dp: needs row_aware: false (a row's mean over "
                                 "the clients that moved it is not bounded by clip / clients)")
        if self.secagg:
            check_secagg(self)
        if self.cyclic:
            check_cyclic(self)
        if self.select == "best" and self.dp.mode != "none":
            raise ValueError("federated.select: best ranks rounds by the silos' plain "
                             "validation AUC, which DP does not cover; use select: last "
                             "with federated.dp")


# secure aggregation reveals only the sum: these need each client's own update
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
# a server optimiser on the weighted mean (Flower's FedOpt family): row_aware does not apply
SERVER_OPTIMISERS = ("fedadam", "fedyogi")


def check_cyclic(cfg: FederatedConfig) -> None:
    """Refuse what cannot combine with ``cyclic`` (one line naming the key)."""
    if cfg.strategy not in ("fedavg", "fedprox"):
        raise ValueError(f"federated.cyclic: needs strategy fedavg or fedprox (one silo's "
                         f"update at a time: nothing to aggregate robustly or with a server "
                         f"optimiser), got {cfg.strategy}")
    refused = {"server_step": cfg.server_step != 1.0, "server_momentum": cfg.server_momentum > 0,
               "fraction": cfg.fraction < 1.0, "dp": cfg.dp.mode != "none",
               "secagg": cfg.secagg}
    for name, on in refused.items():
        if on:
            raise ValueError(f"federated.{name}: not with federated.cyclic (every silo trains "
                             f"every round, one at a time, and the server sees each update)")


def check_secagg(cfg: FederatedConfig) -> None:
    """Refuse what cannot combine with SecAgg+ (one line naming the key)."""
    if cfg.strategy not in SECAGG_STRATEGIES:
        raise ValueError(f"federated.secagg: strategy '{cfg.strategy}' needs each client's "
                         f"update, secure aggregation reveals only their sum; use one of "
                         f"{list(SECAGG_STRATEGIES)}")
    if cfg.dp.mode != "none":
        raise ValueError("federated.secagg: not built together with federated.dp (server-side "
                         "clipping needs each client's update; the pair is untested)")
    if cfg.row_aware and cfg.strategy not in SERVER_OPTIMISERS:
        raise ValueError("federated.secagg: row_aware averaging needs each client's rows, "
                         "secure aggregation reveals only their sum; set row_aware: false")


@dataclass(frozen=True)
class FederatedRun:
    """What ``shopmtl federate`` runs: the silos' experiment and the federation."""

    experiment: ExperimentConfig
    federated: FederatedConfig = field(default_factory=FederatedConfig)


def federated_from_dict(raw: dict[str, Any], overrides: list[str] | None = None,
                        base: str | Path = ".") -> FederatedRun | JointFederatedRun:
    """A federated run from a dict shaped like the YAML file, every key checked: an
    experiment's (``data``, ``model``, ...) or, with a ``joint`` key, a joint model's."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if isinstance(raw.get("joint"), str):  # a path: read before the overrides (joint.x=...)
        raw["joint"] = read_yaml_mapping(Path(base) / raw["joint"], "joint: ")
    raw = apply_overrides(raw, overrides or [])
    fed_raw = raw.pop("federated", None)
    if fed_raw is None:
        raise ConfigError("federated: the section is missing (see examples/federated.yaml)")
    joint_raw = raw.pop("joint", None)
    if joint_raw is not None and isinstance(fed_raw, dict) and "share" not in fed_raw:
        fed_raw = {**fed_raw, "share": list(JOINT_SHARE)}
    try:
        fed = from_dict(FederatedConfig, fed_raw, "federated")
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own cross-key check
        raise ConfigError(str(e)) from None
    if joint_raw is None:
        if fed.silos.by == "source" or "text" in fed.share:
            raise ConfigError("federated.silos.by: source and federated.share: text are for a "
                              "joint model (a `joint:` key naming its config, "
                              "examples/federated_joint.yaml)")
        return FederatedRun(config_from_dict(raw, None, base), fed)
    from shopmtl.joint.config import joint_config_from_dict

    if raw:
        raise ConfigError(f"a joint federated config has only `joint` and `federated`; "
                          f"unknown top-level keys {sorted(raw)}")
    joint = joint_config_from_dict(joint_raw, None, where="joint")
    check_joint(fed, joint, set(fed_raw) if isinstance(fed_raw, dict) else set())
    return JointFederatedRun(joint, fed)


# a joint model shares its text adapter; a head is trained by the one silo owning its source
JOINT_SHARE = ("text",)
_SILO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
JOINT_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class JointFederatedRun:
    """What ``shopmtl federate`` runs on a joint config: each silo owns some of its sources
    (``federated.silos``: by: source), the silos train the one joint model together."""

    joint: JointConfig
    federated: FederatedConfig

    @property
    def silos(self) -> dict[str, tuple[str, ...]]:
        """silo name -> its sources, in the config's order."""
        return {k: tuple(v) for k, v in self.federated.silos.groups.items()}


def check_silo_sources(groups: dict[str, tuple[str, ...]], sources: list[str]) -> None:
    """Every source of the joint config in exactly one silo, and nothing else (one line
    naming the source and the silos)."""
    where: dict[str, list[str]] = {}
    for silo, names in groups.items():
        if not _SILO_NAME.fullmatch(silo):  # it names the silo's folder under OUT/silos
            raise ConfigError(f"federated.silos.groups: a silo's name is letters, digits, _ "
                              f"and - (at most 64, a letter or digit first), got {silo!r}")
        if not names:
            raise ConfigError(f"federated.silos.groups.{silo}: a silo needs at least one "
                              f"source")
        for n in names:
            where.setdefault(n, []).append(silo)
    unknown = sorted(set(where) - set(sources))
    if unknown:
        raise ConfigError(f"federated.silos.groups: {unknown} are not sources of the joint "
                          f"config; its sources: {sources}")
    twice = {n: s for n, s in where.items() if len(s) > 1}
    if twice:
        n = sorted(twice)[0]
        raise ConfigError(f"federated.silos.groups: source '{n}' is in more than one silo "
                          f"({twice[n]}); a source's rows belong to one silo")
    missing = [n for n in sources if n not in where]
    if missing:
        raise ConfigError(f"federated.silos.groups: sources {missing} are in no silo; "
                          f"give each source of the joint config to one silo")


def check_joint(fed: FederatedConfig, joint: JointConfig, given: set[str]) -> None:
    """Refuse, one line naming the key, what a joint federation does not do."""
    if fed.silos.by != "source":
        raise ConfigError(f"federated.silos.by: a joint model's silos are groups of its "
                          f"sources (by: source), got '{fed.silos.by}'")
    check_silo_sources(dict(fed.silos.groups), [s.name for s in joint.sources])
    if fed.share != JOINT_SHARE:
        raise ConfigError(f"federated.share: a joint model shares {list(JOINT_SHARE)} (the "
                          f"text adapter); each head is trained by the one silo that owns its "
                          f"source and stays there, got {list(fed.share)}")
    if fed.strategy not in JOINT_STRATEGIES:
        raise ConfigError(f"federated.strategy: a joint model takes {list(JOINT_STRATEGIES)}, "
                          f"got '{fed.strategy}' (not built for joint: robust aggregation of "
                          f"one adapter over a few business units is untested)")
    if "local_epochs" in given:
        raise ConfigError("federated.local_epochs: not used by a joint model: a round is "
                          "joint.train.steps / rounds steps of the federation, shared by the "
                          "silos as the joint sampler shares steps among sources")
    refused = {"dp": fed.dp.mode != "none", "secagg": fed.secagg,
               "attack": bool(fed.attack.silos), "select": fed.select != "last",
               "cyclic": fed.cyclic}
    for name, on in refused.items():
        if on:
            raise ConfigError(f"federated.{name}: not built for a joint model")
    unknown = sorted(set(fed.faults.silos) - set(fed.silos.groups))
    if unknown:
        raise ConfigError(f"federated.faults.silos: {unknown} are not silos; silos: "
                          f"{list(fed.silos.groups)}")
    if joint.text.mode != "frozen":
        raise ConfigError("joint.text.mode: a joint federation needs the frozen encoder (LoRA "
                          "would put the encoder's adapters on the wire: not built)")


def load_federated(path: str | Path, overrides: list[str] | None = None
                   ) -> FederatedRun | JointFederatedRun:
    """The federated run of a YAML file (with ``a.b=value`` overrides)."""
    path = Path(path)
    return federated_from_dict(read_yaml_mapping(path), overrides, path.parent)
