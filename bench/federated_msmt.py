"""Must-show 1 of docs/FEDERATED.md: the default world split into one silo per scenario.
FedProx's global model against centralised training on the pooled rows (same total epochs)
on every task's pooled test AUC, and each silo's federated model against the silo's
local-only model on the silo's own test rows; mean of ``--seeds`` training seeds.

Variants: ``global`` shares every part (user rows too: a global model comparable with the
centralised one), ``private`` keeps the user rows in their silo (the default; the server's
pooled model then scores every user as unknown, so only the per-silo rows compare).

    python bench/federated_msmt.py --seeds 3 --out runs/federated_msmt

Writes federated_msmt.json and federated_msmt.md into --out (and bench/results/). Another
world: ``--config examples/federated_movielens.yaml`` (a real dataset split by genre group)
writes federated_msmt_<config stem>.json / .md instead, beside the default world's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "federated.yaml"
# the tables' column titles (what the run's federated.strategy is called in the papers)
STRATEGY_NAMES = {"fedprox": "FedProx", "fedavg": "FedAvg", "fedadam": "FedAdam",
                  "fedyogi": "FedYogi"}
VARIANTS = {"global": "[dense,items,towers,users]", "private": "[dense,items,towers]"}


def run(config: Path, seeds: int, out: Path, overrides: list[str]) -> dict:
    import torch

    from shopmtl.federated.baselines import centralised, local_only
    from shopmtl.federated.config import load_federated
    from shopmtl.federated.server import prepare, simulate

    torch.set_num_threads(1)
    res: dict = {"config": str(config), "overrides": overrides, "seeds": {}}
    for seed in range(seeds):
        per: dict = {}
        for variant, share in VARIANTS.items():
            sets = [*overrides, f"train.seed={seed}", f"federated.seed={seed}",
                    f"federated.share={share}"]
            fr = load_federated(config, sets)
            work = out / "work"
            if (work / "silos").exists():
                shutil.rmtree(work / "silos")
            data, fed, info = prepare(fr, work, log=lambda s: None)
            silos = info["_silos"]
            epochs = fr.federated.rounds * fr.federated.local_epochs
            if variant == "global":  # the controls do not depend on what is shared
                t0 = time.perf_counter()
                per["centralised"] = centralised(fed, data, silos, epochs, seed)
                per["local_only"] = local_only(fed, data, silos, epochs, seed)
                per["controls_seconds"] = time.perf_counter() - t0
            _, rec, pooled, secs = simulate(fed, data, log=lambda s: None)
            last = max(rec.eval)
            per[variant] = {"pooled": pooled[last]["auc"],
                            "silos": {s: m["auc"] for s, m in rec.eval[last].items()},
                            "seconds": secs}
            print(f"seed {seed} {variant}: pooled " + ", ".join(
                f"{t} {v['all']:.4f}" for t, v in per[variant]["pooled"].items()), flush=True)
        res["seeds"][seed] = per
    res["silos"] = [s.name for s in silos]
    res["strategy"] = fr.federated.strategy
    res["server_step"] = fr.federated.server_step
    res["cyclic"] = fr.federated.cyclic
    res["tasks"] = list(fed.schema.task_names)
    return res


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _f(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")


def table(res: dict, command: str) -> str:
    seeds = list(res["seeds"].values())
    name = STRATEGY_NAMES.get(res.get("strategy", "fedprox"), res.get("strategy"))
    if res.get("cyclic"):
        name += " cyclic"
    lines = [f"Regenerate: `{command}`", "",
             "Pooled test AUC per task (mean over seeds):", "",
             f"| task | centralised | {name} global | gap | {name} private (users unknown) |",
             "|---|---|---|---|---|"]
    for t in res["tasks"]:
        c = _mean([s["centralised"]["pooled"].get(t, {}).get("all") for s in seeds])
        g = _mean([s["global"]["pooled"].get(t, {}).get("all") for s in seeds])
        p = _mean([s["private"]["pooled"].get(t, {}).get("all") for s in seeds])
        gap = None if g is None or c is None else g - c
        lines.append(f"| {t} | {_f(c)} | {_f(g)} | {_f(gap, True)} | {_f(p)} |")
    lines += ["", "Each silo's own test rows, AUC per task (mean over seeds):", "",
              f"| silo | task | local only | {name} global | {name} private | centralised |",
              "|---|---|---|---|---|---|"]
    for silo in res["silos"]:
        for t in res["tasks"]:
            lo = _mean([s["local_only"][silo].get(t, {}).get("all") for s in seeds])
            if lo is None:
                continue
            g = _mean([s["global"]["silos"][silo].get(t, {}).get("all") for s in seeds])
            p = _mean([s["private"]["silos"][silo].get(t, {}).get("all") for s in seeds])
            c = _mean([s["centralised"]["silos"][silo].get(t, {}).get("all") for s in seeds])
            lines.append(f"| {silo} | {t} | {_f(lo)} | {_f(g)} | {_f(p)} | {_f(c)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/federated_msmt"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--name", default=None, help="the results' file stem (default: "
                    "federated_msmt, or federated_msmt_<config stem> for another config)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run(a.config, a.seeds, a.out, a.sets)
    default = a.config.resolve() == DEFAULT_CONFIG
    command = "python bench/federated_msmt.py " + " ".join(
        [*([] if default else [f"--config {_shown(a.config)}"]), f"--seeds {a.seeds}",
         *(f"--set {s}" for s in a.sets), *([f"--name {a.name}"] if a.name else [])])
    md = table(res, command)
    print(md)
    # the default world keeps its file names; another config's results sit beside them
    stem = a.name or ("federated_msmt" if default else f"federated_msmt_{a.config.stem}")
    for d in (a.out, ROOT / "bench" / "results"):
        (d / f"{stem}.json").write_text(json.dumps(res, indent=1))
        (d / f"{stem}.md").write_text(md)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (the command in the docs)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
