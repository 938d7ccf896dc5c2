"""The training loop: masked multi-task loss sum_i alpha_i L_i, early stopping on a named
validation metric, atomic checkpoints and bitwise-identical resume on CPU.

Layout of an output directory::

    model/            best model so far: model.safetensors + config/schema/encoders JSON
    checkpoints/      ckpt-<step>/ (weights, optimizer, RNG, loop state) and a `latest` pointer
    tb/               TensorBoard scalars
    history.json      per-epoch losses and validation metrics
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shopmtl.config import ConfigError, ExperimentConfig, from_dict, to_dict
from shopmtl.data.dataset import Batch, TensorTable
from shopmtl.data.encoders import Encoders
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import Schema
from shopmtl.jsonsafe import json_safe
from shopmtl.models.base import MultiTaskModel
from shopmtl.registry import build_model
from shopmtl.train import checkpoint as ck
from shopmtl.train.adversarial import fgm_backward
from shopmtl.train.evaluate import metrics_by_scenario, predict_split, summary_metric
from shopmtl.weighting import StepInfo, build_weighting, task_gradient_cosine


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss or weights; nothing non-finite was saved."""


@dataclass
class LoopState:
    epoch: int = 0  # epoch in progress (or next to start)
    step_in_epoch: int = 0  # batches of `epoch` already done
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [step, loss...] every log_every


def set_threads(n: int) -> None:
    import os

    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def make_optimizer(model: MultiTaskModel, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    t = cfg.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    # one fused kernel instead of ~6 operators per parameter tensor (the CPU default loop)
    fused = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    return cls(params, lr=t.batch_lr(), weight_decay=t.weight_decay, fused=fused)


def label_priors(table: TensorTable, schema: Schema) -> dict[str, float]:
    """Each task's output-bias prior from its labelled training rows: logit of the positive
    rate for a binary task, the mean for a regression task (tasks without labels: none)."""
    out = {}
    for j, task in enumerate(schema.tasks):
        m = table.mask[:, j]
        n = int(m.sum())
        if n == 0:
            continue
        mean = float(table.labels[m, j].double().mean())
        if task.type == "binary":
            p = min(max(mean, 1e-4), 1 - 1e-4)
            out[task.name] = math.log(p / (1 - p))
        elif task.type == "regression":
            out[task.name] = mean
    return out


def save_model_dir(
    path: Path,
    model: MultiTaskModel,
    cfg: ExperimentConfig,
    schema: Schema,
    encoders: Encoders,
    extra: dict[str, Any] | None = None,
) -> None:
    _check_finite(model)
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
            "meta": {
                "format": 1,
                "model": cfg.model.name,
                "tasks": list(schema.task_names),
                **json_safe(extra or {}),
            },
        },
    )


def load_model_dir(path: str | Path) -> tuple[MultiTaskModel, ExperimentConfig, Schema, Encoders]:
    """Rebuild a model from its directory alone (the manifest is verified first)."""
    path = Path(path)
    ck.verify_dir(path)
    cfg = from_dict(ExperimentConfig, ck.read_json(path, "config"))
    schema = from_dict(Schema, ck.read_json(path, "schema"))
    content = ck.read_tensors(path, "content") if schema.content_features else None
    encoders = Encoders.from_json(schema, ck.read_json(path, "encoders"), content)
    sizes = {f.name: encoders.vocab_size(f) for f in schema.features if f.kind != "numeric"}
    model = build_model(cfg.model.name, cfg.model.args, schema, sizes, content)
    state = ck.read_tensors(path, "model")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ck.CheckpointError(f"{path}: weights do not fit the model ({e})") from None
    model.eval()
    return model, cfg, schema, encoders


def _non_empty(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors cannot write an empty file; most weightings have no state
    return tensors or {"_empty": torch.zeros(1)}


def _check_finite(model: MultiTaskModel) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"parameter '{name}' is not finite; refusing to save it")


def _id_dropout_table(probs: dict[str, float], schema: Schema) -> torch.Tensor | None:
    """Per categorical column, the probability of the OOV id in training ([Fc]); None if off."""
    if not probs:
        return None
    cats = [f.name for f in schema.of_kind("categorical")]
    unknown = sorted(set(probs) - set(cats))
    if unknown:
        raise ConfigError(f"train.id_dropout: {unknown} are not categorical features; "
                          f"categorical: {cats}")
    bad = {k: v for k, v in probs.items() if not 0.0 <= v < 1.0}
    if bad:
        raise ConfigError(f"train.id_dropout: probabilities must lie in [0, 1), got {bad}")
    return torch.tensor([probs.get(c, 0.0) for c in cats])


def drop_ids(batch: Batch, probs: torch.Tensor) -> Batch:
    """The batch with each categorical id replaced by OOV (0) with its column's probability."""
    import dataclasses

    keep = torch.rand(batch.cat.shape) >= probs  # [B, Fc]
    return dataclasses.replace(batch, cat=batch.cat * keep)


