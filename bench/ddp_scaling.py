"""Training throughput of one process vs several (torchrun, DDP over gloo) on this machine's
CPUs. A benchmark, not a test.

    .venv/bin/python bench/ddp_scaling.py [--rows 200000] [--epochs 3] [--batch 2048]

CPU section: the default synthetic world of ``--rows`` impressions (generated into
``--workdir``, reused when present), the quickstart's SharedBottom trained ``--epochs`` epochs
at global batch ``--batch``, run as ``shopmtl train`` in one process with 1 and with 2 torch
threads, and as ``torchrun --standalone --nproc_per_node=2 -m shopmtl train`` with one thread
per process. samples/s = training rows / the epoch's training-loop seconds (history.json
``seconds``: validation excluded), the median over the epochs. On a 2-core machine two
processes compete for the same two cores as two threads do: expect little or no gain.

One GPU: bench/gpu_throughput.py (MMoE and PLE at batch 2048, 8192 and 65536 against
torch-rechub), run on a lent GPU machine by bench/gpu_check.sh.

Writes bench/results/ddp_scaling.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "ddp_scaling.json"
SEED = 0


def world(rows: int, workdir: Path) -> Path:
    from shopmtl.data.synthetic import WorldConfig, generate

    d = workdir / f"world-{rows}"
    if not (d / "world.json").is_file():
        generate(WorldConfig(rows=rows, seed=SEED), d)
    return d


def config_yaml(data: Path, path: Path, epochs: int, batch: int, threads: int,
                model: str = "shared_bottom", args: dict | None = None,
                device: str = "cpu") -> Path:
    import yaml

    from shopmtl.config import to_dict
    from shopmtl.data.synthetic import default_schema
    from shopmtl.run import QUICKSTART_ALPHA, QUICKSTART_MODEL

    schema = {k: v for k, v in to_dict(default_schema()).items()
              if k in ("features", "tasks", "scenario", "group")}
    raw = {
        "data": {"schema": schema, "train": str(data / "train.parquet"),
                 "valid": str(data / "valid.parquet"), "test": str(data / "test.parquet")},
        "model": {"name": model, "args": args if args is not None else dict(QUICKSTART_MODEL)},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 2e-3, "seed": SEED,
                  "embedding_weight_decay": 1e-2, "alpha": dict(QUICKSTART_ALPHA),
                  "threads": threads, "log_every": 0, "device": device,
                  "early_stopping": {"metric": "valid.click.all.auc", "mode": "max",
                                     "patience": epochs + 1}},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_rows(data: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(data / "train.parquet").metadata.num_rows


def cpu_run(cfg: Path, out: Path, nproc: int, timeout: float) -> dict[str, Any]:
    # --overwrite: a rerun with the same --workdir replaces that run (a non-empty --out is
    # refused otherwise)
    if nproc == 1:
        cmd = [sys.executable, "-m", "shopmtl", "train", str(cfg), "--out", str(out),
               "--overwrite"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "shopmtl", "train", str(cfg), "--out",
               str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {"epoch_seconds": [h["seconds"] for h in history], "wall_seconds":
            time.perf_counter() - t0, "test_auc": {t: m["all"]["auc"] for t, m in
                                                   metrics["test"].items()}}


def cpu_section(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    data = world(args.rows, workdir)
    rows = train_rows(data)
    out = []
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        cfg = config_yaml(data, workdir / f"cfg-{nproc}x{threads}.yaml", args.epochs,
                          args.batch, threads)
        run = cpu_run(cfg, workdir / f"run-{nproc}x{threads}", nproc, args.timeout)
        median = statistics.median(run["epoch_seconds"])
        out.append({"processes": nproc, "threads_per_process": threads, "batch": args.batch,
                    "train_rows": rows, "epochs": args.epochs,
                    "median_epoch_seconds": median, "samples_per_s": rows / median, **run})
        print(f"  {nproc} process(es) x {threads} thread(s): {rows / median:,.0f} samples/s",
              flush=True)
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| processes x threads | global batch | median epoch s | samples/s | speed-up |",
             "|---|---|---|---|---|"] if result["cpu"] else []
    base = result["cpu"][0]["samples_per_s"] if result["cpu"] else 1.0
    for r in result["cpu"]:
        lines.append(f"| {r['processes']} x {r['threads_per_process']} | {r['batch']} | "
                     f"{r['median_epoch_seconds']:.2f} | {r['samples_per_s']:,.0f} | "
                     f"{r['samples_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args(argv)
    sys.path[:0] = [str(REPO / "src"), str(REPO)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"CPU: {os.cpu_count()} cores; {args.rows:,} rows, {args.epochs} epochs, "
              f"global batch {args.batch}", flush=True)
        cpu = [] if args.skip_cpu else cpu_section(args, workdir)
    cmd = ".venv/bin/python bench/ddp_scaling.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    result = {"command": cmd.strip(), "machine": {"cpus": os.cpu_count(),
                                                  "platform": platform.platform()},
              "cpu": cpu}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
