"""Heterogeneous joint training: many sources, one model, one checkpoint.

Each step draws one source (``train.sampling``), takes its next batch, and adds its tasks'
losses with weights alpha (and, with ``weighting: uncertainty``, learned log-variances per task,
Kendall et al. 2018). Tasks of different sources never share a batch, so gradient aggregators
(UPGrad, MGDA, ...) which need every task's gradient at one point do not apply here; the zoo
run (``shopmtl train`` on one table) has them.

The recommendation source (``rec``) is the synthetic world through a zoo model with the item
title routed through the shared text adapter; its metrics are the usual AUC per task x scenario.
Every other source is a ``data.source.Source``: it loads its files, scores predictions in its
own units and fits its own simple baseline.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError, to_dict
from shopmtl.joint.checkpoint import save_joint_dir
from shopmtl.joint.config import JointConfig
from shopmtl.joint.model import JointModel, SharedText
from shopmtl.joint.parts import (
    RecPart,
    SourcePart,
    TextIndex,
    load_parts,
    shared_rows,
    text_bank,
    text_width,
    vector_width,
)
from shopmtl.joint.solve import solve_heads
from shopmtl.jsonsafe import json_safe
from shopmtl.tasks import TASK_TYPES
from shopmtl.train.sampling import SourceSampler


def valid_score(current: dict[str, float], first: dict[str, float], types: dict[str, str]
                ) -> float:
    """How much better every task is than at the first evaluation: the mean over tasks of the
    signed relative change of its primary metric (as Delta_m, Maninis et al. 2019), so tasks
    in AUC, accuracy, RMSE and WAPE count alike."""
    gains = []
    for task, m in current.items():
        ref = first.get(task)
        if ref is None or m is None or not np.isfinite(m) or ref == 0:
            continue
        sign = 1.0 if TASK_TYPES[types[task]].primary[1] else -1.0
        gains.append(sign * (m - ref) / abs(ref))
    return float(np.mean(gains)) if gains else 0.0


def build_joint_model(cfg: JointConfig, parts: list[Any], width: int, log: Any = print
                      ) -> JointModel:
    lora = cfg.text.encoder if cfg.text.mode == "lora" else None
    text = SharedText(width, cfg.model, lora_encoder=lora, ngram_buckets=cfg.text.ngram_buckets)
    heads = {p.name: p.build_head(cfg.model.text_dim, cfg.model, cfg.text.ngram_buckets,
                                  vector_width(cfg))
             for p in parts if isinstance(p, SourcePart)}
    rec_part = next((p for p in parts if isinstance(p, RecPart)), None)
    rec = rec_part.build_model() if rec_part is not None else None
    for p in parts:
        if isinstance(p, SourcePart):
            rows = shared_rows(cfg.model.share_ids, p, rec_part, rec)
            if rows:
                heads[p.name].share(rows)
                for k, r in rows.items():
                    log(f"source {p.name}: id {k!r} shares the rec model's "
                        f"{cfg.model.share_ids[k]!r} rows ({int((r >= 0).sum())} of {len(r)})")
    return JointModel(text, heads, rec)


class JointWeights(nn.Module):
    """alpha per task, times exp(-s_i) with a learned log-variance s_i (uncertainty)."""

    def __init__(self, tasks: list[str], alpha: dict[str, float], learned: bool) -> None:
        super().__init__()
        unknown = sorted(set(alpha) - set(tasks))
        if unknown:
            raise ValueError(f"train.alpha: unknown tasks {unknown}; known: {tasks}")
        self.index = {t: i for i, t in enumerate(tasks)}
        self.register_buffer("alpha", torch.tensor([alpha.get(t, 1.0) for t in tasks]))
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)), requires_grad=learned)
        self.learned = learned

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        out = torch.zeros(())
        for name, loss in losses.items():
            if name.startswith("_"):  # a regulariser (the rec embedding L2): weight 1
                out = out + loss
                continue
            i = self.index[name]
            w = self.alpha[i]
            if self.learned:
                out = out + w * (torch.exp(-self.log_vars[i]) * loss + 0.5 * self.log_vars[i])
            else:
                out = out + w * loss
        return out


def _adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    # fused: one kernel for all parameters (the unfused CPU loop took ~10x longer on the
    # 4M-parameter n-gram table)
    fused = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _head(model: JointModel, part: Any) -> nn.Module:
    if isinstance(part, RecPart):
        assert model.rec is not None
        return model.rec  # its title adapter is borrowed, not registered: not in here
    return model.heads[part.name]


def _clone(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def refit_heads(model: JointModel, parts: list[Any], weights: JointWeights, cfg: JointConfig,
                types: dict[str, str], log: Any = print,
                candidates: dict[str, dict[str, Tensor]] | None = None
                ) -> dict[str, dict[str, Any]]:
    """Second stage: the shared text adapter frozen (weights and dropout), each source's head
    trains alone on its own batches and keeps its best validation step.

    Sources peak at different steps of the joint run (a small text source overfits while the
    recommendation model still learns), and one step chosen for all is a compromise. Once the
    shared parts stop moving, the heads are independent of each other, so each can stop at its
    own best step and the result is still one model. A head is scored as the joint run is
    (``valid_score`` over its tasks, relative to its start); it keeps its start when no refit
    step beats it.

    ``candidates``: per source, its head at the joint step where that source alone scored best
    (a recommendation task can overfit after one epoch while the text sources still learn). It
    is scored on validation with the final shared parts, and replaces the start when better."""
    t = cfg.train
    text = model.text
    trainable = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, dict[str, Any]] = {}
    try:
        # the rec model first: a head that borrows its rows (``share_ids``) then refits on
        # the rows as they end
        for part in sorted(parts, key=lambda p: not isinstance(p, RecPart)):
            head = _head(model, part)
            # only this head trains: the adapter and every other head (with any rec rows a
            # head borrows, ``model.share_ids``) stay as they are
            mine = {id(p) for p in head.parameters()}
            for p in trainable:
                p.requires_grad_(id(p) in mine)
            opt = _adam([p for p in head.parameters() if p.requires_grad], t.refit_lr,
                        t.weight_decay)
            first = _summary({part.name: part.evaluate(model, "valid")}, types)
            best = (0.0, 0, _clone(head))
            own = (candidates or {}).get(part.name)
            took_own = False
            if own is not None:
                head.load_state_dict(own)
                gain = valid_score(_summary({part.name: part.evaluate(model, "valid")}, types),
                                   first, types)
                took_own = gain > 0
                if took_own:
                    best = (gain, 0, own)
                head.load_state_dict(best[2])
            since, step = 0, 0
            model.train()
            text.eval()  # evaluations below restore these modes
            for step in range(1, t.refit_steps + 1):
                losses = part.losses(model, part.next_batch())
                opt.zero_grad(set_to_none=True)
                weights.total(losses).backward()
                opt.step()
                if step % t.refit_eval_every and step < t.refit_steps:
                    continue
                prim = _summary({part.name: part.evaluate(model, "valid")}, types)
                score = valid_score(prim, first, types)
                if score > best[0]:
                    best, since = (score, step, _clone(head)), 0
                else:
                    since += 1
                    if since >= t.refit_patience:
                        break
            head.load_state_dict(best[2])
            out[part.name] = {"own_best_start": took_own, "steps": step,
                              "best_step": best[1], "valid_gain": best[0]}
            log(f"refit {part.name}: " + ("from its own best joint step, " if took_own else "")
                + f"best step {best[1]} of {step}, validation {best[0]:+.4f}")
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return out


def _summary(metrics: dict[str, dict[str, dict[str, Any]]], types: dict[str, str]
             ) -> dict[str, float]:
    out = {}
    for src in metrics.values():
        for task, m in src.items():
            key, _ = TASK_TYPES[types[task]].primary
            if key in m:
                out[task] = m[key]
    return out


def train_joint(cfg: JointConfig, out_dir: str | Path, *, only: tuple[str, ...] | None = None,
                steps: int | None = None, log: Any = print, save: bool = True,
                shared: tuple[list[Any], TextIndex] | None = None) -> dict[str, Any]:
    """Train every source of ``cfg`` (or the sources in ``only``) jointly; evaluate each on its
    valid and test splits; write metrics.json and the checkpoint ``model/`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Adam's moments of the n-gram rows a source does not touch decay by 0.9 a step into
    # subnormal floats, which the CPU computes ~100x slower: without this a 12,000-step run
    # slowed down 4x after step 2,000. Flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    if shared is None:
        parts, texts, load_s = load_parts(cfg, out, log)
    else:
        (parts, texts), load_s = shared, {}
    every_task = [t for p in parts for t in p.task_names]
    unknown = sorted(set(cfg.train.alpha) - set(every_task))
    if unknown:
        raise ConfigError(f"train.alpha: unknown tasks {unknown}; known: {every_task}")
    if only is not None:
        parts = [p for p in parts if p.name in only]
    for p in parts:
        p.reset(cfg.train.seed)
    t1 = time.perf_counter()
    bank = text_bank(cfg, texts.texts)
    embed_s = time.perf_counter() - t1
    log(f"text bank: {len(texts.texts) - 1:,} distinct texts ({embed_s:.1f}s)")
    torch.manual_seed(cfg.train.seed)
    model = build_joint_model(cfg, parts, text_width(cfg), log)
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    tasks = [t for p in parts for t in p.task_names]
    types = {t.name: t.type for p in parts for t in p.tasks}
    weights = JointWeights(tasks, {k: v for k, v in cfg.train.alpha.items() if k in tasks},
                           cfg.train.weighting == "uncertainty")
    opt = _adam([p for p in model.parameters() if p.requires_grad], cfg.train.lr,
                cfg.train.weight_decay)
    if weights.learned:
        opt.add_param_group({"params": [weights.log_vars], "lr": cfg.train.lr,
                             "weight_decay": 0.0})
    n_steps = steps if steps is not None else cfg.train.steps
    sampler = SourceSampler([p.num_batches() for p in parts], cfg.sampling.method,
                            cfg.sampling.temperature, cfg.train.seed)
    counts = np.zeros(len(parts), np.int64)
    running: dict[str, list[float]] = {t: [] for t in tasks}
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    # per source: its own best validation score in the joint run and its head then
    own_best: dict[str, tuple[float, dict[str, Tensor]]] = {}
    model.train()
    t2 = time.perf_counter()
    for step in range(n_steps):
        if step and step % cfg.train.decay_every == 0 and cfg.train.lr_decay != 1.0:
            for g in opt.param_groups:
                g["lr"] *= cfg.train.lr_decay
        i = sampler.next()
        counts[i] += 1
        part = parts[i]
        losses = part.losses(model, part.next_batch())
        total = weights.total(losses)
        if not torch.isfinite(total):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"step {step}: non-finite loss of {bad} (source {part.name})")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for k, v in losses.items():
            if not k.startswith("_"):
                running[k].append(float(v.detach()))
        if cfg.train.log_every and (step + 1) % cfg.train.log_every == 0:
            recent = {k: float(np.mean(v[-50:])) for k, v in running.items() if v}
            log(f"step {step + 1}/{n_steps}: " + ", ".join(f"{k} {v:.3f}"
                                                            for k, v in recent.items()))
        every = cfg.train.eval_every
        if every and ((step + 1) % every == 0 or step + 1 == n_steps):
            prim = _summary({p.name: p.evaluate(model, "valid") for p in parts}, types)
            history.append({"step": step + 1, "valid": prim})
            score = valid_score(prim, history[0]["valid"], types)
            history[-1]["score"] = score
            if best is None or score > best[0]:
                best = (score, step + 1, _clone(model))
            if cfg.train.refit_steps:
                for p in parts:
                    mine = valid_score({t: prim[t] for t in p.task_names if t in prim},
                                       history[0]["valid"], types)
                    if p.name not in own_best or mine > own_best[p.name][0]:
                        own_best[p.name] = (mine, _clone(_head(model, p)))
            log(f"step {step + 1}: validation score {score:+.4f}"
                + (" (best)" if best[1] == step + 1 else ""))
    train_s = time.perf_counter() - t2
    if best is not None:  # the step whose validation score was best
        model.load_state_dict(best[2])
    refit: dict[str, Any] = {}
    t3 = time.perf_counter()
    if cfg.train.refit_steps:
        refit = refit_heads(model, parts, weights, cfg, types, log,
                            {k: v[1] for k, v in own_best.items()})
    refit_s = time.perf_counter() - t3
    solved: dict[str, Any] = {}
    t4 = time.perf_counter()
    if cfg.train.solve_heads:
        solved = solve_heads(model, parts, cfg.train.solve_l2, cfg.train.solve_iters, log)
    solve_s = time.perf_counter() - t4
    model.eval()
    valid = {p.name: p.evaluate(model, "valid") for p in parts}
    test = {p.name: p.evaluate(model, "test") for p in parts}
    metrics: dict[str, Any] = {
        "sources": [p.name for p in parts],
        "tasks": {t: types[t] for t in tasks},
        "steps": n_steps,
        "best_step": best[1] if best is not None else n_steps,
        "valid_history": history,
        "refit": refit,
        "solve": solved,
        "steps_per_source": {p.name: int(c) for p, c in zip(parts, counts, strict=True)},
        "sampling": to_dict(cfg.sampling),
        "valid": valid,
        "test": test,
        "summary": _summary(test, types),
        "seconds": {"load": load_s, "embed": embed_s, "train": train_s, "refit": refit_s,
                    "solve": solve_s,
                    "total": time.perf_counter() - t0},
    }
    if save:
        save_joint_dir(out / "model", model, cfg, parts)
    metrics = json_safe(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


# -- checkpoint -------------------------------------------------------------------------------


def replace_steps(cfg: JointConfig, steps: int) -> JointConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


# -- joint vs alone vs baselines ---------------------------------------------------------------
