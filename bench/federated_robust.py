"""Must-show 2 of docs/FEDERATED.md: 1 of 5 clients sends sign-flipped updates scaled x10.
Plain FedAvg should lose >= 0.05 AUC against its clean run (the attack works); trimmed mean
and Krum should stay within 0.01 of it. Five IID silos (a hash of the user), user rows kept
local; AUC on the pooled test split (the global model) and the mean over the four honest
silos of their own test AUC.

    python bench/federated_robust.py --out runs/federated_robust

Writes federated_robust.json and federated_robust.md into --out (and bench/results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ATTACKER = "users_4"
RUNS = {  # name -> (strategy, attacked)
    "fedavg clean": ("fedavg", False),
    "fedavg attacked": ("fedavg", True),
    "trimmed_mean attacked": ("trimmed_mean", True),
    "krum attacked": ("krum", True),
    "median attacked": ("median", True),
    "multikrum attacked": ("multikrum", True),
}


def run(config: Path, out: Path, overrides: list[str], seed: int) -> dict:
    import torch

    from shopmtl.federated.config import load_federated
    from shopmtl.federated.server import prepare, simulate

    torch.set_num_threads(1)
    res: dict = {}
    for name, (strategy, attacked) in RUNS.items():
        sets = [*overrides, "federated.silos.by=user_hash", "federated.silos.count=5",
                f"federated.strategy={strategy}", f"train.seed={seed}", f"federated.seed={seed}",
                f"federated.attack.silos={[ATTACKER] if attacked else []}"]
        fr = load_federated(config, sets)
        work = out / "work"
        if (work / "silos").exists():
            shutil.rmtree(work / "silos")
        data, fed, _ = prepare(fr, work, log=lambda s: None)
        _, rec, pooled, secs = simulate(fed, data, log=lambda s: None)
        last = max(rec.eval)
        honest = {s: m["auc"] for s, m in rec.eval[last].items() if s != ATTACKER}
        res[name] = {
            "pooled": {t: v["all"] for t, v in pooled[last]["auc"].items()},
            "honest_silos": {t: float(np.mean([m[t]["all"] for m in honest.values()]))
                             for t in fed.schema.task_names},
            "seconds": secs}
        print(name, res[name]["pooled"], flush=True)
    return res


def table(res: dict, command: str) -> str:
    clean = res["fedavg clean"]
    tasks = list(clean["pooled"])
    lines = [f"Regenerate: `{command}`", "",
             "AUC (delta to the clean FedAvg run); pooled: the global model on the pooled test "
             "split; honest: the mean of the 4 honest silos' own test AUC.", "",
             "| run | " + " | ".join(f"pooled {t}" for t in tasks) + " | "
             + " | ".join(f"honest {t}" for t in tasks) + " |",
             "|---|" + "---|" * (2 * len(tasks))]
    for name, r in res.items():
        cells = [f"{r[k][t]:.4f} ({r[k][t] - clean[k][t]:+.4f})"
                 for k in ("pooled", "honest_silos") for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "federated.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/federated_robust"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run(a.config, a.out, a.sets, a.seed)
    command = "python bench/federated_robust.py " + " ".join(
        [f"--seed {a.seed}", *(f"--set {s}" for s in a.sets)])
    md = table(res, command)
    print(md)
    for d in (a.out, ROOT / "bench" / "results"):
        (d / "federated_robust.json").write_text(json.dumps(res, indent=1))
        (d / "federated_robust.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
