"""Can the embedding lookup's backward skip its sort? (docs/BENCHMARKS.md)

In the census MMoE step, ``embedding_dense_backward`` took 15 % of the time: on a CPU it sorts
the batch's ids and reduces each run of equal ids into the table's gradient. The replacement
is a custom autograd function whose backward scatters the output gradient into a zero table
with ``index_add_`` (or ``index_put_(accumulate=True)``), no sort; shopmtl's
``nn.layers.lookup`` does it in one thread. This times the forward + backward of one lookup,
median of ``--repeats``, for shapes of the benchmark's models (census: a 514-row table and
2048 x 31 ids), each variant against ``F.embedding`` in the same process and loop, and checks
the gradients agree. ``--contend`` runs the same table again while another 2-thread job (a
matmul loop) shares the cores, as on a busy machine: a parallel scatter can stall there.

    .venv/bin/python bench/embedding_backward.py --contend   # bench/results/embedding_backward.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from shopmtl.nn.layers import _Lookup

BUSY = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(768, 768)\n"
        "while True:\n    a @ a\n")

# (what, table rows, batch, ids per row)
SHAPES = (("census, batch 2048", 514, 2048, 31), ("census, batch 256", 514, 256, 31),
          ("movielens-like, batch 2048", 12_000, 2048, 8),
          ("a 200k-row table, batch 2048", 200_000, 2048, 20))


class _AddLookup(torch.autograd.Function):
    """weight[idx], with a backward that scatters by ``index_add_`` (``put``: index_put_)."""

    @staticmethod
    def forward(ctx, weight: Tensor, idx: Tensor, put: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.rows, ctx.put = weight.shape[0], put
        return weight[idx]

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        flat, rows = idx.reshape(-1), g.reshape(-1, g.shape[-1])
        gw = g.new_zeros(ctx.rows, g.shape[-1])
        if ctx.put:
            gw.index_put_((flat,), rows, accumulate=True)
        else:
            gw.index_add_(0, flat, rows)
        return gw, None, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--contend", action="store_true",
                    help="also time every shape with a 2-thread matmul job on the cores")
    ap.add_argument("--out", default="bench/results/embedding_backward.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dim {args.dim}, "
          f"median of {args.repeats}")
    result = {"torch": torch.__version__, "threads": args.threads,
              "rows": table(args, "quiet")}
    if args.contend:
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(1.0)
            result["rows_contended"] = table(args, "another 2-thread job on the cores")
        finally:
            busy.kill()
            busy.wait()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


def table(args: argparse.Namespace, condition: str) -> list[dict]:
    variants = {
        "F.embedding (sort)": lambda w, i: F.embedding(i, w),
        "shopmtl lookup (index_add_, 1 thread)": lambda w, i: _Lookup.apply(w, i),
        "index_add_": lambda w, i: _AddLookup.apply(w, i, False),
        "index_put_(accumulate)": lambda w, i: _AddLookup.apply(w, i, True),
    }
    rows = []
    print(f"\n{condition}:\n")
    print("| shape | " + " | ".join(f"{k} ms" for k in variants)
          + " | time vs sort (lookup, index_add_, index_put_) |")
    print("|---|" + "---|" * (len(variants) + 1))
    for what, n_rows, batch, width in SHAPES:
        w = torch.nn.Parameter(torch.randn(n_rows, args.dim))
        idx = torch.randint(0, n_rows, (batch, width))
        g = torch.randn(batch, width, args.dim)
        grads = {}
        for k, f in variants.items():
            w.grad = None
            f(w, idx).backward(g)
            grads[k] = w.grad.clone()
        ref = grads["F.embedding (sort)"]
        for k, v in grads.items():
            if not torch.allclose(v, ref, atol=1e-4):
                raise AssertionError(f"{k}: gradient differs from F.embedding's")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, f in variants.items():  # interleaved: load changes hit every variant
                w.grad = None
                t0 = time.perf_counter()
                f(w, idx).backward(g)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        base = med["F.embedding (sort)"]
        ratio = {k: v / base for k, v in med.items()}
        rows.append({"shape": what, "rows": n_rows, "batch": batch, "ids_per_row": width,
                     "median_ms": med, "ratio_to_sort": ratio})
        print(f"| {what} | " + " | ".join(f"{v:.2f}" for v in med.values()) + " | "
              + ", ".join(f"{r:.2f}x" for k, r in ratio.items() if k != "F.embedding (sort)")
              + " |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
