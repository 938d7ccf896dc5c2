"""An experiment as the service runs it (``shopmtl serve --experiment CONFIG``): its YAML
config, parsed strictly into frozen dataclasses, and its arms' policies.

A config::

    name: ranker-v2            # the experiment's name (its route: /v1/experiments/NAME/rank)
    salt: ranker-v2            # the assignment's salt (default: the name)
    control: control           # the control arm (default: the first)
    k: {home_feed: 20, search: 20, ad_slot: 4, product_page: 10}   # or one number (default 10)
    events: events.db          # the SQLite event store (default: events.db beside the config;
                               # none: nothing logged, a dry run; postgresql://user@host:5432/db:
                               # a PostgreSQL database that several servers share)
    queue: 10000               # events waiting for the writer; beyond, dropped and counted
    arms:
      - {name: control, share: 0.5, policy: {model: runs/a/model,
                                             weights: {click: 1, conversion: 1, price: 1}}}
      - {name: treatment, share: 0.5, policy: {model: {click: runs/b/model,
                                                       conversion: runs/c/model}}}
      # or policy: {popularity: items.json} (item id -> score), {popularity: train.parquet}
      # (each item's clicks in a training file) or {random: 7}

Unknown keys, wrong types and bad shares are one-line ``ConfigError``s naming the key; a
relative path is relative to the config file. An events URL is checked here without being
echoed (it may hold a password); connecting is the event store's job (``abtest.events``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shopmtl.abtest.assign import check_arms
from shopmtl.abtest.events import SCHEMES, StoreURL
from shopmtl.abtest.policy import Policy, PopularityPolicy, RandomPolicy, model_policy
from shopmtl.config import ConfigError, _yaml_load, yaml_problem

DEFAULT_K = 10  # items shown when the config gives no k
DEFAULT_QUEUE = 10_000  # events waiting for the writer (about 10 s of traffic at 1,000 rps)
MAX_QUEUE = 10_000_000
MAX_K = 1_000  # = serve.endpoints.MAX_CANDIDATES: no request shows more
DEFAULT_WEIGHTS = {"click": 1.0, "conversion": 1.0, "price": 1.0}  # rank by expected GMV
_TOP = {"name", "salt", "control", "k", "events", "queue", "arms"}
_ARM = {"name", "share", "policy"}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class PolicyConfig:
    """One of: ``model`` (a directory, or task -> directory) with ``weights``; ``popularity``
    (a JSON file of item id -> score, or a training Parquet file: each item's clicks);
    ``random`` (a seed)."""

    model: Path | Mapping[str, Path] | None = None
    weights: Mapping[str, float] | None = None
    popularity: Path | None = None
    random: int | None = None


@dataclass(frozen=True)
class ArmConfig:
    name: str
    share: float
    policy: PolicyConfig


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    salt: str
    control: str
    arms: tuple[ArmConfig, ...]
    events: Path | str | None  # a SQLite file, a postgresql:// URL; None: ``events: none``
    k: int | Mapping[str, int] = DEFAULT_K
    queue: int = DEFAULT_QUEUE

    @property
    def shares(self) -> dict[str, float]:
        return {a.name: a.share for a in self.arms}

    def k_for(self, scenario: str) -> int | None:
        """Items shown in ``scenario`` (None: the config has no k for it)."""
        return self.k if isinstance(self.k, int) else self.k.get(scenario)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or set(value) - _NAME_CHARS:
        raise ConfigError(f"{where}: expected a name of 1..64 letters, digits, '_', '-', '.'")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected an integer in [{lo}, {hi}]")
    return value


def _path(value: Any, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _url(value: str, where: str) -> str:
    """A PostgreSQL URL, checked for its form only (never echoed: it may hold a password)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (a property that raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL (check the host and port)") from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"{where}: a {parts.scheme[:20]}:// URL is not supported; give a "
                          "file path (SQLite) or a postgresql://user@host:port/db URL")
    if any(c.isspace() for c in value) or not parts.path.strip("/"):
        raise ConfigError(f"{where}: expected postgresql://user@host:port/DATABASE (the "
                          "database name missing, or white space)")
    return StoreURL(value)  # its repr (a printed or hashed config) hides the password


def _keys(raw: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - allowed, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    return raw


def _weights(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping task -> weight (e.g. {{click: 1}})")
    out = {}
    for task, w in raw.items():
        if (not isinstance(task, str) or isinstance(w, bool) or not isinstance(w, int | float)
                or not math.isfinite(w)):
            raise ConfigError(f"{where}: expected task names with finite numbers")
        out[task] = float(w)
    return out


def _policy(raw: Any, where: str, base: Path) -> PolicyConfig:
    raw = _keys(raw, {"model", "weights", "popularity", "random"}, where)
    kinds = [k for k in ("model", "popularity", "random") if k in raw]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of model, popularity, random")
    if "weights" in raw and kinds != ["model"]:
        raise ConfigError(f"{where}.weights: only a model policy has task weights")
    if kinds == ["popularity"]:
        return PolicyConfig(popularity=_path(raw["popularity"], f"{where}.popularity", base))
    if kinds == ["random"]:
        return PolicyConfig(random=_int(raw["random"], f"{where}.random", 0, 2**32 - 1))
    model = raw["model"]
    if isinstance(model, dict):
        if not model:
            raise ConfigError(f"{where}.model: expected a directory or task -> directory")
        dirs: Path | dict[str, Path] = {
            str(t): _path(p, f"{where}.model.{t}", base) for t, p in model.items()}
    else:
        dirs = _path(model, f"{where}.model", base)
    weights = _weights(raw.get("weights", DEFAULT_WEIGHTS), f"{where}.weights")
    return PolicyConfig(model=dirs, weights=weights)


def experiment_from_dict(raw: Any, base: Path, where: str = "experiment") -> ExperimentConfig:
    """The strict parse of the module docstring; ``base``: the folder relative paths start."""
    raw = _keys(raw, _TOP, where)
    for key in ("name", "arms"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key '{key}'")
    name = _name(raw["name"], f"{where}.name")
    salt = raw.get("salt", name)
    if not isinstance(salt, str) or not salt:
        raise ConfigError(f"{where}.salt: expected a non-empty string")
    if not isinstance(raw["arms"], list):
        raise ConfigError(f"{where}.arms: expected a list of {{name, share, policy}}")
    arms = []
    for i, a in enumerate(raw["arms"]):
        at = f"{where}.arms[{i}]"
        a = _keys(a, _ARM, at)
        missing = sorted(_ARM - set(a))
        if missing:
            raise ConfigError(f"{at}: missing key(s) {', '.join(missing)}")
        share = a["share"]
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise ConfigError(f"{at}.share: expected a number in (0, 1]")
        arms.append(ArmConfig(_name(a["name"], f"{at}.name"), float(share),
                              _policy(a["policy"], f"{at}.policy", base)))
    try:
        check_arms([(a.name, a.share) for a in arms])
    except ValueError as e:
        raise ConfigError(f"{where}.arms: {e}") from None
    control = raw.get("control", arms[0].name)
    if control not in {a.name for a in arms}:
        raise ConfigError(f"{where}.control: not one of the arms "
                          f"({', '.join(a.name for a in arms)})")
    k_raw = raw.get("k", DEFAULT_K)
    k: int | dict[str, int]
    if isinstance(k_raw, dict):
        k = {str(s): _int(v, f"{where}.k.{s}", 1, MAX_K) for s, v in k_raw.items()}
    else:
        k = _int(k_raw, f"{where}.k", 1, MAX_K)
    events = raw.get("events", "events.db")
    store: Path | str | None
    if isinstance(events, str) and "://" in events:
        store = _url(events, f"{where}.events")
    else:
        store = None if events == "none" else _path(events, f"{where}.events", base)
    return ExperimentConfig(name, salt, control, tuple(arms), store, k,
                            _int(raw.get("queue", DEFAULT_QUEUE), f"{where}.queue", 1, MAX_QUEUE))


def load_experiment(path: str | Path) -> ExperimentConfig:
    """``experiment_from_dict`` of a YAML file; errors start with the file's path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment config not found: {p}")
    try:
        raw = _yaml_load(p.read_text())
    except Exception as e:  # yaml.YAMLError: the line and column, never the text
        raise ConfigError(f"{p}: not valid YAML: {yaml_problem(e)}") from None
    return experiment_from_dict(raw, p.resolve().parent, where=str(p))


def build_policy(arm: ArmConfig) -> Policy:
    """The arm's ``Policy`` (models loaded: ``shopmtl.load``, manifests checked)."""
    pol = arm.policy
    if pol.random is not None:
        return RandomPolicy(arm.name, pol.random)
    if pol.popularity is not None and pol.popularity.suffix == ".parquet":
        from shopmtl.abtest.policy import popularity_policy  # each item's clicks in the file

        return popularity_policy(arm.name, pol.popularity)
    if pol.popularity is not None:
        try:
            scores = json.loads(pol.popularity.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"arm '{arm.name}': {pol.popularity}: not a JSON file of item id "
                              f"-> score ({type(e).__name__})") from None
        if not isinstance(scores, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values()):
            raise ConfigError(f"arm '{arm.name}': {pol.popularity}: expected a JSON object of "
                              "item id -> number")
        return PopularityPolicy(arm.name, {str(k): float(v) for k, v in scores.items()})
    assert pol.model is not None and pol.weights is not None
    try:
        return model_policy(arm.name, pol.model, pol.weights)
    except ValueError as e:  # a task no model predicts
        raise ConfigError(str(e)) from None


def build_policies(cfg: ExperimentConfig) -> dict[str, Policy]:
    """arm -> its policy, every model loaded once per arm."""
    return {a.name: build_policy(a) for a in cfg.arms}
