"""Do MMoE and PLE train faster when the modules that read one input share one GEMM?

``nn.moe.read_once`` computes the first layer of every expert group and every gate that read
the same tensor as one Linear over their concatenated weights (MMoE: the experts and each
task's gate; PLE's first level: every expert group and every gate). This times
``Trainer.step`` with it against the per-module calls it replaced (each module reading the
input itself), on the same model, the same batches and the same weights, in alternating
blocks so that load on this shared machine hits both alike. Matched benchmark models
(docs/BENCHMARKS.md), batch 2048 and 256, 2 threads.

    .venv/bin/python bench/read_once.py [--datasets census movielens] [--rounds 8]

Writes bench/results/read_once.json; prints median ms per step and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_each(x: Any, experts: list[Any], gates: list[Any]) -> tuple[list[Any], list[Any]]:
    """The reference: each module reads ``x`` itself (what ``read_once`` replaced)."""
    return [e(x) for e in experts], [g(x) for g in gates]


def _use(fn: Any) -> None:
    import shopmtl.models.mmoe as mmoe
    import shopmtl.nn.moe as moe

    moe.read_once = fn  # CGC looks it up in its module
    mmoe.read_once = fn


def time_pair(trainer: Any, table: Any, batch: int, rounds: int, steps: int
              ) -> dict[str, float]:
    from shopmtl.nn.moe import read_once

    batches = list(table.batches(batch, 0, 0))[: steps]
    ms: dict[str, list[float]] = {"read_once": [], "per_module": []}
    for _ in range(rounds):
        for name, fn in (("read_once", read_once), ("per_module", read_each)):
            _use(fn)
            trainer.step(batches[0])  # warm the path
            for b in batches:
                t0 = time.perf_counter()
                trainer.step(b)
                ms[name].append((time.perf_counter() - t0) * 1000)
    _use(read_once)
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"read_once_ms": med["read_once"], "per_module_ms": med["per_module"],
            "speedup": med["per_module"] / med["read_once"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["census", "movielens"])
    ap.add_argument("--models", nargs="+", default=["mmoe", "ple"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2048, 256])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--out", type=Path, default=Path("bench/results/read_once.json"))
    args = ap.parse_args(argv)

    from bench.peers import common as C
    from bench.peers.prepare import prepare
    from bench.peers.run_shopmtl import build_config
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.train.trainer import Trainer

    torch.set_num_threads(C.THREADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shopmtl-read-once-") as tmp:
        for ds in args.datasets:
            prepare(ds, tmp)
            meta, _ = C.load_prepared(Path(tmp) / ds)
            for model in args.models:
                for batch in args.batches:
                    C.seed_everything(0)
                    spec = {"dataset": ds, "model": model, "variant": "matched",
                            "batch": batch, "seed": 0, "epochs": 1}
                    cfg = build_config(spec, meta)
                    data = prepare_data(cfg.data, cfg.data.schema.build())
                    trainer = Trainer(cfg, data, Path(tmp) / f"run-{model}-{batch}",
                                      progress=False)
                    res = time_pair(trainer, data.train, batch, args.rounds, args.steps)
                    row = {"dataset": ds, "model": model, "batch": batch, **res,
                           "load_1min": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(f"{ds:10s} {model:5s} batch {batch:5d}: read_once "
                          f"{res['read_once_ms']:7.2f} ms, per module {res['per_module_ms']:7.2f}"
                          f" ms per step: {res['speedup']:.2f}x (load {row['load_1min']})",
                          flush=True)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "rounds": args.rounds, "steps_per_block": args.steps, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
