"""Scenario-conditioned blocks: layers whose parameters depend on where a request came from.

* STAR (Sheng et al., CIKM 2021): ``PartitionedNorm`` (batch norm with per-scenario statistics
  and scale/shift = shared x scenario), ``StarLinear`` / ``StarMLP`` (star-topology FC: weight =
  shared W (element-wise) scenario W, bias = shared b + scenario b) and ``AuxiliaryNetwork``
  (a small network on the scenario representation whose logit is added to the main one).
  ``PartitionedNorm.for_scenario`` / ``StarLinear.for_scenario`` fold one scenario's copy with
  the shared weights into a plain layer (``ScaleShift``, ``FoldedLinear``): what a one-scenario
  sub-model keeps (``export.scenario``).
* PEPNet (Chang et al., KDD 2023): ``GateNU``, the gate neural unit of EPNet and PPNet,
  ``gamma * sigmoid(W2 relu(W1 x))`` (in (0, gamma), 1 at initialisation for gamma = 2).
* M2M (Zhang et al., WSDM 2022): ``MetaLinear``, a meta unit whose weights are generated from a
  scenario knowledge vector, and ``MetaTower``, residual layers of meta units.

``feature_fields`` maps feature names to field positions of ``FeatureEmbedding``'s output.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.data.schema import Schema
from shopmtl.nn.layers import MLP


def feature_fields(schema: Schema, names: tuple[str, ...], where: str) -> list[int]:
    """Positions of named features in ``FeatureEmbedding``'s fields [B, F, D].

    The layout is categorical, sequence, numeric, content features (schema order each), then the
    scenario as the last field. Unknown names raise ``ConfigError`` naming ``where``.
    """
    order = [
        f.name
        for kind in ("categorical", "sequence", "numeric")
        for f in schema.of_kind(kind)  # type: ignore[arg-type]
    ] + [f.name for f in schema.content_features]
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ConfigError(f"{where}: unknown feature(s) {unknown}; features: {order}")
    return [order.index(n) for n in names]


# -- STAR --------------------------------------------------------------------------------------


class PartitionedNorm(nn.Module):
    """Batch normalisation whose statistics are kept per scenario (STAR's PN).

    Training normalises each row by the moments of its own scenario in the batch (a scenario
    with fewer than two rows in the batch falls back to its running moments); evaluation uses
    the per-scenario running moments. Scale = gamma * gamma_s, shift = beta + beta_s.
    """

    def __init__(
        self, dim: int, n_scenarios: int, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.gamma_s = nn.Parameter(torch.ones(n_scenarios, dim))
        self.beta_s = nn.Parameter(torch.zeros(n_scenarios, dim))
        self.register_buffer("running_mean", torch.zeros(n_scenarios, dim))
        self.register_buffer("running_var", torch.ones(n_scenarios, dim))

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        n_s = self.gamma_s.shape[0]
        if self.training:
            count = torch.bincount(scenario, minlength=n_s).to(x.dtype)  # [S]
            denom = count.clamp(min=1.0).unsqueeze(1)  # [S, 1]
            mean = x.new_zeros(n_s, x.shape[1]).index_add(0, scenario, x) / denom  # [S, W]
            dev = (x - mean[scenario]).square()  # [B, W]
            var = x.new_zeros(n_s, x.shape[1]).index_add(0, scenario, dev) / denom  # [S, W]
            enough = (count >= 2).unsqueeze(1)  # [S, 1]
            with torch.no_grad():
                m = self.momentum
                unbiased = var * (denom / (denom - 1).clamp(min=1.0))  # [S, W]
                new_mean = (1 - m) * self.running_mean + m * mean.detach()
                new_var = (1 - m) * self.running_var + m * unbiased.detach()
                self.running_mean.copy_(torch.where(enough, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(enough, new_var, self.running_var))
            mean = torch.where(enough, mean, self.running_mean)  # [S, W]
            var = torch.where(enough, var, self.running_var)  # [S, W]
        else:
            mean, var = self.running_mean, self.running_var  # [S, W]
        x_hat = (x - mean[scenario]) * torch.rsqrt(var[scenario] + self.eps)  # [B, W]
        scale = self.gamma * self.gamma_s[scenario]  # [B, W]
        shift = self.beta + self.beta_s[scenario]  # [B, W]
        return x_hat * scale + shift  # [B, W]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.gamma, self.beta]

    @torch.no_grad()
    def for_scenario(self, index: int) -> ScaleShift:
        """The evaluation-mode forward of scenario ``index`` as one scale and shift (its
        running moments folded with gamma * gamma_s, beta + beta_s): inference only, since
        training normalises by the batch's moments."""
        scale = self.gamma * self.gamma_s[index] * torch.rsqrt(self.running_var[index] + self.eps)
        shift = self.beta + self.beta_s[index] - self.running_mean[index] * scale
        return ScaleShift(scale, shift)


class ScaleShift(nn.Module):
    """x * scale + shift per feature, [B, W] -> [B, W]: one scenario's ``PartitionedNorm`` in
    evaluation mode. Takes (and ignores) the scenario so it stands in for the norm."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: Tensor, scenario: Tensor | None = None) -> Tensor:
        return x * self.scale + self.shift  # [B, W]


class StarLinear(nn.Module):
    """Star-topology FC: y = x (W * W_s) + b + b_s for the row's scenario s.

    Every scenario's output is computed for the whole batch and the row's own is gathered
    ([B, S, out] transient): cheap for the handful of scenarios a marketplace has.
    """

    def __init__(self, in_dim: int, out_dim: int, n_scenarios: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.weight_s = nn.Parameter(torch.ones(n_scenarios, in_dim, out_dim))
        self.bias_s = nn.Parameter(torch.zeros(n_scenarios, out_dim))
        self.out_dim = out_dim

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        w = self.weight * self.weight_s  # [S, in, out]
        every = torch.einsum("bi,sio->bso", x, w)  # [B, S, out]
        own = every[torch.arange(x.shape[0], device=x.device), scenario]  # [B, out]
        return own + self.bias + self.bias_s[scenario]  # [B, out]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.weight, self.bias]

    @torch.no_grad()
    def for_scenario(self, index: int) -> FoldedLinear:
        """Scenario ``index``'s layer as one plain Linear: W * W_s and b + b_s computed once."""
        layer = FoldedLinear(*self.weight.shape)
        layer.weight.copy_((self.weight * self.weight_s[index]).T)  # nn.Linear keeps [out, in]
        layer.bias.copy_(self.bias + self.bias_s[index])
        return layer


class FoldedLinear(nn.Linear):
    """One scenario's ``StarLinear`` with its weights folded (``StarLinear.for_scenario``).
    Takes (and ignores) the scenario so it stands in for the star layer in ``StarMLP``."""

    def forward(self, x: Tensor, scenario: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)  # [B, out]


class StarMLP(nn.Module):
    """StarLinear -> ReLU (-> Dropout) stack: [B, in] -> [B, hidden[-1]]."""

    def __init__(
        self, in_dim: int, hidden: tuple[int, ...], n_scenarios: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(StarLinear(a, b, n_scenarios) for a, b in pairwise(dims))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = dims[-1]

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        for layer in self.layers:
            x = self.dropout(torch.relu(layer(x, scenario)))  # [B, h]
        return x

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.shared_parameters()]


class AuxiliaryNetwork(MLP):
    """STAR's auxiliary network: a small MLP on the scenario representation whose output
    (one logit per task) is added to the main network's logits, so scenario differences are
    learned directly rather than diluted in the main network."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], n_out: int) -> None:
        super().__init__(in_dim, hidden, 0.0, out_dim=n_out)


# -- PEPNet ------------------------------------------------------------------------------------


class GateNU(nn.Module):
    """Gate neural unit: [B, in] -> gamma * sigmoid(W2 relu(W1 x + b1) + b2), [B, out].

    The output bias starts at zero, so the gate starts at gamma / 2 (1 for gamma = 2): an
    identity scaling that training personalises.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, gamma: float = 2.0) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.bias)
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.sigmoid(self.out(torch.relu(self.hidden(x))))  # [B, out]


