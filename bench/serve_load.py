"""The HTTP service under load: the real server process, loopback only, bounded in time.

Trains the quickstart model if ``--run`` holds none (``shopmtl quickstart --rows 300000
--no-baselines --out runs/bench-export``, as bench/export.py does), exports its int8 ONNX bundle
(``shopmtl export RUN/model --out RUN/bundle-int8 --data RUN/data/test.parquet --int8``, once),
then for each run starts the real server (``python -m shopmtl serve MODEL --port P
--max-in-flight N --batch-rows B``: uvicorn, one process), waits for ``/readyz`` and drives
``POST /v1/recommend`` with C concurrent clients for ``--seconds`` (each request: one user, 100
candidate items, both drawn from the test split), then stops the server (SIGTERM, always):

- ``int8``: the int8 bundle, 16 clients, the default in-flight bound (8), concurrent requests
  combined into one model call (``--batch-rows 4096``, the default: ``serve.batch``);
- ``int8-alone``: the same with ``--batch-rows 0`` (each request its own model call): what
  combining buys;
- ``int8-inflight4`` / ``int8-inflight16``: ``int8`` with ``--max-in-flight`` 4 / 16: closed-loop
  clients keep the admitted requests at the bound, so a request waits for about bound /
  throughput: the bound trades latency against the clients answered 429 (16: none);
- ``overload``: the int8 bundle, 64 clients, ``--max-in-flight 8``: 429s expected, never a 5xx;
- ``pytorch`` / ``pytorch-alone``: the source model directory (plain PyTorch) under the
  ``int8`` run's load, with and without combining;
- ``int8-httpx`` (not run by default): ``int8`` driven by httpx clients, the client of the
  earlier tables;
- ``int8-workers2`` (not run by default): ``int8`` served by ``--workers 2`` with
  ``--max-in-flight 4`` per worker (8 in all, as ``int8``); ``int8-workers2-inflight8``: 8 per
  worker (16 in all). The server's CPU seconds are the supervisor's and its workers'. Run them
  with ``int8`` as the baseline of the same invocation, into a file of their own:

    .venv/bin/python bench/serve_load.py --runs int8 int8-workers2 int8-inflight4 \
        --out bench/results/serve_load_workers.json

Prints the table docs/DEPLOY.md ("## Load") holds and writes ``--out`` (JSON):

    .venv/bin/python bench/serve_load.py --out bench/results/serve_load.json

The client: one Python process on uvloop, one keep-alive HTTP/1.1 connection per client
(``RawHTTP``: the requests' bytes built before the clock starts, each answer's status line,
Content-Length and Retry-After read, the 200 answers not parsed; one checked with httpx before
the run), so the client spends little CPU per request.
Each client is a closed loop: send, wait for the answer, send again; a 429 is honoured as a
polite client would (it sleeps its ``Retry-After`` before sending again). Latency is the time
from sending to the whole answer, in the client: it includes the loopback and the client's own
event-loop delay. Client and server share the same cores (2 on the machine of the docs), and
their CPU seconds are reported apart: read every number with the load average beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import cpu_model, ensure_run  # bench/export.py: the same quickstart run

CANDIDATES = 100
BODIES = 256  # distinct request bodies, cycled
READY_S = 300
# the rec columns that describe the item (the rest: the user and the scenario)
ITEM_FIELDS = ("item_id", "top_category", "leaf_category", "brand", "position", "price")
TARGET_P99_MS = 20.0
MAX_ROWS = 4096  # the server's --batch-rows default (serve.batch.MAX_ROWS)
RUNS = ("int8", "int8-alone", "int8-inflight4", "int8-inflight16", "int8-httpx", "overload",
        "pytorch", "pytorch-alone", "int8-workers2", "int8-workers2-inflight8")
DEFAULT_RUNS = ("int8", "int8-alone", "int8-inflight4", "int8-inflight16", "overload",
                "pytorch", "pytorch-alone")
# the ratios reported: (run a, run b) -> a's throughput / b's, b's p50 / a's, b's p99 / a's
RATIOS = {"onnx_over_pytorch": ("int8", "pytorch"),
          "combined_over_alone": ("int8", "int8-alone"),
          "pytorch_combined_over_alone": ("pytorch", "pytorch-alone"),
          "raw_client_over_httpx": ("int8", "int8-httpx"),
          "workers2_over_one": ("int8-workers2", "int8"),
          "workers2_inflight8_over_one": ("int8-workers2-inflight8", "int8")}
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


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (``--workers``: the supervisor and its workers)."""
    found, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            new = [k for k in kids if k not in found]
            found += new
            todo += new
    return found


def all_ready(url: str, workers: int) -> None:
    """Wait until ``/metrics`` says every worker is ready (``shopmtl_ready`` sums them)."""
    import httpx

    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        if re.search(rf"^shopmtl_ready {workers}\.0$", text, re.M):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{workers} workers were not ready after {READY_S} s")


def tree_cpu_seconds(pids: list[int]) -> float:
    """The CPU seconds of ``pids`` together (a process that ended counts as 0 here)."""
    return sum(c for c in map(cpu_seconds, pids) if c == c)


