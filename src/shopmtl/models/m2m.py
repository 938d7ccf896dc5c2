"""M2M (Zhang et al., "Leaving No One Behind: A Multi-Scenario Multi-Task Meta Learning
Approach for Advertiser Modeling", WSDM 2022).

Expert view: shared MLP experts over the fields plus their interactions. Scenario knowledge: a
small network on the scenario embedding (plus ``domain_features``) gives a vector s. Meta units
are layers whose weights are generated from s, so every scenario gets its own parameters
without a copy of the network per scenario. Meta attention: task t scores expert k with
v . relu(MetaUnit_s([E_k ; tau_t])) (tau_t a learned task embedding), softmax over experts, and
mixes them. Meta tower: per task, residual meta-unit layers h <- relu(MetaUnit_s(h)) + h, then
an output layer.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from shopmtl.nn.layers import MLP, FeatureEmbedding, interaction_features, make_interaction
from shopmtl.nn.moe import Experts
from shopmtl.nn.scenario import MetaLinear, MetaTower, feature_fields
from shopmtl.tasks import out_dim


@dataclass(frozen=True)
class M2MConfig:
    embed_dim: int = embed_dim_arg()
    interaction: Literal["none", "dot", "cross"] = interaction_arg()
    cross_layers: int = cross_layers_arg()
    n_experts: int = count_arg(4, "experts")
    expert: tuple[int, ...] = widths_arg((128, 64), "each expert")
    scenario_dim: int = count_arg(16, "size of the scenario knowledge vector s")
    domain_features: tuple[str, ...] = key((), "features beside the scenario for the scenario "
                                                "knowledge")
    task_dim: int = count_arg(16, "size of each task's embedding")
    attention_dim: int = count_arg(32, "width of the expert attention")
    meta_layers: int = count_arg(2, "meta units stacked in each tower")
    dropout: float = dropout_arg()

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not self.expert:
            raise ValueError("n_experts must be >= 1 and expert needs at least one layer")
        if min(self.scenario_dim, self.task_dim, self.attention_dim) < 1 or self.meta_layers < 0:
            raise ValueError("scenario_dim, task_dim, attention_dim must be >= 1, meta_layers >= 0")


class M2M(MultiTaskModel):
    def __init__(
        self, schema: Schema, vocab_sizes: dict[str, int], config: M2MConfig = M2MConfig()
    ) -> None:
        super().__init__(schema)
        self.config = config
        d, c = config.embed_dim, config.scenario_dim
        self.embed = FeatureEmbedding(schema, vocab_sizes, d)
        domain = feature_fields(schema, config.domain_features, "model.args.domain_features")
        self.register_buffer(
            "domain_idx",
            torch.tensor([*domain, self.embed.num_fields - 1], dtype=torch.long),
            persistent=False,
        )
        self.interaction, width = make_interaction(
            config.interaction, self.embed.num_fields, d, config.cross_layers
        )
        self.experts = Experts(width, config.n_experts, config.expert, config.dropout)
        h = self.experts.out_dim
        self.scenario_net = MLP((len(domain) + 1) * d, (c,), out_dim=c)
        n_tasks = len(schema.tasks)
        self.task_embedding = nn.Parameter(torch.randn(n_tasks, config.task_dim) * 0.1)
        self.att_expert = MetaLinear(h, config.attention_dim, c)
        self.att_task = MetaLinear(config.task_dim, config.attention_dim, c)
        self.att_score = nn.Linear(config.attention_dim, 1)
        self.towers = nn.ModuleDict(
            {t.name: MetaTower(h, c, config.meta_layers) for t in schema.tasks}
        )
        self.outputs = nn.ModuleDict(
            {t.name: nn.Linear(h, out_dim(t)) for t in schema.tasks}
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fields = self.embed(batch)  # [B, F, D]
        self._track_l2(fields)
        x = interaction_features(self.config.interaction, fields, self.interaction)  # [B, W]
        experts = self.experts(x)  # [B, K, H]
        b, k, h = experts.shape
        n_tasks = self.task_embedding.shape[0]
        s = self.scenario_net(fields[:, self.domain_idx].flatten(1))  # [B, C]
        # meta attention: MetaUnit([E_k ; tau_t]) = MetaUnit_E(E_k) + MetaUnit_tau(tau_t)
        a_e = self.att_expert(experts.reshape(b * k, h), s.repeat_interleave(k, 0))  # [B*K, A]
        tau = self.task_embedding.expand(b, -1, -1).reshape(b * n_tasks, -1)  # [B*T, dt]
        a_t = self.att_task(tau, s.repeat_interleave(n_tasks, 0))  # [B*T, A]
        hidden = torch.relu(a_e.view(b, 1, k, -1) + a_t.view(b, n_tasks, 1, -1))  # [B, T, K, A]
        w = torch.softmax(self.att_score(hidden).squeeze(-1), -1)  # [B, T, K]
        mixed = torch.einsum("btk,bkh->bth", w, experts)  # [B, T, H]
        return {
            name: self.outputs[name](tower(mixed[:, j], s)).squeeze(-1)  # [B]
            for j, (name, tower) in enumerate(self.towers.items())
        }

    def output_layers(self) -> dict[str, nn.Linear]:
        return dict(self.outputs.items())

    def shared_parameters(self) -> list[nn.Parameter]:
        shared = [
            p
            for m in (
                self.experts,
                self.scenario_net,
                self.att_expert,
                self.att_task,
                self.att_score,
            )
            for p in m.parameters()
        ]
        if self.interaction is not None:
            shared += list(self.interaction.parameters())
        return shared
