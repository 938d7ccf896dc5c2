"""Must-show 3 of docs/FEDERATED.md: the utility-privacy table. Pooled test AUC per task of
the global model trained with client-level DP (Flower's fixed clipping + Gaussian noise,
``federated.dp``) at epsilon 1, 4 and 8 (delta 1e-5, RDP accountant), against the same
federation without DP.

The world is the example's (300k impressions), split into ``--silos`` IID silos by a hash of
the user (user rows kept local), every client in every round, plain FedAvg (a uniform mean:
what the accountant assumes). Client-level DP's noise on the mean is z * clip / clients, so
it needs many clients; with the example's 4 scenario silos (``--with-scenarios`` adds that
row) it drowns the model.

    python bench/federated_dp.py --seeds 3 --with-scenarios --out runs/federated_dp

Writes federated_dp.json and federated_dp.md into --out (and bench/results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = (8.0, 4.0, 1.0)


def runs(silos: int, clip: float, mode: str, scenarios: bool) -> dict[str, list[str]]:
    """Run name -> its overrides."""
    iid = ["federated.silos.by=user_hash", f"federated.silos.count={silos}"]
    out = {"no DP": [*iid, "federated.dp.mode=none"]}
    for eps in EPSILONS:
        out[f"DP epsilon {eps:g}"] = [*iid, f"federated.dp.mode={mode}",
                                      f"federated.dp.clip={clip}", f"federated.dp.epsilon={eps}"]
    if scenarios:  # the example's 4 silos, one per scenario: what 4 clients' DP costs
        out["DP epsilon 8, 4 scenario silos"] = [
            "federated.silos.by=scenario", f"federated.dp.mode={mode}",
            f"federated.dp.clip={clip}", "federated.dp.epsilon=8"]
    return out


def run(config: Path, out: Path, overrides: list[str], seed: int, plan: dict[str, list[str]]
        ) -> dict:
    """One seed of every run in ``plan``: name -> its pooled AUC, epsilon, noise, seconds."""
    import torch

    from shopmtl.federated.config import load_federated
    from shopmtl.federated.server import prepare, simulate

    torch.set_num_threads(1)
    res: dict = {}
    for name, sets in plan.items():
        # 4 rounds x 1 local epoch: the example's 4 epochs in half its releases (the noise a
        # round needs for a given epsilon grows about as the square root of the rounds)
        fr = load_federated(config, ["federated.strategy=fedavg", "federated.row_aware=false",
                                     "federated.rounds=4", "federated.local_epochs=1.0",
                                     *overrides, *sets, f"train.seed={seed}",
                                     f"federated.seed={seed}"])
        work = out / "work"
        if (work / "silos").exists():
            shutil.rmtree(work / "silos")
        data, fed, _ = prepare(fr, work, log=lambda s: None)
        _, rec, pooled, secs = simulate(fed, data, log=lambda s: None)
        last = max(pooled)
        spent = rec.privacy.get(last)
        res[name] = {
            "pooled": {t: v["all"] for t, v in pooled[last]["auc"].items()},
            "per_round": {r: {t: v["all"] for t, v in p["auc"].items()}
                          for r, p in sorted(pooled.items())},
            "clients": len(fed.silo_names), "rounds": fr.federated.rounds,
            "epsilon": spent["epsilon"] if spent else None,
            "noise_multiplier": rec.dp.get("noise_multiplier"),
            "noise_std": rec.dp.get("noise_std"), "seconds": secs}
        print(name, res[name]["pooled"], res[name]["epsilon"], f"{secs:.0f}s", flush=True)
    return res


def mean_over_seeds(per_seed: dict[int, dict]) -> dict:
    """Each run's pooled AUC averaged over the seeds (with the range), epsilon the largest."""
    first = next(iter(per_seed.values()))
    out = {}
    for name, r in first.items():
        runs_ = [per_seed[s][name] for s in per_seed]
        eps = [x["epsilon"] for x in runs_ if x["epsilon"] is not None]
        out[name] = {**r, "epsilon": max(eps) if eps else None,
                     "pooled": {t: sum(x["pooled"][t] for x in runs_) / len(runs_)
                                for t in r["pooled"]},
                     "range": {t: (min(x["pooled"][t] for x in runs_),
                                   max(x["pooled"][t] for x in runs_)) for t in r["pooled"]}}
    return out


def table(res: dict, command: str, seeds: int) -> str:
    tasks = list(res["no DP"]["pooled"])
    lines = [f"Regenerate: `{command}`", "",
             f"Pooled test AUC of the global model, mean of {seeds} seed(s) (delta to no DP; "
             "click's range over the seeds); epsilon: spent after the last round (delta "
             "1e-5; the largest over the seeds); z: the noise multiplier; std: the noise on "
             "each coordinate of the mean update.", "",
             "| run | clients | epsilon | z | std | " + " | ".join(tasks) + " |",
             "|---|---|---|---|---|" + "---|" * len(tasks)]
    base = res["no DP"]["pooled"]
    for name, r in res.items():
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        std = "-" if r["noise_std"] is None else f"{r['noise_std']:.2g}"
        cells = [f"{r['pooled'][t]:.4f} ({r['pooled'][t] - base[t]:+.4f})" for t in tasks]
        lo, hi = r["range"][tasks[0]]
        cells[0] += f" [{lo:.3f}, {hi:.3f}]"
        lines.append(f"| {name} | {r['clients']} | {eps} | {z} | {std} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "federated.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/federated_dp"))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0 .. n-1")
    ap.add_argument("--silos", type=int, default=50)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--mode", choices=("client", "server"), default="client")
    ap.add_argument("--with-scenarios", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    plan = runs(a.silos, a.clip, a.mode, a.with_scenarios)
    per_seed = {s: run(a.config, a.out, a.sets, s, plan) for s in range(a.seeds)}
    res = mean_over_seeds(per_seed)
    command = "python bench/federated_dp.py " + " ".join(
        [f"--seeds {a.seeds}", f"--silos {a.silos}", f"--clip {a.clip:g}", f"--mode {a.mode}",
         *(["--with-scenarios"] if a.with_scenarios else []),
         *(f"--set {s}" for s in a.sets)])
    md = table(res, command, a.seeds)
    print(md)
    for d in (a.out, ROOT / "bench" / "results"):
        (d / "federated_dp.json").write_text(json.dumps({"mean": res, "seeds": per_seed},
                                                        indent=1))
        (d / "federated_dp.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
