"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019).

    r_i = L_i(e-1) / L_i(e-2)            (mean training loss of the last two finished epochs)
    w_i = T exp(r_i / tau) / sum_j exp(r_j / tau)

A task whose loss fell more slowly gets more weight. Until two epochs have finished, w_i = 1.
The weights depend only on ``StepInfo.prev_epoch_losses``: nothing to checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shopmtl.config import ConfigError
from shopmtl.keys import key
from shopmtl.weighting.base import LossWeighting, StepInfo


@dataclass(frozen=True)
class DWAConfig:
    temperature: float = key(2.0, "tau: large is closer to equal weights", gt=0)


class DWAWeighting(LossWeighting):
    Config = DWAConfig

    def __init__(self, task_names: Sequence[str], config: DWAConfig = DWAConfig()) -> None:
        super().__init__(task_names)
        if not config.temperature > 0:
            raise ConfigError(f"weighting.args.temperature: must be > 0, got {config.temperature}")
        self.temperature = float(config.temperature)

    def weights(self, losses: Tensor, info: StepInfo) -> Tensor:
        t = self.num_tasks
        hist = info.prev_epoch_losses
        if len(hist) < 2:
            return torch.ones(t, dtype=losses.dtype, device=losses.device)
        last, before = (h.to(device=losses.device, dtype=losses.dtype) for h in hist[-2:][::-1])
        if last.shape != (t,) or before.shape != (t,):
            raise ValueError(f"prev_epoch_losses entries must have shape [{t}]")
        # a task with no labels in an epoch (mean loss 0) counts as "no change" (r = 1)
        ok = (before > 0) & torch.isfinite(before) & torch.isfinite(last)
        ratio = torch.where(ok, last / before.clamp(min=1e-12), torch.ones_like(last))
        return t * torch.softmax(ratio / self.temperature, dim=0)
