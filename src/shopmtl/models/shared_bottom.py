"""SharedBottom (Caruana, 1997): one shared network under one tower per task.

Here the shared bottom starts with a feature-interaction layer (pairwise dot products as in
DLRM/FM, or a DCN-v2 cross network) because click logits in e-commerce carry user x item
affinities that an MLP over concatenated embeddings learns poorly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
from shopmtl.nn.layers import (
    MLP,
    FeatureEmbedding,
    interaction_features,
    make_input_norm,
    make_interaction,
)
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class SharedBottomConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    input_norm: Literal["none", "batch", "layer"] = input_norm_arg()
    bottom: tuple[int, ...] = widths_arg((256, 128), "the shared bottom")
    tower: tuple[int, ...] = widths_arg((64,), "each task's tower")
    dropout: float = dropout_arg()


class SharedBottom(MultiTaskModel):
    def __init__(
        self,
        schema: Schema,
        vocab_sizes: dict[str, int],
        config: SharedBottomConfig = SharedBottomConfig(),
    ) -> None:
        super().__init__(schema)
        self.config = config
        self.embed = FeatureEmbedding(schema, vocab_sizes, config.embed_dim)
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, config.embed_dim, config.cross_layers
        )
        self.input_norm = make_input_norm(config.input_norm, width)
        self.bottom = MLP(width, config.bottom, config.dropout)
        self.towers = nn.ModuleDict(
            {
                t.name: MLP(
                    self.bottom.out_dim,
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
        h = self.bottom(self.input_norm(x))
        return {name: tower(h).squeeze(-1) for name, tower in self.towers.items()}  # [B] each

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters()) + list(self.input_norm.parameters()) + (
            list(self.interaction.parameters()) if self.interaction is not None else []
        )
