"""The cost of experiment logging in the service: the rank route with and without its events.

Trains the quickstart model if ``--run`` holds none (``shopmtl quickstart --rows 300000
--no-baselines --out runs/bench-export``, as bench/serve_load.py does), writes an experiment
of two arms of that model (pCTR alone vs expected GMV, 50/50), then for each run starts the
real server (``python -m shopmtl serve --experiment CONFIG --port P``: uvicorn, one process),
waits for ``/readyz`` and drives ``POST /v1/experiments/bench/rank`` with C closed-loop clients
for ``--seconds`` (each request: one of 256 users, 100 candidates of the test split, k = 10):

- ``logged``: every request's exposure queued and written to the SQLite store (WAL) by the
  writer thread: the service as it runs an experiment;
- ``unlogged``: the same arms with ``events: none`` (nothing queued, nothing written): the
  baseline the logging overhead is measured against.

The runs alternate (logged, unlogged, logged, ...) ``--rounds`` times, so a change of the
machine's load hits both. After each logged run the store is read back: exposures stored +
dropped = requests answered. Prints the table docs/ABTEST.md ("## Experiments in the service")
holds and writes ``--out`` (JSON):

    .venv/bin/python bench/abtest_serve.py --out bench/results/abtest_serve.json

The client is bench/serve_load.py's (one process, asyncio, one keep-alive ``httpx.AsyncClient``
per client, bodies serialised before the clock starts); latency is the client's, from sending
to the whole answer. Client and server share the cores: read each number with the load
average beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from export import cpu_model, ensure_run  # bench/export.py: the same quickstart run
from serve_load import cpu_seconds, serving

NAME = "bench"
CANDIDATES = 100
K = 10
BODIES = 256  # distinct users (and candidate lists), cycled
LABELS = ("day", "click", "conversion", "ad_click", "true_click", "true_conversion",
          "true_ad_click", "is_new_item", "user_id", "scenario")


def write_experiment(folder: Path, model: Path, logged: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.db*"):
        old.unlink()
    cfg = {"name": NAME, "k": K, "events": "events.db" if logged else "none",
           "arms": [{"name": "control", "share": 0.5,
                     "policy": {"model": str(model.resolve()), "weights": {"click": 1}}},
                    {"name": "treatment", "share": 0.5,
                     "policy": {"model": str(model.resolve())}}]}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def request_bodies(test: Path, n: int, seed: int = 0) -> list[bytes]:
    """n rank bodies: a user and a scenario of the test split, 100 of its rows as candidates."""
    import pyarrow.parquet as pq

    table = pq.read_table(test).slice(0, 20_000)
    rows = table.to_pylist()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first = rng.randrange(len(rows) - CANDIDATES)
        cands = [{k: v for k, v in r.items() if k not in LABELS}
                 for r in rows[first:first + CANDIDATES]]
        body = {"user_id": f"bench-user-{i}", "scenario": rows[first]["scenario"],
                "candidates": cands}
        out.append(json.dumps(body).encode())
    return out


def server(cfg: Path, log: Path):
    """``python -m shopmtl serve --experiment CFG`` on a free loopback port; always stopped."""
    return serving(["--experiment", str(cfg)], log)


async def drive(url: str, bodies: list[bytes], clients: int, seconds: float
                ) -> dict[str, Any]:
    import httpx

    path = f"/v1/experiments/{NAME}/rank"
    headers = {"content-type": "application/json"}
    lat: list[float] = []
    codes: Counter[str] = Counter()
    https = [httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1),
                               timeout=60) for _ in range(clients)]
    try:
        first = await https[0].post(path, content=bodies[0], headers=headers)
        if first.status_code != 200 or len(first.json()["shown"]) != K:
            raise RuntimeError(f"the first request failed: {first.status_code} "
                               f"{first.text[:300]}")
        start = time.perf_counter()
        end = start + seconds

        async def client(k: int) -> None:
            http, i = https[k], k
            while time.perf_counter() < end:
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                r = await http.post(path, content=body, headers=headers)
                codes[str(r.status_code)] += 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                elif r.status_code == 429:
                    await asyncio.sleep(1.0)

        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(h.aclose() for h in https))
    return {"wall_s": wall, "codes": dict(codes), "latency_s": lat}


def measure(name: str, cfg: Path, bodies: list[bytes], clients: int, seconds: float,
            logs: Path) -> dict[str, Any]:
    import numpy as np

    log = logs / f"serve-abtest-{name}.log"
    with server(cfg, log) as (url, proc):
        cpu0, load0 = cpu_seconds(proc.pid), os.getloadavg()[0]
        got = asyncio.run(drive(url, bodies, clients, seconds))
        cpu1, load1 = cpu_seconds(proc.pid), os.getloadavg()[0]
    lat = np.asarray(got["latency_s"]) * 1e3
    ok = int(got["codes"].get("200", 0))
    answered = sum(int(v) for k, v in got["codes"].items() if k != "429")
    out = {"run": name, "clients": clients, "seconds": got["wall_s"], "ok": ok,
           "codes": got["codes"], "throughput_rps": ok / got["wall_s"],
           "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
           "p99_ms": float(np.percentile(lat, 99)), "server_cpu_s": cpu1 - cpu0,
           "load_average": [load0, load1]}
    store = cfg.parent / "events.db"
    if store.is_file():  # sent = stored + dropped (the first request, before the clock, too)
        from shopmtl.abtest.events import read_events

        ev = read_events(store)
        out["stored"] = ev.exposures.num_rows
        out["dropped"] = ev.meta["dropped"]["exposures"]
        out["sent"] = answered + 1
        if out["stored"] + out["dropped"] != out["sent"]:
            raise RuntimeError(f"{name}: {out['sent']} exposures sent, {out['stored']} stored "
                               f"+ {out['dropped']} dropped")
    return out


def markdown(runs: list[dict[str, Any]]) -> str:
    head = ["run", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms", "server CPU s",
            "exposures stored / dropped", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        events = f"{r['stored']} / {r['dropped']}" if "stored" in r else "-"
        lines.append("| " + " | ".join([
            r["run"], str(r["clients"]), f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}",
            f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['server_cpu_s']:.0f}", events,
            f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-export"),
                    help="a quickstart output folder (trained when it has no model)")
    ap.add_argument("--rows", type=int, default=300_000, help="the quickstart's --rows")
    ap.add_argument("--seconds", type=float, default=20.0, help="the length of each run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="logged/unlogged pairs")
    ap.add_argument("--out", type=Path, default=Path("bench/results/abtest_serve.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    model = ensure_run(args.run, args.rows)
    bodies = request_bodies(args.run / "data" / "test.parquet", BODIES)
    runs = []
    for r in range(args.rounds):
        for name, logged in (("logged", True), ("unlogged", False)):
            cfg = write_experiment(args.run / f"abtest-{name}", model, logged)
            got = measure(name, cfg, bodies, args.clients, args.seconds, args.run)
            got["round"] = r
            runs.append(got)
            print(f"{name} (round {r}): {got['throughput_rps']:.1f} req/s, p50 "
                  f"{got['p50_ms']:.1f} ms, p99 {got['p99_ms']:.1f} ms, codes {got['codes']}",
                  flush=True)

    def med(name: str, key: str) -> float:
        return float(np.median([x[key] for x in runs if x["run"] == name]))

    overhead = {key: med("logged", key) / med("unlogged", key)
                for key in ("throughput_rps", "p50_ms", "p99_ms")}
    table = markdown(runs)
    result = {"runs": runs, "candidates": CANDIDATES, "k": K,
              "logged_over_unlogged_median": overhead, "markdown": table,
              "env": {"cpu": cpu_model(), "cores": os.cpu_count(),
                      "load_average_before": load_before,
                      "load_average_after": os.getloadavg()[0], "quickstart_rows": args.rows},
              "command": "python bench/abtest_serve.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table)
    print(f"logged / unlogged (medians): throughput {overhead['throughput_rps']:.3f}x, p50 "
          f"{overhead['p50_ms']:.3f}x, p99 {overhead['p99_ms']:.3f}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
