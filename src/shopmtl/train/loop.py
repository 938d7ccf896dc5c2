"""The one training loop. Every run is ``Loop.run`` over task sources: a zoo model on one table,
the joint run's sources, each refit stage of a joint run, a torchrun rank (``Dist``:
``train.distributed``), and (later) a federated client's local steps.

One step: the sampler picks a source, its stream gives the next batch, the source turns the
model's outputs into task losses, ``alpha`` scales them, the weighting turns them into one
update (a loss weighting differentiates ``sum_i w_i L_i``; a gradient aggregator combines the
per-task gradients of the shared parameters), optional FGM and clipping, the optimizer steps.
Every ``eval_every`` steps (and at the last) the sources score their validation split, the
selector turns that into one number, and the best weights so far are kept; ``patience``
evaluations without a better one stop the run.

Everything the next step depends on is in ``LoopState`` plus the weights, the optimizer, the
weighting and the torch RNG, so a checkpoint holds exactly that and a resumed run makes the
same steps bit for bit on CPU: the sampler and every stream are pure functions of (seed,
position), see ``train.sampling`` and ``Stream``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.data.source import TaskSource
from shopmtl.train import checkpoint as ck
from shopmtl.train.distributed import Dist
from shopmtl.train.sampling import SamplingMethod, SourceSampler
from shopmtl.weighting import StepInfo, Weighting, task_gradient_cosine


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss or weights; nothing non-finite was saved."""


class DivergenceError(NonFiniteError):
    """A task's loss ran away (``Schedule.divergence_factor``); training stopped before the
    next evaluation, so nothing from the runaway steps was saved as best."""


class NoBetterThanPriorError(NonFiniteError):
    """No evaluation of the run scored better than the label prior (the constant prediction
    of each task's training label rate or mean) on the validation split, so nothing was saved
    as best (``Loop(prior=...)``: the one-table run's ``train.prior_guard``)."""


@dataclass(frozen=True)
class Schedule:
    """How many steps, how fast, and when to look at validation."""

    steps: int
    lr: float
    eval_every: int = 0  # evaluate every n steps (and after the last); 0: after the last only
    lr_decay: float = 1.0  # the model's lr is lr * lr_decay ** (step // decay_every)
    decay_every: int = 0  # 0: no decay
    patience: int = 0  # evaluations without a better score before stopping; 0: never stop
    checkpoint_every: int = 0  # also checkpoint every n steps
    checkpoint_evals: bool = True  # checkpoint at every evaluation
    grad_clip: float = 0.0
    log_every: int = 0  # per-task training losses kept (and logged) every n steps
    sampling: SamplingMethod = "proportional"
    temperature: float = 2.0
    seed: int = 0
    adversarial_epsilon: float = 0.0  # > 0: FGM on sources that support it
    log_grad_cosine: bool = False
    precision: str = "fp32"  # "bf16": forward and losses under torch.autocast(bfloat16)
    # stop with DivergenceError when a task's recent training loss (an exponential mean over
    # ~10 steps) exceeds this many times its first value (the loss at initialisation); 0: off
    divergence_factor: float = 100.0

    def lr_at(self, step: int) -> float:
        if self.decay_every <= 0 or self.lr_decay == 1.0:
            return self.lr
        return self.lr * self.lr_decay ** (step // self.decay_every)


@dataclass
class LoopState:
    """The loop's position and record (JSON in checkpoints; the tensors travel beside it)."""

    step: int = 0
    # source -> [epoch, batches of that epoch already taken]
    positions: dict[str, list[int]] = field(default_factory=dict)
    steps_by_source: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    best_score: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    stopped: bool = False
    # per source: its own best validation score so far (``Loop.own_best`` holds its head then)
    own_best: dict[str, float] = field(default_factory=dict)
    # task -> [sum, count] of the training losses since the last evaluation
    running: dict[str, list[float]] = field(default_factory=dict)
    losses: list[list[float]] = field(default_factory=list)  # [step, loss per task] samples
    # per task: its first positive training loss and the exponential mean of its recent ones
    # (the divergence guard)
    first_loss: dict[str, float] = field(default_factory=dict)
    recent_loss: dict[str, float] = field(default_factory=dict)
    # the label prior's selection score and metric on the validation split ({} when unknown:
    # no guard); an evaluation must beat the score to be saved as best
    prior: dict[str, float] = field(default_factory=dict)

    @property
    def global_step(self) -> int:
        return self.step

    def best_record(self) -> dict[str, Any]:
        """The history record of the best evaluation ({} before any)."""
        return next((r for r in self.history if r["step"] == self.best_step), {})

    @property
    def best_epoch(self) -> int:
        """The best evaluation's number (a one-table run's epoch); -1 before any."""
        return int(self.best_record().get("epoch", -1))

    @property
    def best_metric(self) -> float | None:
        """The best evaluation's named metric (a one-table run's early-stopping metric)."""
        return self.best_record().get("valid_metric")


class Selector(Protocol):
    """Turns validation metrics into one number, higher is better, and a history record."""

    def score(self, valid: dict[str, dict[str, Any]], history: list[dict[str, Any]]
              ) -> tuple[float, dict[str, Any]]: ...

    def source_score(self, valid: dict[str, dict[str, Any]], source: TaskSource,
                     history: list[dict[str, Any]]) -> float: ...


class Stream:
    """A source's endless batches: epoch e in its (seed, e) order, resumable at any batch."""

    def __init__(self, source: TaskSource, seed: int, epoch: int = 0, taken: int = 0) -> None:
        self.source, self.seed, self.epoch, self.taken = source, seed, epoch, taken
        self._it: Iterator[Any] = source.batches(epoch, seed, taken)

    def next(self) -> Any:
        for _ in range(2):  # at most one epoch boundary per batch
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.taken = self.epoch + 1, 0
                self._it = self.source.batches(self.epoch, self.seed, 0)
                continue
            self.taken += 1
            return batch
        raise ValueError(f"source '{self.source.name}' yields no training batch")


def make_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float = 0.0,
                   kind: str = "adam") -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    params = list(params)
    # one fused kernel for every parameter instead of ~6 operators per tensor (the CPU loop
    # took ~10x longer on the joint run's 4M-parameter n-gram table)
    # (CUDA float32 parameters: the fused CUDA kernel)
    fused = bool(params) and len({p.device.type for p in params}) == 1 and all(
        p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return cls(params, lr=lr, weight_decay=weight_decay, fused=fused)


def check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"parameter '{name}' is not finite; refusing to save it")


def clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Loop:
    """``model`` trained on ``sources`` under one weighting of all their tasks.

    ``params``: what the optimizer moves (default: every trainable parameter of the model; a
    refit stage passes one head's). ``frozen``: modules kept in eval mode while training (a
    refit stage's shared text adapter: no dropout). ``track_sources``: also keep each source's
    head (``source.head(model)``) at that source's own best evaluation (``own_best``).
    ``checkpoint``: called with the loop at every checkpoint point; it saves
    ``self.snapshot()`` and ``self.state`` (``train.stages``).
    """

    def __init__(self, model: nn.Module, sources: Sequence[TaskSource], weighting: Weighting,
                 schedule: Schedule, selector: Selector, *, alpha: dict[str, float] | None = None,
                 params: Sequence[nn.Parameter] | None = None, weight_decay: float = 0.0,
                 optimizer: str = "adam", frozen: Sequence[nn.Module] = (),
                 track_sources: bool = False, log: Callable[[str], None] | None = None,
                 writer: Any = None,
                 checkpoint: Callable[[Loop], None] | None = None,
                 on_best: Callable[[Loop, dict[str, Any]], None] | None = None,
                 dist: Dist | None = None,
                 prior: Callable[[], dict[str, dict[str, Any]] | None] | None = None) -> None:
        if not sources:
            raise ValueError("a loop needs at least one source")
        self.model, self.sources, self.weighting = model, list(sources), weighting
        self.schedule, self.selector = schedule, selector
        self.tasks = tuple(t for s in self.sources for t in s.task_names)
        if self.tasks != weighting.task_names:
            raise ValueError(f"the weighting's tasks {list(weighting.task_names)} are not the "
                             f"sources' {list(self.tasks)}")
        self.index = {t: i for i, t in enumerate(self.tasks)}
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.params = list(params)
        # the device the model lives on (the trainer moved it there); losses and weights too
        self.device = self.params[0].device if self.params else torch.device("cpu")
        alpha = alpha or {}
        self.alpha = torch.tensor([float(alpha.get(t, 1.0)) for t in self.tasks],
                                  device=self.device)
        # torchrun: this process's rank in the job (``train.distributed``); None: one process
        self.dist = dist
        if dist is not None and weighting.needs_gradients:
            raise ConfigError(f"weighting '{type(weighting).__name__}' combines per-task "
                              "gradients, which is not supported with several processes "
                              "(torchrun); use a loss weighting or one process")
        self.opt = make_optimizer(self.params, schedule.lr, weight_decay, optimizer)
        for group in weighting.param_groups(schedule.lr):  # e.g. learned log-variances
            self.opt.add_param_group(group)
        self.frozen, self.track_sources = list(frozen), track_sources
        self.log, self.writer, self.checkpoint = log, writer, checkpoint
        self.on_best = on_best  # e.g. the one-table run writes model/ at each new best
        self.state = LoopState()
        self.best: dict[str, Tensor] | None = None  # the model at the best evaluation
        self.own_best: dict[str, dict[str, Tensor]] = {}  # source -> its head at its best
        self.sampler = None if len(self.sources) == 1 else SourceSampler(
            [s.num_batches() for s in self.sources], schedule.sampling, schedule.temperature,
            schedule.seed)
        self.streams: dict[str, Stream] = {}
        self._present: dict[str, Tensor | None] = {}  # source -> tasks it has (None: all)
        self._zero = torch.zeros((), device=self.device)
        self.last_valid: dict[str, dict[str, Any]] = {}
        # the label prior's validation metrics, per source and task (None: a task without a
        # prior), shaped like ``TaskSource.evaluate``'s; scored by ``selector.prior``
        self.prior = prior
        self._prior_tried = False

    # -- state --------------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """Everything a checkpoint needs besides ``self.state``: tensor groups, and the
        optimizer's parameter groups (JSON)."""
        opt_t, opt_meta = ck.optimizer_to_tensors(self.opt)
        opt_t["rng.torch"] = torch.get_rng_state()
        out = {"weights": self.model.state_dict(), "optimizer": opt_t,
               "weighting": self.weighting.state_dict() or {"_empty": torch.zeros(1)}}
        if self.best is not None:
            out["best"] = self.best
        for name, head in self.own_best.items():
            out[f"own_best.{name}"] = head
        return out, opt_meta

    def restore(self, tensors: dict[str, dict[str, Tensor]], state: dict[str, Any],
                optimizer_meta: dict[str, Any]) -> None:
        self.model.load_state_dict(tensors["weights"])
        opt_t = dict(tensors["optimizer"])
        torch.set_rng_state(opt_t.pop("rng.torch"))
        ck.optimizer_from_tensors(self.opt, opt_t, optimizer_meta)
        w = dict(tensors["weighting"])
        w.pop("_empty", None)
        self.weighting.load_state_dict(w)
        self.best = tensors.get("best")
        self.own_best = {k.removeprefix("own_best."): v for k, v in tensors.items()
                         if k.startswith("own_best.")}
        self.state = LoopState(**state)

    # -- one step -----------------------------------------------------------------------------
    def stream(self, source: TaskSource) -> Stream:
        s = self.streams.get(source.name)
        if s is None:
            epoch, taken = self.state.positions.get(source.name, [0, 0])
            s = self.streams[source.name] = Stream(source, self.schedule.seed, epoch, taken)
        return s

    def step(self, source: TaskSource, batch: Any) -> dict[str, float]:
        """One update on ``batch`` of ``source``; returns its task losses (floats)."""
        sched, st = self.schedule, self.state
        for group in self.opt.param_groups[:1]:  # the model's group, not a weighting's
            group["lr"] = sched.lr_at(st.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=sched.precision == "bf16"):
            losses = source.losses(self.model, batch)
        extra = [v.float() for k, v in losses.items() if k.startswith("_")]
        zero = self._zero
        vec = torch.stack([losses.get(t, zero).float() for t in self.tasks])  # [T]
        reg = sum(extra) if extra else None
        if self.dist is not None:  # the world's loss values (each rank's own gradient path)
            vec = self.dist.global_values(vec, self._counts(source, batch))
        if not bool(torch.isfinite(vec).all()) or (reg is not None
                                                  and not bool(torch.isfinite(reg))):
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items()
                               if not bool(torch.isfinite(v).all()))
            raise NonFiniteError(f"non-finite loss at step {st.step} (source {source.name}: "
                                 f"{detail}); training stopped, no checkpoint written after the "
                                 "last good one")
        present = self._present.get(source.name)
        if present is None:
            mask = torch.tensor([t in source.task_names for t in self.tasks],
                                device=self.device)
            present = self._present[source.name] = None if bool(mask.all()) else mask
        info = StepInfo.from_history(st.step, self.epoch(), st.history, self.tasks)
        if present is not None:
            info = dataclasses.replace(info, present=present)
        if self.writer is not None and sched.log_grad_cosine and self._log_now():
            self._log_cosine(self.alpha * vec)
        self.opt.zero_grad(set_to_none=True)
        weights = self.weighting.backward(self.alpha * vec, self.model, info, reg)
        if not bool(torch.isfinite(weights).all()):
            raise NonFiniteError(f"non-finite task weights at step {st.step}")
        if sched.adversarial_epsilon > 0:  # + gradient at the perturbed embeddings
            adv = source.adversarial_backward(self.model, batch, self.alpha * weights,
                                              sched.adversarial_epsilon)
            if adv is not None and not bool(torch.isfinite(adv).all()):
                raise NonFiniteError(f"non-finite FGM loss at step {st.step}")
        if self.dist is not None:  # one update for the whole world
            self.dist.average_gradients(p for g in self.opt.param_groups for p in g["params"])
        if sched.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, sched.grad_clip)
            if not bool(torch.isfinite(norm)):
                raise NonFiniteError(f"non-finite gradient at step {st.step}")
        self.opt.step()
        if self.writer is not None and self._log_now():
            for t, w in zip(self.tasks, weights.float().tolist(), strict=True):
                if t in losses:
                    self.writer.add_scalar(f"task_weight/{t}", w, st.step + 1)
        return dict(zip(source.task_names, vec.detach()[self._cols(source)].tolist(),
                        strict=True))

    def _counts(self, source: TaskSource, batch: Any) -> Tensor | None:
        """[T] labelled rows per task of this batch (``source.loss_counts``, a source whose
        task losses are masked means); None when the source does not say."""
        counts = getattr(source, "loss_counts", None)
        if counts is None:
            return None
        out = torch.zeros(len(self.tasks), device=self.device)
        out[self._cols(source)] = counts(batch).to(out)
        return out

    def _cols(self, source: TaskSource) -> list[int]:
        return [self.index[t] for t in source.task_names]

    def _log_now(self) -> bool:
        every = self.schedule.log_every
        return every > 0 and (self.state.step + 1) % every == 0

    def _log_cosine(self, weighted: Tensor) -> None:
        shared = getattr(self.model, "shared_parameters", None)
        if shared is None:
            return
        cos = task_gradient_cosine(weighted, shared())
        for a in range(len(self.tasks)):
            for b in range(a + 1, len(self.tasks)):
                self.writer.add_scalar(f"grad_cosine/{self.tasks[a]}~{self.tasks[b]}",
                                       float(cos[a, b]), self.state.step + 1)

    def check_divergence(self, losses: dict[str, float]) -> None:
        """Raise DivergenceError when a task's loss has run away from where it started (a
        learning rate far too high: the loss grows by orders of magnitude while staying
        finite, and the run would end with chance-level AUC saved as its best)."""
        factor, st = self.schedule.divergence_factor, self.state
        if not factor > 0:
            return
        for task, v in losses.items():
            first = st.first_loss.get(task)
            if first is None:
                if v > 0:  # a batch without the task's labels gives 0: no reference
                    st.first_loss[task] = v
                    st.recent_loss[task] = v
                continue
            recent = st.recent_loss[task] = 0.9 * st.recent_loss[task] + 0.1 * v
            if recent > factor * first:
                raise DivergenceError(
                    f"training diverged at step {st.step}: the recent {task} loss {recent:.3g} "
                    f"is over {factor:g}x its first value {first:.3g}; lower the learning rate "
                    "(or set the divergence_factor of the train section to 0 to switch this "
                    "check off); nothing after the last evaluation was saved")

    def epoch(self) -> int:
        """Evaluations done: the epoch of a one-table run (its eval_every is an epoch)."""
        return len(self.state.history)

    # -- the loop -----------------------------------------------------------------------------
    def train_mode(self) -> None:
        self.model.train()
        self.weighting.train()
        for m in self.frozen:
            m.eval()

    def run(self, progress: bool = False) -> LoopState:
        sched, st = self.schedule, self.state
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                       disable=not progress)
        with bar:
            job = bar.add_task("training", total=sched.steps, completed=st.step)
            self.train_mode()
            t0 = time.perf_counter()
            while st.step < sched.steps and not st.stopped:
                i = 0 if self.sampler is None else int(self.sampler.schedule(1, st.step)[0])
                source = self.sources[i]
                stream = self.stream(source)
                losses = self.step(source, stream.next())
                st.step += 1
                st.positions[source.name] = [stream.epoch, stream.taken]
                st.steps_by_source[source.name] = st.steps_by_source.get(source.name, 0) + 1
                for k, v in losses.items():
                    run = st.running.setdefault(k, [0.0, 0])
                    run[0] += v
                    run[1] += 1
                self.check_divergence(losses)
                bar.advance(job)
                if sched.log_every and st.step % sched.log_every == 0:
                    st.losses.append([st.step, *(losses.get(t, math.nan) for t in self.tasks)])
                    if self.writer is not None:
                        for k, v in losses.items():
                            self.writer.add_scalar(f"train_loss/{k}", v, st.step)
                    if self.log is not None:
                        self.log(f"step {st.step}/{sched.steps}: " + ", ".join(
                            f"{k} {v[0] / max(v[1], 1):.3f}" for k, v in st.running.items()))
                at_eval = st.step == sched.steps or (
                    sched.eval_every > 0 and st.step % sched.eval_every == 0)
                if at_eval:
                    self.evaluate(time.perf_counter() - t0)
                    self.train_mode()
                if self.checkpoint is not None and ((at_eval and sched.checkpoint_evals) or (
                        sched.checkpoint_every and st.step % sched.checkpoint_every == 0)):
                    self.checkpoint(self)
                if at_eval:  # an interval's seconds are its training steps alone
                    t0 = time.perf_counter()
        self.check_prior()
        return st

    def evaluate(self, seconds: float = 0.0) -> None:
        st = self.state
        # the prior's metrics once per process (a resumed run has them in its state)
        want_prior = self.prior is not None and not st.prior and not self._prior_tried
        self._prior_tried = True
        prior_valid = None
        if self.dist is None or self.dist.main:
            valid = {s.name: s.evaluate(self.model, "valid") for s in self.sources}
            if want_prior:
                prior_valid = self.prior()  # type: ignore[misc]
        else:
            valid = {}
        if self.dist is not None:  # rank 0's metrics: the same best/stop decision everywhere
            valid, prior_valid = self.dist.broadcast_json([valid, prior_valid])
        if want_prior:
            self._set_prior(prior_valid)
        self.last_valid = valid
        score, record = self.selector.score(valid, st.history)
        train_loss = {t: (st.running[t][0] / st.running[t][1]) if t in st.running else 0.0
                      for t in self.tasks}
        st.running = {}
        rec = {"epoch": len(st.history) + 1, "step": st.step, "train_loss": train_loss,
               **record, "score": score, "seconds": seconds}
        st.history.append(rec)
        if self.writer is not None:
            self.writer.add_scalar("valid/score", score, st.step)
            for group, prefix in (("valid", "valid/"), ("valid_auc", "valid_auc/")):
                for k, v in record.get(group, {}).items():
                    if v is not None and math.isfinite(v):
                        self.writer.add_scalar(prefix + k, v, st.step)
        # the first evaluation is the best so far even when its score is NaN (a split with
        # one class); a NaN never beats a number. A refit stage presets ``best`` (its start).
        # With a known prior, only a score strictly above the prior's counts.
        if self._guarded():
            better = math.isfinite(score) and score > st.prior["score"] and (
                st.best_score is None or score > st.best_score)
        else:
            better = self.best is None or (
                math.isfinite(score) and (st.best_score is None or score > st.best_score))
        if better:
            st.best_score = score if math.isfinite(score) else None
            st.best_step = st.step
            st.bad_evals = 0
            self.best = clone_state(self.model)
            if self.on_best is not None:
                self.on_best(self, rec)
        else:
            st.bad_evals += 1
            if self.schedule.patience and st.bad_evals >= self.schedule.patience:
                st.stopped = True
        if self.track_sources:
            for s in self.sources:
                mine = self.selector.source_score(valid, s, st.history)
                if s.name not in st.own_best or mine > st.own_best[s.name]:
                    st.own_best[s.name] = mine
                    self.own_best[s.name] = clone_state(s.head(self.model))
        if self.log is not None:
            self.log(f"step {st.step}: validation score {score:+.4f}"
                     + (" (best)" if st.best_step == st.step else ""))

    def _set_prior(self, prior_valid: dict[str, dict[str, Any]] | None) -> None:
        """``state.prior`` from the prior's validation metrics (left empty, no guard, when
        there are none or the selector cannot score them, e.g. the joint run's gain)."""
        score_prior = getattr(self.selector, "prior", None)
        got = score_prior(prior_valid) if prior_valid and score_prior is not None else None
        if got is not None:
            self.state.prior = {"score": got[0], "metric": got[1]}

    def _guarded(self) -> bool:
        """The prior guard is on (``prior`` given: a resumed run with it switched off is not
        held to the prior its checkpoint recorded) and the prior's score is known."""
        return self.prior is not None and bool(self.state.prior)

    def check_prior(self) -> None:
        """Raise NoBetterThanPriorError when the run has evaluated but no evaluation beat the
        label prior (so none was saved as best)."""
        st = self.state
        if not self._guarded() or not st.history or st.best_score is not None:
            return
        name = getattr(self.selector, "metric", "the validation score")
        key = "valid_metric" if all("valid_metric" in r for r in st.history) else "score"
        vals = [r[key] for r in st.history if r[key] is not None and math.isfinite(r[key])]
        mode = getattr(self.selector, "mode", "max")
        best = (min(vals) if mode == "min" else max(vals)) if vals else math.nan
        prior = st.prior["metric"] if key == "valid_metric" else st.prior["score"]
        raise NoBetterThanPriorError(
            f"no evaluation beat the label prior: the best {name} {best:.4g} is no better than "
            f"the label prior's {prior:.4g} (each task's training label rate or mean, "
            "predicted for every row); "
            "lower train.lr, check the labels (or set train.prior_guard: false); no model "
            "was saved")

    def load_best(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best)


