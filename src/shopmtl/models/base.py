"""The model API every architecture implements.

A model maps a ``Batch`` to one logit tensor per task name ([B] for binary tasks). It owns its
losses (``task_losses``), so a model whose supervision is not one loss per head (ESMM) overrides
that method and the trainer never names a model. ``shared_parameters`` tells gradient methods
which parameters the tasks share.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.keys import key
from shopmtl.tasks import TASK_TYPES

# The arguments every architecture shares (``model.args``), declared once with their meaning
# and range (``keys.key``) so each model's Config reads the same and docs/CONFIG.md lists them.

def embed_dim_arg() -> Any:
    return key(16, "width of every feature embedding", ge=1)


def interaction_arg() -> Any:
    return key("dot", "feature interactions beside the embeddings: none, dot (pairwise "
                      "products) or cross (DCN-v2)")


def cross_layers_arg() -> Any:
    return key(2, "interaction cross: number of cross layers", ge=0)


def input_norm_arg(of: str = "the bottom's") -> Any:
    return key("layer", f"normalisation of {of} input: none, batch or layer")


def dropout_arg() -> Any:
    return key(0.0, "dropout probability of the MLPs", ge=0, lt=1)


def widths_arg(default: tuple[int, ...], doc: str) -> Any:
    """A list of layer widths, each >= 1 (empty: no hidden layer)."""
    return key(default, f"{doc}: layer widths", ge=1)


def count_arg(default: int, doc: str) -> Any:
    return key(default, doc, ge=1)


class MultiTaskModel(nn.Module):
    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.schema = schema
        self.task_names = schema.task_names
        self._task_types = [TASK_TYPES[t.type] for t in schema.tasks]
        self._emb_l2: Tensor | None = None

    def forward(self, batch: Batch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_losses(self, logits: dict[str, Tensor], batch: Batch) -> Tensor:
        """Masked loss per task, [T] in schema order."""
        return torch.stack(
            [
                tt.loss(logits[t.name], batch.labels[:, j], batch.mask[:, j], t)
                for j, (t, tt) in enumerate(zip(self.schema.tasks, self._task_types, strict=True))
            ]
        )

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, Tensor]:
        logits = self(batch)
        return {
            n: tt.activate(logits[n])
            for n, tt in zip(self.task_names, self._task_types, strict=True)
        }

    def embedding_l2(self) -> Tensor:
        """Mean squared norm of the embedding rows the last forward looked up (sparse L2)."""
        if self._emb_l2 is None:
            return torch.zeros(())
        # computed only when the trainer asks (embedding_weight_decay > 0): the square of
        # [B, F, D] fields is ~4% of a small model's step
        return self._emb_l2.square().sum(dim=(1, 2)).mean()

    def output_layers(self) -> dict[str, nn.Linear]:
        """Each task's final Linear (whose bias is the task's logit prior). By default the last
        Linear of ``self.towers[name]``; a model whose heads live elsewhere overrides this, and
        one that sets its own priors (AITM's chain) returns {}."""
        towers = getattr(self, "towers", None)
        if towers is None:
            return {}
        out = {}
        for name in self.task_names:
            linears = [m for m in towers[name].modules() if isinstance(m, nn.Linear)]
            if linears and linears[-1].out_features == 1:
                out[name] = linears[-1]
        return out

    @torch.no_grad()
    def init_output_bias(self, prior: dict[str, float]) -> list[str]:
        """Set the bias of each named task's output layer; returns the tasks it set."""
        layers = self.output_layers()
        done = []
        for name, value in prior.items():
            if name in layers and math.isfinite(value):
                layers[name].bias.fill_(value)
                done.append(name)
        return done

    def shared_parameters(self) -> list[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _track_l2(self, fields: Tensor) -> None:
        if self.training:
            self._emb_l2 = fields  # [B, F, D]; embedding_l2() reduces it on demand
