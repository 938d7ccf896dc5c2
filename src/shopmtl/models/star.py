"""STAR (Sheng et al., "One Model to Serve All: Star Topology Adaptive Recommender for
Multi-Domain CTR Prediction", CIKM 2021), extended to several tasks.

The fields plus their interactions pass through partitioned normalisation (batch norm with
per-scenario statistics, scale gamma * gamma_s, shift beta + beta_s) and a star-topology FC
network whose weight for scenario s is W (shared) * W_s (element-wise) and bias b + b_s. One
tower per task reads its output; the auxiliary network, a small MLP on the scenario embedding,
adds one logit per task (the paper's single CTR logit, one per task here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
from shopmtl.nn.layers import MLP, FeatureEmbedding, interaction_features, make_interaction
from shopmtl.nn.scenario import AuxiliaryNetwork, PartitionedNorm, StarMLP
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class STARConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    star: tuple[int, ...] = widths_arg((256, 128), "the star-topology FC")
    tower: tuple[int, ...] = widths_arg((64,), "each task's tower")
    aux: tuple[int, ...] = widths_arg((32,), "the auxiliary scenario network")
    partitioned_norm: bool = key(True, "partitioned normalisation (per-scenario "
                                       "statistics)")
    norm_momentum: float = key(0.1, "momentum of the partitioned normalisation", gt=0, le=1)
    dropout: float = dropout_arg()

    def __post_init__(self) -> None:
        if not self.star:
            raise ValueError("star needs at least one layer")
        if not 0.0 < self.norm_momentum <= 1.0:
            raise ValueError("norm_momentum must lie in (0, 1]")


class STAR(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: STARConfig = STARConfig()
    ) -> None:
        super().__init__(schema)
        self.config = config
        n_s = len(schema.scenario_names)
        self.embed = FeatureEmbedding(schema, vocab_sizes, config.embed_dim)
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, config.embed_dim, config.cross_layers
        )
        self.norm = (
            PartitionedNorm(width, n_s, config.norm_momentum) if config.partitioned_norm else None
        )
        self.star = StarMLP(width, config.star, n_s, config.dropout)
        self.towers = nn.ModuleDict(
            {
                t.name: MLP(
                    self.star.out_dim,
                    config.tower,
                    config.dropout,
                    out_dim=out_dim(t),
                )
                for t in schema.tasks
            }
        )
        self.aux = AuxiliaryNetwork(config.embed_dim, config.aux, len(schema.tasks))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embed(batch)  # [B, F, D]
        self._track_l2(fields)
        x = interaction_features(self.config.interaction, fields, self.interaction)  # [B, W]
        if self.norm is not None:
            x = self.norm(x, batch.scenario)  # [B, W]
        h = self.star(x, batch.scenario)  # [B, H]
        aux = self.aux(fields[:, -1])  # [B, T] from the scenario field [B, D]
        out = {}
        for j, (name, tower) in enumerate(self.towers.items()):
            o = tower(h)  # [B, out_dim]: the scenario's prior shifts every column alike
            out[name] = o.squeeze(-1) + aux[:, j] if o.shape[-1] == 1 else o + aux[:, j, None]
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        shared = self.star.shared_parameters()
        if self.norm is not None:
            shared += self.norm.shared_parameters()
        if self.interaction is not None:
            shared += list(self.interaction.parameters())
        return shared
