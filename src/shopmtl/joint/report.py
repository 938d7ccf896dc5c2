"""Joint vs alone vs baselines: the table that says which tasks gain from sharing."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from shopmtl.joint.config import REC, JointConfig
from shopmtl.joint.parts import RecPart, load_parts
from shopmtl.joint.train import join, main_first, replace_steps, train_joint
from shopmtl.jsonsafe import json_safe
from shopmtl.tasks import TASK_TYPES
from shopmtl.train.distributed import shutdown


def _primary(types: dict[str, str], task: str, m: dict[str, Any] | None) -> float | None:
    if not m:
        return None
    key, _ = TASK_TYPES[types[task]].primary
    v = m.get(key)
    return None if v is None else float(v)


def baselines(parts: list[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each source's own simple baseline on its test split (the rec source's is the ID-only
    model, trained in ``run_joint``)."""
    return {p.name: b for p in parts if (b := p.baseline())}


def run_joint(cfg: JointConfig, out_dir: str | Path, *, alone: bool = False,
              log: Any = print, resume: bool = False, run_id: str | None = None
              ) -> dict[str, Any]:
    """The joint model, each source's baseline and (``alone``) each source trained alone for
    the number of steps it got in the joint run (the same batches seen, the same budget per
    source); metrics.json + report.md. The rec source's baseline, the same zoo model ID-only,
    is trained for the steps rec got in any case; with ``alone`` the rec source is also
    trained alone with its title (the same model without sharing). ``resume``: every run
    continues from its latest checkpoint (one that had none starts afresh). ``run_id``: the id
    every run's checkpoints carry (``train.outdir``).

    Under torchrun (``WORLD_SIZE > 1``) every model here trains across the processes
    (``train_joint``); rank 0 alone computes the baselines and writes metrics.json and the
    report, and returns the metrics (the other ranks return {} after waiting for it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, dist = join(cfg)  # before any data: ``device: cuda`` without CUDA stops here
    main = dist is None or dist.main
    if not main:
        log = _quiet
    with main_first(dist):  # rank 0 generates the rec world, the others read it
        parts, texts, load_s = load_parts(cfg, out, log)
    joint = train_joint(cfg, out / "joint", log=log, shared=(parts, texts), resume=resume,
                        run_id=run_id)
    joint["seconds"]["load"] = sum(load_s.values())
    types = joint["tasks"]
    t0 = time.perf_counter()
    base = baselines(parts) if main else {}
    log(f"baselines ({time.perf_counter() - t0:.1f}s)")
    result: dict[str, Any] = {"joint": joint, "baseline": base, "alone": {}}
    if alone:
        for p in parts:
            n = joint["steps_per_source"][p.name]
            log(f"alone: {p.name} for {n} steps")
            result["alone"][p.name] = train_joint(
                replace_steps(cfg, n), out / "alone" / p.name, only=(p.name,), log=log,
                save=False, shared=(parts, texts), resume=resume, run_id=run_id)
    # the rec source's baseline is a model too: the same zoo model without the title field
    rec = next((p for p in parts if isinstance(p, RecPart)), None)
    if rec is not None and rec.args["content"]:
        sc = dataclasses.replace(rec.cfg, args={**rec.cfg.args, "content": []})
        with main_first(dist):
            id_only = RecPart(sc, out / "rec_id_only", cfg.text, cfg.train.seed, log)
        n = joint["steps_per_source"][REC]
        log(f"baseline: rec ID-only for {n} steps")
        result["rec_id_only"] = train_joint(
            replace_steps(cfg, n), out / "alone" / "rec_id_only", log=log, save=False,
            shared=([id_only], texts), resume=resume, run_id=run_id)
    if not main:
        shutdown()  # waits for rank 0's files
        return {}
    result["table"] = comparison_table(result, types)
    result = json_safe(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    (out / "report.md").write_text(render_table(result["table"], cfg))
    shutdown()  # torchrun: the other ranks are waiting for these files
    return result


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log of a torchrun rank other than 0: rank 0 speaks for the job."""


def comparison_table(result: dict[str, Any], types: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for src, tasks in result["joint"]["test"].items():
        for task, m in tasks.items():
            key, higher = TASK_TYPES[types[task]].primary
            joint = _primary(types, task, m)
            alone_m = result["alone"].get(src, {}).get("test", {}).get(src, {}).get(task)
            alone_v = _primary(types, task, alone_m)
            if src == REC:
                b = result.get("rec_id_only", {}).get("test", {}).get(REC, {}).get(task)
                base_v, base_name = _primary(types, task, b), "ID-only model"
            else:
                base_v = _primary(types, task, result["baseline"].get(src, {}).get(task))
                base_name = "baseline"
            sign = 1.0 if higher else -1.0
            rows.append({
                "source": src, "task": task, "metric": key, "higher_is_better": higher,
                "joint": joint, "alone": alone_v, "baseline": base_v, "baseline_kind": base_name,
                "joint_minus_alone": None if joint is None or alone_v is None
                else sign * (joint - alone_v),
                "joint_beats_baseline": None if joint is None or base_v is None
                else bool(sign * (joint - base_v) > 0),
            })
    return rows


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def render_table(rows: list[dict[str, Any]], cfg: JointConfig) -> str:
    lines = [
        "# shopmtl joint run",
        "",
        f"Sources: {', '.join(s.name for s in cfg.sources)}; {cfg.train.steps} steps, "
        f"{cfg.sampling.method} sampling; text encoder {cfg.text.encoder} ({cfg.text.mode}).",
        "Test split of each source. 'gain' is joint minus alone, signed so that positive is "
        "better; 'alone' trains the same model on that source only, for the steps it got in "
        "the joint run.",
        "",
        "| source | task | metric | joint | alone | gain from sharing | baseline "
        "| beats baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        beats = {None: "-", True: "yes", False: "**no**"}[r["joint_beats_baseline"]]
        lines.append(
            f"| {r['source']} | {r['task']} | {r['metric']} | {_fmt(r['joint'])} | "
            f"{_fmt(r['alone'])} | {_fmt(r['joint_minus_alone'])} | {_fmt(r['baseline'])} "
            f"({r['baseline_kind']}) | {beats} |")
    return "\n".join(lines) + "\n"
