"""Would torch-rechub gain as much from shopmtl's large-batch learning rate?

``bench/run_all.py`` trains shopmtl at batch 2048 with its square-root rule (lr 1e-3 at batch
256 -> 0.00283 at 2048) and the peers at the matched lr 1e-3. This runs torch-rechub, the best
peer in most batch-2048 cells, at that same scaled rate, through its own trainer and predict
path as in the benchmark (same splits, same harness, peers venv), and prints its test AUC next
to the benchmark's torch-rechub (lr 1e-3) and shopmtl figures from ``bench/results/peers.json``.

    .venv/bin/python -m bench.peers.scaled_lr [--seeds 3] [--out bench/results/scaled_lr.json]

About 4 minutes on 2 cores (7 cells x 3 seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.peers import common as C
from bench.peers.prepare import prepare
from bench.run_all import PEERS_PY, RESULTS, run_child

CELLS = [("census", m) for m in ("shared_bottom", "mmoe", "ple")] + [
    ("movielens", m) for m in ("shared_bottom", "mmoe", "ple", "esmm")]


def _mean_auc(runs: list[dict[str, Any]]) -> list[float]:
    tasks = list(runs[0]["auc"])
    return [statistics.mean(r["auc"][t] for r in runs) for t in tasks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS, help="the benchmark's peers.json")
    ap.add_argument("--out", type=Path, default=Path("bench/results/scaled_lr.json"))
    args = ap.parse_args(argv)
    from shopmtl.config import TrainConfig

    # the rate shopmtl's runs train at (its own rule, not a copy of the formula)
    lr = TrainConfig(lr=C.LR, batch_size=2048, lr_scaling=C.SHOPMTL_LR_SCALING,
                     lr_base_batch=C.LR_BASE_BATCH).batch_lr()
    bench = json.loads(args.results.read_text())["runs"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shopmtl-scaled-lr-") as tmp:
        work = Path(tmp)
        for ds in sorted({d for d, _ in CELLS}):
            prepare(ds, work)
        for ds, model in CELLS:
            runs = []
            for seed in range(args.seeds):
                tag = f"rechub-{ds}-{model}-s{seed}"
                spec = {"library": "torch-rechub", "variant": "matched", "model": model,
                        "dataset": ds, "batch": 2048, "seed": seed,
                        "epochs": C.DATASETS[ds]["epochs"], "lr": lr,
                        "data_dir": str(work / ds), "out": str(work / f"{tag}.json")}
                (work / f"{tag}.spec.json").write_text(json.dumps(spec))
                rc, _, _ = run_child([str(PEERS_PY), "-m", "bench.peers.run_rechub",
                                      str(work / f"{tag}.spec.json")], work / f"{tag}.log", 600)
                if rc != 0:
                    raise SystemExit(f"{tag} failed:\n{(work / f'{tag}.log').read_text()[-2000:]}")
                runs.append(json.loads((work / f"{tag}.json").read_text()))

            def of(lib: str, variant: str, ds: str = ds, model: str = model
                   ) -> list[dict[str, Any]]:
                return [r for r in bench if r.get("library") == lib and r.get("variant") == variant
                        and r["dataset"] == ds and r["model"] == model and r["batch"] == 2048
                        and "auc" in r]

            row = {"dataset": ds, "model": model, "lr": lr,
                   "rechub_scaled": _mean_auc(runs),
                   "rechub_flat": _mean_auc(of("torch-rechub", "matched")),
                   "shopmtl": _mean_auc(of("shopmtl", "matched"))}
            rows.append(row)
            print(f"{ds:9s} {model:13s} torch-rechub lr {C.LR}: "
                  + " / ".join(f"{v:.4f}" for v in row["rechub_flat"])
                  + f" | torch-rechub lr {lr:.5f}: "
                  + " / ".join(f"{v:.4f}" for v in row["rechub_scaled"])
                  + " | shopmtl (scaled): " + " / ".join(f"{v:.4f}" for v in row["shopmtl"]),
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "lr": lr, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