# -- M2M ---------------------------------------------------------------------------------------


class MetaLinear(nn.Module):
    """A meta unit: a linear layer whose weights are generated from a condition vector s.

    y = x W0 + b0 + x W(s) + b(s), with W(s) = sum_j s_j V_j and b(s) = s U (a linear generator,
    computed without materialising a per-row weight matrix). W0, b0 are a static base the
    generated part modulates.
    """

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.base = nn.Linear(in_dim, out_dim)
        self.v = nn.Parameter(torch.randn(cond_dim, in_dim, out_dim) / math.sqrt(in_dim * cond_dim))
        self.u = nn.Parameter(torch.zeros(cond_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        xv = torch.einsum("bi,jio->bjo", x, self.v)  # [B, C, out]
        generated = (xv * s.unsqueeze(-1)).sum(1)  # [B, out]
        return self.base(x) + generated + s @ self.u  # [B, out]


class MetaTower(nn.Module):
    """Residual meta-unit layers: h <- relu(MetaLinear(h, s)) + h, [B, H] -> [B, H]."""

    def __init__(self, dim: int, cond_dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MetaLinear(dim, dim, cond_dim) for _ in range(layers))

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        for layer in self.layers:
            h = torch.relu(layer(h, s)) + h  # [B, H]
        return h
