"""Streamed training with and without ``data.prefetch`` (the next batches parsed, encoded and
gathered in a background thread while the step runs), against the same data in memory. A
benchmark, not a test.

    .venv/bin/python bench/streaming_prefetch.py [--rows 200000] [--epochs 3] [--threads 1]

The default synthetic world of ``--rows`` impressions (generated into ``--workdir``, reused when
present), the quickstart's SharedBottom at batch 2048, ``shopmtl train`` in one process with
``--threads`` torch threads: in memory, streamed (``data.streaming: true``, chunks of
``--chunk`` rows) with prefetch 0 (off) and 4. samples/s = training rows / the epoch's
training-loop seconds (history.json ``seconds``: validation excluded), the median over the
epochs; the runs alternate so that background load falls on each alike. The three runs train
the same batches in the same order, so their test AUCs must agree: the table shows them.

Writes bench/results/streaming_prefetch.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ddp_scaling import config_yaml, cpu_run, train_rows, world  # noqa: E402

RESULTS = REPO / "bench" / "results" / "streaming_prefetch.json"
RUNS = {"in memory": {}, "streamed, prefetch 0": {"streaming": True, "prefetch": 0},
        "streamed, prefetch 4": {"streaming": True, "prefetch": 4}}


def variant_yaml(base: Path, path: Path, data: dict, chunk: int) -> Path:
    import yaml

    raw = yaml.safe_load(base.read_text())
    raw["data"].update(data)
    if data:
        raw["data"]["chunk_rows"] = chunk
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="prefetch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = world(a.rows, workdir)
    rows = train_rows(data)
    base = config_yaml(data, workdir / "base.yaml", a.epochs, a.batch, a.threads)
    seconds: dict[str, list[float]] = {name: [] for name in RUNS}
    auc: dict[str, dict[str, float]] = {}
    for r in range(a.repeats):
        for name, keys in RUNS.items():
            slug = name.replace(" ", "").replace(",", "-")
            cfg = variant_yaml(base, workdir / f"cfg-{slug}.yaml", keys, a.chunk)
            run = cpu_run(cfg, workdir / f"run-{slug}", 1, a.timeout)
            seconds[name] += run["epoch_seconds"]
            auc[name] = run["test_auc"]
            print(f"  repeat {r}: {name}: {rows / statistics.median(run['epoch_seconds']):,.0f}"
                  " samples/s", flush=True)
    ref = statistics.median(seconds["streamed, prefetch 0"])
    table = []
    for name in RUNS:
        med = statistics.median(seconds[name])
        table.append({"run": name, "median_epoch_seconds": med, "samples_per_s": rows / med,
                      "vs_streamed_without_prefetch": ref / med, "test_auc": auc[name],
                      "epoch_seconds": seconds[name]})
    result = {"rows": a.rows, "train_rows": rows, "epochs": a.epochs, "batch": a.batch,
              "threads": a.threads, "chunk_rows": a.chunk, "repeats": a.repeats,
              "machine": platform.processor() or platform.machine(), "runs": table}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    tasks = list(table[0]["test_auc"])
    print(f"\n{rows:,} training rows, batch {a.batch}, {a.threads} thread(s), chunks of "
          f"{a.chunk:,} rows, median over {a.epochs} epochs x {a.repeats} repeats:\n")
    print("| run | median epoch s | samples/s | vs streamed, no prefetch | "
          + " | ".join(f"test AUC {t}" for t in tasks) + " |")
    print("|---|---|---|---|" + "---|" * len(tasks))
    for row in table:
        print(f"| {row['run']} | {row['median_epoch_seconds']:.2f} | "
              f"{row['samples_per_s']:,.0f} | {row['vs_streamed_without_prefetch']:.2f}x | "
              + " | ".join(f"{row['test_auc'][t]:.4f}" for t in tasks) + " |")


if __name__ == "__main__":
    sys.exit(main())
