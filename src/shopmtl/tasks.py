"""Task types: how a head's logits become a masked loss, a prediction and metrics.

A task type is a small stateless object; towers size themselves from ``out_dim``. Masked labels
contribute neither loss nor gradient: a fully masked task gives exactly zero.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shopmtl.train import metrics


class BinaryTask:
    out_dim = 1

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp(min=1.0)

    @staticmethod
    def activate(logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    @staticmethod
    def metrics(
        y: np.ndarray, pred: np.ndarray, group: np.ndarray | None, oracle: np.ndarray | None
    ) -> dict[str, float]:
        return metrics.binary_metrics(y, pred, group, oracle)


class RegressionTask:
    out_dim = 1

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(logits.dtype)
        return ((logits - y).square() * m).sum() / m.sum().clamp(min=1.0)

    @staticmethod
    def activate(logits: Tensor) -> Tensor:
        return logits

    @staticmethod
    def metrics(
        y: np.ndarray, pred: np.ndarray, group: np.ndarray | None, oracle: np.ndarray | None
    ) -> dict[str, float]:
        return metrics.regression_metrics(y, pred)


TASK_TYPES: dict[str, type[BinaryTask] | type[RegressionTask]] = {
    "binary": BinaryTask,
    "regression": RegressionTask,
}
