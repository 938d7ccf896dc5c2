"""Training throughput on one GPU (issue #17's must-show 1): shopmtl's MMoE and PLE at global
batch 2048, 8192 and 65536 against torch-rechub's MMOE and PLE on the same device and rows.
A benchmark, not a test; the prepared script a lent GPU machine runs (bench/gpu_check.sh), and
on CPU a dry run of the same code (``--device cpu --rows 20000 --steps 2``).

    python bench/gpu_throughput.py [--device cuda] [--rows 1000000] [--steps 30]

Data: the default synthetic world of ``--rows`` impressions (generated into ``--workdir``,
reused when present), shopmtl's reader and encoders. Models: the peers' matched protocol
(bench/peers/common.py: embeddings of 16, 4 experts [64], towers [32], PLE 2 levels x 2+2
experts; no dropout; ``interaction: none``), Adam at lr 1e-3.

Runs per model and batch:

- ``shopmtl resident``: ``train.resident: on``, the training table on the GPU, each batch a
  gather there (the one loop's ``Trainer.step``: task losses, weighting, Adam);
- ``shopmtl host``: ``train.resident: off``, batches gathered on the host, pinned and copied
  each step (``data.prefetch`` does not apply: in-memory data is gathered on the training
  thread);
- ``shopmtl resident bf16``: as resident, ``train.precision: bf16``;
- ``torch-rechub resident``: its ``MMOE`` / ``PLE`` (BatchNorm after every Linear, as the
  library builds them) fed the same rows from tensors already on the GPU, a plain loop (BCE on
  every task, Adam): the fastest way to run it, faster than its ``MTLTrainer`` with a
  DataLoader. Absent when ``torch_rechub`` does not import (gpu_check.sh installs its wheel).

samples/s = rows of ``--steps`` timed steps (after ``--warmup``) / their seconds, the device
synchronised before and after; peak memory = ``torch.cuda.max_memory_allocated`` since the
run's start (none on CPU). Writes bench/results/gpu_throughput.json (or ``--out``) and prints
a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from bench.ddp_scaling import config_yaml, world  # noqa: E402
from bench.peers import common as C  # noqa: E402
from bench.peers.run_shopmtl import model_args  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gpu_throughput.json"
MODELS = ("mmoe", "ple")
VARIANTS = {"shopmtl resident": ("on", "fp32"), "shopmtl host": ("off", "fp32"),
            "shopmtl resident bf16": ("on", "bf16")}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _timed(step: Any, batches: Any, warmup: int, steps: int, device: Any) -> float:
    """samples/s of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(next(batches))
    _sync(device)
    t0, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step(next(batches))
    _sync(device)
    return seen / (time.perf_counter() - t0)


def shopmtl_run(data_dir: Path, data: Any, workdir: Path, model: str, batch: int,
                resident: str, precision: str, device: str, warmup: int, steps: int
                ) -> dict[str, Any]:
    import yaml

    from shopmtl.config import load_config
    from shopmtl.train.trainer import Trainer

    path = config_yaml(data_dir, workdir / f"{model}-{batch}-{resident}-{precision}.yaml", 1,
                       batch, 0, model, model_args(model, "matched"), device)
    raw = yaml.safe_load(path.read_text())
    raw["train"].update({"resident": resident, "precision": precision, "lr": C.LR,
                         "embedding_weight_decay": 0.0, "alpha": {}})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path)
    trainer = Trainer(cfg, data, workdir / path.stem, progress=False)
    dev = trainer.device
    _reset_peak(dev)
    on_device = trainer.source.train is not data.train
    stream = (b for e in itertools.count() for b in trainer.source.batches(e, 0))

    def step(b: Any) -> int:
        trainer.step(b)
        return len(b)

    rate = _timed(step, stream, warmup, steps, dev)
    return {"samples_per_s": rate, "peak_mib": _peak_mib(dev), "table_on_device": on_device,
            "params": sum(p.numel() for p in trainer.model.parameters())}


def rechub_meta(data: Any) -> dict[str, Any]:
    """The peers' feature description of shopmtl's encoded tables (bench/peers/prepare.py)."""
    schema, enc = data.schema, data.encoders
    cats, seqs = schema.of_kind("categorical"), schema.of_kind("sequence")
    return {"tasks": list(schema.task_names), "cat": [f.name for f in cats],
            "cat_vocab": [enc.vocab_size(f) for f in cats],
            "num": [f.name for f in schema.of_kind("numeric")],
            "seq": [f.name for f in seqs], "seq_vocab": [enc.vocab_size(f) for f in seqs],
            "scenario": schema.scenario.column if schema.scenario else None,
            "scenario_vocab": len(schema.scenario_names)}


