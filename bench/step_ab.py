"""Does a change to the training step make it faster? Same model, same batches, same weights,
the shipped code path against the one it replaced, in alternating blocks so that load on this
shared machine hits both alike. Matched benchmark models (docs/BENCHMARKS.md), batch 2048 and
256, 2 threads; median ms per ``Trainer.step`` and the ratio.

Changes (``--change``):

- ``read_once``: ``nn.moe.read_once`` computes the first layer of every expert group and gate
  that read one tensor as one Linear over their concatenated weights (MMoE: the experts and
  each task's gate; PLE's first level: every expert group and gate), against each module
  reading the input itself.
- ``lookup``: ``nn.layers.lookup``, the embedding lookup whose backward adds rows with
  ``index_add_`` in one thread, against ``nn.Embedding``'s sorting backward.
- ``mix_parts``: PLE's gates mix the task-specific and shared expert groups held apart
  (``nn.moe.mix_parts``), against mixing their concatenation.

    .venv/bin/python bench/step_ab.py --change lookup [--datasets census movielens] [--rounds 8]

Writes bench/results/step_ab_<change>.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_each(x: Any, experts: list[Any], gates: list[Any]) -> tuple[list[Any], list[Any]]:
    """Before ``read_once``: each module reads ``x`` itself."""
    return [e(x) for e in experts], [g(x) for g in gates]


def sorting_lookup(table: Any, ids: Any) -> Any:
    """Before ``lookup``: ``nn.Embedding``'s own forward and (sorting) backward."""
    return table(ids)


def mix_concatenated(groups: list[Any], weights: Any) -> Any:
    """Before ``mix_parts``: one concatenated [B, n, H] tensor, then ``mix``."""
    from shopmtl.nn.moe import mix

    return mix(torch.cat(groups, 1), weights)


# change -> the (module, name) globals its callers look up at call time, and the replaced path
CHANGES: dict[str, tuple[tuple[tuple[str, str], ...], Callable[..., Any]]] = {
    "read_once": ((("shopmtl.nn.moe", "read_once"), ("shopmtl.models.mmoe", "read_once")),
                  read_each),
    "lookup": ((("shopmtl.nn.layers", "lookup"),), sorting_lookup),
    "mix_parts": ((("shopmtl.nn.moe", "mix_parts"),), mix_concatenated),
}


def _install(change: str, fn: Callable[..., Any]) -> None:
    """Point every module that calls the changed function at ``fn``."""
    for module, name in CHANGES[change][0]:
        setattr(importlib.import_module(module), name, fn)


def variants(change: str) -> dict[str, Callable[..., Any]]:
    """{change: the shipped function, "before": the replaced path}."""
    (module, name), *_ = CHANGES[change][0]
    return {change: getattr(importlib.import_module(module), name),
            "before": CHANGES[change][1]}


def time_pair(change: str, trainer: Any, table: Any, batch: int, rounds: int, steps: int
              ) -> dict[str, float]:
    pair = variants(change)
    batches = list(table.batches(batch, 0, 0))[: steps]
    ms: dict[str, list[float]] = {k: [] for k in pair}
    try:
        for r in range(rounds):
            order = list(pair) if r % 2 == 0 else list(pair)[::-1]
            for name in order:
                _install(change, pair[name])
                trainer.step(batches[0])  # warm the path
                for b in batches:
                    t0 = time.perf_counter()
                    trainer.step(b)
                    ms[name].append((time.perf_counter() - t0) * 1000)
    finally:
        _install(change, pair[change])
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"shipped_ms": med[change], "before_ms": med["before"],
            "speedup": med["before"] / med[change]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--change", choices=sorted(CHANGES), required=True)
    ap.add_argument("--datasets", nargs="+", default=["census", "movielens"])
    ap.add_argument("--models", nargs="+", default=None,
                    help="default: mmoe ple (mix_parts: ple)")
    ap.add_argument("--batches", nargs="+", type=int, default=[2048, 256])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/step_ab_<change>.json")
    args = ap.parse_args(argv)
    models = args.models or (["ple"] if args.change == "mix_parts" else ["mmoe", "ple"])
    out_path = args.out or Path(f"bench/results/step_ab_{args.change}.json")

    from bench.peers import common as C
    from bench.peers.prepare import prepare
    from bench.peers.run_shopmtl import build_config
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.train.trainer import Trainer

    torch.set_num_threads(C.THREADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="shopmtl-step-ab-") as tmp:
        for ds in args.datasets:
            prepare(ds, tmp)
            meta, _ = C.load_prepared(Path(tmp) / ds)
            for model in models:
                for batch in args.batches:
                    C.seed_everything(0)
                    spec = {"dataset": ds, "model": model, "variant": "matched",
                            "batch": batch, "seed": 0, "epochs": 1}
                    cfg = build_config(spec, meta)
                    data = prepare_data(cfg.data, cfg.data.schema.build())
                    trainer = Trainer(cfg, data, Path(tmp) / f"run-{model}-{batch}",
                                      progress=False)
                    res = time_pair(args.change, trainer, data.train, batch, args.rounds,
                                    args.steps)
                    row = {"dataset": ds, "model": model, "batch": batch, **res,
                           "load_1min": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(f"{ds:10s} {model:5s} batch {batch:5d}: {args.change} "
                          f"{res['shipped_ms']:7.2f} ms, before {res['before_ms']:7.2f} ms per "
                          f"step: {res['speedup']:.2f}x (load {row['load_1min']})", flush=True)
    out = {"change": args.change, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "rounds": args.rounds, "steps_per_block": args.steps,
           "runs": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