@dataclass
class FitResult:
    state: LoopState
    weights: dict[str, Tensor]  # the model's weights at the end (not the best evaluation's)
    valid: dict[str, dict[str, Any]]  # the last evaluation, per source and task
    # the optimizer's per-parameter state at the end (Adam's moments and step count), for a
    # caller that continues the same optimizer later (a federated client between rounds)
    optimizer: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def fit(model: nn.Module, sources: Sequence[TaskSource], weighting: Weighting,
        schedule: Schedule, selector: Selector, *, weights: dict[str, Tensor] | None = None,
        start: LoopState | None = None, optimizer_state: dict[int, dict[str, Tensor]] | None
        = None, **loop_args: Any) -> FitResult:
    """A bounded piece of training: from ``weights`` (e.g. a federated round's global model)
    and ``start`` (where the streams and the step count stand), run to ``schedule.steps`` and
    hand back the new weights, state and metrics. The optimizer starts afresh (a federated
    client's local steps) unless ``optimizer_state`` (a previous ``FitResult.optimizer``)
    gives it its per-parameter state back; the learning rate is the schedule's either way. To
    continue a run exactly, resume from its checkpoint instead."""
    if weights is not None:
        model.load_state_dict(weights)
    loop = Loop(model, sources, weighting, schedule, selector, **loop_args)
    if start is not None:
        loop.state = LoopState(**json.loads(json.dumps(asdict(start))))  # a deep copy
    if optimizer_state:
        sd = loop.opt.state_dict()  # its param_groups: this schedule's lr, not the old one's
        sd["state"] = optimizer_state
        loop.opt.load_state_dict(sd)
    loop.run()
    # the optimizer's own tensors, not copies: the loop and its optimizer end here
    return FitResult(loop.state, clone_state(model), loop.last_valid,
                     {int(i): dict(st) for i, st in loop.opt.state_dict()["state"].items()})


def state_json(state: LoopState) -> dict[str, Any]:
    from shopmtl.jsonsafe import json_safe

    return json_safe(asdict(state))
