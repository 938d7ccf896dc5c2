"""Training throughput of one process vs several (torchrun, DDP over gloo) on this machine's
CPUs. A benchmark, not a test.

    .venv/bin/python bench/ddp_scaling.py [--rows 200000] [--epochs 3] [--batch 2048]
        [--streamed]

CPU section: the default synthetic world of ``--rows`` impressions (generated into
``--workdir``, reused when present), the quickstart's SharedBottom trained ``--epochs`` epochs
at global batch ``--batch``, run as ``shopmtl train`` in one process with 1 and with 2 torch
threads, and as ``torchrun --standalone --nproc_per_node=2 -m shopmtl train`` with one thread
per process. samples/s = training rows / the epoch's training-loop seconds (history.json
``seconds``: validation excluded), the median over the epochs. On a 2-core machine two
processes compete for the same two cores as two threads do: expect little or no gain.
``--streamed`` adds ``data.streaming: true`` rows for 1 and 2 processes over a copy of the
training file in row groups of ``--row-group`` rows (under torchrun each rank reads its own
row groups, ``shopmtl.data.shards``): samples/s then counts the rows a run trains on (two
processes leave a small remainder out each epoch) and includes each epoch's parse.

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
                device: str = "cpu", streamed: Path | None = None) -> Path:
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
    if streamed is not None:  # the training file in row groups, re-read every epoch
        raw["data"].update(streaming=True, train=str(streamed))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def row_grouped(data: Path, rows_per_group: int) -> Path:
    """train.parquet rewritten in row groups of ``rows_per_group`` rows (reused)."""
    import pyarrow.parquet as pq

    path = data / f"train-rg{rows_per_group}.parquet"
    if not path.is_file():
        pq.write_table(pq.read_table(data / "train.parquet"), path,
                       row_group_size=rows_per_group)
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
    return {"epoch_seconds": [h["seconds"] for h in history],
            "steps_per_epoch": history[0]["step"], "wall_seconds":
            time.perf_counter() - t0, "test_auc": {t: m["all"]["auc"] for t, m in
                                                   metrics["test"].items()}}


def cpu_section(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    data = world(args.rows, workdir)
    rows = train_rows(data)
    out = []
    runs = [(1, 1, None), (1, 2, None), (2, 1, None)]
    if args.streamed:
        grouped = row_grouped(data, args.row_group)
        runs += [(1, 1, grouped), (2, 1, grouped)]
    for nproc, threads, streamed in runs:
        tag = f"{nproc}x{threads}" + ("-streamed" if streamed else "")
        cfg = config_yaml(data, workdir / f"cfg-{tag}.yaml", args.epochs, args.batch,
                          threads, streamed=streamed)
        run = cpu_run(cfg, workdir / f"run-{tag}", nproc, args.timeout)
        median = statistics.median(run["epoch_seconds"])
        # the rows trained on: two streaming processes leave a remainder out each epoch
        trained = min(rows, run["steps_per_epoch"] * args.batch)
        out.append({"processes": nproc, "threads_per_process": threads, "batch": args.batch,
                    "data": "streamed" if streamed else "memory", "train_rows": rows,
                    "trained_rows_per_epoch": trained, "epochs": args.epochs,
                    "median_epoch_seconds": median, "samples_per_s": trained / median, **run})
        print(f"  {tag}: {trained / median:,.0f} samples/s", flush=True)
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| processes x threads | data | global batch | median epoch s | samples/s | "
             "speed-up | test click AUC |",
             "|---|---|---|---|---|---|---|"] if result["cpu"] else []
    base = result["cpu"][0]["samples_per_s"] if result["cpu"] else 1.0
    for r in result["cpu"]:
        lines.append(f"| {r['processes']} x {r['threads_per_process']} | "
                     f"{r.get('data', 'memory')} | {r['batch']} | "
                     f"{r['median_epoch_seconds']:.2f} | {r['samples_per_s']:,.0f} | "
                     f"{r['samples_per_s'] / base:.2f}x | {r['test_auc']['click']:.4f} |")
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
    ap.add_argument("--streamed", action="store_true",
                    help="also 1 and 2 processes with data.streaming over row groups")
    ap.add_argument("--row-group", type=int, default=10_000,
                    help="rows per Parquet row group of the streamed copy")
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
