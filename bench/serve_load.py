"""The HTTP service under load: the real server process, loopback only, bounded in time.

Trains the quickstart model if ``--run`` holds none (``shopmtl quickstart --rows 300000
--no-baselines --out runs/bench-export``, as bench/export.py does), exports its int8 ONNX bundle
(``shopmtl export RUN/model --out RUN/bundle-int8 --data RUN/data/test.parquet --int8``, once),
then for each run starts the real server (``python -m shopmtl serve MODEL --port P
--max-in-flight N``: uvicorn, one process), waits for ``/readyz`` and drives ``POST
/v1/recommend`` with C concurrent clients for ``--seconds`` (each request: one user, 100
candidate items, both drawn from the test split), then stops the server (SIGTERM, always):

- ``int8``: the int8 bundle, 16 clients, the default in-flight bound (8);
- ``overload``: the int8 bundle, 64 clients, ``--max-in-flight 8``: 429s expected, never a 5xx;
- ``pytorch``: the source model directory (plain PyTorch) under the ``int8`` run's load.

Prints the table docs/DEPLOY.md ("## Load") holds and writes ``--out`` (JSON):

    .venv/bin/python bench/serve_load.py --out bench/results/serve_load.json

The client: one Python process, asyncio, one ``httpx.AsyncClient`` per client (HTTP/1.1, one
keep-alive connection each), the request bodies serialised before the clock starts and the 200
answers not parsed (one checked before the run), so the client spends little CPU per request.
Each client is a closed loop: send, wait for the answer, send again; a 429 is honoured as a
polite client would (it sleeps its ``Retry-After`` before sending again). Latency is the time
from sending to the whole answer, in the client: it includes the loopback and the client's own
event-loop delay. Client and server share the same cores (2 on the machine of the docs), and
their CPU seconds are reported apart: read every number with the load average beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from export import cpu_model, ensure_run  # bench/export.py: the same quickstart run

CANDIDATES = 100
BODIES = 256  # distinct request bodies, cycled
READY_S = 300
# the rec columns that describe the item (the rest: the user and the scenario)
ITEM_FIELDS = ("item_id", "top_category", "leaf_category", "brand", "position", "price")
TARGET_P99_MS = 20.0
GATE_LINE = re.compile(r"POST /v1/recommend 200 ([0-9.]+) ms")


def ensure_bundle(run: Path) -> Path:
    """The int8 ONNX bundle of the run's model, exported first when absent."""
    bundle = run / "bundle-int8"
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "shopmtl", "export", str(run / "model"), "--out",
                        str(bundle), "--data", str(run / "data" / "test.parquet"), "--int8"],
                       check=True)
    return bundle


def request_bodies(model_dir: Path, test: Path, n: int, seed: int = 0) -> list[bytes]:
    """``n`` /v1/recommend bodies: a test row's user and scenario as the context, the item
    fields of ``CANDIDATES`` other test rows as the candidates (real ids, real prices)."""
    import pyarrow.parquet as pq

    from shopmtl.modeldir import load

    inputs = load(model_dir).contract("click").inputs
    fields = [f.name for f in inputs]
    strings = {f.name for f in inputs if f.type == "string"}  # ids: JSON strings
    floats = {f.name for f in inputs if f.type == "number"}
    table = pq.read_table(test, columns=fields)
    rows = [{k: None if v is None else str(v) if k in strings else float(v) if k in floats
             else v for k, v in r.items()}
            for r in table.slice(0, min(table.num_rows, 20_000)).to_pylist()]
    rng = random.Random(seed)
    item = [f for f in fields if f in ITEM_FIELDS]
    user = [f for f in fields if f not in ITEM_FIELDS]
    out = []
    for _ in range(n):
        ctx = rng.choice(rows)
        cands = rng.sample(rows, CANDIDATES)
        # an empty cell (None, "") is left out: the service reads it as absent, as training
        body = {"context": {k: ctx[k] for k in user if ctx[k] not in (None, "")},
                "candidates": [{k: c[k] for k in item if c[k] not in (None, "")}
                               for c in cands]}
        out.append(json.dumps(body).encode())
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


@contextmanager
def server(model: Path, max_in_flight: int, log: Path):
    """``python -m shopmtl serve MODEL`` on a free loopback port, ready; always stopped."""
    import httpx

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shopmtl", "serve", str(model), "--port", str(port),
             "--max-in-flight", str(max_in_flight)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): see {log}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {READY_S} s: see {log}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def drive(url: str, bodies: list[bytes], clients: int, seconds: float
                ) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``: every answer's status and latency."""
    import httpx

    headers = {"content-type": "application/json"}
    lat_ok: list[float] = []
    codes: Counter[str] = Counter()
    # one AsyncClient (one keep-alive connection) per client: a pool shared by 64 clients
    # costs the client process several ms of CPU per request (httpcore's pool bookkeeping)
    https = [httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1),
                               timeout=60) for _ in range(clients)]
    try:
        first = await https[0].post("/v1/recommend", content=bodies[0], headers=headers)
        if first.status_code != 200 or len(first.json()["items"]) != CANDIDATES:
            raise RuntimeError(f"the first request failed: {first.status_code} "
                               f"{first.text[:500]}")
        start = time.perf_counter()
        end = start + seconds

        async def client(k: int) -> None:
            http, i = https[k], k
            while time.perf_counter() < end:
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/recommend", content=body, headers=headers)
                except httpx.TransportError:
                    codes["connection_error"] += 1
                    continue
                dt = time.perf_counter() - t0
                codes[str(r.status_code)] += 1
                if r.status_code == 200:
                    lat_ok.append(dt)
                elif r.status_code == 429:
                    await asyncio.sleep(min(float(r.headers.get("retry-after", "1")),
                                            max(0.0, end - time.perf_counter())))

        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(h.aclose() for h in https))
    return {"wall_s": wall, "codes": dict(codes), "latency_ok_s": lat_ok}


