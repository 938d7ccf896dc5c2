"""Fixed weights: ``equal`` (every w_i = 1, the plain sum of task losses) and ``static``
(hand-set per-task weights alpha_i, default 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shopmtl.config import ConfigError
from shopmtl.keys import key
from shopmtl.weighting.base import LossWeighting, StepInfo


@dataclass(frozen=True)
class EqualConfig:
    pass


@dataclass(frozen=True)
class StaticConfig:
    alpha: dict[str, float] = key(factory=dict, doc="task -> weight (default 1)", ge=0)


class StaticWeighting(LossWeighting):
    Config = StaticConfig

    def __init__(self, task_names: Sequence[str], config: StaticConfig = StaticConfig()) -> None:
        super().__init__(task_names)
        unknown = sorted(set(config.alpha) - set(self.task_names))
        if unknown:
            raise ConfigError(
                f"weighting.args.alpha: unknown task(s) {unknown}; tasks: {list(self.task_names)}"
            )
        bad = {k: v for k, v in config.alpha.items() if not (v >= 0 and v < float("inf"))}
        if bad:
            raise ConfigError(f"weighting.args.alpha: weights must be finite and >= 0, got {bad}")
        self.register_buffer(
            "alpha",
            torch.tensor([float(config.alpha.get(n, 1.0)) for n in self.task_names]),
            persistent=False,
        )

    def weights(self, losses: Tensor, info: StepInfo) -> Tensor:
        return self.alpha.to(losses)


class EqualWeighting(StaticWeighting):
    """sum_i L_i."""

    Config = EqualConfig  # type: ignore[assignment]

    def __init__(self, task_names: Sequence[str], config: EqualConfig = EqualConfig()) -> None:
        super().__init__(task_names, StaticConfig())
