"""Faults and resume in docs/FEDERATED.md: five IID silos (a hash of the user, user rows kept
local), plain FedAvg, min_clients 3, on examples/federated.yaml's world.

- clean: every client healthy;
- 2 of 5 fail: users_1 raises every round, users_3 sends NaNs in odd rounds and answers
  after the round's timeout in even ones (``federated.faults``, a test tool);
- killed + resumed: the clean run's command SIGKILLed once round ``--kill-after``'s
  checkpoint exists, then ``shopmtl federate ... --resume``.

    python bench/federated_faults.py --out runs/federated_faults

Prints a table and writes federated_faults.json / .md into --out (and bench/results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sets(rounds: int, rows: int, timeout: float, faults: bool) -> list[str]:
    out = [f"data.synthetic.rows={rows}", "federated.silos.by=user_hash",
           "federated.silos.count=5", "federated.strategy=fedavg", f"federated.rounds={rounds}",
           "federated.min_clients=3", f"federated.round_timeout={timeout}"]
    if faults:
        pattern = ["nan" if r % 2 else "timeout" for r in range(1, rounds + 1)]
        crash = ", ".join(["exception"] * rounds)
        out.append(f"federated.faults.silos={{users_1: [{crash}], users_3: "
                   f"[{', '.join(pattern)}]}}")
    return out


def federate(config: Path, out: Path, overrides: list[str], *extra: str
             ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shopmtl", "federate", str(config), "--out", str(out),
           *[a for s in overrides for a in ("--set", s)], *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, float]:
    t0 = time.perf_counter()
    text, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(text[-3000:])
    return text, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "federated.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "federated_faults")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--kill-after", type=int, default=2)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    res: dict = {}
    for name, faults in (("clean", False), ("2 of 5 fail", True)):
        _, secs = finish(federate(args.config, args.out / name.replace(" ", "_"),
                                     sets(args.rounds, args.rows, args.timeout, faults)))
        m = json.loads((args.out / name.replace(" ", "_") / "metrics.json").read_text())
        res[name] = {"pooled": {t: v["all"] for t, v in m["final"]["pooled"].items()},
                     "dropped": {r["round"]: r["dropped"] for r in m["rounds"]},
                     "seconds": secs}
        print(name, res[name]["pooled"], flush=True)
    cut = args.out / "killed"
    overrides = sets(args.rounds, args.rows, args.timeout, False)
    proc = federate(args.config, cut, overrides)
    latest, wanted = cut / "checkpoints" / "latest", f"ckpt-00-{args.kill_after:09d}"
    while proc.poll() is None and not (latest.is_file() and latest.read_text() >= wanted):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text()
    _, secs = finish(federate(args.config, cut, overrides, "--resume"))
    m = json.loads((cut / "metrics.json").read_text())
    res["killed + resumed"] = {"pooled": {t: v["all"] for t, v in m["final"]["pooled"].items()},
                               "killed_at": killed_at, "seconds_resumed": secs,
                               "rounds": [r["round"] for r in m["rounds"]]}
    print("killed + resumed", res["killed + resumed"]["pooled"], flush=True)
    tasks = list(res["clean"]["pooled"])
    lines = ["| run | " + " | ".join(f"pooled {t}" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for name, r in res.items():
        cells = [f"{r['pooled'][t]:.4f} ({r['pooled'][t] - res['clean']['pooled'][t]:+.4f})"
                 for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": res,
               "table": table}
    args.out.mkdir(parents=True, exist_ok=True)
    for where in (args.out, ROOT / "bench" / "results"):
        where.mkdir(parents=True, exist_ok=True)
        (where / "federated_faults.json").write_text(json.dumps(payload, indent=1))
        (where / "federated_faults.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
