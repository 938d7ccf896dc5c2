"""Does item content (title, image) help the recommendation tasks, step for step?

The joint model's rec source beats its ID-only baseline on conversion and ad click but not on
click (docs/JOINT.md). This separates the two things that could explain it: the information
in the content, and the step the two-stage selection keeps.

1. ``--joint RUN``: the validation AUC of click, conversion and ad click at every evaluation
   of a joint run (``shopmtl train examples/joint.yaml --out RUN``) and of its ID-only
   baseline, with each task's standard error (Hanley & McNeil 1982) on the validation split:
   how noisy each task's vote in the step selection is.
2. The rec source trained alone (the joint config, no other source) with each ``--content``
   list, for the steps rec gets in the joint run: validation AUC per evaluation, and test AUC
   after the two-stage selection.

    .venv/bin/python bench/rec_content.py --joint runs/joint \\
        --content "" title title,image --out bench/results/rec_content.json

Writes ``--out`` (JSON) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("click", "conversion", "ad_click")


def auc_se(auc: float, pos: int, neg: int) -> float:
    """Hanley & McNeil's standard error of an AUC from pos positives and neg negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (pos - 1) * (q1 - auc * auc) + (neg - 1) * (q2 - auc * auc))
    return math.sqrt(var / (pos * neg))


def label_counts(split: Path) -> dict[str, tuple[int, int]]:
    """(positives, negatives) of each rec task where its label exists, in a split file."""
    import pyarrow.parquet as pq

    t = pq.read_table(split, columns=["click", "conversion", "ad_click"]).to_pydict()
    out = {}
    for task in TASKS:
        y = np.array([np.nan if v is None else float(v) for v in t[task]])
        if task == "conversion":  # observed only after a click
            y = np.where(np.array(t["click"], bool), y, np.nan)
        y = y[~np.isnan(y)]
        out[task] = (int(y.sum()), int(len(y) - y.sum()))
    return out


def joint_history(run: Path) -> dict[str, Any]:
    joint = json.loads((run / "joint" / "metrics.json").read_text())
    base = json.loads((run / "alone" / "rec_id_only" / "metrics.json").read_text())
    counts = label_counts(run / "rec" / "data" / "valid.parquet")
    final = {t: joint["valid"]["rec"][t]["auc"] for t in TASKS}
    return {
        "joint": [{"step": h["step"], **{t: h["valid"][t] for t in TASKS}}
                  for h in joint["valid_history"]],
        "id_only": [{"step": h["step"], **{t: h["valid"][t] for t in TASKS}}
                    for h in base["valid_history"]],
        "rec_steps": joint["steps_per_source"]["rec"],
        "valid_labels": counts,
        "valid_auc_se": {t: auc_se(final[t], *counts[t]) for t in TASKS},
        "test": {"joint": {t: joint["summary"][t] for t in TASKS},
                 "id_only": {t: base["summary"][t] for t in TASKS}},
    }


def rec_alone(config: str, content: list[str], steps: int, out: Path) -> dict[str, Any]:
    from shopmtl.joint.config import REC, load_joint_config
    from shopmtl.joint.train import replace_steps, train_joint

    cfg = load_joint_config(config)
    rec = [dataclasses.replace(s, args={**s.args, "content": content})
           for s in cfg.sources if s.name == REC]
    cfg = replace_steps(dataclasses.replace(cfg, sources=tuple(rec)), steps)
    m = train_joint(cfg, out, save=False, log=lambda *_: None)
    return {
        "content": content,
        "history": [{"step": h["step"], **{t: h["valid"][t] for t in TASKS}}
                    for h in m["valid_history"]],
        "refit": m["refit"].get(REC, {}),
        "valid": {t: m["valid"]["rec"][t]["auc"] for t in TASKS},
        "test": {t: m["summary"][t] for t in TASKS},
        "train_seconds": m["seconds"]["train"],
    }


def _row(step: int, r: dict[str, float]) -> str:
    return f"| {step} | " + " | ".join(f"{r[t]:.4f}" for t in TASKS) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--joint", type=Path, default=None, help="a `shopmtl train` joint run dir")
    ap.add_argument("--config", default="examples/joint.yaml")
    ap.add_argument("--content", nargs="*", default=[],
                    help="content lists to train rec alone with, comma-separated ('' = IDs only)")
    ap.add_argument("--steps", type=int, default=0,
                    help="rec steps (0: those of --joint, else 4584)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/rec_content.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    result: dict[str, Any] = {}
    steps = args.steps
    if args.joint is not None:
        j = joint_history(args.joint)
        result["joint_run"] = j
        steps = steps or j["rec_steps"]
        print("validation AUC at each evaluation of the joint run (global steps; rec got "
              f"{j['rec_steps']} of them) and of the ID-only baseline (its own steps)")
        print("| step | click | conversion | ad_click |\n|---|---|---|---|")
        for h in j["joint"]:
            print(_row(h["step"], h))
        print("| ID-only | | | |")
        for h in j["id_only"]:
            print(_row(h["step"], h))
        print("validation labels (pos, neg):", j["valid_labels"])
        print("validation AUC standard error:",
              {t: round(v, 4) for t, v in j["valid_auc_se"].items()})
        print("test (after the selection):", j["test"])
    steps = steps or 4584
    result["alone"] = []
    for spec in args.content:
        content = [c for c in spec.split(",") if c]
        with tempfile.TemporaryDirectory(prefix="shopmtl-rec-content-") as tmp:
            r = rec_alone(args.config, content, steps, Path(tmp))
        result["alone"].append(r)
        name = "+".join(content) or "IDs only"
        print(f"\nrec alone, {name}, {steps} steps ({r['train_seconds']:.0f}s): validation AUC")
        print("| step | click | conversion | ad_click |\n|---|---|---|---|")
        for h in r["history"]:
            print(_row(h["step"], h))
        f = r["refit"]
        print(f"stage 2 (refit): best step {f.get('best_step')} of {f.get('steps')}, from its own "
              f"best joint step: {f.get('own_best_start')}")
        print("test after the selection:", {t: round(v, 4) for t, v in r["test"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
