"""Are a trained joint model's text heads short of the optimum of their own output layer?

After the joint steps and the head refits, the shared adapter and every head's trunk are fixed.
A ``TableHead`` task's logit is then linear in fixed inputs: the trunk's features, the text's
n-gram bag (the wide term) and its frozen sentence vector (the ``vector`` term). With a binary
(logistic), multiclass (softmax) or regression (squared) loss that is a generalised linear
model, and a logistic regression on [n-grams, sentence vector] beats the joint heads on the
test split (``bench/text_probe.py``). So: is Adam on batches of 64 rows short of that optimum?

This loads a joint checkpoint (``OUT/joint/model`` of ``shopmtl train``), rebuilds the text
bank of its table sources (customer service, reviews, demand; the recommendation and search
sources are not loaded) and solves each such task's output layer by full-batch L-BFGS with an
L2 penalty, over a path of penalties from strong to weak (each solve starts from the previous
one; last-layer retraining, Kirichenko et al. 2023). The penalty is picked on validation (ties
in a coarse metric go to the lower loss) and the solution is written into the model only when
it beats the trained layer there. Only the wide rows some training text of the source uses are
free; an n-gram seen only in validation or test keeps its weight (zero: it never had a
gradient). Prints validation and test per task, before and after; writes ``--out`` (JSON).

    .venv/bin/python bench/solve_heads.py runs/joint/joint/model \\
        --out bench/results/solve_heads.json

Result on the default run (docs/JOINT.md): the solved layers score *below* the trained ones on
validation, so the gap to TF-IDF is not in the heads' optimisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from shopmtl.joint.model import TableHead
from shopmtl.joint.solve import SOLVABLE, solve_heads
from shopmtl.tasks import TASK_TYPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a joint model directory (OUT/joint/model)")
    ap.add_argument("--out", default="bench/results/solve_heads.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=0,
                    help="L-BFGS iterations per penalty (0: the run's train.solve_iters)")
    args = ap.parse_args(argv)

    from shopmtl.joint.checkpoint import load_joint_dir
    from shopmtl.joint.parts import load_parts, text_bank

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model, cfg, _ = load_joint_dir(args.model)
    # only the table sources: the recommendation world and the search lists are not needed
    tables = tuple(sc for sc in cfg.sources
                   if sc.name in model.heads and isinstance(model.heads[sc.name], TableHead))
    with tempfile.TemporaryDirectory() as tmp:
        parts, texts, _ = load_parts(dataclasses.replace(cfg, sources=tables), Path(tmp),
                                     log=lambda *_: None)
    bank = text_bank(cfg, texts.texts)
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)

    def scores() -> dict[str, dict[str, float]]:
        out = {}
        for p in parts:
            types = {t.name: t.type for t in p.tasks}
            for split in ("valid", "test"):
                for task, m in p.evaluate(model, split).items():
                    if types[task] in SOLVABLE:
                        key = TASK_TYPES[types[task]].primary[0]
                        out.setdefault(task, {})[split] = m[key]
        return out

    before = scores()
    t0 = time.perf_counter()
    res = solve_heads(model, parts, cfg.train.solve_l2, args.iters or cfg.train.solve_iters)
    seconds = time.perf_counter() - t0
    after = scores()
    rows = []
    print("\n| source | task | metric | valid: trained | whole layer solved | linear part "
          "solved, best mix | kept | test: trained | test: after |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for src, tasks in res.items():
        for task, r in tasks.items():
            spec_type = next(t.type for p in parts for t in p.tasks if t.name == task)
            metric = TASK_TYPES[spec_type].primary[0]
            mixes = {k: abs(v) for k, v in r["valid"].items() if k.startswith("linear")}
            mix = max(mixes, key=lambda k: r["valid"][k])
            row = {"source": src, "task": task, "metric": metric,
                   "valid_trained": before[task]["valid"],
                   "valid_candidates": {k: abs(v) for k, v in r["valid"].items()},
                   "kept": r["kept"], "l2": r["l2"],
                   "test_trained": before[task]["test"], "test_after": after[task]["test"],
                   "path_solved": r["path_solved"], "path_linear": r["path_linear"]}
            rows.append(row)
            print(f"| {src} | {task} | {metric} | {row['valid_trained']:.4f} | "
                  f"{abs(r['valid']['solved']):.4f} | {mixes[mix]:.4f} ({mix}) | {r['kept']} | "
                  f"{row['test_trained']:.4f} | {row['test_after']:.4f} |")
    print(f"\nsolve: {seconds:.0f}s on {args.threads} threads")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "seconds": seconds, "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
