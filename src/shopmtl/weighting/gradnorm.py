"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Learned task weights w_i (sum T). Per step, with G_i = || grad_W (w_i L_i) || on the shared
parameters W, Gbar = mean_i G_i, the inverse training rate r_i = Lt_i / mean_j Lt_j where
Lt_i = L_i(t) / L_i(0):

    L_grad = sum_i | G_i - Gbar * r_i^alpha |      (the target Gbar r_i^alpha held constant)

The network is trained on sum_i w_i L_i (w held constant); the weights get dL_grad/dw in their
``.grad`` and are updated by the trainer's optimizer (their own parameter group), then
renormalised to sum to T before the next use. Since G_i = w_i ||grad_W L_i||, the gradient of
L_grad is closed-form: sign(G_i - target_i) * ||grad_W L_i||; no second-order pass is needed.

W is ``model.shared_parameters()`` (the paper uses the last shared layer to save time; here the
cost is T extra backward passes through towers and the shared bottom, not through the
embeddings). L_i(0) is ``StepInfo.initial_losses`` when the trainer provides it, else the losses
this weighting saw first (kept in its state_dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.keys import key
from shopmtl.weighting.base import GradientWeighting, SharedModel, StepInfo, split_parameters


@dataclass(frozen=True)
class GradNormConfig:
    alpha: float = key(1.5, "restoring-force strength (paper: 0.12 to 3)", ge=0)
    lr: float | None = key(None, "learning rate of the weights (null: the model's)", gt=0)
    min_weight: float = key(1e-3, "floor before renormalisation", gt=0, lt=1)


class GradNormWeighting(GradientWeighting):
    Config = GradNormConfig

    def __init__(
        self, task_names: Sequence[str], config: GradNormConfig = GradNormConfig()
    ) -> None:
        super().__init__(task_names, config.lr)
        if config.alpha < 0:
            raise ConfigError(f"weighting.args.alpha: must be >= 0, got {config.alpha}")
        if config.lr is not None and not config.lr > 0:
            raise ConfigError(f"weighting.args.lr: must be > 0, got {config.lr}")
        if not 0 < config.min_weight < 1:
            raise ConfigError(
                f"weighting.args.min_weight: must lie in (0, 1), got {config.min_weight}"
            )
        self.alpha = float(config.alpha)
        self.min_weight = float(config.min_weight)
        t = len(self.task_names)
        self.task_weights = nn.Parameter(torch.ones(t))
        self.register_buffer("initial_losses", torch.zeros(t))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def renormalize(self) -> Tensor:
        """Clamp to ``min_weight`` and rescale so the weights sum to T (in place); return them."""
        w = self.task_weights
        w.clamp_(min=self.min_weight)
        w.mul_(self.num_tasks / w.sum())
        return w.detach().clone()

    def current_weights(self) -> Tensor:
        """The current weights (renormalised copy; sums to T)."""
        w = self.task_weights.detach().clamp(min=self.min_weight)
        return w * (self.num_tasks / w.sum())

    def _reference(self, losses: Tensor, info: StepInfo) -> Tensor:
        if info.initial_losses is not None:
            return info.initial_losses.to(losses)
        if not bool(self.has_initial):
            self.initial_losses.copy_(losses.detach())
            self.has_initial.fill_(True)
        return self.initial_losses.to(losses)

    def backward(
        self,
        losses: Tensor,
        model: SharedModel,
        info: StepInfo,
        extra_loss: Tensor | None = None,
    ) -> Tensor:
        self._check(losses, info)
        shared, _ = split_parameters(model)
        w = self.renormalize().to(losses)
        # ||grad_W L_i|| per task (retain the graph: the network backward follows)
        norms = []
        for i in range(self.num_tasks):
            grads = torch.autograd.grad(losses[i], shared, retain_graph=True, allow_unused=True)
            flat = [g.reshape(-1) for g in grads if g is not None]
            norms.append(
                torch.linalg.vector_norm(torch.cat(flat)) if flat else losses.new_zeros(())
            )
        n = torch.stack(norms).to(losses)
        with torch.no_grad():
            l0 = self._reference(losses, info)
            ratio = torch.where(l0 > 0, losses.detach() / l0.clamp(min=1e-12), torch.ones_like(l0))
            r = ratio / ratio.mean().clamp(min=1e-12)
            g = w * n
            target = g.mean() * r.pow(self.alpha)
            grad_w = torch.sign(g - target) * n
        total = (w * losses).sum()
        if extra_loss is not None:
            total = total + extra_loss
        total.backward()
        gw = grad_w.to(self.task_weights)
        if self.task_weights.grad is None:
            self.task_weights.grad = gw
        else:
            self.task_weights.grad += gw
        return self._remember(w)
