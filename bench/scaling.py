"""Scaling of streamed training: time and peak memory for 1e5, 1e6 and 1e7 synthetic rows.

    .venv/bin/python bench/scaling.py [--rows 100000,1000000,10000000] [--quick] [--threads 2]

For each size: the default synthetic world of that many rows (generated into --workdir, reused
when its world.json holds the same config), then, in a child process of its own, the
quickstart's SharedBottom trained for one epoch with ``data.streaming: true`` (the trainer
re-reads train.parquet chunk by chunk; validation reads valid.parquet chunk by chunk too) at
batch 2048, without single-task baselines or a test split. Peak RSS is the child's
(``os.wait4``), the epoch time the run's history.json ``seconds`` (training loop only).
Expectation: time per row ~flat (near-linear time), peak RSS ~flat. Prints a table, writes
bench/results/scaling.json and the ``<!-- scaling:start -->`` block of docs/BENCHMARKS.md
(bench/run_all.py keeps it: its report renders the same block from bench/results/scaling.json).

Module level imports the standard library only: bench/peers/report.py imports
``render_block`` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scaling.json"
DOCS = REPO / "docs" / "BENCHMARKS.md"
START, END = "<!-- scaling:start -->", "<!-- scaling:end -->"
DEFAULT_ROWS = (100_000, 1_000_000, 10_000_000)
QUICK_ROWS = (20_000, 100_000)
SEED = 0


# -- the child: one streamed training run ---------------------------------------------------


def experiment_config(rows: int, batch: int = 2048, threads: int = 2, chunk_rows: int = 200_000,
                      shuffle_buffer_chunks: int = 4) -> Any:
    """The quickstart's model and optimiser for one streamed epoch over the default world."""
    from shopmtl.config import DataConfig, EarlyStopping, ExperimentConfig, ModelConfig, TrainConfig
    from shopmtl.run import QUICKSTART_ALPHA, QUICKSTART_MODEL

    return ExperimentConfig(
        data=DataConfig(synthetic={"rows": rows, "seed": SEED}, streaming=True,
                        chunk_rows=chunk_rows, shuffle_buffer_chunks=shuffle_buffer_chunks),
        model=ModelConfig("shared_bottom", dict(QUICKSTART_MODEL)),
        # one epoch: early stopping cannot stop anything (patience above the epoch count)
        train=TrainConfig(epochs=1, batch_size=batch, lr=2e-3, lr_decay=0.5,
                          embedding_weight_decay=1e-2, seed=SEED, alpha=dict(QUICKSTART_ALPHA),
                          threads=threads,
                          early_stopping=EarlyStopping("valid.click.all.auc", "max", 10)),
    )


def ensure_world(rows: int, data_dir: Path) -> float:
    """Generate the default world of ``rows`` rows into data_dir unless world.json there holds
    the same config; seconds spent generating (0 when reused)."""
    from shopmtl.data.pipeline import resolve_synthetic

    t0 = time.perf_counter()
    generated: list[str] = []
    resolve_synthetic(experiment_config(rows), data_dir, log=generated.append)
    return time.perf_counter() - t0 if generated else 0.0


