"""Random Loss Weighting (Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022; arXiv 2111.10603, 2021).

Each step draws z ~ N(0, I_T) and weights the losses by softmax(z), scaled here by T so that
the expected weight of a task is 1 (the paper's weights sum to 1; the factor T only rescales
the learning rate and makes RLW comparable to ``equal``, whose weights are 1).

Draws come from a generator seeded by (seed, step), not from the global RNG: the weights of a
step are the same after a resume and the model's own random stream is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shopmtl.keys import key
from shopmtl.weighting.base import LossWeighting, StepInfo


@dataclass(frozen=True)
class RLWConfig:
    seed: int = key(0, "seed of the random weights (with the step)")


def rlw_logits(seed: int, step: int, num_tasks: int) -> Tensor:
    """The z ~ N(0, I) drawn for ``step`` (CPU, float32)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 101) % (2**63 - 1))
    return torch.randn(num_tasks, generator=g)


class RLWWeighting(LossWeighting):
    Config = RLWConfig

    def __init__(self, task_names: Sequence[str], config: RLWConfig = RLWConfig()) -> None:
        super().__init__(task_names)
        self.seed = int(config.seed)

    def weights(self, losses: Tensor, info: StepInfo) -> Tensor:
        z = rlw_logits(self.seed, info.step, self.num_tasks)
        return (self.num_tasks * torch.softmax(z, dim=0)).to(losses)
