"""``shopmtl abtest run CONFIG``: compare models in the simulated shop against the truth
(docs/ABTEST.md, "Comparing models: shopmtl abtest run").

One job: train the multi-task model and the single-task baselines on the default world
(``shopmtl.run.quickstart``; or reuse a quickstart / ``shopmtl train --baselines`` folder),
build the arms' policies (each model ranks by ``score = pCTR x pCVR x price``, the single-task
models combined the same way; popularity; random), compute every arm's true metrics from the
world (exact expectations over many requests), play the experiment into an event store (a
pre-period on the control, then the test), analyse it (``abtest.analyze``), estimate the
target policy off-policy from a randomised log (``abtest.ope``), and write the report with the
truth beside every estimate.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shopmtl.abtest import ope as ope_mod
from shopmtl.abtest.events import EventStore, read_events
from shopmtl.abtest.policy import (
    Policy,
    RandomPolicy,
    model_policy,
    popularity_policy,
)
from shopmtl.abtest.shop import METRICS, PER_USER, Experiment, Shop, play, read_world, truth
from shopmtl.config import (
    ConfigError,
    _yaml_load,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from shopmtl.data.synthetic import WorldConfig
from shopmtl.jsonsafe import json_safe
from shopmtl.keys import key

PolicyKind = Literal["multi_task", "single_task", "popularity", "random"]


@dataclass(frozen=True)
class TrainSpec:
    rows: int = key(1_000_000, "impressions of the default world to train on (quickstart)",
                    ge=1000)
    seed: int = key(0, "seed of the world and of training", ge=0)
    world: dict[str, Any] = key(factory=dict, doc="other keys of the world (data.synthetic), "
                                "e.g. a smaller n_users; none: the default world")
    epochs: int = key(4, "training epochs (the quickstart's)", ge=1)


@dataclass(frozen=True)
class ArmSpec:
    name: str = key(doc="the arm's name (as the events and the report show it)")
    policy: PolicyKind = key(doc="multi_task | single_task | popularity | random")
    share: float = key(doc="share of users on the arm", gt=0, le=1)


@dataclass(frozen=True)
class ShopSpec:
    slots: tuple[int, ...] = key((10, 10, 4, 10), "items shown per request and scenario",
                                 ge=1)
    candidates: tuple[int, ...] = key((30, 50), "candidate draws per request: low, high",
                                      ge=1)


@dataclass(frozen=True)
class OpeSpec:
    logging: str = key(doc="the arm whose scores, Plackett-Luce sampled, log the events")
    target: str = key(doc="the arm estimated off-policy (its model is DR's reward model)")
    temperature: float = key(1.0, "Plackett-Luce temperature of the logging policy", gt=0)
    requests: int = key(2000, "logged requests", ge=10)
    seed: int = key(0, "seed of the logged requests and draws", ge=0)


@dataclass(frozen=True)
class AbConfig:
    arms: tuple[ArmSpec, ...] = key(doc="the experiment's arms")
    control: str = key(doc="the control arm's name")
    name: str = key("abtest", "the experiment's name (in the events)")
    train: TrainSpec = key(factory=TrainSpec, doc="what to train when no models are given")
    models: str | None = key(None, "a quickstart (or train --baselines) folder to reuse: "
                                   "model/, single_task/<task>/model, data/")
    weights: dict[str, float] = key(factory=lambda: {"click": 1.0, "conversion": 1.0,
                                                     "price": 1.0},
                                    doc="task exponents of a model's score (pCTR x pCVR x price)")
    salt: str = key("abtest", "salt of the user assignment")
    pre_requests: int = key(20_000, "requests before the test (every user on the control)",
                            ge=0)
    test_requests: int = key(100_000, "requests during the test", ge=1)
    seed: int = key(0, "seed of the played requests and responses", ge=0)
    truth_requests: int = key(20_000, "requests the truth averages over (exact per request)",
                              ge=100)
    alpha: float = key(0.05, "significance level", gt=0, lt=1)
    shop: ShopSpec = key(factory=ShopSpec, doc="the shop")
    ope: OpeSpec | None = key(None, "off-policy evaluation of one arm from a randomised log")

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if self.control not in names:
            raise ValueError(f"control '{self.control}' is not an arm ({names})")
        if self.ope is not None:
            for which in ("logging", "target"):
                arm = getattr(self.ope, which)
                if arm not in names:
                    raise ValueError(f"ope.{which}: '{arm}' is not an arm ({names})")
            kinds = {a.name: a.policy for a in self.arms}
            if kinds[self.ope.target] not in ("multi_task", "single_task"):
                raise ValueError("ope.target: the target arm needs a model (multi_task or "
                                 "single_task): its predictions are DR's reward model")
        if len(self.shop.candidates) != 2:
            raise ValueError("shop.candidates: give [low, high]")


def is_abtest_config(path: str | Path) -> bool:
    """Whether a YAML file is an ``abtest run`` config (it has arms), not a training one."""
    try:
        raw = _yaml_load(Path(path).read_text())
    except Exception:  # unreadable or invalid: not ours to judge here
        return False
    return isinstance(raw, dict) and "arms" in raw


def load_abtest_config(path: str | Path, overrides: list[str] | None = None) -> AbConfig:
    """The config of a YAML file (``a.b=value`` overrides), every key checked (unknown keys are
    errors); a relative ``models`` path is relative to the file."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    cfg = from_dict(AbConfig, apply_overrides(raw, overrides or []), "")
    if cfg.models is not None and not Path(cfg.models).is_absolute():
        cfg = dataclasses.replace(cfg, models=str((p.parent / cfg.models).resolve()))
    return cfg


