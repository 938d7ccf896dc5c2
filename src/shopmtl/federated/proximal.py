"""FedProx's proximal term as a regulariser of the one loop: a task source that adds
``mu / 2 * ||w - w_global||^2`` over the shared weights to its source's losses.

The loop adds every ``_``-prefixed loss to the update (``train.loop.Loop.step``), so a client's
local training stays ``fit(model, [ProximalSource(its source)], ...)``: no second loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.data.schema import TaskSpec


class ProximalSource:
    """``source`` with the proximal term: ``anchors`` pairs a parameter with the global
    model's value of it (for a user-free embedding table: the row indices that are shared,
    so the silo's own user rows are free to move)."""

    def __init__(self, source: Any, mu: float,
                 anchors: list[tuple[nn.Parameter, Tensor, Tensor | None]]) -> None:
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

    def proximal(self) -> Tensor:
        total = torch.zeros(())
        for param, anchor, rows in self.anchors:
            diff = (param if rows is None else param[rows]) - anchor
            total = total + (diff * diff).sum()
        return 0.5 * self.mu * total

    def losses(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        out = self.source.losses(model, batch)
        out["_proximal"] = self.proximal()
        return out

    def loss_counts(self, batch: Any) -> Tensor:
        return self.source.loss_counts(batch)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, dict[str, Any]]:
        return self.source.evaluate(model, split)

    def head(self, model: nn.Module) -> nn.Module:
        return self.source.head(model)


def anchors_of(model: nn.Module, chosen: list[Any]) -> list[tuple[nn.Parameter, Tensor,
                                                                  Tensor | None]]:
    """(parameter, its current value detached, rows) for every shared piece that is a
    parameter (``wire.Piece``): the global model the client just received."""
    params = dict(model.named_parameters())
    out = []
    for p in chosen:
        if p.key in params:
            w = params[p.key]
            value = (w if p.rows is None else w[p.rows]).detach().clone()
            out.append((w, value, p.rows))
    return out
