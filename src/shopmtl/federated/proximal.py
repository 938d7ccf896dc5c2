"""FedProx's proximal term as a regulariser of the one loop: a task source that adds
``mu / 2 * ||w - w_global||^2`` over the shared weights to its source's losses.

The loop adds every ``_``-prefixed loss to the update (``train.loop.Loop.step``), so a client's
local training stays ``fit(model, [ProximalSource(its source)], ...)``: no second loop.

Embedding rows count only when the batch looks them up, as the project's embedding L2 does
(``train.embedding_weight_decay``). Under Adam a dense proximal gradient on every row would be
normalised to a full step: each row would snap back to the global value between two batches
that use it, undoing the local training of the ids (measured: pooled click AUC 0.68 instead of
0.73 on the default world, docs/FEDERATED.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.data.schema import TaskSpec
from shopmtl.nn.layers import FeatureEmbedding

# (parameter, its global value, for an embedding table: (the shared rows as a [V] mask, the
# table rows a batch looks up))
Anchor = tuple[nn.Parameter, Tensor, tuple[Tensor, Callable[[Any], Tensor]] | None]


class ProximalSource:
    """``source`` with the proximal term over ``anchors`` (``anchors_of``): each parameter
    against the global model's value of it; an embedding table only on the shared rows the
    batch looks up (the silo's own user rows are free to move)."""

    def __init__(self, source: Any, mu: float, anchors: list[Anchor]) -> None:
        self.source, self.mu, self.anchors = source, mu, anchors
        self.name = source.name

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.source.tasks

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.source.task_names

    def num_batches(self) -> int:
        return self.source.num_batches()

    def batches(self, epoch: int, seed: int, skip: int = 0) -> Iterator[Any]:
        return self.source.batches(epoch, seed, skip)

    def proximal(self, batch: Any) -> Tensor:
        total = torch.zeros(())
        for param, anchor, table in self.anchors:
            if table is None:
                diff = param - anchor
            else:
                shared, looked_up = table
                rows = looked_up(batch)
                rows = rows[shared[rows]]
                diff = param[rows] - anchor[rows]
            total = total + (diff * diff).sum()
        return 0.5 * self.mu * total

    def losses(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        out = self.source.losses(model, batch)
        out["_proximal"] = self.proximal(batch)
        return out

    def loss_counts(self, batch: Any) -> Tensor:
        return self.source.loss_counts(batch)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, dict[str, Any]]:
        return self.source.evaluate(model, split)

    def head(self, model: nn.Module) -> nn.Module:
        return self.source.head(model)


def table_rows(embed: FeatureEmbedding) -> Callable[[Any], Tensor]:
    """The rows of ``embed``'s table a batch looks up (its ids and sequences, offset)."""

    def rows(batch: Any) -> Tensor:
        ids = [(batch.cat + embed.cat_offsets).flatten()]
        if batch.seq.numel():
            ids.append((batch.seq + embed.seq_offsets[None, :, None]).flatten())
        return torch.cat(ids).unique()

    return rows


def anchors_of(model: nn.Module, chosen: list[Any]) -> list[Anchor]:
    """The anchors of every shared piece that is a parameter (``wire.Piece``), at its
    current value: the global model the client just received."""
    params = dict(model.named_parameters())
    out: list[Anchor] = []
    tables: dict[str, Tensor] = {}  # table key -> mask of its shared rows
    for p in chosen:
        if p.key not in params:
            continue
        w = params[p.key]
        if p.rows is None:
            out.append((w, w.detach().clone(), None))
        else:
            mask = tables.setdefault(p.key, torch.zeros(w.shape[0], dtype=torch.bool))
            mask[p.rows] = True
    for key, mask in tables.items():
        w = params[key]
        embed = model.get_submodule(key.removesuffix(".table.weight"))
        out.append((w, w.detach().clone(), (mask, table_rows(embed))))
    return out