# -- models and policies ------------------------------------------------------------------------

def _models_dir(cfg: AbConfig, out: Path, log: Any) -> Path:
    if cfg.models is not None:
        d = Path(cfg.models)
        for need in ("model", "data/world.json", "data/train.parquet"):
            if not (d / need).exists():
                raise ConfigError(f"models: {d} has no {need} (give a quickstart or "
                                  "'train --baselines' folder)")
        return d
    d = out / "models"
    t0 = time.perf_counter()
    log(f"training the multi-task model and the single-task baselines on "
        f"{cfg.train.rows:,} rows of the world ...")
    train_models(cfg.train, d)
    log(f"trained in {time.perf_counter() - t0:.0f}s -> {d}")
    return d


def train_models(spec: TrainSpec, out: Path) -> Path:
    """The quickstart's multi-task model and single-task baselines (``shopmtl.run``, the one
    training path) on ``spec``'s world, in a quickstart folder: model/, single_task/<task>/model,
    data/ (the world, its world.json)."""
    import torch

    from shopmtl.run import quickstart_config, run_experiment

    qc = quickstart_config(spec.rows, spec.seed)
    world = {**dict(spec.world), "rows": spec.rows, "seed": spec.seed}
    qc = dataclasses.replace(qc, data=dataclasses.replace(qc.data, synthetic=world),
                             train=dataclasses.replace(qc.train, epochs=spec.epochs))
    torch.manual_seed(spec.seed)
    run_experiment(qc, out, baselines=True, progress=False, log=lambda *a, **k: None)
    return out


def world_of(models: Path) -> WorldConfig:
    """The world the models were trained on (``MODELS/data/world.json``), for the shop."""
    return read_world(models / "data" / "world.json")


def build_policies(cfg: AbConfig, models: Path) -> dict[str, Policy]:
    weights = dict(cfg.weights)
    out: dict[str, Policy] = {}
    for i, arm in enumerate(cfg.arms):
        if arm.policy == "multi_task":
            out[arm.name] = model_policy(arm.name, models / "model", weights)
        elif arm.policy == "single_task":
            tasks = [t for t in weights if t != "price"]
            missing = [t for t in tasks if not (models / "single_task" / t / "model").is_dir()]
            if missing:
                raise ConfigError(f"arm '{arm.name}': no single-task model for {missing} in "
                                  f"{models / 'single_task'}")
            out[arm.name] = model_policy(
                arm.name, {t: models / "single_task" / t / "model" for t in tasks}, weights)
        elif arm.policy == "popularity":
            out[arm.name] = popularity_policy(arm.name, models / "data" / "train.parquet")
        else:
            out[arm.name] = RandomPolicy(arm.name, seed=cfg.seed * 1000 + i)
    return out


