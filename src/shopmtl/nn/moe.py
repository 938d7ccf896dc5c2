"""Mixture-of-experts blocks: parallel MLP experts, softmax gates and the CGC extraction layer.

``Experts`` + ``Gate`` + ``mix`` make MMoE (Ma et al., KDD 2018) and the expert view of M2M;
``CGC`` is one extraction level of PLE (Tang et al., RecSys 2020): task-specific experts beside
shared ones, a gate per task over its own and the shared experts, and (below the top level) a
shared gate over every expert that feeds the next level's shared experts.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Experts(nn.Module):
    """``n`` independent MLP experts on one input: [B, in] -> [B, n, H].

    Packed: the first layer of every expert is one Linear(in, n * h0), a single GEMM that reads
    the (wide) input once instead of n skinny GEMMs; deeper layers are [n, h_in, h_out] weights
    applied with one batched matmul. Each expert's weights are initialised as an
    ``nn.Linear`` of the same shape would be.
    """

    def __init__(self, in_dim: int, n: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        if n < 1 or not hidden:
            raise ValueError("experts: need n >= 1 and at least one hidden layer")
        hidden = tuple(hidden)
        self.first = nn.Linear(in_dim, n * hidden[0])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in pairwise(hidden):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default init, per expert
            self.weights.append(nn.Parameter(torch.empty(n, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n = n
        self.hidden = hidden
        self.out_dim = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.first(x))

    def rest(self, first: Tensor) -> Tensor:
        """Everything after the first Linear: its pre-activation [B, n*h0] -> [B, n, H]."""
        b = first.shape[0]
        h = self.dropout(torch.relu(first))  # [B, n*h0]
        if not len(self.weights):
            return h.view(b, self.n, self.hidden[0])  # [B, n, H]
        h = h.view(b, self.n, self.hidden[0]).transpose(0, 1)  # [n, B, h0]
        for w, bias in zip(self.weights, self.biases, strict=True):
            h = self.dropout(torch.relu(torch.baddbmm(bias, h, w)))  # [n, B, h_out]
        return h.transpose(0, 1)  # [B, n, H]


class Gate(nn.Module):
    """A softmax gate: [B, in] -> mixture weights [B, n] (rows sum to 1)."""

    def __init__(self, in_dim: int, n: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), -1)  # [B, n]


def read_once(x: Tensor, experts: list[Experts], gates: list[Gate]
              ) -> tuple[list[Tensor], list[Tensor]]:
    """Several expert groups and gates that read the same input ``x``: every first layer in
    one GEMM (their weights concatenated) -> each group's [B, n, H] and each gate's [B, n].

    The same numbers as calling each module, with one pass over the wide input instead of one
    per module: forward, and backward, where every module would otherwise write and add its own
    [B, in] input gradient. An MMoE over 2 tasks read the input 3 times, a PLE level 6 times;
    a gate's GEMM (a few outputs) is all memory traffic. The parameters stay the modules' own,
    so checkpoints do not change."""
    linears = [e.first for e in experts] + [g.linear for g in gates]
    out = F.linear(x, torch.cat([m.weight for m in linears]),
                   torch.cat([m.bias for m in linears]))
    parts = out.split([m.out_features for m in linears], dim=1)
    hs = [e.rest(h) for e, h in zip(experts, parts[: len(experts)], strict=True)]
    ws = [torch.softmax(g, -1) for g in parts[len(experts):]]
    return hs, ws


def mix(experts: Tensor, weights: Tensor) -> Tensor:
    """Gate-weighted sum of expert outputs: [B, n, H] x [B, n] -> [B, H]."""
    # a broadcast product and a sum: the einsum lowers to B tiny batched matmuls (a sixth of
    # an MMoE step on CPU, forward and backward)
    return (experts * weights.unsqueeze(-1)).sum(1)  # [B, H]


def mix_parts(groups: list[Tensor], weights: Tensor) -> Tensor:
    """``mix`` over expert groups held apart: [B, n_i, H] each, weights [B, sum n_i] -> [B, H].

    The same sum as ``mix(torch.cat(groups, 1), weights)`` without writing the concatenated
    [B, n, H] copy (PLE's gates mix task-specific with shared experts at every level)."""
    ws = weights.split([g.shape[1] for g in groups], dim=1)
    out = mix(groups[0], ws[0])
    for g, w in zip(groups[1:], ws[1:], strict=True):
        out = out + mix(g, w)
    return out


class CGC(nn.Module):
    """One PLE extraction level (customized gate control).

    Inputs: one representation per task plus one shared representation (all [B, in]). Task t's
    gate, fed with task t's input, mixes task t's ``n_specific`` experts and the ``n_shared``
    shared experts; with ``shared_out`` a shared gate, fed with the shared input, mixes all
    experts into the shared representation of the next level.
    """

    def __init__(
        self,
        in_dim: int,
        n_tasks: int,
        n_specific: int,
        n_shared: int,
        hidden: tuple[int, ...],
        dropout: float = 0.0,
        shared_out: bool = True,
    ) -> None:
        super().__init__()
        self.specific = nn.ModuleList(
            Experts(in_dim, n_specific, hidden, dropout) for _ in range(n_tasks)
        )
        self.shared = Experts(in_dim, n_shared, hidden, dropout)
        self.task_gates = nn.ModuleList(Gate(in_dim, n_specific + n_shared) for _ in range(n_tasks))
        self.shared_gate = Gate(in_dim, n_tasks * n_specific + n_shared) if shared_out else None
        self.out_dim = hidden[-1]

    def forward(
        self, task_in: list[Tensor], shared_in: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        shared_gate = [self.shared_gate] if self.shared_gate is not None else []
        if all(x is shared_in for x in task_in):  # the first level: one input for all
            hs, ws = read_once(shared_in, [*self.specific, self.shared],
                               [*self.task_gates, *shared_gate])
            specific, shared = hs[:-1], hs[-1]  # T x [B, ns, H], [B, n_shared, H]
            task_w, shared_w = ws[: len(task_in)], ws[len(task_in):]
        else:
            specific, task_w = [], []
            for e, g, x in zip(self.specific, self.task_gates, task_in, strict=True):
                (h,), (w,) = read_once(x, [e], [g])
                specific.append(h)
                task_w.append(w)
            (shared,), shared_w = read_once(shared_in, [self.shared], shared_gate)
        task_out = [mix_parts([s, shared], w) for s, w in zip(specific, task_w, strict=True)]
        shared_out = mix_parts([*specific, shared], shared_w[0]) if shared_w else None
        return task_out, shared_out  # T x [B, H], [B, H] or None

    def shared_parameters(self) -> list[nn.Parameter]:
        gate = list(self.shared_gate.parameters()) if self.shared_gate is not None else []
        return list(self.shared.parameters()) + gate
