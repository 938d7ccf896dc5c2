"""The joint run over several training seeds: does each task beat its simple baseline on the
mean, and by more than the spread?

Each seed is one ``shopmtl train CONFIG`` run (``train.seed`` = 0, 1, ...; the data splits do
not move with it): the joint model and every baseline, scored on the test splits. The TF-IDF,
BM25 and seasonal-naive baselines do not depend on the seed; the recommendation baseline (the
same zoo model with ID features only) is trained with each seed. Writes ``joint_seeds.json``
and ``joint_seeds.md`` into ``--out`` and prints the table.

    python bench/joint_seeds.py --config examples/joint.yaml --seeds 3 --out runs/joint_seeds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def summarise(tables: list[list[dict]]) -> list[dict]:
    """Per task: joint and baseline mean +- std over seeds, and in how many seeds the joint
    model beat the baseline."""
    rows = []
    for r0 in tables[0]:
        per = [next(r for r in t if r["task"] == r0["task"]) for t in tables]
        joint = [r["joint"] for r in per]
        base = [r["baseline"] for r in per if r["baseline"] is not None]
        sign = 1.0 if r0["higher_is_better"] else -1.0
        jm, js = _mean_std(joint)
        bm, bs = _mean_std(base) if base else (math.nan, math.nan)
        rows.append({
            "source": r0["source"], "task": r0["task"], "metric": r0["metric"],
            "higher_is_better": r0["higher_is_better"], "baseline_kind": r0["baseline_kind"],
            "joint": joint, "joint_mean": jm, "joint_std": js,
            "baseline_mean": bm, "baseline_std": bs,
            "margin": sign * (jm - bm),
            "seeds_beating": sum(bool(r["joint_beats_baseline"]) for r in per),
        })
    return rows


def render(rows: list[dict], seeds: int, command: str, minutes: float) -> str:
    lines = [
        f"`{command}` ({seeds} seeds, {minutes:.1f} min)", "",
        "| source | task | metric | joint (mean ± std) | baseline | margin (+ = joint better) "
        "| seeds beating |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = f"{r['baseline_mean']:.4f}"
        if r["baseline_std"] == r["baseline_std"] and r["baseline_std"] > 1e-9:  # not NaN, not 0
            base += f" ± {r['baseline_std']:.4f}"
        lines.append(
            f"| {r['source']} | {r['task']} | {r['metric']} | {r['joint_mean']:.4f} ± "
            f"{r['joint_std']:.4f} | {base} ({r['baseline_kind']}) | {r['margin']:+.4f} | "
            f"{r['seeds_beating']}/{seeds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=Path("examples/joint.yaml"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/joint_seeds"))
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="config override key.path=value (every seed)")
    ap.add_argument("--reuse", action="store_true",
                    help="read a seed's OUT/seedN/metrics.json when it exists instead of training")
    args = ap.parse_args(argv)

    from shopmtl.checks import load_joint as load_joint_config
    from shopmtl.joint.report import run_joint

    t0 = time.perf_counter()
    tables, seconds = [], []
    for seed in range(args.seeds):
        cfg = load_joint_config(args.config, [*args.sets, f"train.seed={seed}"])
        done = args.out / f"seed{seed}" / "metrics.json"
        if args.reuse and done.is_file():
            res = json.loads(done.read_text())
            print(f"seed {seed}: reusing {done}", flush=True)
        else:
            res = run_joint(cfg, args.out / f"seed{seed}", log=lambda s: print(s, flush=True))
        tables.append(res["table"])
        seconds.append(res["joint"]["seconds"])
    rows = summarise(tables)
    minutes = (time.perf_counter() - t0) / 60
    command = ("python bench/joint_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)
               ).strip()
    md = render(rows, args.seeds, command, minutes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "joint_seeds.json").write_text(json.dumps(
        {"command": command, "seeds": args.seeds, "rows": rows, "seconds": seconds}, indent=1))
    (args.out / "joint_seeds.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
