"""Deployment mode against the simulation (docs/FEDERATED.md, deployment mode): the tests'
tiny world in 2 silos, run once by a SuperLink and 2 SuperNodes on loopback (insecure, free
ports; the processes and their cleanup are the test's, tests/federated/test_deployment.py)
and once on the simulation engine, same config and seed; prints the seconds, the pooled
click AUC of each and the largest difference between the two global models.

    python bench/federated_deploy.py --rounds 1 --secagg

Writes federated_deploy.json into --out (and bench/results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]


def main() -> None:
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from shopmtl.cli import app
    from shopmtl.federated.config import federated_from_dict
    from shopmtl.federated.server import prepare, run_federated
    from tests.federated.conftest import tiny_raw
    from tests.federated.test_deployment import (
        BIN,
        TWO_SILOS,
        Procs,
        flower_env,
        free_port,
        wait_port,
        world_config,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--secagg", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/federated_deploy"))
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    world = args.out / "world"
    prepare(federated_from_dict(tiny_raw()), world, log=lambda s: None)
    fed = {"silos": TWO_SILOS, "rounds": args.rounds, "local_epochs": 0.25}
    if args.secagg:
        fed |= {"strategy": "fedavg", "row_aware": False, "secagg": True}
    raw = world_config(world, **fed)
    cfg = args.out / "fed.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))  # the silos' order is their index

    env, procs, deployed = flower_env(args.out / "flwr_home"), Procs(), args.out / "deployed"
    t0 = time.perf_counter()
    try:
        link = free_port()
        superlink = procs.start([str(BIN / "flower-superlink"), "--insecure", "--port",
                                 str(link)], env, args.out / "superlink.log")
        wait_port(link, superlink)
        for k in range(2):
            procs.start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                         f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config",
                         f"partition-id={k} federation='{deployed / 'federation.json'}'"],
                        env, args.out / f"supernode{k}.log")
        res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(deployed),
                                       "--deployment", f"127.0.0.1:{link}", "--insecure"],
                                 env=env)
    finally:
        procs.stop()
    seconds_deployed = time.perf_counter() - t0
    if res.exit_code != 0:
        raise SystemExit(f"the deployed run failed: {res.output[-2000:]}")
    t0 = time.perf_counter()
    simulated = run_federated(federated_from_dict(raw), args.out / "simulated",
                              log=lambda s: None)
    seconds_simulated = time.perf_counter() - t0
    dep = json.loads((deployed / "metrics.json").read_text())
    a = load_file(str(deployed / "model" / "model.safetensors"))
    b = load_file(str(args.out / "simulated" / "model" / "model.safetensors"))
    doc = {"rounds": args.rounds, "secagg": args.secagg,
           "seconds": {"deployed": seconds_deployed, "simulated": seconds_simulated},
           "pooled_click_auc": {"deployed": dep["final"]["pooled"]["click"]["all"],
                                "simulated": simulated["final"]["pooled"]["click"]["all"]},
           "max_abs_diff": max(float(np.abs(a[k] - b[k]).max()) for k in a)}
    print("| run | seconds | pooled click AUC |\n|---|---|---|")
    for k in ("deployed", "simulated"):
        print(f"| {k} | {doc['seconds'][k]:.1f} | {doc['pooled_click_auc'][k]:.4f} |")
    print(f"max abs difference of the two global models: {doc['max_abs_diff']:.2e}")
    for dest in (args.out / "federated_deploy.json", ROOT / "bench/results/federated_deploy.json"):
        dest.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
