"""Cold-start experiment: click AUC on new items (``is_new_item == 1``), ID-only vs content.

One synthetic world (``examples/cold_start.yaml``) is generated once; each variant (which item
content features the schema has) is encoded once and trained with ``--seeds`` training seeds
(``train.seed``, ``train.seed + 1``, ...). Writes ``cold_start.json`` and ``cold_start.md`` (the
table and the command) into ``--out``.

    python bench/cold_start.py --config examples/cold_start.yaml --seeds 3 --out runs/cold_start
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS: dict[str, tuple[str, ...]] = {
    "id_only": (),
    "text": ("title",),
    "image": ("image",),
    "text_image": ("title", "image"),
}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def run(config: Path, seeds: int, out: Path, variants: list[str],
        overrides: list[str] | None = None) -> dict:
    from shopmtl.config import load_config
    from shopmtl.data.pipeline import prepare_data, resolve_synthetic
    from shopmtl.jsonsafe import json_safe
    from shopmtl.train.evaluate import metrics_by_scenario, metrics_by_slice, predict_table
    from shopmtl.train.trainer import train_model

    base = load_config(config, overrides or [])
    results: dict[str, dict] = {}
    world = None
    for name in variants:
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data,
                                                                 content=VARIANTS[name]))
        cfg, world = resolve_synthetic(cfg, out / "data")  # one world for every variant
        t0 = time.perf_counter()
        data = prepare_data(cfg.data, cfg.data.schema.build(), out / name)
        prep = time.perf_counter() - t0
        runs = []
        for k in range(seeds):
            seed = base.train.seed + k
            rcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            t1 = time.perf_counter()
            model, state = train_model(rcfg, data, out / name / f"seed{seed}", progress=False,
                                       tensorboard=False)
            assert data.test is not None
            preds = predict_table(model, data.test)
            test = metrics_by_scenario(data.schema, data.test, preds)
            cold = metrics_by_slice(data.schema, data.test, preds)["is_new_item"]
            runs.append({
                "seed": seed,
                "cold_click_auc": cold["click"]["all"]["auc"],
                "cold_click_oracle_auc": cold["click"]["all"]["oracle_auc"],
                "cold_rows": cold["click"]["all"]["n"],
                "click_auc": test["click"]["all"]["auc"],
                "best_epoch": state.best_epoch,
                "seconds": time.perf_counter() - t1,
            })
            print(f"{name} seed {seed}: cold-start click AUC {runs[-1]['cold_click_auc']:.4f}, "
                  f"all rows {runs[-1]['click_auc']:.4f} ({runs[-1]['seconds']:.0f}s)",
                  flush=True)
        results[name] = {"content": list(VARIANTS[name]), "runs": runs, "prepare_seconds": prep}
        for key in ("cold_click_auc", "click_auc"):
            m, s = _mean_std([r[key] for r in runs])
            results[name][key] = {"mean": m, "std": s}
    summary = {"config": str(config), "overrides": overrides or [], "seeds": seeds,
               "world": world, "variants": results}
    if "id_only" in results:
        ref = [r["cold_click_auc"] for r in results["id_only"]["runs"]]
        for res in results.values():
            d = [r["cold_click_auc"] - b for r, b in zip(res["runs"], ref, strict=True)]
            res["cold_delta_vs_id_only"] = dict(zip(("mean", "std"), _mean_std(d), strict=True))
    return json_safe(summary)


def _pm(stat: dict, signed: bool = False) -> str:
    mean = f"{stat['mean']:+.4f}" if signed else f"{stat['mean']:.4f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std']:.4f}"


def markdown(summary: dict, command: str) -> str:
    v = summary["variants"]
    any_run = next(iter(v.values()))["runs"][0]
    lines = [
        f"Command: `{command}`",
        "",
        f"Cold-start test rows: {any_run['cold_rows']:,}; oracle click AUC on them "
        f"{any_run['cold_click_oracle_auc']:.4f}. Mean ± std over seeds "
        f"{[r['seed'] for r in next(iter(v.values()))['runs']]}.",
        "",
        "| variant | content features | cold-start click AUC | delta vs ID-only (paired) | "
        "click AUC, all test rows | seconds per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in v.items():
        c, a = res["cold_click_auc"], res["click_auc"]
        d = res.get("cold_delta_vs_id_only")
        delta = "-" if not d or name == "id_only" else _pm(d, signed=True)
        secs = np.mean([r["seconds"] for r in res["runs"]])
        lines.append(f"| {name} | {', '.join(res['content']) or '(none)'} | "
                     f"{_pm(c)} | {delta} | {_pm(a)} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("examples/cold_start.yaml"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/cold_start"))
    p.add_argument("--variants", default="id_only,text_image",
                   help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="config override key.path=value (repeatable)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [x for x in variants if x not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
    command = "python bench/cold_start.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    summary = run(args.config, args.seeds, args.out, variants, args.sets)
    summary["command"] = command
    (args.out / "cold_start.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    table = markdown(summary, command)
    (args.out / "cold_start.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
