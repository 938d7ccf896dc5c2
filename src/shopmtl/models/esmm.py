"""ESMM (Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate", SIGIR 2018).

A CTR tower and a CVR tower over a shared embedding. ``forward`` returns each task's own logit:
pCTR for the parent task and pCVR = p(child | parent) for a task ``given`` it, so predictions
mean what the labels mean. ``task_losses`` trains on the entire impression space: the parent on
its own labels, the child through pCTCVR = pCTR * pCVR against y_parent * y_child on every
impression where the parent label exists (a non-click is a known CTCVR negative), computed in
log space. Chains (a given b given c) multiply along the chain (ESM^2 style); tasks outside any
chain get an ordinary tower and loss. Each tower reads the fields plus their interactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.models.base import (
    MultiTaskModel,
    cross_layers_arg,
    dropout_arg,
    embed_dim_arg,
    input_norm_arg,
    interaction_arg,
    widths_arg,
)
from shopmtl.nn.chains import GivenChains, bce_from_log_prob, shared_dense_parameters
from shopmtl.nn.layers import (
    MLP,
    FeatureEmbedding,
    interaction_features,
    make_input_norm,
    make_interaction,
)
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class ESMMConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    input_norm: Literal["none", "batch", "layer"] = input_norm_arg("the towers'")
    tower: tuple[int, ...] = widths_arg((128, 64), "each task's tower")
    dropout: float = dropout_arg()


class ESMM(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: ESMMConfig = ESMMConfig()
    ) -> None:
        super().__init__(schema)
        self.chains = GivenChains(schema)
        if not self.chains.parent:
            raise ValueError(
                "ESMM needs a binary task with `given` (e.g. conversion given click) to model "
                f"pCTCVR = pCTR * pCVR; tasks {list(schema.task_names)} have none. Set `given` "
                "in the schema or use another model."
            )
        self.config = config
        self.embed = FeatureEmbedding(schema, vocab_sizes, config.embed_dim)
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, config.embed_dim, config.cross_layers
        )
        self.input_norm = make_input_norm(config.input_norm, width)
        self.towers = nn.ModuleDict(
            {
                t.name: MLP(width, config.tower, config.dropout, out_dim=out_dim(t))
                for t in schema.tasks
            }
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embed(batch)  # [B, F, D]
        self._track_l2(fields)
        x = interaction_features(self.config.interaction, fields, self.interaction)  # [B, W]
        x = self.input_norm(x)
        # parent: pCTR logit; child: pCVR logit (conditional on the parent)
        return {name: tower(x).squeeze(-1) for name, tower in self.towers.items()}  # [B] each

    def task_losses(self, logits: dict[str, Tensor], batch: Batch) -> Tensor:
        """[T]: own-label loss for tasks outside chains (CTR), pCTCVR loss for children."""
        own = super().task_losses(logits, batch)  # [T]
        labels, mask = self.chains.targets(batch)  # [B, T] joint
        joint = self.chains.joint_log_probs(logits)  # name -> log pCTCVR [B]
        return torch.stack(
            [
                bce_from_log_prob(joint[n], labels[:, j], mask[:, j])
                if n in self.chains.parent
                else own[j]
                for j, n in enumerate(self.task_names)
            ]
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        # the towers are separate: only the input (embedding, interaction) is shared
        return shared_dense_parameters(self.embed, self.interaction) + list(
            self.input_norm.parameters()
        )
