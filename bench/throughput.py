"""Training and inference throughput of shopmtl models on the default synthetic world.

    .venv/bin/python bench/throughput.py [--rows 500000] [--batch 2048] [--models shared_bottom]

Prints a table and writes bench/results/throughput.json. Times are medians over repeats; the
machine is shared, so compare models within one run (ratios), not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shopmtl.config import DataConfig, ExperimentConfig, ModelConfig, SchemaConfig, TrainConfig
from shopmtl.data.pipeline import prepare_data
from shopmtl.data.synthetic import WorldConfig, default_schema, generate
from shopmtl.run import QUICKSTART_MODEL
from shopmtl.train.trainer import Trainer, set_threads


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def bench_model(name: str, data, schema, batch: int, steps: int, repeats: int) -> dict:
    cfg = ExperimentConfig(
        data=DataConfig(schema=SchemaConfig(schema.features, schema.tasks, schema.scenario,
                                            schema.group), train="unused"),
        # the quickstart's SharedBottom; other models with their own defaults
        model=ModelConfig(name, dict(QUICKSTART_MODEL) if name == "shared_bottom" else {}),
        train=TrainConfig(batch_size=batch, embedding_weight_decay=1e-2),
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, tmp, progress=False)
        table = data.train
        # warm-up (allocator, first-touch of the embedding tables)
        for i, b in enumerate(table.batches(batch, 0, 0)):
            trainer.step(b)
            if i >= 5:
                break
        train_rates = []
        for r in range(repeats):
            it = table.batches(batch, r + 1, 0)
            t0 = time.perf_counter()
            n = 0
            for i, b in enumerate(it):
                trainer.step(b)
                n += len(b)
                if i + 1 >= steps:
                    break
            train_rates.append(n / (time.perf_counter() - t0))
        model = trainer.model.eval()
        infer_rates = []
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = 0
                for i, b in enumerate(table.batches(2048, shuffle=False)):
                    model(b)
                    n += len(b)
                    if i + 1 >= steps:
                        break
                infer_rates.append(n / (time.perf_counter() - t0))
        params = sum(p.numel() for p in model.parameters())
    return {"model": name, "batch": batch, "params": params,
            "train_samples_per_s": statistics.median(train_rates),
            "infer_samples_per_s": statistics.median(infer_rates),
            "train_runs": train_rates, "infer_runs": infer_rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["shared_bottom"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = ap.parse_args()
    set_threads(0)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        wc = WorldConfig(rows=args.rows, seed=0)
        generate(wc, tmp)
        schema = default_schema(wc)
        dc = DataConfig(schema=SchemaConfig(schema.features, schema.tasks, schema.scenario,
                                            schema.group), train=f"{tmp}/train.parquet",
                        valid=f"{tmp}/valid.parquet", test=f"{tmp}/test.parquet")
        data = prepare_data(dc, schema)
        results = [bench_model(m, data, schema, args.batch, args.steps, args.repeats)
                   for m in args.models]
    env = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_average_before": load_before, "load_average_after": load_average(),
           "rows": args.rows, "steps": args.steps, "repeats": args.repeats}
    print(f"CPU {env['cpu']} | torch {env['torch']} | threads {env['threads']} | "
          f"load avg before/after {load_before:.2f}/{env['load_average_after']:.2f}")
    print(f"{'model':16s} {'batch':>6s} {'params':>10s} {'train samples/s':>16s} "
          f"{'infer samples/s':>16s}")
    for r in results:
        print(f"{r['model']:16s} {r['batch']:6d} {r['params']:10,d} "
              f"{r['train_samples_per_s']:16,.0f} {r['infer_samples_per_s']:16,.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
