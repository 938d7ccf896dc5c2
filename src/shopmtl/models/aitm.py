"""AITM (Xi et al., "Modeling the Sequential Dependence among Audience Multi-step Conversions
with Multi-task Learning in Targeted Display Advertising", KDD 2021).

Tasks are ordered by the schema's ``given`` chains (impression -> click -> conversion). Each task
has a tower q_t; a task with a parent receives the parent's information through the Adaptive
Information Transfer module: p = g(z_parent) (a transfer MLP) and q_t are attended over,
w_u = softmax_u(<h1(u), h2(u)> / sqrt(k)), z_t = sum_u w_u h3(u); a head maps z_t to the task's
logit. As in the paper, heads of chained binary tasks predict the *unconditional* probability
(click and conversion given an impression) and are trained on the entire space against the
joint label y_parent * y_child, plus the behavioural expectation calibrator
``calibrator * mean(max(p_child - p_parent, 0))`` (0 disables it). A child head's output bias
starts at -3 per level below the root, so p_child < p_parent from the first step.

``forward`` still returns what each label means: for a chained child the conditional logit
p(child | parent) = p_child / p_parent (clamped below 1), computed in log space. The unconditional
logits of the last forward are kept so that ``task_losses`` on that forward's output trains
them directly; for logits from elsewhere the joint is rebuilt from the conditional logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.keys import key
from shopmtl.models.base import (
    MultiTaskModel,
    cross_layers_arg,
    dropout_arg,
    embed_dim_arg,
    interaction_arg,
    widths_arg,
)
from shopmtl.nn.chains import (
    GivenChains,
    bce_from_log_prob,
    conditional_logit,
    shared_dense_parameters,
)
from shopmtl.nn.layers import MLP, FeatureEmbedding, interaction_features, make_interaction
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class AITMConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    tower: tuple[int, ...] = widths_arg((128, 64), "task tower (its last width is the AIT "
                                                   "dimension)")
    head: tuple[int, ...] = widths_arg((32,), "each task's head after the transfer")
    calibrator: float = key(0.6, "weight of the behavioural expectation calibrator "
                                 "(0: off)", ge=0)
    dropout: float = dropout_arg()

    def __post_init__(self) -> None:
        if not self.tower:
            raise ValueError("tower needs at least one layer")
        if self.calibrator < 0:
            raise ValueError("calibrator must be >= 0")


class AdaptiveInformationTransfer(nn.Module):
    """AIT: attention over {transferred parent info, own tower output}: [B, k] x 2 -> [B, k]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())  # g(.)
        self.h1, self.h2, self.h3 = (nn.Linear(dim, dim) for _ in range(3))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, parent: Tensor, own: Tensor) -> Tensor:
        u = torch.stack([self.transfer(parent), own], 1)  # [B, 2, k]
        score = (self.h1(u) * self.h2(u)).sum(-1) * self.scale  # [B, 2]
        w = torch.softmax(score, 1).unsqueeze(-1)  # [B, 2, 1]
        return (w * self.h3(u)).sum(1)  # [B, k]


class AITM(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: AITMConfig = AITMConfig()
    ) -> None:
        super().__init__(schema)
        self.config = config
        self.chains = GivenChains(schema)
        self.given = {t.name: t.given for t in schema.tasks if t.given is not None}
        self.embed = FeatureEmbedding(schema, vocab_sizes, config.embed_dim)
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, config.embed_dim, config.cross_layers
        )
        k = config.tower[-1]
        self.towers = nn.ModuleDict(
            {t.name: MLP(width, config.tower, config.dropout) for t in schema.tasks}
        )
        self.ait = nn.ModuleDict({name: AdaptiveInformationTransfer(k) for name in self.given})
        self.heads = nn.ModuleDict(
            {
                t.name: MLP(k, config.head, config.dropout, out_dim=out_dim(t))
                for t in schema.tasks
            }
        )
        for name in self.chains.parent:  # start each child well below its parent (no clamping)
            nn.init.constant_(self.heads[name][-1].bias, -3.0 * self._depth(name))
        self._last: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None

    def _depth(self, name: str) -> int:
        par = self.chains.parent.get(name)
        return 0 if par is None else 1 + self._depth(par)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embed(batch)  # [B, F, D]
        self._track_l2(fields)
        x = interaction_features(self.config.interaction, fields, self.interaction)  # [B, W]
        z: dict[str, Tensor] = {}
        head: dict[str, Tensor] = {}  # unconditional logits for chained tasks
        for name in self.chains.order:
            q = self.towers[name](x)  # [B, k]
            par = self.given.get(name)
            z[name] = q if par is None else self.ait[name](z[par], q)  # [B, k]
            head[name] = self.heads[name](z[name]).squeeze(-1)  # [B]
        out = {}
        for name in self.task_names:
            par = self.chains.parent.get(name)
            out[name] = (
                head[name]
                if par is None
                else conditional_logit(F.logsigmoid(head[name]), F.logsigmoid(head[par]))
            )  # [B]
        self._last = (out, head)
        return out

    def task_losses(self, logits: dict[str, Tensor], batch: Batch) -> Tensor:
        """[T]: entire-space joint loss (+ calibrator) for chained children, own loss otherwise."""
        own = super().task_losses(logits, batch)  # [T]
        labels, mask = self.chains.targets(batch)  # [B, T] joint
        last = self._last
        fresh = last is not None and last[0] is logits
        if fresh:
            head = last[1]
            joint = {n: F.logsigmoid(head[n]) for n in head}  # log p(task | impression) [B]
        else:
            joint = self.chains.joint_log_probs(logits)
        losses = []
        for j, name in enumerate(self.task_names):
            par = self.chains.parent.get(name)
            if par is None:
                losses.append(own[j])
                continue
            m = mask[:, j]  # [B]
            loss = bce_from_log_prob(joint[name], labels[:, j], m)
            if fresh and self.config.calibrator > 0:
                excess = torch.relu(joint[name].exp() - joint[par].exp())  # [B]
                excess = torch.where(m, excess, torch.zeros_like(excess))
                loss = loss + self.config.calibrator * excess.sum() / m.sum().clamp(min=1)
            losses.append(loss)
        return torch.stack(losses)

    def output_layers(self) -> dict[str, nn.Linear]:
        # only the chains' roots: a child's head is a joint probability (its label rate is
        # conditional on the parent) and keeps the start below its parent set above
        return {n: self.heads[n][-1] for n in self.task_names if n not in self.chains.parent}

    def shared_parameters(self) -> list[nn.Parameter]:
        # the towers are separate: only the input (embedding, interaction) is shared
        return shared_dense_parameters(self.embed, self.interaction)
