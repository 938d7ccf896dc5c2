"""What closes (and what does not close) the gap between FedProx's global model and
centralised training on the default world (docs/FEDERATED.md, must-show 1): one seed, the
"global" variant (every part shared), each variant a set of ``--set`` overrides of
examples/federated.yaml, against centralised training of the same total epochs.

    python bench/federated_tuning.py --out runs/federated_tuning

Writes federated_tuning.json and federated_tuning.md into --out (and bench/results/).
About 40 s a variant on 2 cores. Besides the variants: two controls of the loop (one silo
holding every row must reproduce centralised training) and centralised training at the
batch sizes federated averaging stands in for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARE = "federated.share=[dense,items,towers,users]"
# name -> overrides; every variant keeps 4 silos by scenario and 4 total epochs
VARIANTS: dict[str, list[str]] = {
    "fedprox (the example)": [],
    "keep_optimizer": ["federated.keep_optimizer=true"],
    "server_step 2": ["federated.server_step=2"],
    "server_step 4": ["federated.server_step=4"],
    "keep_optimizer + server_step 2": ["federated.keep_optimizer=true",
                                       "federated.server_step=2"],
    "keep_optimizer + server_momentum 0.5": ["federated.keep_optimizer=true",
                                             "federated.server_momentum=0.5"],
    "keep_optimizer + local batch 256": ["federated.keep_optimizer=true",
                                         "train.batch_size=256"],
    "keep_optimizer + batch 256, 32 rounds x 0.125 epochs": [
        "federated.keep_optimizer=true", "train.batch_size=256", "federated.rounds=32",
        "federated.local_epochs=0.125"],
    "IID control: 2 user-hash silos, keep_optimizer": [
        "federated.silos={by: user_hash, count: 2}", "federated.keep_optimizer=true"],
    "IID control: 4 user-hash silos, keep_optimizer": [
        "federated.silos={by: user_hash, count: 4}", "federated.keep_optimizer=true"],
    # the loop's control: one silo holding every row, plain FedAvg (no proximal term): the
    # rounds then are centralised training cut into pieces and must land on its numbers
    "control: 1 silo (every row), fedavg, keep_optimizer": [
        "federated.silos={by: user_hash, count: 1}", "federated.strategy=fedavg",
        "federated.mu=0", "federated.keep_optimizer=true"],
    "control: 1 silo (every row), fedprox mu 1e-4, keep_optimizer": [
        "federated.silos={by: user_hash, count: 1}", "federated.keep_optimizer=true"],
    # twice the epochs (and a slower decay) for both: does federation catch up given time?
    "keep_optimizer, lr_decay 0.7, 16 rounds (8 epochs)": [
        "federated.keep_optimizer=true", "train.lr_decay=0.7", "federated.rounds=16"],
}
# centralised training at other batch sizes (same 4 epochs): the mean of K clients' steps
# is one step of a K times larger batch, so these bound what averaging 4 silos can reach
CENTRAL: dict[str, list[str]] = {
    "centralised, batch 4096 (4 x 1024)": ["train.batch_size=4096"],
    "centralised, batch 4096, lr x 4": ["train.batch_size=4096", "train.lr=0.008"],
    "centralised, batch 256": ["train.batch_size=256"],
    "centralised, lr_decay 0.7, 2 epochs": ["train.lr_decay=0.7", "federated.rounds=4"],
    "centralised, lr_decay 0.7, 8 epochs": ["train.lr_decay=0.7", "federated.rounds=16"],
}


def run(config: Path, seed: int, out: Path, only: list[str]) -> dict:
    import torch

    from shopmtl.federated.baselines import centralised
    from shopmtl.federated.config import load_federated
    from shopmtl.federated.server import prepare, simulate

    torch.set_num_threads(1)
    res: dict = {"config": str(config), "seed": seed, "variants": {}}
    base = [SHARE, f"train.seed={seed}", f"federated.seed={seed}"]
    work = out / "work"
    for i, (name, sets) in enumerate(VARIANTS.items()):
        if only and name not in only:
            continue
        fr = load_federated(config, [*base, *sets])
        if (work / "silos").exists():
            shutil.rmtree(work / "silos")
        data, fed, info = prepare(fr, work, log=lambda s: None)
        if "centralised" not in res:  # the control: the example's batch size and epochs
            t0 = time.perf_counter()
            c = centralised(fed, data, info["_silos"],
                            fr.federated.rounds * fr.federated.local_epochs, seed)
            res["centralised"] = {"pooled": {t: v["all"] for t, v in c["pooled"].items()},
                                  "seconds": time.perf_counter() - t0}
            print(f"centralised: {res['centralised']['pooled']}", flush=True)
            for cname, csets in CENTRAL.items():
                if only and cname not in only:
                    continue
                cfr = load_federated(config, [*base, *csets])
                shutil.rmtree(work / "central", ignore_errors=True)
                cdata, cfed, cinfo = prepare(cfr, work / "central", log=lambda s: None)
                t0 = time.perf_counter()
                c = centralised(cfed, cdata, cinfo["_silos"],
                                cfr.federated.rounds * cfr.federated.local_epochs, seed)
                res["variants"][cname] = {
                    "overrides": csets, "pooled": {t: v["all"] for t, v in c["pooled"].items()},
                    "seconds": time.perf_counter() - t0}
                print(f"{cname}: {res['variants'][cname]['pooled']}", flush=True)
        t0 = time.perf_counter()
        _, _rec, pooled, _ = simulate(fed, data, log=lambda s: None)
        rounds = sorted(pooled)
        res["variants"][name] = {
            "overrides": sets,
            "pooled": {t: v["all"] for t, v in pooled[rounds[-1]]["auc"].items()},
            "by_round": {r: {t: v["all"] for t, v in pooled[r]["auc"].items()}
                         for r in rounds},
            "seconds": time.perf_counter() - t0}
        print(f"[{i}] {name}: {res['variants'][name]['pooled']}", flush=True)
    return res


def table(res: dict, command: str) -> str:
    c = res["centralised"]["pooled"]
    tasks = list(c)
    lines = [f"Regenerate: `{command}` (seed {res['seed']})", "",
             "| run | " + " | ".join(f"{t} (gap)" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks),
             "| centralised | " + " | ".join(f"{c[t]:.4f}" for t in tasks) + " |"]
    for name, v in res["variants"].items():
        cells = [f"{v['pooled'][t]:.4f} ({v['pooled'][t] - c[t]:+.4f})" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "federated.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/federated_tuning"))
    ap.add_argument("--only", action="append", default=[], help="a variant's name (repeat)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run(a.config, a.seed, a.out, a.only)
    md = table(res, f"python bench/federated_tuning.py --seed {a.seed}")
    print(md)
    for d in (a.out, ROOT / "bench" / "results"):
        (d / "federated_tuning.json").write_text(json.dumps(res, indent=1))
        (d / "federated_tuning.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
