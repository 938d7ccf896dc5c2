"""MMoE (Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018): shared experts, one softmax gate per task over them, a tower
per task on its gate's mixture.

As in SharedBottom, the experts read the concatenated fields plus their interactions (dot or
DCN-v2 cross) so user x item affinities are learnable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.models.base import (
    MultiTaskModel,
    count_arg,
    cross_layers_arg,
    dropout_arg,
    embed_dim_arg,
    input_norm_arg,
    interaction_arg,
    widths_arg,
)
from shopmtl.nn.layers import (
    MLP,
    FeatureEmbedding,
    interaction_features,
    make_input_norm,
    make_interaction,
)
from shopmtl.nn.moe import Experts, Gate, mix, read_once
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class MMoEConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    input_norm: Literal["none", "batch", "layer"] = input_norm_arg()
    n_experts: int = count_arg(4, "experts")
    expert: tuple[int, ...] = widths_arg((128, 64), "each expert")
    tower: tuple[int, ...] = widths_arg((64,), "each task's tower")
    dropout: float = dropout_arg()

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not self.expert:
            raise ValueError("n_experts must be >= 1 and expert needs at least one layer")


class MMoE(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: MMoEConfig = MMoEConfig()
    ) -> None:
        super().__init__(schema)
        self.config = config
        self.embed = FeatureEmbedding(schema, vocab_sizes, config.embed_dim)
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, config.embed_dim, config.cross_layers
        )
        self.input_norm = make_input_norm(config.input_norm, width)
        self.experts = Experts(width, config.n_experts, config.expert, config.dropout)
        self.gates = nn.ModuleDict({t.name: Gate(width, config.n_experts) for t in schema.tasks})
        self.towers = nn.ModuleDict(
            {
                t.name: MLP(
                    self.experts.out_dim,
                    config.tower,
                    config.dropout,
                    out_dim=out_dim(t),
                )
                for t in schema.tasks
            }
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embed(batch)  # [B, F, D]
        self._track_l2(fields)
        x = interaction_features(self.config.interaction, fields, self.interaction)  # [B, W]
        x = self.input_norm(x)
        # the experts' first layer and every gate in one GEMM over x
        (experts,), weights = read_once(x, [self.experts], list(self.gates.values()))
        return {
            name: self.towers[name](mix(experts, w)).squeeze(-1)  # [B]; experts [B, E, H]
            for name, w in zip(self.gates, weights, strict=True)
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters()) + list(self.input_norm.parameters()) + (
            list(self.interaction.parameters()) if self.interaction is not None else []
        )
