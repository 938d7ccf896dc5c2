"""PEPNet (Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing
with Personalized Prior Information", KDD 2023).

EPNet personalises the embedding per scenario: a gate neural unit fed with the domain side
(the scenario embedding, plus ``domain_features``) and the stop-gradient general embedding
scales every embedding dimension, O_ep = GateNU(E_d + sg(E)) * E. The gated fields plus their
interactions feed one tower per task. PPNet personalises the towers: before every tower layer a
gate neural unit fed with the personal priors (``prior_features``, by default the categorical
ids) and the stop-gradient tower input emits one gate per task that scales that layer's input.
Gates are gamma * sigmoid(.), 1 at initialisation for gamma = 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.keys import key
from shopmtl.models.base import (
    MultiTaskModel,
    count_arg,
    cross_layers_arg,
    dropout_arg,
    embed_dim_arg,
    interaction_arg,
    widths_arg,
)
from shopmtl.nn.layers import FeatureEmbedding, interaction_features, make_interaction
from shopmtl.nn.scenario import GateNU, feature_fields
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class PEPNetConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    tower: tuple[int, ...] = widths_arg((128, 64), "each task's tower")
    gate_hidden: int = count_arg(64, "hidden width of each gate neural unit")
    gamma: float = key(2.0, "gate scale: gamma * sigmoid(.) (2: gates start at 1)", gt=0)
    domain_features: tuple[str, ...] = key((), "features beside the scenario for EPNet's "
                                                "domain side")
    prior_features: tuple[str, ...] = key((), "PPNet's personal priors (empty: every "
                                               "categorical)")
    dropout: float = dropout_arg()

    def __post_init__(self) -> None:
        if self.gate_hidden < 1 or self.gamma <= 0:
            raise ValueError("gate_hidden must be >= 1 and gamma > 0")


class PEPNet(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: PEPNetConfig = PEPNetConfig()
    ) -> None:
        super().__init__(schema)
        self.config = config
        d = config.embed_dim
        self.embed = FeatureEmbedding(schema, vocab_sizes, d)
        n_fields = self.embed.num_fields
        domain = feature_fields(schema, config.domain_features, "model.args.domain_features")
        priors = config.prior_features or tuple(f.name for f in schema.of_kind("categorical"))
        prior = feature_fields(schema, priors, "model.args.prior_features")
        self.register_buffer(
            "domain_idx", torch.tensor([*domain, n_fields - 1], dtype=torch.long), persistent=False
        )
        self.register_buffer("prior_idx", torch.tensor(prior, dtype=torch.long), persistent=False)
        self.epnet = GateNU(
            (len(domain) + 1 + n_fields) * d, n_fields * d, config.gate_hidden, config.gamma
        )
        self.interaction, width = make_interaction(
            config.interaction, n_fields, d, config.cross_layers
        )
        dims = [width, *config.tower]
        n_tasks = len(schema.tasks)
        gate_in = len(prior) * d + width
        self.ppnet = nn.ModuleList(
            GateNU(gate_in, n_tasks * k, config.gate_hidden, config.gamma) for k in dims
        )
        self.towers = nn.ModuleDict(
            {
                t.name: nn.ModuleList(
                    [nn.Linear(a, b) for a, b in pairwise(dims)]
                    + [nn.Linear(dims[-1], out_dim(t))]
                )
                for t in schema.tasks
            }
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embed(batch)  # [B, F, D]
        self._track_l2(fields)
        b, f, d = fields.shape
        # EPNet: domain side (with gradient) + general embedding (stop-gradient)
        domain = fields[:, self.domain_idx].flatten(1)  # [B, (Fd+1)*D]
        delta = self.epnet(torch.cat([domain, fields.detach().flatten(1)], 1))  # [B, F*D]
        personal = fields * delta.view(b, f, d)  # [B, F, D]
        x = interaction_features(self.config.interaction, personal, self.interaction)  # [B, W]
        # PPNet: personal priors (with gradient) + tower input (stop-gradient)
        prior = fields[:, self.prior_idx].flatten(1)  # [B, Fp*D]
        gate_in = torch.cat([prior, x.detach()], 1)  # [B, Fp*D + W]
        n_tasks = len(self.task_names)
        gates = [g(gate_in).view(b, n_tasks, -1) for g in self.ppnet]  # L+1 x [B, T, d_l]
        out = {}
        for j, (name, layers) in enumerate(self.towers.items()):
            h = x  # [B, W]
            for level, linear in enumerate(layers):
                h = linear(h * gates[level][:, j])  # [B, d_{l+1}]
                if level < len(layers) - 1:
                    h = self.dropout(torch.relu(h))
            out[name] = h.squeeze(-1)  # [B]
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        shared = list(self.epnet.parameters()) + list(self.ppnet.parameters())
        if self.interaction is not None:
            shared += list(self.interaction.parameters())
        return shared
