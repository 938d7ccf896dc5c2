"""Conditional task chains from the schema's ``given`` (conversion given click given impression).

Entire-space models (ESMM, AITM) supervise a child task through the joint probability
p(parent and child | impression) = p(parent) * p(child | parent) on every impression where the
parent's label exists: a row whose parent is negative is a known joint negative even though the
child's own label is masked there. ``GivenChains`` builds those joint targets and joint
log-probabilities; ``bce_from_log_prob`` is the binary cross-entropy of a probability given in
log space (no product of sigmoids underflows, no log(0)). ``shared_dense_parameters`` is what
such models, whose towers share only the input, report to gradient methods.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.nn.layers import FeatureEmbedding

LOG_ONE = -1e-7  # log-probabilities are clamped below log(1) so log(1 - p) stays finite


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012), nan-free gradients."""
    hi = a.clamp(min=-math.log(2.0), max=LOG_ONE)  # near 0: expm1 is accurate
    lo = a.clamp(max=-math.log(2.0))  # far below 0: log1p is accurate
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(hi)), torch.log1p(-torch.exp(lo)))


def bce_from_log_prob(log_p: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Masked mean binary cross-entropy of probabilities given as log p [B] (0 if all masked)."""
    log_p = log_p.clamp(max=LOG_ONE)  # [B]
    per = -(y * log_p + (1.0 - y) * log1mexp(log_p))  # [B]
    m = mask.to(per.dtype)
    return torch.where(mask, per, torch.zeros_like(per)).sum() / m.sum().clamp(min=1.0)


def given_order(schema: Schema) -> tuple[str, ...]:
    """Task names with every task after the task it is given (stable otherwise)."""
    done: list[str] = []
    pending = list(schema.tasks)
    while pending:
        ready = [t for t in pending if t.given is None or t.given in done]
        if not ready:
            names = [t.name for t in pending]
            raise ValueError(f"schema: tasks {names} form a cycle of `given` conditions")
        done += [t.name for t in ready]
        pending = [t for t in pending if t.name not in done]
    return tuple(done)


class GivenChains(nn.Module):
    """Binary tasks linked by ``given``: joint targets and joint log-probabilities.

    ``parent[child]`` holds every binary task that has a ``given`` (its parent is binary by the
    schema's rules). A child's joint label exists where its parent's joint label exists, in the
    scenarios where the child is defined, and either the parent's joint label is 0 (a known
    joint negative) or the child's own label exists.
    """

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.order = given_order(schema)
        self.index = {n: j for j, n in enumerate(schema.task_names)}
        self.parent = {
            t.name: t.given for t in schema.tasks if t.given is not None and t.type == "binary"
        }
        avail = schema.availability()
        self.register_buffer(
            "available",
            torch.tensor([[avail[n][s] for s in schema.scenario_names] for n in schema.task_names]),
            persistent=False,
        )  # [T, S]

    def targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Joint labels and masks [B, T]; tasks outside chains keep their own."""
        labels = batch.labels.clone()  # [B, T]
        mask = batch.mask.clone()  # [B, T]
        for name in self.order:
            if name not in self.parent:
                continue
            j, p = self.index[name], self.index[self.parent[name]]
            defined = self.available[j][batch.scenario]  # [B]
            parent_neg = labels[:, p] == 0  # [B]
            mask[:, j] = mask[:, p] & defined & (parent_neg | batch.mask[:, j])
            labels[:, j] = labels[:, p] * torch.where(batch.mask[:, j], batch.labels[:, j], 0.0)
        return labels, mask

    def joint_log_probs(self, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """log p(task and all its ancestors) [B] from conditional logits, for chained tasks
        and their ancestors."""
        out: dict[str, Tensor] = {}
        for name in self.order:
            own = F.logsigmoid(logits[name])  # [B]
            par = self.parent.get(name)
            if par is not None:
                out[name] = own + out[par]  # [B]
            elif name in self.parent.values():
                out[name] = own
        return out


def conditional_logit(log_joint: Tensor, log_joint_parent: Tensor) -> Tensor:
    """logit p(child | parent) from log p(child, parent) and log p(parent), both [B].

    p(child | parent) is clamped below 1 when the joint exceeds the parent's probability (an
    unconditional head can violate the order; AITM's calibrator penalises that).
    """
    log_cond = (log_joint - log_joint_parent).clamp(max=LOG_ONE)  # [B]
    return log_cond - log1mexp(log_cond)  # [B]


def shared_dense_parameters(embed: FeatureEmbedding, interaction: nn.Module | None) -> list[Tensor]:
    """The dense parameters every task of a tower-per-task model reads: the interaction layer
    (a cross network has some), the numeric-feature vectors and the scenario embedding.

    The categorical tables are shared too but are left out: gradient methods build per-task
    Jacobians of ``shared_parameters()``, which a [vocab, D] table would make far too large.
    """
    dense = [embed.num_weight, embed.num_bias, embed.scenario.weight]
    return dense + (list(interaction.parameters()) if interaction is not None else [])
