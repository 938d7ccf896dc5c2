"""Off-policy evaluation over repeated logs: bias, RMSE and interval coverage of IPS, SNIPS and
DR (``shopmtl.abtest.ope``) against the target policy's simulated online truth.

The models are those of ``shopmtl abtest run examples/abtest.yaml --out runs/abtest`` (its
``models/`` folder: the quickstart's multi-task model and single-task baselines on the default
world; any quickstart folder works). The logging policy is the single-task arm (pCTR x pCVR x
price of the single-task models), Plackett-Luce sampled at each temperature; the target is the
multi-task arm; DR's reward model is the multi-task model. The requests are fixed (drawn once);
each log redraws the logging rankings and the users' responses, so the spread over logs is the
estimators' own. The truth is the target's exact expected value on the same requests
(``abtest.shop``: no response noise).

    .venv/bin/python bench/abtest_ope.py --models runs/abtest/models \
        --out bench/results/abtest_ope.json

Prints the table docs/ABTEST.md holds and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_all import cpu_model  # noqa: E402  (the machine line every bench writes)


def measure(models: Path, requests: int, logs: int, temperatures: list[float], seed: int
            ) -> dict:
    import torch

    from shopmtl.abtest import ope
    from shopmtl.abtest.policy import model_policy
    from shopmtl.abtest.run import world_of
    from shopmtl.abtest.shop import Shop
    from shopmtl.modeldir import load

    torch.set_num_threads(1)
    weights = {"click": 1.0, "conversion": 1.0, "price": 1.0}
    st = models / "single_task"
    logging = model_policy("single_task", {"click": st / "click" / "model",
                                           "conversion": st / "conversion" / "model"}, weights)
    target = model_policy("multi_task", models / "model", weights)
    shop = Shop(world_of(models))
    reqs = list(shop.requests(requests, seed=30_000 + seed))
    scores = ope.logging_scores(reqs, logging)
    tgt = ope.target_rankings(reqs, target)
    rewards = ope.reward_model(reqs, tgt, load(models / "model"))
    truth = ope.online_value(shop, reqs, tgt)
    out: dict = {"truth": truth, "requests": requests, "logs": logs, "by_temperature": {}}
    for temp in temperatures:
        t0 = time.perf_counter()
        props = ope.propensities(reqs, scores, temp)
        t_props = time.perf_counter() - t0
        rng = np.random.default_rng([seed, int(temp * 1000)])
        est: dict[str, dict[str, list[float]]] = {m: {e: [] for e in ope.ESTIMATORS}
                                                  for m in ope.OPE_METRICS}
        cover: dict[str, dict[str, int]] = {m: dict.fromkeys(ope.ESTIMATORS, 0)
                                            for m in ope.OPE_METRICS}
        width: dict[str, dict[str, list[float]]] = {m: {e: [] for e in ope.ESTIMATORS}
                                                    for m in ope.OPE_METRICS}
        logged = {"ctr": [], "gmv": []}
        for _ in range(logs):
            log = ope.log_events(shop, reqs, scores, props, temp, rng)
            clicks = sum(c.sum() for c in log.clicks)
            logged["ctr"].append(clicks / sum(len(s) for s in log.shown))
            logged["gmv"].append(sum(g.sum() for g in log.gmv) / len(reqs))
            e = ope.estimate(log, tgt, rewards)
            for m in ope.OPE_METRICS:
                for name, v in e[m].items():
                    est[m][name].append(v["estimate"])
                    lo, hi = v["ci"]
                    cover[m][name] += lo <= truth[m] <= hi
                    width[m][name].append(hi - lo)
        res: dict = {"propensity_seconds": t_props,
                     "logging_value": {m: float(np.mean(v)) for m, v in logged.items()}}
        for m in ope.OPE_METRICS:
            res[m] = {}
            for name, v in est[m].items():
                a = np.asarray(v)
                res[m][name] = {"mean": float(a.mean()), "bias": float(a.mean() - truth[m]),
                                "bias_se": float(a.std(ddof=1) / np.sqrt(len(a))),
                                "rmse": float(np.sqrt(((a - truth[m]) ** 2).mean())),
                                "coverage": cover[m][name] / logs,
                                "mean_ci_width": float(np.mean(width[m][name]))}
        out["by_temperature"][str(temp)] = res
    return out


def render(r: dict) -> str:
    lines = [f"target: multi_task; truth on the {r['requests']} requests: ctr "
             f"{r['truth']['ctr']:.5f}, gmv {r['truth']['gmv']:.4f}; {r['logs']} logs each",
             "", "| temperature | metric | logging policy's value | estimator | mean | bias (se) "
             "| RMSE | 95% CI coverage | mean CI width |", "|---|---|---|---|---|---|---|---|---|"]
    for temp, res in r["by_temperature"].items():
        for m in ("ctr", "gmv"):
            for name, v in res[m].items():
                f = "{:.5f}" if m == "ctr" else "{:.3f}"
                lines.append(
                    f"| {temp} | {m} | {f.format(res['logging_value'][m])} | {name} | "
                    f"{f.format(v['mean'])} | {f.format(v['bias'])} ({f.format(v['bias_se'])}) "
                    f"| {f.format(v['rmse'])} | {v['coverage']:.2f} | "
                    f"{f.format(v['mean_ci_width'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / "runs" / "abtest" / "models")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--logs", type=int, default=50)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "abtest_ope.json")
    args = ap.parse_args()
    if not (args.models / "model").is_dir():
        sys.exit(f"no models at {args.models}: run 'shopmtl abtest run examples/abtest.yaml "
                 "--out runs/abtest' first (or give --models a quickstart folder)")
    t0 = time.perf_counter()
    r = measure(args.models, args.requests, args.logs, args.temperatures, args.seed)
    r["seconds"] = time.perf_counter() - t0
    r["cpu"] = cpu_model()
    r["command"] = " ".join(["python bench/abtest_ope.py", *sys.argv[1:]])
    print(render(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1))
    print(f"wrote {args.out} ({r['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
