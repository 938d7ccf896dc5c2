"""Task types: how a head's logits become a masked loss, a prediction and metrics.

A task type is a small stateless object; towers size themselves from ``out_dim``. Masked labels
contribute neither loss nor gradient: a fully masked task gives exactly zero. ``loss`` takes the
task's ``TaskSpec`` for its options (binary: ``pos_weight``, ``loss="focal"``, ``focal_gamma``);
without one it is the plain masked mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shopmtl.data.schema import TaskSpec
from shopmtl.train import metrics


def focal_loss_with_logits(
    logits: Tensor, y: Tensor, gamma: float = 2.0, pos_weight: float = 1.0
) -> Tensor:
    """Per-example focal loss (Lin et al., ICCV 2017) on logits, unreduced:
    ``-[pos_weight * y * (1 - p)^gamma * log p + (1 - y) * p^gamma * log(1 - p)]``, p = sigmoid.

    Computed from log-sigmoids, so it stays finite for any finite logit; ``gamma = 0`` is BCE
    (with ``pos_weight`` as in ``BCEWithLogitsLoss``), and ``pos_weight`` plays the role of the
    paper's alpha balance (alpha / (1 - alpha) up to a constant scale).
    """
    log_p = F.logsigmoid(logits)  # log p
    log_q = F.logsigmoid(-logits)  # log(1 - p)
    if gamma == 0:
        pos, neg = log_p, log_q
    else:
        pos = torch.exp(gamma * log_q) * log_p  # (1 - p)^gamma log p
        neg = torch.exp(gamma * log_p) * log_q  # p^gamma log(1 - p)
    return -(pos_weight * y * pos + (1.0 - y) * neg)


class BinaryTask:
    out_dim = 1

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        """Masked mean of BCE, or of focal loss; ``pos_weight`` scales the positive term."""
        pos_weight = 1.0 if spec is None else spec.pos_weight
        if spec is not None and spec.loss == "focal":
            per = focal_loss_with_logits(logits, y, spec.focal_gamma, pos_weight)
        elif pos_weight != 1.0:
            pw = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
            per = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pw)
        else:
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
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
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