# -- the job ------------------------------------------------------------------------------------

def run_abtest(cfg: AbConfig, out_dir: str | Path, log: Any = print) -> dict[str, Any]:
    """The whole comparison; writes events.db, truth.json, ope.json, report.html, results.json
    and abtest.json (the summary) under ``out_dir``; returns the summary."""
    from shopmtl.abtest.analyze import analyze
    from shopmtl.abtest.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events_path = out / "events.db"
    if events_path.exists():
        raise ConfigError(f"{events_path} exists: give an empty --out folder")
    (out / "abtest.yaml").write_text(_dump(cfg))
    models = _models_dir(cfg, out, log)
    world = world_of(models)
    shop = Shop(world, slots=cfg.shop.slots, candidates=tuple(cfg.shop.candidates))
    policies = build_policies(cfg, models)

    t0 = time.perf_counter()
    true = truth(shop, policies, cfg.control, cfg.truth_requests, seed=10_000 + cfg.seed,
                 test_requests=cfg.test_requests)
    (out / "truth.json").write_text(json.dumps(json_safe(true), indent=1))
    log(f"truth: exact expectations of {len(policies)} policies over {cfg.truth_requests:,} "
        f"requests ({time.perf_counter() - t0:.0f}s)")

    exp = Experiment(cfg.name, tuple((a.name, a.share) for a in cfg.arms), cfg.control,
                     cfg.salt, cfg.pre_requests, cfg.test_requests, seed=cfg.seed)
    t0 = time.perf_counter()
    with EventStore(events_path) as store:
        counts = play(shop, exp, store, policies=policies)
    log(f"played {cfg.pre_requests:,} pre-period and {cfg.test_requests:,} test requests "
        f"({time.perf_counter() - t0:.0f}s) -> {events_path}")

    events = read_events(events_path)
    results = analyze(events, control=cfg.control, alpha=cfg.alpha)
    ope = None
    if cfg.ope is not None:
        t0 = time.perf_counter()
        ope = run_ope(shop, cfg.ope, policies, models, true, alpha=cfg.alpha)
        (out / "ope.json").write_text(json.dumps(json_safe(ope), indent=1))
        log(f"off-policy evaluation of '{cfg.ope.target}' ({time.perf_counter() - t0:.0f}s)")
    html, _ = write_report(results, out, truth=true, ope=ope)
    rows = compare(results, true, stops(results, events))
    summary = {"counts": counts, "comparison": rows, "coverage": coverage(rows),
               "ope": ope, "report": str(html)}
    (out / "abtest.json").write_text(json.dumps(json_safe(summary), indent=1))
    log(render(rows, summary["coverage"]))
    if ope is not None:
        log(render_ope(ope))
    return summary


def run_ope(shop: Shop, spec: OpeSpec, policies: dict[str, Policy], models: Path,
            true: dict, alpha: float) -> dict[str, Any]:
    """One log of ``spec.requests`` requests under the logging arm's Plackett-Luce sampling;
    IPS / SNIPS / DR of the target arm beside its online truth."""
    reqs = list(shop.requests(spec.requests, seed=20_000 + spec.seed))
    scores = ope_mod.logging_scores(reqs, policies[spec.logging])
    props = ope_mod.propensities(reqs, scores, spec.temperature)
    rng = np.random.default_rng([shop.cfg.seed, 9, spec.seed])
    log = ope_mod.log_events(shop, reqs, scores, props, spec.temperature, rng)
    target = ope_mod.target_rankings(reqs, policies[spec.target])
    reward = _reward_model(policies[spec.target], models)
    est = ope_mod.estimate(log, target, ope_mod.reward_model(reqs, target, reward), alpha=alpha)
    out: dict[str, Any] = {}
    for metric, by in est.items():
        out[metric] = {**by, "online": true[spec.target][metric]["all"]["value"]}
    return {spec.target: out}


def _reward_model(policy: Policy, models: Path) -> Any:
    """The target's own model when one model predicts both tasks; else the multi-task model."""
    from shopmtl.modeldir import load

    ms = getattr(policy, "models", {})
    if ms and len({id(m) for m in ms.values()}) == 1:
        return next(iter(ms.values()))
    return load(models / "model")