def rechub_run(data: Any, model: str, batch: int, device: str, warmup: int, steps: int
               ) -> dict[str, Any]:
    import torch

    from bench.peers.run_rechub import build

    dev = torch.device(device)
    meta = rechub_meta(data)
    t = data.train
    torch.manual_seed(0)
    net = build(model, meta).to(dev)
    x = {n: t.cat[:, j].to(dev) for j, n in enumerate(meta["cat"])}
    if meta["scenario"]:
        x[meta["scenario"]] = t.scenario.to(dev)
    x.update({n: t.seq[:, j].to(dev) for j, n in enumerate(meta["seq"])})
    x.update({n: t.num[:, j].to(dev) for j, n in enumerate(meta["num"])})
    y = (t.labels * t.mask).to(dev)  # a missing label counts as 0: the library has no mask
    opt = torch.optim.Adam(net.parameters(), lr=C.LR)
    loss_fn = torch.nn.BCELoss()
    _reset_peak(dev)
    n = len(t)
    g = torch.Generator().manual_seed(0)

    def batches() -> Any:
        while True:
            perm = torch.randperm(n, generator=g).to(dev)
            for lo in range(0, n - batch + 1, batch):
                yield perm[lo:lo + batch]

    def step(idx: Any) -> int:
        out = net({k: v[idx] for k, v in x.items()})
        loss = loss_fn(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(idx)

    net.train()
    rate = _timed(step, batches(), warmup, steps, dev)
    return {"samples_per_s": rate, "peak_mib": _peak_mib(dev), "table_on_device": True,
            "params": sum(p.numel() for p in net.parameters())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batches", default="2048,8192,65536")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-throughput"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    from shopmtl.config import load_config
    from shopmtl.data.pipeline import prepare_data

    a.workdir.mkdir(parents=True, exist_ok=True)
    data_dir = world(a.rows, a.workdir)
    cfg = load_config(config_yaml(data_dir, a.workdir / "data.yaml", 1, 2048, 0))
    data = prepare_data(cfg.data, cfg.data.schema.build())
    try:
        import torch_rechub  # noqa: F401

        rechub = True
    except ImportError:
        rechub = False
    print(f"{len(data.train):,} training rows on {a.device}; torch {torch.__version__}; "
          f"torch-rechub {'present' if rechub else 'absent'}", flush=True)
    names = [*VARIANTS, *(["torch-rechub resident"] if rechub else [])]
    rows: list[dict[str, Any]] = []
    for model in MODELS:
        for batch in (int(b) for b in a.batches.split(",")):
            for name in names:
                try:
                    if name in VARIANTS:
                        resident, precision = VARIANTS[name]
                        res = shopmtl_run(data_dir, data, a.workdir, model, batch, resident,
                                          precision, a.device, a.warmup, a.steps)
                    else:
                        res = rechub_run(data, model, batch, a.device, a.warmup, a.steps)
                except Exception as e:  # one failed run is a row of the table, not the end
                    res = {"error": f"{type(e).__name__}: {e}"[:300]}
                rows.append({"model": model, "batch": batch, "run": name, **res})
                r = rows[-1]
                print(f"  {model} batch {batch} {name}: " + (
                    r["error"] if "error" in r else
                    f"{r['samples_per_s']:,.0f} samples/s"
                    + (f", peak {r['peak_mib']:.0f} MiB" if r["peak_mib"] else "")), flush=True)
    device_name = (torch.cuda.get_device_name(0) if a.device == "cuda"
                   else platform.processor() or platform.machine())
    result = {"command": "python bench/gpu_throughput.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "device": device_name, "torch": torch.__version__,
              "train_rows": len(data.train), "steps": a.steps, "warmup": a.warmup,
              "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"\n{device_name}, {len(data.train):,} training rows, {a.steps} timed steps:\n")
    print("| model | batch | run | samples/s | peak MiB |\n|---|---|---|---|---|")
    for r in rows:
        rate = "error" if "error" in r else f"{r['samples_per_s']:,.0f}"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['model']} | {r['batch']} | {r['run']} | {rate} | {peak} |")
    return result


if __name__ == "__main__":
    main()
