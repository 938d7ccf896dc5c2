"""PLE (Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL)
Model for Personalized Recommendations", RecSys 2020).

``levels`` stacked CGC extraction layers: each task has its own experts beside shared experts;
a task's gate mixes its own and the shared experts, and below the top level a shared gate mixes
every expert into the next level's shared input. A tower per task sits on its top-level output.
The first level reads the fields plus their interactions, as in SharedBottom.
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
from shopmtl.nn.moe import CGC
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class PLEConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    input_norm: Literal["none", "batch", "layer"] = input_norm_arg()
    levels: int = count_arg(2, "stacked extraction layers")
    specific_experts: int = count_arg(1, "experts per task, per level")
    shared_experts: int = count_arg(2, "shared experts per level")
    expert: tuple[int, ...] = widths_arg((64,), "each expert")
    tower: tuple[int, ...] = widths_arg((64,), "each task's tower")
    dropout: float = dropout_arg()

    def __post_init__(self) -> None:
        if self.levels < 1 or self.specific_experts < 1 or self.shared_experts < 1:
            raise ValueError("levels, specific_experts and shared_experts must be >= 1")
        if not self.expert:
            raise ValueError("expert needs at least one layer")


class PLE(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: PLEConfig = PLEConfig()
    ) -> None:
        super().__init__(schema)
        self.config = config
        self.embed = FeatureEmbedding(schema, vocab_sizes, config.embed_dim)
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, config.embed_dim, config.cross_layers
        )
        self.input_norm = make_input_norm(config.input_norm, width)
        n_tasks = len(schema.tasks)
        self.levels = nn.ModuleList()
        for level in range(config.levels):
            cgc = CGC(
                width,
                n_tasks,
                config.specific_experts,
                config.shared_experts,
                config.expert,
                config.dropout,
                shared_out=level < config.levels - 1,
            )
            self.levels.append(cgc)
            width = cgc.out_dim
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
        task_h, shared_h = [x] * len(self.task_names), x  # T x [B, W], [B, W]
        for cgc in self.levels:
            task_h, shared_h = cgc(task_h, shared_h)  # T x [B, H], [B, H] (None at the top)
        return {
            name: tower(h).squeeze(-1)  # [B]
            for (name, tower), h in zip(self.towers.items(), task_h, strict=True)
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        shared = [p for cgc in self.levels for p in cgc.shared_parameters()]
        shared += list(self.input_norm.parameters())
        if self.interaction is not None:
            shared += list(self.interaction.parameters())
        return shared