# -- the comparison table -----------------------------------------------------------------------

def stops(results: dict, events: Any) -> dict[tuple[str, str], dict[str, int]]:
    """Where the group-sequential test (the analysis' ``sequential`` section) first crossed its
    boundary, per (arm, metric) of scenario 'all': the look and the test requests (all arms)
    played by then: the sample size the decision took. Absent: it never crossed."""
    seq = results.get("sequential") or {}
    cuts = seq.get("cut_ts") or []
    ex = events.exposures
    test = np.asarray(ex["period"].to_pylist()) == "test"
    ts = np.sort(ex["ts"].to_numpy(zero_copy_only=False)[test])
    out = {}
    for arm, by in (seq.get("arms") or {}).items():
        for metric, v in by.items():
            look = v.get("gst_stop") if isinstance(v, dict) else None
            if look is not None and look < len(cuts):
                out[(arm, metric)] = {"look": int(look) + 1, "looks": len(cuts),
                                      "requests": int(np.searchsorted(ts, cuts[look], "right"))}
    return out


def compare(results: dict, true: dict, stopped: dict | None = None) -> list[dict[str, Any]]:
    """One row per (arm, metric, scenario): the true lift, the estimate with its interval, the
    decision, the sample size (and, for 'all', where the sequential test stopped), and whether
    the interval holds the truth."""
    stopped = stopped or {}
    rows = []
    for arm, res in results["arms"].items():
        for metric in METRICS + PER_USER:
            for scen, r in res["metrics"].get(metric, {}).items():
                t = true.get(arm, {}).get(metric, {}).get(scen)
                if t is None:
                    continue
                lo, hi = r["abs_ci"]
                rows.append({
                    "arm": arm, "metric": metric, "scenario": scen,
                    "true_abs_lift": t["abs_lift"], "true_rel_lift": t["rel_lift"],
                    "abs_lift": r["abs_lift"], "abs_ci": [lo, hi], "rel_lift": r["rel_lift"],
                    "rel_ci": r["rel_ci"], "decision": r["decision"],
                    "n_units": r["n_units"], "n_requests": r["n_requests"],
                    "covers": bool(lo <= t["abs_lift"] <= hi),
                    "sequential_stop": stopped.get((arm, metric)) if scen == "all" else None,
                })
    return rows


def coverage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    k = sum(r["covers"] for r in rows)
    return {"intervals": n, "cover_truth": k, "share": k / n if n else float("nan")}


def render(rows: list[dict[str, Any]], cov: dict[str, Any]) -> str:
    head = (f"{'arm':<14}{'metric':<16}{'scenario':<14}{'true lift':>11}{'est. lift':>11}"
            f"{'95% CI':>24}  {'decision':<16}{'units':>7}{'requests':>10}  truth in CI  "
            f"sequential stop")
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = f"[{r['abs_ci'][0]:+.4g}, {r['abs_ci'][1]:+.4g}]"
        lines.append(f"{r['arm']:<14}{r['metric']:<16}{r['scenario']:<14}"
                     f"{r['true_abs_lift']:>+11.4g}{r['abs_lift']:>+11.4g}{ci:>24}  "
                     f"{r['decision']:<16}{r['n_units']:>7}{r['n_requests']:>10}  "
                     f"{'yes' if r['covers'] else 'NO':<11}  {_stop(r['sequential_stop'])}")
    lines.append(f"{cov['cover_truth']} of {cov['intervals']} intervals hold the true lift "
                 f"({cov['share']:.0%})")
    return "\n".join(lines)


def _stop(s: dict | None) -> str:
    return "" if s is None else f"look {s['look']}/{s['looks']}, {s['requests']:,} requests"


def render_ope(ope: dict[str, Any]) -> str:
    lines = []
    for policy, by in ope.items():
        for metric, v in by.items():
            parts = [f"{e} {v[e]['estimate']:.4g} [{v[e]['ci'][0]:.4g}, {v[e]['ci'][1]:.4g}]"
                     for e in ope_mod.ESTIMATORS if e in v]
            lines.append(f"OPE {policy} {metric}: online truth {v['online']:.4g}; "
                         + "; ".join(parts))
    return "\n".join(lines)


def _dump(cfg: AbConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
