"""What serving an ONNX bundle without torch saves: start-to-ready seconds and the server's RSS.

The quickstart model (``shopmtl quickstart --rows 300000 --no-baselines --out
runs/bench-export``, trained when ``--run`` holds none, as bench/export.py does) and its int8
bundle (``shopmtl export RUN/model --out RUN/bundle-int8 --data RUN/data/test.parquet --int8``,
exported once, as bench/serve_load.py does), each served by the real server (``python -m
shopmtl serve MODEL --port P``: uvicorn, one process) ``--starts`` times, the variants
alternated round by round so a change in the machine's load falls on all of them:

- ``int8``: the bundle, this checkout: ``shopmtl.load`` of a bundle imports no torch;
- ``pytorch``: the source model directory, this checkout (it needs torch);
- ``int8-before`` (with ``--before SRC``): the bundle served by the ``src`` folder of the code
  before the change (``git archive c5b0a80 src | tar -x -C /tmp/before``), which imported
  torch for a bundle too.

Per start: the seconds from ``Popen`` to the first 200 of ``/readyz`` (polled every 20 ms: the
interpreter, the imports, the model's load and the warm-up of every endpoint), then the
server's CPU seconds so far (utime + stime: what the start cost, whatever else the machine
runs), its resident memory (``VmRSS``) and its peak (``VmHWM``) from ``/proc``, and whether
torch is in the process (its ``libtorch`` mapped, ``/proc/PID/maps``); then SIGTERM. Prints
the medians as the table docs/DEPLOY.md ("Serving without torch") holds and writes ``--out``:

    .venv/bin/python bench/serve_startup.py --before /tmp/before/src \\
        --out bench/results/serve_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import cpu_model, ensure_run  # bench/export.py: the same quickstart run
from serve_load import cpu_seconds, ensure_bundle, free_port  # bench/serve_load.py

READY_S = 300
POLL_S = 0.02


@dataclass(frozen=True)
class Variant:
    name: str
    model: Path
    src: Path | None  # the src folder to serve with (None: this checkout's)


@dataclass(frozen=True)
class Start:
    ready_s: float
    cpu_s: float  # the server's CPU seconds to ready: less at the mercy of the machine's load
    rss_mib: float
    peak_mib: float
    torch: bool


def proc_kib(pid: int, field: str) -> float:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def has_torch(pid: int) -> bool:
    """Whether the process has torch's shared library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def ready(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def start_once(v: Variant, log: Path) -> Start:
    """One start of ``v``'s server to ready, measured; always stopped."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if v.src is not None:
        env["PYTHONPATH"] = str(v.src.resolve())
    port = free_port()
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "shopmtl", "serve", str(v.model),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        while not ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{v.name}: the server exited ({proc.returncode}): see {log}")
            if time.perf_counter() - t0 > READY_S:
                raise RuntimeError(f"{v.name}: not ready after {READY_S} s: see {log}")
            time.sleep(POLL_S)
        ready_s = time.perf_counter() - t0
        return Start(ready_s, cpu_seconds(proc.pid), proc_kib(proc.pid, "VmRSS") / 1024,
                     proc_kib(proc.pid, "VmHWM") / 1024, has_torch(proc.pid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def summary(v: Variant, starts: list[Start]) -> dict[str, Any]:
    """The medians (and ranges) of one variant's starts."""
    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    ready_s = [s.ready_s for s in starts]
    cpu_s = [s.cpu_s for s in starts]
    rss = [s.rss_mib for s in starts]
    return {"variant": v.name, "model": str(v.model), "src": str(v.src or "this checkout"),
            "starts": len(starts), "ready_s_median": med(ready_s),
            "ready_s_range": [min(ready_s), max(ready_s)], "cpu_s_median": med(cpu_s),
            "cpu_s_range": [min(cpu_s), max(cpu_s)], "rss_mib_median": med(rss),
            "rss_mib_range": [min(rss), max(rss)],
            "peak_rss_mib_median": med([s.peak_mib for s in starts]),
            "torch_loaded": sorted({s.torch for s in starts})}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table, then the torch-free bundle against each other variant."""
    lines = ["| served | torch in the process | start to ready, s (median; range) | CPU s to "
             "ready (median; range) | RSS, MiB (median; range) | peak RSS, MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        torch = "/".join("yes" if t else "no" for t in r["torch_loaded"])
        lines.append(
            f"| {r['variant']} | {torch} | {r['ready_s_median']:.2f} "
            f"({r['ready_s_range'][0]:.2f}-{r['ready_s_range'][1]:.2f}) | "
            f"{r['cpu_s_median']:.2f} ({r['cpu_s_range'][0]:.2f}-{r['cpu_s_range'][1]:.2f}) | "
            f"{r['rss_mib_median']:.0f} ({r['rss_mib_range'][0]:.0f}-"
            f"{r['rss_mib_range'][1]:.0f}) | {r['peak_rss_mib_median']:.0f} |")
    lines.append("")
    first = rows[0]
    for r in rows[1:]:
        lines.append(f"{first['variant']} / {r['variant']}: "
                     f"{first['ready_s_median'] / r['ready_s_median']:.2f}x the start time, "
                     f"{first['cpu_s_median'] / r['cpu_s_median']:.2f}x the CPU seconds, "
                     f"{first['rss_mib_median'] / r['rss_mib_median']:.2f}x the RSS")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-export"),
                    help="a quickstart output folder (trained when it has no model)")
    ap.add_argument("--rows", type=int, default=300_000, help="the quickstart's --rows")
    ap.add_argument("--starts", type=int, default=5, help="starts of each variant (>= 3)")
    ap.add_argument("--before", type=Path, default=None,
                    help="also serve the bundle with this src folder (the code before)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_startup.json"))
    args = ap.parse_args(argv)
    if args.starts < 3:
        ap.error("--starts: at least 3 (the table gives medians)")
    load_before = os.getloadavg()[0]
    model_dir = ensure_run(args.run, args.rows)
    bundle = ensure_bundle(args.run)
    variants = [Variant("int8", bundle, None), Variant("pytorch", model_dir, None)]
    if args.before is not None:
        variants.append(Variant("int8-before", bundle, args.before))
    starts: dict[str, list[Start]] = {v.name: [] for v in variants}
    for i in range(args.starts):
        for v in variants:
            s = start_once(v, args.run / f"serve-startup-{v.name}.log")
            starts[v.name].append(s)
            print(f"round {i + 1} {v.name}: ready in {s.ready_s:.2f} s ({s.cpu_s:.2f} CPU s), "
                  f"RSS {s.rss_mib:.0f} MiB, torch {'yes' if s.torch else 'no'}", flush=True)
    rows = [summary(v, starts[v.name]) for v in variants]
    result: dict[str, Any] = {
        "variants": rows, "starts": {k: [vars(s) for s in v] for k, v in starts.items()},
        "env": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_before": load_before,
                "load_average_after": os.getloadavg()[0], "quickstart_rows": args.rows,
                "poll_s": POLL_S},
        "command": "python bench/serve_startup.py " + " ".join(
            argv if argv is not None else sys.argv[1:])}
    table = markdown(rows)
    result["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table)
    print(f"load {load_before:.1f} -> {result['env']['load_average_after']:.1f}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
