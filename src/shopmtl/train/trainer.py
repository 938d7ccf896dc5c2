"""A zoo model trained on one table: the one loop (``train.loop``) over one ``TableSource``,
an evaluation every epoch, early stopping on a named validation metric, atomic checkpoints and
bitwise-identical resume on CPU.

Layout of an output directory::

    model/            best model so far: model.safetensors + config/schema/encoders JSON
    checkpoints/      ckpt-<stage>-<step>/ (weights, optimizer, RNG, loop state), `latest`
    tb/               TensorBoard scalars
    history.json      per-epoch losses and validation metrics
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from shopmtl.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    check_tasks,
    to_dict,
)
from shopmtl.data.dataset import TensorTable
from shopmtl.data.encoders import Encoders
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import Schema
from shopmtl.jsonsafe import json_safe
from shopmtl.models.base import MultiTaskModel
from shopmtl.registry import build_model
from shopmtl.tasks import TASK_TYPES
from shopmtl.train import checkpoint as ck
from shopmtl.train.distributed import resolve_device, setup
from shopmtl.train.loop import Loop, LoopState, Schedule, check_finite
from shopmtl.train.modelfiles import read_model_files  # also its public home (tests, export)
from shopmtl.train.select import MetricSelector
from shopmtl.train.stages import Checkpointer, Stage, StageContext, run_stages
from shopmtl.train.table import TableSource, id_dropout_table
from shopmtl.weighting import build_weighting


def set_threads(n: int) -> None:
    import os

    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def label_priors(table: TensorTable, schema: Schema) -> dict[str, float]:
    """Each task's output-bias prior from its labelled training rows (its task type's
    ``label_prior``: logit of the positive rate for a binary task, the mean for a regression
    task; tasks without labels: none)."""
    out = {}
    for j, task in enumerate(schema.tasks):
        m = table.mask[:, j]
        if not bool(m.any()):
            continue
        prior = TASK_TYPES[task.type].label_prior(table.labels[m, j].numpy())
        if prior is not None:
            out[task.name] = prior
    return out


def save_model_dir(
    path: Path,
    model: MultiTaskModel,
    cfg: ExperimentConfig,
    schema: Schema,
    encoders: Encoders,
    extra: dict[str, Any] | None = None,
) -> None:
    check_finite(model)
    tensors = {"model": model.state_dict()}
    if schema.content_features:  # the catalog's matrices, once (not in the weights)
        tensors["content"] = encoders.content_tensors()
    ck.write_dir(
        path,
        tensors,
        {
            "config": to_dict(cfg),
            "schema": to_dict(schema),
            "encoders": encoders.to_json(),
            "meta": ck.model_meta("zoo", list(schema.task_names), model=cfg.model.name,
                                  **json_safe(extra or {})),
        },
    )


def load_model_dir(path: str | Path, verify: bool = True
                   ) -> tuple[MultiTaskModel, ExperimentConfig, Schema, Encoders]:
    """Rebuild a model from its directory alone (the manifest is verified first, unless the
    caller just did: ``verify=False``). ``shopmtl.load`` reads any kind of model directory."""
    path = Path(path)
    if verify:
        ck.verify_dir(path)
    cfg, schema, encoders, content = read_model_files(path)
    sizes = {f.name: encoders.vocab_size(f) for f in schema.features if f.kind != "numeric"}
    model = build_model(cfg.model.name, cfg.model.args, schema, sizes, content)
    state = ck.read_tensors(path, "model")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ck.CheckpointError(f"{path}: weights do not fit the model ({e})") from None
    model.eval()
    return model, cfg, schema, encoders


def epoch_schedule(t: TrainConfig, batches: int, epochs: int) -> Schedule:
    """The one-table run's steps for ``epochs`` epochs of ``batches`` batches: ``t``'s lr
    (scaled to its batch), decayed once an epoch, clipping, seed, precision, divergence guard
    and FGM; no evaluation before the end, no early stopping (the ``Trainer`` adds those; a
    fine-tune of an exported model, ``export.finetune``, runs it as it is)."""
    return Schedule(steps=epochs * batches, lr=t.batch_lr(), lr_decay=t.lr_decay,
                    decay_every=batches, grad_clip=t.grad_clip, seed=t.seed,
                    precision=t.precision, divergence_factor=t.divergence_factor,
                    adversarial_epsilon=t.adversarial_epsilon if t.adversarial == "fgm" else 0.0)


class Trainer:
    """Build the zoo model, its table source, weighting and loop from an experiment config."""

    def __init__(
        self, cfg: ExperimentConfig, data: PreparedData, out_dir: str | Path, progress: bool = True,
        run_id: str | None = None,
    ) -> None:
        self.cfg, self.data, self.out = cfg, data, Path(out_dir)
        self.progress = progress
        t = cfg.train
        set_threads(t.threads)
        torch.manual_seed(t.seed)
        self.device = resolve_device(t.device)
        # torchrun (WORLD_SIZE > 1): join the job; None for one process
        self.dist = setup(self.device, t.dist_timeout)
        if self.dist is not None:
            self.device = self.dist.device
        self.main = self.dist is None or self.dist.main
        self.schema = data.schema
        check_tasks("train.alpha", t.alpha, self.schema.task_names)
        content = data.encoders.content_tensors() if self.schema.content_features else None
        self.model = build_model(cfg.model.name, cfg.model.args, self.schema, data.vocab_sizes,
                                 content)
        if t.output_bias_prior and isinstance(data.train, TensorTable):
            self.model.init_output_bias(label_priors(data.train, self.schema))
        self.model.to(self.device)
        if self.dist is not None:  # the same initial weights on every rank
            self.dist.broadcast_module(self.model)
        self.weighting = build_weighting(cfg.weighting.name, cfg.weighting.args,
                                         self.schema.task_names).to(self.device)
        self.source = TableSource(data, t.batch_size,
                                  embedding_weight_decay=t.embedding_weight_decay,
                                  id_dropout=id_dropout_table(t.id_dropout, self.schema),
                                  eval_batch_size=t.eval_batch_size, device=self.device,
                                  rank=self.dist.rank if self.dist else 0,
                                  world=self.dist.world if self.dist else 1,
                                  prefetch=cfg.data.prefetch, resident=t.resident)
        if t.adversarial == "fgm" and not t.adversarial_epsilon > 0:
            raise ConfigError(f"train.adversarial_epsilon: must be > 0, got "
                              f"{t.adversarial_epsilon}")
        # one evaluation, one lr decay per epoch (a trainer driven step by step by a test may
        # have no training table)
        n = self.source.num_batches() if data.train is not None else 1
        self.schedule = dataclasses.replace(
            epoch_schedule(t, n, t.epochs), eval_every=n, patience=t.early_stopping.patience,
            checkpoint_every=t.checkpoint_every, log_every=t.log_every,
            log_grad_cosine=t.log_grad_cosine)
        selector = MetricSelector(t.early_stopping.metric, t.early_stopping.mode,
                                  self.source.name)
        self.loop = Loop(self.model, [self.source], self.weighting, self.schedule, selector,
                         alpha=t.alpha, weight_decay=t.weight_decay, optimizer=t.optimizer,
                         on_best=self._save_best, dist=self.dist,
                         prior=self._prior_metrics if t.prior_guard else None)
        # run_id: the output folder's run (train.outdir); retention deletes only its checkpoints
        self.checkpointer = Checkpointer(self.out / "checkpoints", write=self.main, run_id=run_id)

    @property
    def state(self) -> LoopState:
        return self.loop.state

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.loop.opt

    @property
    def alpha(self) -> torch.Tensor:
        return self.loop.alpha

    def step(self, batch: Any) -> dict[str, float]:
        """One training step on ``batch`` (tests drive the loop's step directly)."""
        self.loop.train_mode()
        out = self.loop.step(self.source, batch)
        self.loop.state.step += 1
        return out

    def _prior_metrics(self) -> dict[str, dict[str, Any]] | None:
        """The label prior's validation metrics (the loop's prior guard); None without an
        in-memory training table to take the priors from (streamed training: no guard)."""
        if not isinstance(self.data.train, TensorTable):
            return None
        priors = label_priors(self.data.train, self.schema)
        return {self.source.name: self.source.prior_metrics(priors)}

    def _save_best(self, loop: Loop, record: dict[str, Any]) -> None:
        if not self.main:  # rank 0 writes model/
            return
        save_model_dir(self.out / "model", self.model, self.cfg, self.schema, self.data.encoders,
                       {"epoch": record["epoch"], "valid_metric": record["valid_metric"]})

    def _stage(self, ctx: StageContext) -> dict[str, Any]:
        ctx.attach(self.loop)
        try:
            self.loop.run(self.progress)
        finally:
            if self.main:
                (self.out / "history.json").write_text(
                    json.dumps(json_safe(self.loop.state.history), indent=1))
        ctx.finish(self.loop)
        return json_safe(vars(self.loop.state))

    def fit(self, resume: bool = False, writer: Any = None) -> LoopState:
        self.loop.writer = writer
        results = run_stages(self.model, [Stage("train", self._stage)], self.checkpointer,
                             resume)
        return LoopState(**results["train"])


def tensorboard_writer(log_dir: Path) -> Any:
    """A TensorBoard SummaryWriter into ``log_dir``, or None (one info line, once) when the
    'viz' extra's tensorboard is not installed: training runs the same without it."""
    from shopmtl.deps import installed, note_skipped

    if not installed("tensorboard"):
        note_skipped("TensorBoard logging", "tensorboard", "viz")
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def train_model(
    cfg: ExperimentConfig,
    data: PreparedData,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    run_id: str | None = None,
) -> tuple[MultiTaskModel, LoopState]:
    """Train, then reload the best weights (what was saved in ``out_dir/model``). ``run_id``:
    the id its checkpoints carry (``train.stages.Checkpointer``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, data, out, progress, run_id=run_id)
    writer = tensorboard_writer(out / "tb") if tensorboard and trainer.main else None
    try:
        state = trainer.fit(resume=resume, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    if trainer.dist is not None:  # rank 0 has written model/
        trainer.dist.barrier()
    best = ck.read_tensors(out / "model", "model")
    trainer.model.load_state_dict({k: v.to(trainer.device) for k, v in best.items()})
    trainer.model.eval()
    return trainer.model, state
