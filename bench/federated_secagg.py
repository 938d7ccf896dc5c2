"""SecAgg+ against plain FedAvg (docs/FEDERATED.md, secure aggregation): the same clients and
seed, FedAvg without row-aware averaging, with and without ``federated.secagg``; after each
round the largest difference between the two global models (the protocol's quantisation
error, then what training makes of it), the pooled test AUC, and the seconds per run.

    python bench/federated_secagg.py --rows 30000 --max-rounds 2

Writes federated_secagg.json into --out (and bench/results/).
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
TWO_SILOS = {"by": "scenario", "groups": {"feeds": ["home_feed", "search"],
                                          "ads": ["ad_slot", "product_page"]}}


def config(rows: int, rounds: int, secagg: bool) -> dict:
    """The tests' tiny world (``tests/federated/conftest.py``) at ``rows`` impressions."""
    return {
        "data": {"synthetic": {"rows": rows, "seed": 0, "n_users": 300, "n_items": 200}},
        "model": {"name": "shared_bottom",
                  "args": {"embed_dim": 8, "interaction": "dot", "bottom": [32], "tower": [16],
                           "dropout": 0.0, "input_norm": "none"}},
        "train": {"batch_size": 512, "lr": 0.005, "seed": 0, "threads": 1,
                  "alpha": {"click": 1.0, "conversion": 0.1, "ad_click": 0.1}},
        "federated": {"silos": TWO_SILOS, "strategy": "fedavg", "row_aware": False,
                      "rounds": rounds, "local_epochs": 0.25, "secagg": secagg},
    }


def run(out: Path, rows: int, rounds: int, secagg: bool) -> tuple[dict, dict, float]:
    """(the global shared arrays after the last round, the pooled AUC per round, seconds)."""
    import torch

    from shopmtl.federated.config import federated_from_dict
    from shopmtl.federated.server import prepare, simulate
    from shopmtl.federated.wire import pack

    torch.set_num_threads(1)
    data, fed, _ = prepare(federated_from_dict(config(rows, rounds, secagg)), out,
                           log=lambda s: None)
    t0 = time.perf_counter()
    model, _, pooled, _ = simulate(fed, data, log=lambda s: None)
    return pack(model, fed.layout(model)[0]), pooled, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--max-rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/federated_secagg"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    rows = []
    for rounds in range(1, args.max_rounds + 1):
        finals, aucs, secs = {}, {}, {}
        for secagg in (False, True):
            out = args.out / f"r{rounds}_{'secagg' if secagg else 'plain'}"
            if out.exists():
                shutil.rmtree(out)
            if (args.out / "data").is_dir():  # the world, generated once
                shutil.copytree(args.out / "data", out / "data")
            arrays, pooled, secs[secagg] = run(out, args.rows, rounds, secagg)
            if not (args.out / "data").is_dir():
                shutil.copytree(out / "data", args.out / "data")
            finals[secagg] = arrays
            aucs[secagg] = pooled[rounds]["auc"]["click"]["all"]
        diff = max(float(np.abs(finals[False][k] - finals[True][k]).max())
                   for k in finals[False])
        rows.append({"rounds": rounds, "max_abs_diff": diff, "click_auc_plain": aucs[False],
                     "click_auc_secagg": aucs[True], "seconds_plain": secs[False],
                     "seconds_secagg": secs[True]})
    print("| rounds | max abs diff | pooled click AUC plain | SecAgg+ | seconds plain | SecAgg+ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rounds']} | {r['max_abs_diff']:.2e} | {r['click_auc_plain']:.4f} | "
              f"{r['click_auc_secagg']:.4f} | {r['seconds_plain']:.1f} | "
              f"{r['seconds_secagg']:.1f} |")
    doc = {"rows": args.rows, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    for dest in (args.out / "federated_secagg.json", ROOT / "bench/results/federated_secagg.json"):
        dest.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
