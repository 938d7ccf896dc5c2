"""The joint model federated across business units (docs/FEDERATED.md, "The joint model"):
every task's primary test metric on its owner silo for three arms of the same total steps.

- ``centralised``: ``shopmtl train``'s joint stage on every source pooled in one place
  (``joint.train.steps`` steps, the joint sampler choosing the source of each step);
- ``federated``: ``shopmtl federate`` (the silos of the federated config; the same steps in
  all, each silo its sources' sampler share of every round, the text adapter averaged);
  each client's Adam starts afresh every round (the default);
- ``federated_kept``: the same with ``federated.keep_optimizer: true`` (each client keeps its
  Adam moments between rounds): the control that tells the federation's effect from the
  optimizer restarts' (at these few steps the restarts alone move click AUC by +0.05);
- ``local-only``: each silo trains its own sources alone, the steps it made in the
  federation, with an adapter of its own.

All three run the joint stage only (``refit_steps: 0``, ``solve_heads: false``: a
federation does not run those stages) and keep the last step (``eval_every: 0``). Mean and
standard deviation over ``--seeds`` seeds (``joint.train.seed``: initialisation, sampling and
the sources' example slices; ``federated.seed``).

    python bench/federated_joint.py --seeds 3 --out runs/federated_joint

Writes federated_joint.json and federated_joint.md into --out and bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "federated_joint.yaml"
DEFAULT_SETS = ["joint.train.steps=600", "federated.rounds=6"]
ARMS = ("centralised", "federated", "federated_kept", "local_only")


def joint_stage_only(cfg: Any, steps: int, sources: tuple[str, ...] | None = None) -> Any:
    """``cfg`` with the joint stage alone, ``steps`` steps, last step kept (and only
    ``sources`` when given)."""
    train = dataclasses.replace(cfg.train, steps=steps, refit_steps=0, solve_heads=False,
                                eval_every=0, log_every=0)
    picked = cfg.sources if sources is None else tuple(
        s for s in cfg.sources if s.name in sources)
    return dataclasses.replace(cfg, train=train, sources=picked)


def run(config: Path, sets: list[str], out: Path) -> dict[str, Any]:
    import torch

    from shopmtl.federated.config import JointFederatedRun, load_federated
    from shopmtl.federated.joint import run_joint_federated
    from shopmtl.joint.train import train_joint

    torch.set_num_threads(1)
    fr = load_federated(config, sets)
    if not isinstance(fr, JointFederatedRun):
        raise SystemExit(f"{config}: not a joint federated config (no `joint:` key)")
    quiet = lambda s: None  # noqa: E731
    res: dict[str, Any] = {"config": str(config.relative_to(ROOT)), "overrides": sets,
                           "silos": {k: list(v) for k, v in fr.silos.items()},
                           "steps": fr.joint.train.steps, "rounds": fr.federated.rounds,
                           "strategy": fr.federated.strategy, "seconds": {}}
    t0 = time.perf_counter()
    joint = joint_stage_only(fr.joint, fr.joint.train.steps)
    central = train_joint(joint, out / "centralised", log=quiet)
    res["seconds"]["centralised"] = time.perf_counter() - t0
    types = central["tasks"]

    t0 = time.perf_counter()
    fed = run_joint_federated(dataclasses.replace(fr, joint=joint), out / "federated", quiet)
    res["seconds"]["federated"] = time.perf_counter() - t0
    kept = dataclasses.replace(fr, joint=joint, federated=dataclasses.replace(
        fr.federated, keep_optimizer=True))
    fed_kept = run_joint_federated(kept, out / "federated_kept", quiet)

    t0 = time.perf_counter()
    local: dict[str, float] = {}
    for silo, sources in fr.silos.items():
        steps = fed["steps_per_round"][silo] * fr.federated.rounds
        got = train_joint(joint_stage_only(fr.joint, steps, sources), out / f"local-{silo}",
                          log=quiet)
        local.update(got["summary"])
    res["seconds"]["local_only"] = time.perf_counter() - t0
    res["steps_per_round"] = fed["steps_per_round"]
    res["shared_bytes_per_client"] = fed["shared_bytes_per_client"]
    res["tasks"] = {t: {"type": types[t], "silo": fed["owner"][t],
                        "centralised": central["summary"][t],
                        "federated": fed["final"]["tasks"][t]["test"],
                        "federated_kept": fed_kept["final"]["tasks"][t]["test"],
                        "local_only": local[t],
                        "rounds": [r["tasks"][t]["test"] for r in fed["rounds"]]}
                    for t in types}
    return res


def summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and arm: the mean and standard deviation over the seeds (and the federated
    run's mean by round)."""
    import numpy as np

    out = {}
    for t, m in per_seed[0]["tasks"].items():
        row: dict[str, Any] = {"type": m["type"], "silo": m["silo"]}
        for arm in ARMS:
            v = np.array([r["tasks"][t][arm] for r in per_seed])
            row[arm] = {"mean": float(v.mean()), "std": float(v.std())}
        row["rounds"] = np.mean([r["tasks"][t]["rounds"] for r in per_seed], 0).tolist()
        out[t] = row
    return out


def table(tasks: dict[str, Any]) -> str:
    from shopmtl.tasks import TASK_TYPES

    lines = ["| task | silo | metric | centralised | federated | federated, Adam kept | "
             "local-only | federated by round |", "|---|---|---|---|---|---|---|---|"]
    for t, m in tasks.items():
        key, higher = TASK_TYPES[m["type"]].primary
        arrow = "higher is better" if higher else "lower is better"
        cells = " | ".join(f"{m[a]['mean']:.4f} ± {m[a]['std']:.4f}" for a in ARMS)
        rounds = " ".join(f"{v:.3f}" for v in m["rounds"])
        lines.append(f"| {t} | {m['silo']} | {key} ({arrow}) | {cells} | {rounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help=f"a.b=value overrides (default: {DEFAULT_SETS})")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "federated_joint")
    a = ap.parse_args(argv)
    sets = DEFAULT_SETS if a.sets is None else a.sets
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    t0 = time.perf_counter()
    per_seed = [run(a.config.resolve(), [*sets, f"joint.train.seed={seed}",
                                         f"federated.seed={seed}"], a.out / f"seed{seed}")
                for seed in range(a.seeds)]
    first = per_seed[0]
    res = {k: first[k] for k in ("config", "silos", "steps", "rounds", "strategy",
                                 "steps_per_round", "shared_bytes_per_client")}
    res.update(overrides=sets, seeds=a.seeds, tasks=summary(per_seed), per_seed=per_seed,
               seconds=time.perf_counter() - t0,
               command="python bench/federated_joint.py " + " ".join(
                   ([f"--config {a.config}"] if a.config != DEFAULT_CONFIG else [])
                   + [f"--set {x}" for x in (a.sets or [])] + [f"--seeds {a.seeds}"]))
    md = table(res["tasks"])
    print(md)
    print(f"\n{res['seconds']:.0f}s; silos {res['silos']}; steps per round "
          f"{res['steps_per_round']}", file=sys.stderr)
    for d in (a.out, ROOT / "bench" / "results"):
        (d / "federated_joint.json").write_text(json.dumps(res, indent=1))
        (d / "federated_joint.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