def gate_latencies(log: Path) -> list[float]:
    """The server's own time (ms) of each 200 on /v1/recommend, from its log lines (the gate
    logs each request with its time, from the moment the gate sees it); the first one, sent
    before the clock started, left out."""
    times = [float(m) for m in GATE_LINE.findall(log.read_text(errors="replace"))]
    return times[1:]


def measure(name: str, model: Path, bodies: list[bytes], clients: int, seconds: float,
            max_in_flight: int, logs: Path) -> dict[str, Any]:
    import numpy as np

    log = logs / f"serve-{name}.log"
    with server(model, max_in_flight, log) as (url, proc):
        cpu0, me0, load0 = cpu_seconds(proc.pid), time.process_time(), os.getloadavg()[0]
        got = asyncio.run(drive(url, bodies, clients, seconds))
        cpu1, me1, load1 = cpu_seconds(proc.pid), time.process_time(), os.getloadavg()[0]
    lat = np.asarray(got["latency_ok_s"]) * 1e3
    gate = np.asarray(gate_latencies(log))
    codes = got["codes"]
    ok = int(codes.get("200", 0))
    n5xx = sum(v for k, v in codes.items() if k.isdigit() and int(k) >= 500)
    other = sum(v for k, v in codes.items() if k.isdigit() and int(k) not in (200, 429)
                and int(k) < 500)
    pct = (lambda q: float(np.percentile(lat, q))) if ok else (lambda q: float("nan"))
    return {"run": name, "model": str(model), "clients": clients, "max_in_flight": max_in_flight,
            "seconds": got["wall_s"], "requests": sum(codes.values()), "ok": ok,
            "throughput_ok_rps": ok / got["wall_s"], "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "max_ms": float(lat.max()) if ok else float("nan"),
            "server_p50_ms": float(np.percentile(gate, 50)) if len(gate) else float("nan"),
            "server_p99_ms": float(np.percentile(gate, 99)) if len(gate) else float("nan"),
            "n429": int(codes.get("429", 0)), "n5xx": n5xx, "other_4xx": other,
            "connection_errors": int(codes.get("connection_error", 0)), "codes": codes,
            "server_cpu_s": cpu1 - cpu0, "client_cpu_s": me1 - me0,
            "load_average": [load0, load1]}


def markdown(result: dict[str, Any]) -> str:
    head = ["run", "model", "clients", "in-flight", "req/s (200)", "p50 ms", "p99 ms",
            "server p50 / p99 ms",
            "200", "429", "5xx", "conn. err.", "server / client CPU s", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        cells = [r["run"], r["model_kind"], str(r["clients"]), str(r["max_in_flight"]),
                 f"{r['throughput_ok_rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                 f"{r['server_p50_ms']:.1f} / {r['server_p99_ms']:.1f}",
                 str(r["ok"]), str(r["n429"]), str(r["n5xx"]), str(r["connection_errors"]),
                 f"{r['server_cpu_s']:.0f} / {r['client_cpu_s']:.0f}",
                 f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-export"),
                    help="a quickstart output folder (trained when it has no model)")
    ap.add_argument("--rows", type=int, default=300_000, help="the quickstart's --rows")
    ap.add_argument("--seconds", type=float, default=60.0, help="the length of each run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--overload-clients", type=int, default=64)
    ap.add_argument("--overload-in-flight", type=int, default=8)
    ap.add_argument("--runs", nargs="+", default=["int8", "overload", "pytorch"],
                    choices=["int8", "overload", "pytorch"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    model_dir = ensure_run(args.run, args.rows)
    bundle = ensure_bundle(args.run)
    bodies = request_bodies(model_dir, args.run / "data" / "test.parquet", BODIES)
    plan = {"int8": (bundle, args.clients, 8),
            "overload": (bundle, args.overload_clients, args.overload_in_flight),
            "pytorch": (model_dir, args.clients, 8)}
    runs = []
    for name in args.runs:
        model, clients, limit = plan[name]
        r = measure(name, model, bodies, clients, args.seconds, limit, args.run)
        r["model_kind"] = "onnx int8" if model == bundle else "pytorch"
        runs.append(r)
        print(f"{name}: {r['throughput_ok_rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, codes {r['codes']}", flush=True)
    by = {r["run"]: r for r in runs}
    result: dict[str, Any] = {"runs": runs, "candidates": CANDIDATES,
                              "target_p99_ms": TARGET_P99_MS}
    if "int8" in by and "pytorch" in by:
        result["onnx_over_pytorch"] = {
            "throughput": by["int8"]["throughput_ok_rps"] / by["pytorch"]["throughput_ok_rps"],
            "p50": by["pytorch"]["p50_ms"] / by["int8"]["p50_ms"],
            "p99": by["pytorch"]["p99_ms"] / by["int8"]["p99_ms"]}
    result["env"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                     "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0], "quickstart_rows": args.rows,
                     "client": "one process, asyncio, one httpx.AsyncClient per client, closed "
                     "loop, 429 -> sleep Retry-After; client and server share the cores"}
    result["command"] = "python bench/serve_load.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    table = markdown(result)
    result["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table)
    if "onnx_over_pytorch" in result:
        x = result["onnx_over_pytorch"]
        print(f"onnx int8 / pytorch: {x['throughput']:.2f}x throughput, p50 {x['p50']:.2f}x, "
              f"p99 {x['p99']:.2f}x lower")
    print(f"load {load_before:.1f} -> {result['env']['load_average_after']:.1f}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