def child(spec_path: str) -> None:
    import dataclasses
    import resource

    import torch

    from shopmtl.data.pipeline import resolve_synthetic
    from shopmtl.run import run_experiment

    spec = json.loads(Path(spec_path).read_text())
    cfg, _ = resolve_synthetic(
        experiment_config(spec["rows"], spec["batch"], spec["threads"], spec["chunk_rows"],
                          spec["shuffle_buffer_chunks"]), Path(spec["data_dir"]))
    # the files and schema are now explicit; no test split (validation is the held-out read)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, synthetic=None, test=None, test_fraction=0.0))
    run = Path(spec["run_dir"])
    metrics = run_experiment(cfg, run, baselines=False, progress=False)
    history = json.loads((run / "history.json").read_text())
    out = {"epoch_seconds": history[0]["seconds"], "valid_auc": history[0]["valid_auc"],
           "train_seconds_with_validation": metrics["train"]["seconds"],
           "run_seconds": metrics["seconds_total"], "threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "peak_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    Path(spec["out"]).write_text(json.dumps(out, indent=1))


# -- the parent -----------------------------------------------------------------------------


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def child_env(threads: int) -> dict[str, str]:
    from bench.peers import common as C

    env = C.child_env()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def measure(rows: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench.run_all import load_average, run_child

    size_dir = work / f"rows_{rows}"
    data_dir = size_dir / "data"
    gen_s = ensure_world(rows, data_dir)
    run_dir = size_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {"rows": rows, "batch": args.batch, "threads": args.threads,
            "chunk_rows": args.chunk_rows, "shuffle_buffer_chunks": args.shuffle_buffer_chunks,
            "data_dir": str(data_dir), "run_dir": str(run_dir),
            "out": str(size_dir / "result.json")}
    spec_path = size_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["out"]).unlink(missing_ok=True)
    la0 = load_average()
    rc, rss, wall = run_child([sys.executable, "-m", "bench.scaling", "--child", str(spec_path)],
                              size_dir / "child.log", args.timeout, env=child_env(args.threads))
    la1 = load_average()
    if rc != 0:
        raise SystemExit(f"rows {rows}: child failed (exit {rc}):\n"
                         + (size_dir / "child.log").read_text()[-3000:])
    res = json.loads(Path(spec["out"]).read_text())
    train_rows = parquet_rows(data_dir / "train.parquet")
    return {"rows": rows, "train_rows": train_rows,
            "valid_rows": parquet_rows(data_dir / "valid.parquet"),
            "epoch_seconds": res["epoch_seconds"],
            "child_wall_seconds": wall,
            "train_seconds_with_validation": res["train_seconds_with_validation"],
            "samples_per_s": train_rows / res["epoch_seconds"],
            "peak_rss_mb": rss, "peak_rss_self_mb": res["peak_rss_self_mb"],
            "load_average": [la0, la1], "threads": res["threads"], "torch": res["torch"],
            "valid_auc": res["valid_auc"], "generate_seconds": gen_s}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Time per training row and peak RSS, each over the smallest size's."""
    base = min(results, key=lambda r: r["rows"])
    per_row = base["epoch_seconds"] / base["train_rows"]
    for r in results:
        r["time_per_row_ratio"] = r["epoch_seconds"] / r["train_rows"] / per_row
        r["peak_rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]


# -- the report -----------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| rows | training rows | epoch s | child wall s | samples/s | peak RSS MB | "
             "time/row ÷ smallest | peak RSS ÷ smallest | load avg before → after |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['train_rows']:,} | {r['epoch_seconds']:.1f} | "
            f"{r['child_wall_seconds']:.1f} | {r['samples_per_s']:,.0f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['time_per_row_ratio']:.2f} | "
            f"{r['peak_rss_ratio']:.2f} | {r['load_average'][0]:.2f} → "
            f"{r['load_average'][1]:.2f} |")
    return lines


def render_block(doc: dict[str, Any]) -> str:
    """The docs section between the markers (markers included), from scaling.json."""
    env, results = doc["env"], doc["results"]
    buffer_rows = env["chunk_rows"] * env["shuffle_buffer_chunks"]
    loads = [x for r in results for x in r["load_average"]]
    lines = [
        START,
        "## Scaling: streamed training",
        "",
        "<!-- generated by bench/scaling.py into bench/results/scaling.json; bench/run_all.py "
        "renders it again from there -->",
        "",
        "Training time and peak memory of the quickstart's SharedBottom for one epoch over the "
        "default synthetic world at several sizes, with `data.streaming: true` (the trainer "
        "re-reads train.parquet chunk by chunk each epoch). Each size runs in its own process; "
        "peak RSS is that child's (`os.wait4`), the epoch time the run's history.json `seconds` "
        "(training loop only; validation excluded). Near-linear time means time/row ÷ smallest "
        "≈ 1.0; flat memory means peak RSS ÷ smallest ≈ 1.0.",
        "",
        "```bash",
        env["command"],
        "```",
        "",
        f"Run {env['started']}. CPU: {env['cpu']}, {env['cores']} cores; torch threads "
        f"{env['threads']}; torch {env['torch']}; Python {env['python']}. Batch "
        f"{env['batch']}; chunk_rows {env['chunk_rows']:,} × shuffle_buffer_chunks "
        f"{env['shuffle_buffer_chunks']} = {buffer_rows:,} rows in the shuffle buffer. Load "
        f"average (1 min) over the runs {min(loads):.2f}–{max(loads):.2f} on "
        f"{env['cores']} cores"
        + (": **the machine was loaded; read the ratios with care.**"
           if max(loads) > env["cores"] * 0.75 else ".")
        + (" **Quick run (small sizes): a smoke test, not the measurement.**"
           if env.get("quick") else ""),
        "",
        *table(results),
        "",
        "Caveats: " + (
            "every split is streamed: training re-reads train.parquet each epoch, and each "
            "validation reads valid.parquet chunk by chunk and keeps only its predictions and "
            "label columns (about 60 bytes a row: "
            f"{results[-1]['valid_rows']:,} rows at the largest size), so that part still grows "
            "with the size; the features never do. "
            if env.get("streamed_valid") else
            "the valid split (days 24–26 of 30, "
            f"{results[-1]['valid_rows'] / results[-1]['rows']:.0%} of the rows) is encoded and "
            "held in memory for validation, so it grows with the size; only the training read "
            "is streamed. ")
        + (f"Below {buffer_rows:,} training rows the whole split fits in one shuffle buffer, so "
           "the smallest sizes hold less than the steady-state buffer. "
           if buffer_rows > min(r["train_rows"] for r in results) else
           f"The shuffle buffer ({buffer_rows:,} rows) is filled at every size, so every size "
           "holds the same buffer; a larger buffer shuffles better and costs memory in "
           "proportion, not in the file's size. ")
        + "Peak RSS includes a fixed part "
        "(interpreter, torch, pyarrow, the TensorBoard writer): most of the smallest size's "
        "figure. The epoch time includes fixed start-up costs (first steps, first chunk read), "
        "which weigh most at the smallest size.",
        END,
    ]
    return "\n".join(lines)


def splice(text: str, block: str) -> str:
    """``text`` with its scaling block replaced by ``block`` (appended when it has none)."""
    i, j = text.find(START), text.find(END)
    if i != -1 and j > i:
        return text[:i] + block + text[j + len(END):]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def write_docs(path: Path, block: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(splice(path.read_text() if path.is_file() else "", block))


def parse_rows(text: str) -> list[int]:
    rows = sorted({int(float(x)) for x in text.split(",") if x.strip()})
    if not rows or rows[0] < 1000:
        raise argparse.ArgumentTypeError("--rows: comma-separated sizes, each >= 1000")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=parse_rows, default=list(DEFAULT_ROWS),
                    help="comma-separated sizes (default 100000,1000000,10000000)")
    ap.add_argument("--quick", action="store_true",
                    help=f"sizes {','.join(map(str, QUICK_ROWS))} only (a smoke run)")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    # a 50,000-row buffer: below the smallest size's 80,000 training rows, so every size holds
    # the same steady-state buffer and the memory column shows what grows with the file
    ap.add_argument("--chunk-rows", type=int, default=25_000, help="data.chunk_rows")
    ap.add_argument("--shuffle-buffer-chunks", type=int, default=2,
                    help="data.shuffle_buffer_chunks")
    ap.add_argument("--workdir", type=Path,
                    default=Path(tempfile.gettempdir()) / "shopmtl-scaling",
                    help="worlds and runs, one folder per size; worlds are reused "
                         "(default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--docs", type=Path, default=DOCS,
                    help="markdown file whose scaling block is (re)written")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, str(REPO))
    import torch

    from bench.run_all import cpu_model, load_average

    sizes = list(QUICK_ROWS) if args.quick else args.rows
    command = " ".join([".venv/bin/python bench/scaling.py", *map(shlex.quote, sys.argv[1:])])
    env = {"command": command, "cpu": cpu_model(), "cores": os.cpu_count(),
           "threads": args.threads, "torch": torch.__version__,
           "python": platform.python_version(), "batch": args.batch,
           "chunk_rows": args.chunk_rows, "shuffle_buffer_chunks": args.shuffle_buffer_chunks,
           "quick": args.quick, "streamed_valid": True,
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "load_average_start": load_average()}
    print(f"CPU {env['cpu']} | {env['cores']} cores | torch threads {args.threads} | "
          f"load average {env['load_average_start']}", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in sizes:
        r = measure(rows, args, args.workdir)
        results.append(r)
        print(f"rows {rows:,}: epoch {r['epoch_seconds']:.1f}s ({r['samples_per_s']:,.0f}/s), "
              f"child {r['child_wall_seconds']:.1f}s, peak RSS {r['peak_rss_mb']:,.0f} MB, "
              f"load {r['load_average'][0]}-{r['load_average'][1]}", flush=True)
    add_ratios(results)
    env["load_average_end"] = load_average()
    doc = {"env": env, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(args.out)
    print("\n".join(table(results)))
    write_docs(args.docs, render_block(doc))
    print(f"wrote {args.out} and the scaling block of {args.docs}")


if __name__ == "__main__":
    main()