@contextmanager
def serving(args: list[str], log: Path, env: dict[str, str] | None = None):
    """``python -m shopmtl serve ARGS --port P`` on a free loopback port, ready: (its URL, the
    process); always stopped (SIGTERM: in-flight requests finish; killed after 60 s)."""
    import httpx

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shopmtl", "serve", *args, "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
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


def server(model: Path, max_in_flight: int, log: Path, *args: str, src: Path | None = None):
    """``serving`` the model with ``--max-in-flight`` and ``args``. ``src``: the ``src``
    folder of another checkout to serve with (``--src``)."""
    env = {**os.environ, **({"PYTHONPATH": str(src.resolve())} if src is not None else {})}
    return serving([str(model), "--max-in-flight", str(max_in_flight), *args], log, env)


class RawHTTP:
    """One keep-alive HTTP/1.1 connection that POSTs prepared bodies and reads each answer's
    status, ``Retry-After`` and body: the least a load client can do per request. Why not
    httpx here: on the 2-core machine the client shares the cores with the server, and
    httpx's ``AsyncClient`` spent about 1.2 ms of CPU per request (9 CPU s for 7,300
    requests in the last httpx run), a server-sized cost taken from the server; this client
    spends a fraction of that (both are measured: ``--client httpx`` runs the old one)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, path: str, body: bytes) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    async def post(self, request: bytes) -> tuple[int, float, bytes]:
        """(status, Retry-After seconds or 0, body) of one prepared request."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, retry, close = 0, 0.0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                retry = float(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            await self.aclose()
        return status, retry, body

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def drive(url: str, bodies: list[bytes], clients: int, seconds: float,
                kind: str = "raw") -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``: every answer's status and latency.
    ``kind``: "raw" (``RawHTTP``) or "httpx" (one ``httpx.AsyncClient`` per client)."""
    import httpx

    headers = {"content-type": "application/json"}
    lat_ok: list[float] = []
    codes: Counter[str] = Counter()
    host, port = url.removeprefix("http://").split(":")
    # one connection per client: a pool shared by 64 clients costs the client process
    # several ms of CPU per request (httpcore's pool bookkeeping)
    https = [httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1),
                               timeout=60) for _ in range(clients)] if kind == "httpx" else []
    raws = [RawHTTP(host, int(port)) for _ in range(clients)] if kind == "raw" else []
    prepared = [RawHTTP(host, int(port)).request("/v1/recommend", b) for b in bodies]

    async def post(k: int, i: int) -> tuple[int, float]:
        if raws:
            status, retry, _ = await raws[k].post(prepared[i])
            return status, retry
        r = await https[k].post("/v1/recommend", content=bodies[i], headers=headers)
        return r.status_code, float(r.headers.get("retry-after", "0"))

    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as check:
            first = await check.post("/v1/recommend", content=bodies[0], headers=headers)
        want = len(json.loads(bodies[0])["candidates"])
        if first.status_code != 200 or len(first.json()["items"]) != want:
            raise RuntimeError(f"the first request failed: {first.status_code} "
                               f"{first.text[:500]}")
        start = time.perf_counter()
        end = start + seconds

        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                n = i % len(bodies)
                i += clients
                t0 = time.perf_counter()
                try:
                    status, retry = await post(k, n)
                except (httpx.TransportError, OSError, asyncio.IncompleteReadError):
                    codes["connection_error"] += 1
                    if raws:
                        await raws[k].aclose()
                    continue
                dt = time.perf_counter() - t0
                codes[str(status)] += 1
                if status == 200:
                    lat_ok.append(dt)
                elif status == 429:
                    await asyncio.sleep(min(retry or 1.0, max(0.0, end - time.perf_counter())))

        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(h.aclose() for h in https), *(r.aclose() for r in raws))
    return {"wall_s": wall, "codes": dict(codes), "latency_ok_s": lat_ok}


def gate_latencies(log: Path) -> list[float]:
    """The server's own time (ms) of each 200 on /v1/recommend, from its log lines (the gate
    logs each request with its time, from the moment the gate sees it); the first one, sent
    before the clock started, left out."""
    times = [float(m) for m in GATE_LINE.findall(log.read_text(errors="replace"))]
    return times[1:]


def run_async(coro: Any) -> Any:
    """uvloop's event loop when installed (the server's too, under uvicorn), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass(frozen=True)
class Run:
    """One load run: the model, the clients, the server's in-flight bound and --batch-rows,
    the client kind."""

    model: Path
    clients: int
    max_in_flight: int
    batch_rows: int
    client: str = "raw"
    workers: int = 1  # --workers: the in-flight bound is per worker


