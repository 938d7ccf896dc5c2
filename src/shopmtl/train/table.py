"""The task source of a zoo model: rows of one schema (a tensor table, or a file streamed from
disk) through a ``MultiTaskModel``. The one-table run's only source, and the joint run's
recommendation source (there the zoo model is ``model.rec`` of the joint model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.data import prefetch as ahead
from shopmtl.data.dataset import Batch, TensorTable, concat_tables, labels_only
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import ALL, Schema, TaskSpec
from shopmtl.models.base import MultiTaskModel
from shopmtl.tasks import TASK_TYPES
from shopmtl.train.adversarial import fgm_backward
from shopmtl.train.distributed import check_batch_size, pin_memory
from shopmtl.train.evaluate import metrics_by_scenario, predict_split


def id_dropout_table(probs: dict[str, float], schema: Schema) -> Tensor | None:
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


def drop_ids(batch: Batch, probs: Tensor) -> Batch:
    """The batch with each categorical id replaced by OOV (0) with its column's probability.
    Drawn on the CPU generator wherever the batch lives, so a run draws the same masks on
    every device."""
    keep = torch.rand(batch.cat.shape) >= probs  # [B, Fc]
    return dataclasses.replace(batch, cat=batch.cat * keep.to(batch.cat.device))


def keep_resident(nbytes: int, free: int, setting: str) -> bool:
    """Whether a GPU run keeps its training table (``nbytes``) on the GPU (``free`` bytes
    free there): ``on``, ``off``, or ``auto``: when it takes at most half of the free memory
    (the model, its gradients, Adam's moments and the activations need the rest)."""
    if setting == "auto":
        return 2 * nbytes <= free
    return setting == "on"


def _zoo(model: nn.Module) -> MultiTaskModel:
    return model  # type: ignore[return-value]


class TableSource:
    """``data``'s training rows in seeded epochs; losses and metrics of its schema's tasks.

    ``module`` picks the zoo model out of the model the loop trains (itself by default).
    ``evaluate`` returns per task the ``all`` scope's metrics at the top level (AUC first) and
    every scenario's under ``by_scenario``.
    """

    def __init__(self, data: PreparedData, batch_size: int, *, name: str = "table",
                 module: Callable[[nn.Module], MultiTaskModel] = _zoo,
                 embedding_weight_decay: float = 0.0, id_dropout: Tensor | None = None,
                 eval_batch_size: int = 4096, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1, prefetch: int = 0,
                 resident: str = "off") -> None:
        self.name, self.data, self.batch_size = name, data, batch_size
        self.schema = data.schema
        self.module = module
        self.embedding_weight_decay = embedding_weight_decay
        self.id_dropout = id_dropout
        self.eval_batch_size = eval_batch_size
        self.prefetch_depth, self.resident = prefetch, resident
        self.place(torch.device(device), rank, world)

    def place(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        """Where training batches go (the model's device), and this process's share under
        torchrun (a joint run places its rec source once it knows both)."""
        # pinned first only for a GPU
        self.device = torch.device(device)
        self.pin = pin_memory(self.device)
        data = self.data
        # batches made ahead in a thread (``data.prefetch``): worth it where making one costs
        # (a streamed file's parse and encoding, a GPU's copies), not for an in-memory
        # table's gather on CPU
        streamed = data.train is not None and not isinstance(data.train, TensorTable)
        self.prefetch = self.prefetch_depth if streamed or self.device.type == "cuda" else 0
        # a GPU run's in-memory training rows, kept on the GPU (``train.resident``): a batch
        # is then a gather there, with no host work and no copy per step
        self.train = data.train
        if (self.device.type == "cuda" and isinstance(data.train, TensorTable)
                and keep_resident(data.train.nbytes(),
                                  torch.cuda.mem_get_info(self.device)[0], self.resident)):
            self.train = data.train.to(self.device)
            self.prefetch = 0
        # torchrun: this process takes every ``world``-th row of each (global) batch, or its
        # own row groups of a streamed file (``data.shards``)
        self.rank, self.world = rank, world
        if world > 1:
            check_batch_size(self.batch_size, world)
            if data.train is not None and not isinstance(data.train, TensorTable):
                data.train.plan(self.batch_size, world)  # refused now (one line), not mid-run

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.schema.tasks

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.schema.task_names

    def num_batches(self) -> int:
        return self.train.num_batches(self.batch_size, self.world)

    def batches(self, epoch: int, seed: int, skip: int = 0) -> Iterator[Batch]:
        it = self.train.batches(self.batch_size, epoch, seed, True, skip,
                                rank=self.rank, world=self.world)
        for batch in ahead.prefetch(it, self.prefetch, f"prefetch-{self.name}"):
            # drawn here, right before the step that uses the batch: the RNG order is the
            # step's, so resume replays it
            if self.id_dropout is not None:
                batch = drop_ids(batch, self.id_dropout)
            if batch.scenario.device.type == "cpu" and self.device.type != "cpu":
                batch = (batch.pin() if self.pin else batch).to(self.device, non_blocking=True)
            yield batch

    def losses(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        zoo = self.module(model)
        vec = zoo.task_losses(zoo(batch), batch)  # [T]
        out = {t: vec[j] for j, t in enumerate(self.task_names)}
        if self.embedding_weight_decay > 0:  # L2 on the rows this batch touched
            out["_embedding_l2"] = self.embedding_weight_decay * zoo.embedding_l2()
        return out

    def loss_counts(self, batch: Batch) -> Tensor:
        """[T] labelled rows per task: the weight of each masked-mean task loss when several
        processes combine their shards of one batch (``train.distributed``)."""
        return batch.mask.sum(0)

    def adversarial_backward(self, model: nn.Module, batch: Batch, weights: Tensor,
                             epsilon: float) -> Tensor | None:
        return fgm_backward(self.module(model), batch, weights, epsilon)

    def head(self, model: nn.Module) -> nn.Module:
        return self.module(model)

    def split(self, split: str) -> Any:
        if split == "valid":
            return self.data.valid
        return self.data.test if self.data.test is not None else self.data.valid

    @torch.no_grad()
    def scenario_metrics(self, model: nn.Module, split: str
                         ) -> dict[str, dict[str, dict[str, float]]]:
        """metrics[task][scenario] (``train.evaluate.metrics_by_scenario``)."""
        table = self.split(split)
        if table is None:
            return {}
        model.eval()  # all of it: a joint model's rec model borrows the shared text adapter
        preds, scored = predict_split(self.module(model), table, self.eval_batch_size)
        return metrics_by_scenario(self.schema, scored, preds)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, dict[str, Any]]:
        return {task: {**per.get(ALL, {}),
                       "by_scenario": {s: m for s, m in per.items() if s != ALL}}
                for task, per in self.scenario_metrics(model, split).items()}

    def prior_metrics(self, priors: dict[str, float], split: str = "valid"
                      ) -> dict[str, dict[str, Any] | None]:
        """Per task, the metrics of the label prior on ``split`` (shaped like ``evaluate``'s):
        every row predicted as the task's ``priors`` value (its type's ``label_prior``, an
        output bias) activated, e.g. the training positive rate; None for a task without a
        prior. A constant scores AUC and GAUC 0.5, and the logloss / RMSE of the base rate."""
        table = self.split(split)
        if table is None:
            return {}
        if not isinstance(table, TensorTable):  # streamed: its label columns, chunk by chunk
            table = concat_tables([labels_only(c) for c in table.tables()])
        n = len(table.scenario)
        preds = {t.name: np.full(n, float(TASK_TYPES[t.type].activate(
                     torch.tensor(priors[t.name], dtype=torch.float64))), np.float64)
                 for t in self.tasks if priors.get(t.name) is not None}
        per_task = metrics_by_scenario(self.schema, table, preds)
        return {t: ({**per_task[t].get(ALL, {}),
                     "by_scenario": {s: m for s, m in per_task[t].items() if s != ALL}}
                    if t in per_task else None) for t in self.task_names}
