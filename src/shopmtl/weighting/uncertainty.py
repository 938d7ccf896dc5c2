"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task gets a learned log-variance s_i = log sigma_i^2 and the objective is

    sum_i exp(-s_i) L_i + s_i / 2

which is Kendall et al.'s form for a classification likelihood (1/sigma^2 L + log sigma); their
regression form halves the first term, a constant factor the learned s_i absorbs. At the optimum
exp(-s_i) = 1 / (2 L_i): a task's weight falls as its loss grows. s starts at ``init`` (0 gives
weight 1 per task, i.e. the equal weighting).

The s_i are ``nn.Parameter``s: the trainer must add ``param_groups(lr)`` to its optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.keys import key
from shopmtl.weighting.base import LossWeighting, StepInfo


@dataclass(frozen=True)
class UncertaintyConfig:
    init: float = key(0.0, "initial log-variance s_i", finite=True)
    lr: float | None = key(None, "learning rate of s (null: the model's)", gt=0)


class UncertaintyWeighting(LossWeighting):
    Config = UncertaintyConfig

    def __init__(
        self, task_names: Sequence[str], config: UncertaintyConfig = UncertaintyConfig()
    ) -> None:
        super().__init__(task_names, config.lr)
        if config.lr is not None and not config.lr > 0:
            raise ConfigError(f"weighting.args.lr: must be > 0, got {config.lr}")
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(config.init)))

    def weights(self, losses: Tensor, info: StepInfo) -> Tensor:
        return torch.exp(-self.log_vars)

    def regularizer(self, present: Tensor | None = None) -> Tensor:
        if present is None:
            return 0.5 * self.log_vars.sum()
        return 0.5 * self.log_vars[present].sum()
