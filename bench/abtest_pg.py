"""The event store's write rate: SQLite (one file, WAL) against PostgreSQL, with one writer and
with two writers at once (two servers sharing one database).

Each writer is its own process (as each server is) with its own ``EventStore`` and writes
``--rows`` exposures in transactions of 512 (``serve.experiment.BATCH``: what the service's
writer thread commits at most per transaction), timing each transaction. PostgreSQL is a
throwaway cluster on loopback (tests/abtest/pg.py) with durable commits (fsync and
synchronous_commit on, the server's defaults). Prints the
table docs/ABTEST.md ("### Several servers: PostgreSQL") holds and writes ``--out`` (JSON):

    .venv/bin/python bench/abtest_pg.py --out bench/results/abtest_pg.json

The service needs the store to keep up with its request rate: at 512 events per transaction
a writer drains ``512 / (ms per transaction) * 1000`` events per second; slower, the bounded
queue fills and drops (counted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # shopmtl and the tests' cluster helper

from shopmtl.abtest.events import EventStore, Exposure, read_events  # noqa: E402

BATCH = 512  # = shopmtl.serve.experiment.BATCH (not imported: that pulls in the serve extra)


def _rows(writer: int, n: int) -> list[Exposure]:
    rng = np.random.default_rng(writer)
    shown = json.dumps([str(i) for i in range(10)])
    return [Exposure(f"w{writer}-{i}", 1.7e9 + i, "bench", "test",
                     "control" if rng.random() < 0.5 else "treatment", f"{rng.integers(1 << 62):x}",
                     "search", shown, float(rng.exponential(20)), 200) for i in range(n)]


def _write(where: str, writer: int, n: int, start: Any, out: Any) -> None:
    rows = _rows(writer, n)
    with EventStore(where) as store:
        start.wait()  # every writer connected: they write at the same time
        times = []
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            t = time.perf_counter()
            store.add_exposures(rows[i:i + BATCH])
            times.append(time.perf_counter() - t)
        out.put((writer, time.perf_counter() - t0, times))


def run(where: str, writers: int, n: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_write, args=(where, w, n, start, out)) for w in range(writers)]
    load = os.getloadavg()[0]
    for p in procs:
        p.start()
    try:
        got = [out.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    stored = read_events(where).exposures.num_rows
    assert stored == writers * n, (stored, writers * n)
    ms = np.array([t for _, _, ts in got for t in ts]) * 1000
    wall = max(s for _, s, _ in got)
    return {"writers": writers, "rows_per_writer": n, "rows_stored": stored,
            "rows_per_s": writers * n / wall, "tx_ms_p50": float(np.percentile(ms, 50)),
            "tx_ms_p99": float(np.percentile(ms, 99)), "load_average": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="exposures per writer")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/abtest_pg.json")
    args = ap.parse_args(argv)
    from tests.abtest.pg import cluster

    results = []
    with tempfile.TemporaryDirectory() as tmp, cluster(durable=True) as pg:
        for backend, writers in (("sqlite", 1), ("postgresql", 1), ("postgresql", 2)):
            if backend == "sqlite":
                where = str(Path(tmp) / "events.db")
            else:
                where = pg.create_database(f"bench{writers}")
            r = {"backend": backend, **run(where, writers, args.rows)}
            results.append(r)
            print(f"{backend} x{writers}: {r['rows_per_s']:.0f} rows/s, transaction p50 "
                  f"{r['tx_ms_p50']:.1f} ms, p99 {r['tx_ms_p99']:.1f} ms", flush=True)
    table = ["| store | writers | rows/s (all writers) | ms per 512-row transaction p50 / p99 "
             "| load |", "|---|---|---|---|---|"]
    table += [f"| {r['backend']} | {r['writers']} | {r['rows_per_s']:.0f} | "
              f"{r['tx_ms_p50']:.1f} / {r['tx_ms_p99']:.1f} | {r['load_average']:.1f} |"
              for r in results]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "batch": BATCH, "cpus": os.cpu_count(),
                                    "postgres": "throwaway loopback cluster, durable commits"},
                                   indent=1))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
