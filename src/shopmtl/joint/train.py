"""Heterogeneous joint training: many sources, one model, one checkpoint, the one loop.

Each source (``joint.parts``) is a task source of ``train.loop``: the recommendation world
through a zoo model, and every file source (search, customer service, reviews, demand). The run
is a list of stages (``train.stages``):

1. ``joint``: every source's batches, drawn by the sampler (``train.sampling``), each step one
   source's tasks through the run's weighting; validation every ``eval_every`` steps and the
   best step kept (``train.select.GainSelector``: tasks in AUC, accuracy, RMSE and WAPE count
   alike). Tasks of different sources never share a batch, so a weighting that needs every
   task's gradient at one point (UPGrad, MGDA, GradNorm, ...) is refused at config load.
2. ``refit:<source>`` (``train.refit_steps``): the shared text adapter frozen (weights and
   dropout), each source's head trains alone and keeps its own best validation step. Sources
   peak at different steps of the joint run (a small text source overfits while the
   recommendation model still learns), and one step chosen for all is a compromise; once the
   shared parts stop moving the heads are independent, so each can stop at its own best step
   and the result is still one model. A head starts from the better of the joint best step
   and its own best joint step. The rec model refits first: a head that borrows its rows
   (``model.share_ids``) then refits on the rows as they end.
3. ``solve`` (``train.solve_heads``): each text head's output layer solved by L-BFGS
   (``joint.solve``), kept where validation improves.

Device and processes (docs/SCALING.md), as in a one-table run: the model lives on
``train.device`` (every source's training batches are moved there, evaluation comes back as CPU
numpy, files are written from CPU copies) and ``train.precision: bf16`` runs the forward and
the losses of the joint and refit steps under autocast. Under torchrun every source takes its
rank's rows of each global batch, every step is one step of the world (``Loop`` with ``dist``)
and rank 0 alone validates (broadcast), writes checkpoints, ``model/``, TensorBoard and
``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from shopmtl.config import check_tasks, to_dict
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
from shopmtl.train.distributed import Dist, resolve_device, setup
from shopmtl.train.loop import Loop, Schedule, clone_state
from shopmtl.train.select import GainSelector, primary, valid_score
from shopmtl.train.stages import Checkpointer, Stage, StageContext, run_stages
from shopmtl.train.trainer import tensorboard_writer
from shopmtl.weighting import build_weighting


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


def _schedule(cfg: JointConfig, steps: int) -> Schedule:
    t = cfg.train
    return Schedule(steps=steps, lr=t.lr, eval_every=t.eval_every, lr_decay=t.lr_decay,
                    decay_every=t.decay_every, log_every=t.log_every,
                    sampling=cfg.sampling.method, temperature=cfg.sampling.temperature,
                    seed=t.seed, divergence_factor=t.divergence_factor, precision=t.precision)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def main_first(dist: Dist | None) -> Iterator[None]:
    """Under torchrun rank 0 runs the block first (it generates the synthetic world and
    embeds and caches the texts) and the others then, reading what it wrote instead of
    writing the same files at the same time; one process: just the block. The others wait
    in a barrier, bounded by ``train.dist_timeout``."""
    if dist is not None and not dist.main:
        dist.barrier()
    yield
    if dist is not None and dist.main:
        dist.barrier()


def _valid_primary(part: Any, model: torch.nn.Module, types: dict[str, str],
                   dist: Dist | None) -> dict[str, float]:
    """``part``'s primary validation metrics, scored by rank 0 and broadcast (as ``Loop``
    validates): a decision taken on them is the same on every rank."""
    got = (primary({part.name: part.evaluate(model, "valid")}, types)
           if dist is None or dist.main else None)
    return got if dist is None else dist.broadcast_json(got)


def _joint_stage(cfg: JointConfig, parts: list[Any], types: dict[str, str], steps: int,
                 log: Any, writer: Any = None, dist: Dist | None = None) -> Any:
    t = cfg.train
    tasks = [n for p in parts for n in p.task_names]

    def run(ctx: StageContext) -> dict[str, Any]:
        weighting = build_weighting(cfg.weighting.name, cfg.weighting.args, tasks
                                    ).to(_device(ctx.model))
        loop = Loop(ctx.model, parts, weighting, _schedule(cfg, steps), GainSelector(types),
                    alpha={k: v for k, v in t.alpha.items() if k in tasks},
                    weight_decay=t.weight_decay, track_sources=bool(t.refit_steps), log=log,
                    writer=writer, dist=dist)
        ctx.attach(loop).run()
        ctx.finish(loop)
        if dist is not None:  # the sampler is a function of (seed, step): the same everywhere
            theirs = dist.broadcast_json(loop.state.steps_by_source)
            if theirs != loop.state.steps_by_source:
                raise RuntimeError(f"rank {dist.rank} drew other sources than rank 0 "
                                   f"({loop.state.steps_by_source} vs {theirs})")
        loop.load_best()
        # each source's head at its own best joint step: the refit stages' other start
        ctx.carry.update({f"own_best.{k}": v for k, v in loop.own_best.items()})
        return {"steps": steps, "best_step": loop.state.best_step,
                "valid_history": [{k: r[k] for k in ("step", "valid", "score")}
                                  for r in loop.state.history],
                "steps_per_source": {p.name: loop.state.steps_by_source.get(p.name, 0)
                                     for p in parts}}

    return run


def _refit_stage(cfg: JointConfig, part: Any, types: dict[str, str], log: Any,
                 dist: Dist | None = None) -> Any:
    """One source's head alone on its batches, everything else frozen (``refit_steps``).
    Under torchrun it is the same distributed loop as the joint stage (each rank its rows,
    one averaged update, rank 0's validation), so every rank keeps the same head."""
    t = cfg.train

    def run(ctx: StageContext) -> dict[str, Any]:
        model = ctx.model
        head = part.head(model)
        start = clone_state(head)
        mine = {id(p) for p in head.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        first = _valid_primary(part, model, types, dist)
        best = (0.0, start)  # a refit must beat the head it starts from
        own = ctx.carry.get(f"own_best.{part.name}")
        took_own = False
        if own is not None:
            head.load_state_dict(own)
            gain = valid_score(_valid_primary(part, model, types, dist), first, types)
            took_own = gain > 0
            if took_own:
                best = (gain, own)
            head.load_state_dict(best[1])
        alpha = {k: v for k, v in t.alpha.items() if k in part.task_names}
        weighting = build_weighting("static", {"alpha": alpha}, part.task_names)
        schedule = Schedule(steps=t.refit_steps, lr=t.refit_lr, eval_every=t.refit_eval_every,
                            patience=t.refit_patience, seed=t.seed, checkpoint_evals=False,
                            divergence_factor=t.divergence_factor, precision=t.precision)
        try:
            # only this head trains: the adapter and every other head (with any rec rows a
            # head borrows) stay as they are, and get no gradient computed
            for p in trainable:
                p.requires_grad_(id(p) in mine)
            loop = Loop(model, [part], weighting, schedule, GainSelector(types, first),
                        params=[p for p in head.parameters() if p.requires_grad],
                        weight_decay=t.weight_decay, frozen=[model.text], dist=dist)
            ctx.attach(loop)
            # the start to beat: the head as it is now (the better of its two starts)
            loop.state.best_score, loop.best = best[0], clone_state(model)
            loop.run()
            ctx.finish(loop)
            loop.load_best()
        finally:
            for p in trainable:
                p.requires_grad_(True)
        st = loop.state
        log(f"refit {part.name}: " + ("from its own best joint step, " if took_own else "")
            + f"best step {st.best_step} of {st.step}, validation {st.best_score or 0.0:+.4f}")
        return {"own_best_start": took_own, "steps": st.step, "best_step": st.best_step,
                "valid_gain": st.best_score or 0.0}

    return run


def _solve_stage(cfg: JointConfig, parts: list[Any], log: Any, dist: Dist | None) -> Any:
    """The L-BFGS solve of the table heads (``joint.solve``). Under torchrun every rank solves
    the same full-batch problem from the same weights (every rank holds every split), so no
    rank idles in a collective bounded by ``train.dist_timeout`` meanwhile, and the wall time
    is one solve's; rank 0's heads and result are then broadcast, so that a kernel that is not
    bitwise deterministic (a GPU's sparse products) cannot leave the ranks apart. Simpler than
    sharding it: the solve is a small part of a run."""
    t = cfg.train

    def run(ctx: StageContext) -> dict[str, Any]:
        res = solve_heads(ctx.model, parts, t.solve_l2, t.solve_iters, log)
        if dist is not None:
            dist.broadcast_module(ctx.model)
            res = dist.broadcast_json(res)
        return res

    return run


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log of a torchrun rank other than 0: rank 0 speaks for the job."""


def join(cfg: JointConfig) -> tuple[torch.device, Dist | None]:
    """``train.device`` resolved (``cuda`` without CUDA: a ConfigError, before any data is
    read) and, under torchrun, the job joined (once; later calls return it)."""
    device = resolve_device(cfg.train.device)
    dist = setup(device, cfg.train.dist_timeout)
    return (dist.device if dist is not None else device), dist


def refit_heads(model: JointModel, parts: list[Any], cfg: JointConfig, types: dict[str, str],
                log: Any = print, candidates: dict[str, dict[str, Any]] | None = None
                ) -> dict[str, dict[str, Any]]:
    """The refit stages alone (no checkpoints): each part's head, rec first. ``candidates``:
    per source, a head state to start from when it scores better on validation."""
    stages = [Stage(f"refit:{p.name}", _refit_stage(cfg, p, types, log))
              for p in sorted(parts, key=lambda p: not p.refit_first)]
    carry = {f"own_best.{k}": v for k, v in (candidates or {}).items()}
    results = run_stages(model, stages, None, carry=carry)
    return {k.removeprefix("refit:"): v for k, v in results.items()}


def train_joint(cfg: JointConfig, out_dir: str | Path, *, only: tuple[str, ...] | None = None,
                steps: int | None = None, log: Any = print, save: bool = True,
                shared: tuple[list[Any], TextIndex] | None = None,
                resume: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Train every source of ``cfg`` (or the sources in ``only``) jointly; evaluate each on its
    valid and test splits; write metrics.json and the checkpoint ``model/`` into ``out_dir``.
    ``resume``: continue from the latest checkpoint under ``out_dir/checkpoints`` if any.
    ``run_id``: the id its checkpoints carry (``train.stages.Checkpointer``)."""
    with flushed_denormals():
        return _train_joint(cfg, out_dir, only=only, steps=steps, log=log, save=save,
                            shared=shared, resume=resume, run_id=run_id)


def _denormals_flushed() -> bool:
    """Whether this thread's CPU flushes subnormal floats to zero now (FTZ/DAZ): half the
    smallest normal double is then 0 (plain float arithmetic runs on the same FPU state)."""
    smallest_normal = sys.float_info.min  # a runtime value: never constant-folded
    return smallest_normal / 2.0 == 0.0


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Subnormal floats flushed to zero inside, the caller's setting restored after.

    Adam's moments of the n-gram rows a source does not touch decay by 0.9 a step into
    subnormal floats, which the CPU computes ~100x slower: without this a 12,000-step run
    slowed down 4x after step 2,000. Flushing them to zero changes nothing measurable. It is
    process-wide FPU state, so it must not outlive the run: a caller's own code (hypothesis,
    numerics that rely on IEEE subnormals) would silently change behaviour."""
    before = _denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _train_joint(cfg: JointConfig, out_dir: str | Path, *, only: tuple[str, ...] | None = None,
                steps: int | None = None, log: Any = print, save: bool = True,
                shared: tuple[list[Any], TextIndex] | None = None,
                resume: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """``train_joint`` with denormals already flushed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dist = join(cfg)
    main = dist is None or dist.main
    if not main:
        log = _quiet
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    if shared is None:
        with main_first(dist):
            parts, texts, load_s = load_parts(cfg, out, log)
    else:
        (parts, texts), load_s = shared, {}
    every_task = [t for p in parts for t in p.task_names]
    check_tasks("train.alpha", cfg.train.alpha, every_task)
    if only is not None:
        parts = [p for p in parts if p.name in only]
    t1 = time.perf_counter()
    with main_first(dist):  # rank 0 embeds (and caches) the texts, the others read the cache
        bank = text_bank(cfg, texts.texts)
    embed_s = time.perf_counter() - t1
    log(f"text bank: {len(texts.texts) - 1:,} distinct texts ({embed_s:.1f}s)")
    torch.manual_seed(cfg.train.seed)
    model = build_joint_model(cfg, parts, text_width(cfg), log)
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    model.to(device)  # the bank is a buffer: it moves with the weights
    if dist is not None:  # the same initial weights on every rank
        dist.broadcast_module(model)
    for p in parts:  # training batches to the device; under torchrun this rank's rows
        p.place(device, dist.rank if dist else 0, dist.world if dist else 1)
    tasks = [t for p in parts for t in p.task_names]
    types = {t.name: t.type for p in parts for t in p.tasks}
    n_steps = steps if steps is not None else cfg.train.steps
    # training losses, task weights, validation (rank 0's)
    writer = tensorboard_writer(out / "tb") if main else None
    stages = [Stage("joint", _joint_stage(cfg, parts, types, n_steps, log, writer, dist))]
    if cfg.train.refit_steps:  # rec first: heads that borrow its rows refit on their end
        stages += [Stage(f"refit:{p.name}", _refit_stage(cfg, p, types, log, dist))
                   for p in sorted(parts, key=lambda p: not p.refit_first)]
    if cfg.train.solve_heads:
        stages.append(Stage("solve", _solve_stage(cfg, parts, log, dist)))
    checkpointer = Checkpointer(out / "checkpoints", write=main, run_id=run_id)
    resume = resume and checkpointer.latest() is not None
    t2 = time.perf_counter()
    try:
        results = run_stages(model, stages, checkpointer, resume)
    finally:
        if writer is not None:
            writer.close()
    train_s = time.perf_counter() - t2
    joint = results["joint"]
    model.eval()
    if not main:  # rank 0 scores, writes, and hands every rank the same metrics
        return dist.broadcast_json(None)  # type: ignore[union-attr]
    valid = {p.name: p.evaluate(model, "valid") for p in parts}
    test = {p.name: p.evaluate(model, "test") for p in parts}
    metrics: dict[str, Any] = {
        "sources": [p.name for p in parts],
        "tasks": {t: types[t] for t in tasks},
        "steps": n_steps,
        "best_step": joint["best_step"],
        "valid_history": joint["valid_history"],
        "refit": {k.removeprefix("refit:"): v for k, v in results.items()
                  if k.startswith("refit:")},
        "solve": results.get("solve", {}),
        "steps_per_source": joint["steps_per_source"],
        "sampling": to_dict(cfg.sampling),
        "valid": valid,
        "test": test,
        "summary": primary(test, types),
        "seconds": {"load": load_s, "embed": embed_s, "train": train_s,
                    "total": time.perf_counter() - t0},
    }
    if save:
        save_joint_dir(out / "model", model, cfg, parts)
    metrics = json_safe(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics if dist is None else dist.broadcast_json(metrics)


def replace_steps(cfg: JointConfig, steps: int) -> JointConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