class Trainer:
    def __init__(
        self, cfg: ExperimentConfig, data: PreparedData, out_dir: str | Path, progress: bool = True
    ) -> None:
        self.cfg, self.data, self.out = cfg, data, Path(out_dir)
        self.progress = progress
        set_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.schema = data.schema
        content = data.encoders.content_tensors() if self.schema.content_features else None
        self.model = build_model(cfg.model.name, cfg.model.args, self.schema, data.vocab_sizes,
                                 content)
        if cfg.train.output_bias_prior and isinstance(data.train, TensorTable):
            self.model.init_output_bias(label_priors(data.train, self.schema))
        self.opt = make_optimizer(self.model, cfg)
        unknown = sorted(set(cfg.train.alpha) - set(self.schema.task_names))
        if unknown:
            raise ValueError(
                f"train.alpha: unknown task(s) {unknown}; tasks: {list(self.schema.task_names)}"
            )
        self.alpha = torch.tensor([cfg.train.alpha.get(n, 1.0) for n in self.schema.task_names])
        self.weighting = build_weighting(cfg.weighting.name, cfg.weighting.args,
                                         self.schema.task_names)
        for group in self.weighting.param_groups(cfg.train.batch_lr()):  # e.g. log-variances
            self.opt.add_param_group(group)
        self.id_dropout = _id_dropout_table(cfg.train.id_dropout, self.schema)
        self.state = LoopState()
        self.ckpt_dir = self.out / "checkpoints"

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        _check_finite(self.model)
        opt_t, opt_meta = ck.optimizer_to_tensors(self.opt)
        opt_t["rng.torch"] = torch.get_rng_state()
        name = f"ckpt-{self.state.global_step:09d}-{self.state.epoch:04d}"
        # NaN (e.g. an AUC on a split with one class) is stored as null: strict JSON
        st = json_safe(dict(self.state.__dict__))
        path = ck.write_dir(
            self.ckpt_dir / name,
            {"weights": self.model.state_dict(), "optimizer": opt_t,
             "weighting": _non_empty(self.weighting.state_dict())},
            {"state": st, "optimizer_meta": opt_meta},
        )
        ck.write_pointer(self.ckpt_dir, "latest", name)
        for old in sorted(self.ckpt_dir.glob("ckpt-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self) -> bool:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return False
        path = self.ckpt_dir / pointer.read_text().strip()
        ck.verify_dir(path)
        self.model.load_state_dict(ck.read_tensors(path, "weights"))
        opt_t = ck.read_tensors(path, "optimizer")
        torch.set_rng_state(opt_t.pop("rng.torch"))
        weighting_state = ck.read_tensors(path, "weighting")
        weighting_state.pop("_empty", None)
        self.weighting.load_state_dict(weighting_state)
        ck.optimizer_from_tensors(self.opt, opt_t, ck.read_json(path, "optimizer_meta"))
        self.state = LoopState(**ck.read_json(path, "state"))
        return True

    # -- loop --------------------------------------------------------------------------------
    def step(self, batch: Batch, writer: Any = None) -> torch.Tensor:
        t = self.cfg.train
        self.model.train()
        self.weighting.train()
        if self.id_dropout is not None:
            batch = drop_ids(batch, self.id_dropout)
        logits = self.model(batch)
        losses = self.model.task_losses(logits, batch)  # [T]
        if not torch.isfinite(losses).all():
            detail = ", ".join(
                f"{n}={v:.4g}"
                for n, v in zip(self.schema.task_names, losses.tolist(), strict=True)
            )
            raise NonFiniteError(
                f"non-finite loss at epoch {self.state.epoch}, step {self.state.global_step} "
                f"({detail}); training stopped, no checkpoint written after the last good one"
            )
        if writer is not None and t.log_grad_cosine and self._log_now():
            cos = task_gradient_cosine(self.alpha * losses, self.model.shared_parameters())
            names = self.schema.task_names
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    writer.add_scalar(f"grad_cosine/{names[a]}~{names[b]}", float(cos[a, b]),
                                      self.state.global_step + 1)
        extra = None
        if t.embedding_weight_decay > 0:
            extra = t.embedding_weight_decay * self.model.embedding_l2()
        self.opt.zero_grad(set_to_none=True)
        info = StepInfo.from_history(self.state.global_step, self.state.epoch,
                                     self.state.history, self.schema.task_names)
        weights = self.weighting.backward(self.alpha * losses, self.model, info, extra)
        if not torch.isfinite(weights).all():
            raise NonFiniteError(f"non-finite task weights at step {self.state.global_step}")
        if t.adversarial == "fgm":  # + gradient at the perturbed embeddings; table restored
            adv = fgm_backward(self.model, batch, self.alpha * weights, t.adversarial_epsilon)
            if adv is not None and not torch.isfinite(adv).all():
                raise NonFiniteError(f"non-finite FGM loss at step {self.state.global_step}")
        if t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            if not torch.isfinite(norm):
                raise NonFiniteError(f"non-finite gradient at step {self.state.global_step}")
        self.opt.step()
        if writer is not None and self._log_now():
            for n, w in zip(self.schema.task_names, weights.tolist(), strict=True):
                writer.add_scalar(f"task_weight/{n}", w, self.state.global_step + 1)
        return losses.detach()

    def _log_now(self) -> bool:
        return (self.state.global_step + 1) % self.cfg.train.log_every == 0

    def evaluate(self, split: str = "valid") -> dict[str, Any]:
        table = self.data.valid if split == "valid" else self.data.test
        if table is None:
            return {}
        preds, scored = predict_split(self.model, table, self.cfg.train.eval_batch_size)
        tm = metrics_by_scenario(self.schema, scored, preds)
        return {
            "tasks": tm,
            "all_tasks": {
                "auc": summary_metric(tm, "auc"),
                "logloss": summary_metric(tm, "logloss"),
            },
        }

    def _metric(self, valid: dict[str, Any]) -> float:
        """Read e.g. ``valid.all_tasks.auc`` or ``valid.click.home_feed.auc``."""
        name = self.cfg.train.early_stopping.metric
        parts = name.removeprefix("valid.").split(".")
        try:
            if parts[0] == "all_tasks" and len(parts) == 2:
                return float(valid["all_tasks"][parts[1]])
            task, scenario, key = parts
            return float(valid["tasks"][task][scenario][key])
        except (KeyError, ValueError, IndexError):
            raise ConfigError(
                f"train.early_stopping.metric: '{name}' is not a validation metric; use "
                "valid.all_tasks.<auc|logloss> or valid.<task>.<scenario|all>.<auc|logloss|gauc>"
            ) from None

    def fit(self, resume: bool = False, writer: Any = None) -> LoopState:
        t = self.cfg.train
        es = t.early_stopping
        if resume and not self.load_checkpoint():
            raise ck.CheckpointError(f"--resume: no checkpoint in {self.ckpt_dir}")
        train = self.data.train
        n_batches = train.num_batches(t.batch_size)
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            disable=not self.progress,
        )
        with bar:
            while self.state.epoch < t.epochs and not self.state.stopped:
                ep = self.state.epoch
                for group in self.opt.param_groups[:1]:  # the model's group, not a weighting's
                    group["lr"] = t.batch_lr() * t.lr_decay**ep
                job = bar.add_task(
                    f"epoch {ep + 1}/{t.epochs}",
                    total=n_batches,
                    completed=self.state.step_in_epoch,
                )
                sums = torch.zeros(len(self.schema.tasks))
                count = 0
                t0 = time.perf_counter()
                for batch in train.batches(
                    t.batch_size, ep, t.seed, True, self.state.step_in_epoch
                ):
                    losses = self.step(batch, writer)
                    sums += losses
                    count += 1
                    self.state.global_step += 1
                    self.state.step_in_epoch += 1
                    bar.advance(job)
                    if self.state.global_step % t.log_every == 0:
                        self.state.losses.append([self.state.global_step, *losses.tolist()])
                        if writer is not None:
                            for n, v in zip(self.schema.task_names, losses.tolist(), strict=True):
                                writer.add_scalar(f"train_loss/{n}", v, self.state.global_step)
                    if t.checkpoint_every and self.state.global_step % t.checkpoint_every == 0:
                        self.save_checkpoint()
                seconds = time.perf_counter() - t0
                valid = self.evaluate("valid")
                metric = self._metric(valid)
                record = {
                    "epoch": ep + 1,
                    "step": self.state.global_step,
                    "train_loss": dict(
                        zip(self.schema.task_names, (sums / max(count, 1)).tolist(), strict=True)
                    ),
                    "valid_metric": metric,
                    "seconds": seconds,
                    "valid_auc": {
                        n: m.get("all", {}).get("auc", math.nan) for n, m in valid["tasks"].items()
                    },
                }
                self.state.history.append(record)
                if writer is not None:
                    writer.add_scalar("valid/" + es.metric, metric, ep + 1)
                    for n, v in record["valid_auc"].items():
                        writer.add_scalar(f"valid_auc/{n}", v, ep + 1)
                better = self.state.best_metric is None or (
                    metric > self.state.best_metric
                    if es.mode == "max"
                    else metric < self.state.best_metric
                )
                if better:
                    # a NaN metric (one-class split) is kept as None, as JSON stores it
                    self.state.best_metric = metric if math.isfinite(metric) else None
                    self.state.best_epoch = ep + 1
                    self.state.bad_epochs = 0
                    save_model_dir(
                        self.out / "model",
                        self.model,
                        self.cfg,
                        self.schema,
                        self.data.encoders,
                        {"epoch": ep + 1, "valid_metric": metric},
                    )
                else:
                    self.state.bad_epochs += 1
                    if self.state.bad_epochs >= es.patience:
                        self.state.stopped = True
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                self.save_checkpoint()
                (self.out / "history.json").write_text(
                    json.dumps(json_safe(self.state.history), indent=1)
                )
        return self.state


def train_model(
    cfg: ExperimentConfig,
    data: PreparedData,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
) -> tuple[MultiTaskModel, LoopState]:
    """Train, then reload the best weights (what was saved in ``out_dir/model``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, data, out, progress)
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    try:
        state = trainer.fit(resume=resume, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    best = ck.read_tensors(out / "model", "model")
    trainer.model.load_state_dict(best)
    trainer.model.eval()
    return trainer.model, state