def measure(name: str, run: Run, bodies: list[bytes], seconds: float, logs: Path,
            src: Path | None = None) -> dict[str, Any]:
    import numpy as np

    log = logs / f"serve-{name}.log"
    # the option only when it is not the default: a --src checkout may predate it
    extra = ["--batch-rows", str(run.batch_rows)] if run.batch_rows != MAX_ROWS else []
    extra += ["--workers", str(run.workers)] if run.workers > 1 else []
    with server(run.model, run.max_in_flight, log, *extra, src=src) as (url, proc):
        if run.workers > 1:  # /readyz answered from one worker: wait for every one
            all_ready(url, run.workers)
        pids = process_tree(proc.pid)
        cpu0, me0, load0 = tree_cpu_seconds(pids), time.process_time(), os.getloadavg()[0]
        got = run_async(drive(url, bodies, run.clients, seconds, run.client))
        cpu1, me1, load1 = tree_cpu_seconds(pids), time.process_time(), os.getloadavg()[0]
    lat = np.asarray(got["latency_ok_s"]) * 1e3
    gate = np.asarray(gate_latencies(log))
    codes = got["codes"]
    ok = int(codes.get("200", 0))
    n5xx = sum(v for k, v in codes.items() if k.isdigit() and int(k) >= 500)
    other = sum(v for k, v in codes.items() if k.isdigit() and int(k) not in (200, 429)
                and int(k) < 500)
    pct = (lambda q: float(np.percentile(lat, q))) if ok else (lambda q: float("nan"))
    return {"run": name, "model": str(run.model), "clients": run.clients,
            "max_in_flight": run.max_in_flight, "batch_rows": run.batch_rows,
            "client": run.client, "workers": run.workers,
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
    head = ["run", "model", "batch rows", "client", "clients", "in-flight", "req/s (200)",
            "p50 ms", "p99 ms", "server p50 / p99 ms", "200", "429", "5xx", "conn. err.",
            "server / client CPU s", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        cells = [r["run"], r["model_kind"], str(r["batch_rows"]), r["client"],
                 str(r["clients"]), str(r["max_in_flight"]) + (
                     f" x {r['workers']} workers" if r.get("workers", 1) > 1 else ""),
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
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS))
    ap.add_argument("--src", type=Path, default=None,
                    help="serve with the src folder of another checkout (e.g. the code before "
                    "a change, `git worktree add /tmp/before REF`), driven the same way")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    model_dir = ensure_run(args.run, args.rows)
    bundle = ensure_bundle(args.run)
    bodies = request_bodies(model_dir, args.run / "data" / "test.parquet", BODIES)
    plan = {"int8": Run(bundle, args.clients, 8, MAX_ROWS),
            "int8-alone": Run(bundle, args.clients, 8, 0),
            "int8-inflight4": Run(bundle, args.clients, 4, MAX_ROWS),
            "int8-inflight16": Run(bundle, args.clients, 16, MAX_ROWS),
            "int8-httpx": Run(bundle, args.clients, 8, MAX_ROWS, "httpx"),
            "overload": Run(bundle, args.overload_clients, args.overload_in_flight, MAX_ROWS),
            "pytorch": Run(model_dir, args.clients, 8, MAX_ROWS),
            "pytorch-alone": Run(model_dir, args.clients, 8, 0),
            "int8-workers2": Run(bundle, args.clients, 4, MAX_ROWS, workers=2),
            "int8-workers2-inflight8": Run(bundle, args.clients, 8, MAX_ROWS, workers=2)}
    runs = []
    for name in args.runs:
        r = measure(name, plan[name], bodies, args.seconds, args.run, args.src)
        if args.src is not None:  # another checkout: its options may differ from this one's
            r["run"], r["batch_rows"] = f"{name} (--src)", "its default"
        r["model_kind"] = "onnx int8" if plan[name].model == bundle else "pytorch"
        runs.append(r)
        print(f"{name}: {r['throughput_ok_rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, codes {r['codes']}", flush=True)
    by = {r["run"]: r for r in runs}
    result: dict[str, Any] = {"runs": runs, "candidates": CANDIDATES,
                              "target_p99_ms": TARGET_P99_MS}
    for key, (a, b) in RATIOS.items():
        if a in by and b in by:
            result[key] = {"throughput": by[a]["throughput_ok_rps"] / by[b]["throughput_ok_rps"],
                           "p50": by[b]["p50_ms"] / by[a]["p50_ms"],
                           "p99": by[b]["p99_ms"] / by[a]["p99_ms"]}
    result["env"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                     "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0], "quickstart_rows": args.rows,
                     "server_src": str(args.src) if args.src is not None else "this checkout",
                     "client": "one process, uvloop, one keep-alive connection per client "
                     "(RawHTTP, or httpx.AsyncClient for the -httpx run), closed loop, 429 -> "
                     "sleep Retry-After; client and server share the cores"}
    result["command"] = "python bench/serve_load.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    table = markdown(result)
    result["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table)
    for key, (a, b) in RATIOS.items():
        if key in result:
            x = result[key]
            print(f"{a} / {b}: {x['throughput']:.2f}x throughput, p50 {x['p50']:.2f}x, "
                  f"p99 {x['p99']:.2f}x lower")
    print(f"load {load_before:.1f} -> {result['env']['load_average_after']:.1f}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
