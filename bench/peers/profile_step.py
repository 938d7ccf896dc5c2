"""Where shopmtl's training step spends its time: census MMoE (matched: interaction none),
batch 2048, 2 threads, through ``Trainer.step`` on ``TensorTable`` batches.

    .venv/bin/python -m bench.peers.profile_step --data-dir DIR/census [--out profile.json]

(DIR is a ``bench/run_all.py --workdir``; without --data-dir the census split is prepared in a
temporary folder.) Three views, each over the same batches:

1. phases, timed one by one with perf_counter: batch slicing (``TensorTable.take``), forward,
   task losses, backward, Adam; the rest of ``Trainer.step`` (checks, weighting, bookkeeping) is
   its measured total minus those phases; Adam split into the embedding table vs dense weights;
   the same phases for the minimal tensor-resident MMoE next to it.
2. torch.profiler: the top operators by self CPU time per step.
3. cProfile: the top Python functions by own time per step (the interpreter's share).
4. inference: census MMoE and PLE (matched) through ``predict_table`` at batch 2048, ms per
   batch and the operators' shares, GEMMs apart (what bounds the inference ratio).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.peers import common as C

STEPS = 24


def _ms(f: Any, n: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) * 1000 / n


def phases(trainer: Any, table: Any, batch: int) -> dict[str, float]:
    """Median ms per step of each phase of Trainer.step (recomputed the way step does it)."""
    model, opt = trainer.model, trainer.opt
    perm = torch.randperm(len(table))
    idxs = [perm[i * batch:(i + 1) * batch] for i in range(len(table) // batch)]
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("slice", "forward", "loss", "backward", "adam", "zero_grad",
                                     "step_total")}
    for s in range(STEPS):
        idx = idxs[s % len(idxs)]
        t = time.perf_counter
        t0 = t()
        b = table.take(idx)
        t1 = t()
        model.train()
        logits = model(b)
        t2 = t()
        losses = model.task_losses(logits, b)
        total = losses.sum()
        t3 = t()
        opt.zero_grad(set_to_none=True)
        t4 = t()
        total.backward()
        t5 = t()
        opt.step()
        t6 = t()
        b2 = table.take(idxs[(s + 1) % len(idxs)])
        t7 = t()
        trainer.step(b2)
        t8 = t()
        for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5, t4 - t3, t8 - t7),
                        strict=True):
            rows[k].append(v * 1000)
    out = {k: statistics.median(v) for k, v in rows.items()}
    out["step_overhead"] = out["step_total"] - sum(
        out[k] for k in ("forward", "loss", "zero_grad", "backward", "adam"))
    # Adam over the embedding table alone vs the dense weights alone, with the real gradients
    emb = [p for n, p in model.named_parameters() if n.startswith("embed.table")]
    dense = [p for n, p in model.named_parameters() if not n.startswith("embed.table")]
    for name, params in (("adam_embedding_table", emb), ("adam_dense", dense)):
        o = torch.optim.Adam(params, lr=C.LR)
        o.step()
        out[name] = statistics.median(_ms(o.step) for _ in range(STEPS))
    out["embedding_rows"] = int(sum(p.shape[0] for p in emb))
    out["params_embedding"] = int(sum(p.numel() for p in emb))
    out["params_dense"] = int(sum(p.numel() for p in dense))
    return out


def minimal_phases(meta: dict[str, Any], arrays: dict[str, C.Arrays], batch: int
                   ) -> dict[str, float]:
    from bench.peers.run_minimal import MinimalMMoE, tensors

    cat, seq, num, y = tensors(arrays["train"])
    model = MinimalMMoE(meta)
    opt = torch.optim.Adam(model.parameters(), lr=C.LR)
    perm = torch.randperm(len(y))
    rows: dict[str, list[float]] = {k: [] for k in ("slice", "forward", "backward", "adam",
                                                    "step_total")}
    for s in range(STEPS + 5):
        idx = perm[(s % (len(y) // batch)) * batch:][:batch]
        t0 = time.perf_counter()
        xb = (cat[idx], seq[idx], num[idx], y[idx])
        t1 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(*xb[:3]), xb[3])
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if s >= 5:
            for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                rows[k].append(v * 1000)
    return {k: statistics.median(v) for k, v in rows.items()}


def operator_table(trainer: Any, table: Any, batch: int, top: int = 18) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    batches = list(table.batches(batch, 7, 0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(STEPS):
            trainer.step(batches[s % len(batches)])
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        rows.append({"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / STEPS,
                     "share": e.self_cpu_time_total / total,
                     "calls_per_step": e.count / STEPS})
    return rows


def python_table(trainer: Any, table: Any, batch: int, top: int = 15) -> dict[str, Any]:
    batches = list(table.batches(batch, 8, 0))
    pr = cProfile.Profile()
    pr.enable()
    for s in range(STEPS):
        trainer.step(batches[s % len(batches)])
    pr.disable()
    st = pstats.Stats(pr, stream=io.StringIO())
    total = st.total_tt
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in sorted(
            st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        short = "/".join(Path(file).parts[-2:]) if file != "~" else "builtin"
        rows.append({"function": f"{short}:{line}({fn})", "own_ms_per_step": tt * 1000 / STEPS,
                     "cum_ms_per_step": ct * 1000 / STEPS, "calls_per_step": nc / STEPS})
    return {"total_ms_per_step": total * 1000 / STEPS, "top": rows}


GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")


def inference_profile(meta: dict[str, Any], tmp: str, batch: int = C.INFER_BATCH
                      ) -> dict[str, Any]:
    """Census MMoE and PLE: the predict path (``predict_table``) over the training split, after
    a few training steps: median ms per batch of 5 passes, and torch.profiler's operators."""
    from torch.profiler import ProfilerActivity, profile

    from bench.peers.run_shopmtl import build_config
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.train.evaluate import predict_table
    from shopmtl.train.trainer import Trainer

    out: dict[str, Any] = {}
    for model in ("mmoe", "ple"):
        C.seed_everything(0)
        spec = {"dataset": "census", "model": model, "variant": "matched", "batch": 2048,
                "seed": 0, "epochs": 1}
        cfg = build_config(spec, meta)
        data = prepare_data(cfg.data, cfg.data.schema.build())
        trainer = Trainer(cfg, data, Path(tmp) / f"infer-{model}", progress=False)
        for b in list(data.train.batches(2048, 0, 0))[:3]:
            trainer.step(b)
        n_batches = -(-len(data.train) // batch)
        predict_table(trainer.model, data.valid, batch)  # warm-up
        pass_s = C.infer_seconds(partial(predict_table, trainer.model, data.train, batch), 5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            predict_table(trainer.model, data.train, batch)
        ops = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ops)
        gemm = sum(e.self_cpu_time_total for e in ops if e.key in GEMM_OPS)
        top = [{"op": e.key, "self_ms_per_batch": e.self_cpu_time_total / 1000 / n_batches,
                "share": e.self_cpu_time_total / total}
               for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]]
        out[model] = {"ms_per_batch": pass_s * 1000 / n_batches, "gemm_share": gemm / total,
                      "forward_mflop_per_sample": C.linear_flops_per_sample(trainer.model)
                      / 3 / 1e6, "operators": top}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=2048)
    args = ap.parse_args()
    C.seed_everything(0)
    from bench.peers.run_shopmtl import build_config
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.train.trainer import Trainer

    tmp = tempfile.TemporaryDirectory(prefix="shopmtl-profile-")
    data_dir = args.data_dir
    if data_dir is None:
        from bench.peers.prepare import prepare

        prepare("census", tmp.name)
        data_dir = Path(tmp.name) / "census"
    meta, arrays = C.load_prepared(data_dir)
    spec = {"dataset": "census", "model": "mmoe", "variant": "matched", "batch": args.batch,
            "seed": 0, "epochs": 5}
    cfg = build_config(spec, meta)
    data = prepare_data(cfg.data, cfg.data.schema.build())
    trainer = Trainer(cfg, data, Path(tmp.name) / "run", progress=False)
    for b in list(data.train.batches(args.batch, 0, 0))[:5]:  # warm-up
        trainer.step(b)
    load0 = round(__import__("os").getloadavg()[0], 2)
    res = {
        "setup": "census MMoE (interaction none), batch 2048, 2 threads, Trainer.step",
        "threads": torch.get_num_threads(),
        "flops_per_sample": C.linear_flops_per_sample(trainer.model),
        "phases_ms": phases(trainer, data.train, args.batch),
        "minimal_phases_ms": minimal_phases(meta, arrays, args.batch),
        "operators": operator_table(trainer, data.train, args.batch),
        "python": python_table(trainer, data.train, args.batch),
        "inference": inference_profile(meta, tmp.name),
    }
    res["load_average"] = [load0, round(__import__("os").getloadavg()[0], 2)]
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    tmp.cleanup()


if __name__ == "__main__":
    main()
