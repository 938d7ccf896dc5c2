"""Deployment mode against the simulation (docs/FEDERATED.md, deployment mode): the tests'
tiny world in 2 silos, run once by a SuperLink and 2 SuperNodes on loopback (insecure, free
ports; the processes and their cleanup are the test's, tests/federated/test_deployment.py)
and once on the simulation engine, same config and seed; prints the seconds, the pooled
click AUC of each and the largest difference between the two global models.

    python bench/federated_deploy.py --rounds 1 --secagg
    python bench/federated_deploy.py --rounds 1 --tls   # TLS + SuperNode authentication

``--tls`` runs docs/FEDERATED.md's real-machine commands on loopback: a CA and a certificate
for 127.0.0.1 (openssl), the SuperLink with TLS and ``--enable-supernode-auth``, each
SuperNode's ECDSA key (ssh-keygen) registered with ``flwr supernode register``.

Writes federated_deploy.json into --out (and bench/results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]


def tls_material(d: Path) -> dict[str, Path]:
    """A CA, the SuperLink's certificate for localhost / 127.0.0.1, two SuperNode keys."""
    d.mkdir(parents=True, exist_ok=True)

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
       "/CN=shopmtl-ca", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
       "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    sh("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
       "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-out",
       str(d / "server.pem"), "-extfile", str(d / "san.ext"))
    for k in range(2):
        sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(d / f"silo{k}"))
    return {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}


def main() -> None:
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from shopmtl.cli import app
    from shopmtl.federated.config import federated_from_dict
    from shopmtl.federated.deploy import CONNECTION, write_flower_home
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
    ap.add_argument("--tls", action="store_true", help="TLS and SuperNode authentication")
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
    tls = tls_material(args.out / "certs") if args.tls else None
    link_tls = (["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                 "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth"]
                if tls else ["--insecure"])
    t0 = time.perf_counter()
    try:
        link = free_port()
        superlink = procs.start([str(BIN / "flower-superlink"), *link_tls, "--port",
                                 str(link)], env, args.out / "superlink.log")
        wait_port(link, superlink)
        if tls:  # the operator registers each silo's public key
            home = write_flower_home(args.out / "operator", f"127.0.0.1:{link}", False,
                                     tls["ca"])
            for k in range(2):
                subprocess.run([str(BIN / "flwr"), "supernode", "register",
                                str(args.out / "certs" / f"silo{k}.pub"), CONNECTION],
                               env={**env, "FLWR_HOME": str(home)}, check=True,
                               capture_output=True)
        for k in range(2):
            node_tls = (["--root-certificates", str(tls["ca"]), "--auth-supernode-private-key",
                         str(args.out / "certs" / f"silo{k}")] if tls else ["--insecure"])
            procs.start([str(BIN / "flower-supernode"), *node_tls, "--superlink",
                         f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config",
                         f"partition-id={k} federation='{deployed / 'federation.json'}'"],
                        env, args.out / f"supernode{k}.log")
        conn = ["--root-certificates", str(tls["ca"])] if tls else ["--insecure"]
        res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(deployed),
                                       "--deployment", f"127.0.0.1:{link}", *conn], env=env)
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
    doc = {"rounds": args.rounds, "secagg": args.secagg, "tls_and_node_auth": args.tls,
           "seconds": {"deployed": seconds_deployed, "simulated": seconds_simulated},
           "pooled_click_auc": {"deployed": dep["final"]["pooled"]["click"]["all"],
                                "simulated": simulated["final"]["pooled"]["click"]["all"]},
           "max_abs_diff": max(float(np.abs(a[k] - b[k]).max()) for k in a)}
    print("| run | seconds | pooled click AUC |\n|---|---|---|")
    for k in ("deployed", "simulated"):
        print(f"| {k} | {doc['seconds'][k]:.1f} | {doc['pooled_click_auc'][k]:.4f} |")
    print(f"max abs difference of the two global models: {doc['max_abs_diff']:.2e}")
    name = f"federated_deploy{'_tls' if args.tls else ''}.json"
    for dest in (args.out / name, ROOT / "bench/results" / name):
        dest.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
