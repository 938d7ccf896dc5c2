"""Task types: how a head's logits become a masked loss, a prediction and metrics.

A task type is a small stateless class; a tower's width is ``out_dim(spec)`` (a multiclass head
has one logit per class, a quantile head one output per level). Masked labels contribute neither
loss nor gradient: a fully masked task gives exactly zero loss and zero gradient. ``loss`` takes
the task's ``TaskSpec`` for its options (binary: ``pos_weight``, ``loss="focal"``,
``focal_gamma``; quantile: ``quantiles``; ranking: ``loss="softmax"`` or ``"pairwise"``);
without one binary and regression are the plain masked mean.

Shapes (B rows; for ranking G lists of L candidates):

========== ============ ================================ ============= ===================
type       logits       y                                mask          activate
========== ============ ================================ ============= ===================
binary     [B]          0/1                              [B]           sigmoid
regression [B]          value                            [B]           identity
multiclass [B, C]       class id (float ids are cast)    [B]           softmax over C
quantile   [B, Q]       value                            [B]           identity
ranking    [G, L]       graded relevance >= 0, NaN = pad [G] (a list)  identity (scores)
========== ============ ================================ ============= ===================

``metrics(y, pred, group, oracle, spec=None)`` has one signature for every type, so the
evaluation loop needs no branch; the types that need options take them from ``spec`` (quantile
levels for the pinball loss, the NDCG cut-off ``k``) and fall back to defaults without it.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shopmtl import metrics
from shopmtl.data.schema import TaskSpec


class TaskType(Protocol):
    """What a task type provides (as static methods and attributes of a class)."""

    # the metric the type is judged by in summaries and model selection, and whether higher
    # is better
    primary: tuple[str, bool]

    @staticmethod
    def output_width(spec: TaskSpec) -> int: ...

    @staticmethod
    def label_prior(labels: np.ndarray) -> float | None:
        """The output bias that predicts the training labels' base rate before any step
        (``MultiTaskModel.init_output_bias``), from the labelled rows; None: no prior."""
        ...

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor: ...

    @staticmethod
    def activate(logits: Tensor) -> Tensor: ...

    @staticmethod
    def metrics(
        y: np.ndarray,
        pred: np.ndarray,
        group: np.ndarray | None,
        oracle: np.ndarray | None,
        spec: TaskSpec | None = None,
    ) -> dict[str, float]: ...


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


def _masked_mean(per: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``per`` over the entries where ``keep``; exactly 0 (and 0 gradient) if none.

    ``torch.where`` rather than a product with the mask: a dropped entry computed from a
    placeholder label must not reach the sum, and 0 * inf would be NaN. Callers also sanitise
    the placeholders first, so the dropped branch's backward sees finite values.
    """
    return torch.where(keep, per, torch.zeros_like(per)).sum() / keep.sum().clamp(min=1)


class BinaryTask:
    out_dim = 1  # kept for callers that read the class attribute; use ``out_dim(spec)``

    primary = ("auc", True)

    @staticmethod
    def label_prior(labels: np.ndarray) -> float | None:
        p = min(max(float(np.mean(labels, dtype=np.float64)), 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p))  # logit of the positive rate

    @staticmethod
    def output_width(spec: TaskSpec) -> int:
        return 1

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        """Masked mean of BCE, or of focal loss; ``pos_weight`` scales the positive term."""
        pos_weight = 1.0 if spec is None else spec.pos_weight
        if spec is not None and spec.resolved_loss == "focal":
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
        y: np.ndarray,
        pred: np.ndarray,
        group: np.ndarray | None,
        oracle: np.ndarray | None,
        spec: TaskSpec | None = None,
    ) -> dict[str, float]:
        return metrics.binary_metrics(y, pred, group, oracle)


class RegressionTask:
    out_dim = 1  # kept for callers that read the class attribute; use ``out_dim(spec)``

    primary = ("rmse", False)

    @staticmethod
    def label_prior(labels: np.ndarray) -> float | None:
        return float(np.mean(labels, dtype=np.float64))

    @staticmethod
    def output_width(spec: TaskSpec) -> int:
        return 1

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        m = mask.to(logits.dtype)
        return ((logits - y).square() * m).sum() / m.sum().clamp(min=1.0)

    @staticmethod
    def activate(logits: Tensor) -> Tensor:
        return logits

    @staticmethod
    def metrics(
        y: np.ndarray,
        pred: np.ndarray,
        group: np.ndarray | None,
        oracle: np.ndarray | None,
        spec: TaskSpec | None = None,
    ) -> dict[str, float]:
        return metrics.regression_metrics(y, pred)


class MulticlassTask:
    """One logit per class; softmax cross-entropy. The label matrix is float, so a label is a
    class id held as a float (2.0); masked rows may hold anything (0, -1, NaN)."""

    primary = ("accuracy", True)

    @staticmethod
    def label_prior(labels: np.ndarray) -> float | None:
        return None

    @staticmethod
    def output_width(spec: TaskSpec) -> int:
        return spec.n_classes

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        n_classes = logits.shape[-1]
        if logits.dim() != 2 or (spec is not None and spec.n_classes != n_classes):
            want = f"[B, {spec.n_classes}]" if spec is not None else "[B, C]"
            raise ValueError(f"multiclass logits must be {want}, got {list(logits.shape)}")
        mask = mask.bool()
        # replace masked labels before the cast: NaN or -1 must never become an index
        y = torch.where(mask, y, torch.zeros_like(y))
        cls = y.long()
        bad = mask & ((cls < 0) | (cls >= n_classes) | (cls.to(y.dtype) != y))
        if bool(bad.any()):  # fail here, not as an opaque index error (a device assert on GPU)
            name = f"task '{spec.name}': " if spec is not None else ""
            raise ValueError(
                f"{name}multiclass labels must be class ids 0..{n_classes - 1}, got "
                f"{y[bad][:5].tolist()}"
            )
        per = F.cross_entropy(logits, cls, reduction="none")  # [B]
        return _masked_mean(per, mask)

    @staticmethod
    def activate(logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)

    @staticmethod
    def metrics(
        y: np.ndarray,
        pred: np.ndarray,
        group: np.ndarray | None,
        oracle: np.ndarray | None,
        spec: TaskSpec | None = None,
    ) -> dict[str, float]:
        return metrics.multiclass_metrics(y, pred)


class QuantileTask:
    """One output per quantile level (``spec.quantiles``), trained with the pinball loss
    ``rho_tau(u) = max(tau u, (tau - 1) u)``, u = y - q_tau (Koenker & Bassett, 1978), averaged
    over levels and then over labelled rows. The outputs are not forced to be monotone in tau
    (no sorting): a crossing shows up in the metrics instead of being hidden."""

    primary = ("wape", False)

    @staticmethod
    def label_prior(labels: np.ndarray) -> float | None:
        return None

    @staticmethod
    def output_width(spec: TaskSpec) -> int:
        return len(spec.quantiles)

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        if spec is None or not spec.quantiles:
            raise ValueError("the quantile loss needs the task's spec, for its quantiles")
        if logits.dim() == 1:  # a one-level head: towers squeeze their last dimension
            logits = logits.unsqueeze(-1)
        tau = torch.tensor(spec.quantiles, dtype=logits.dtype, device=logits.device)
        if logits.shape[-1] != len(tau):
            raise ValueError(
                f"task '{spec.name}': {len(tau)} quantiles but logits {list(logits.shape)}"
            )
        mask = mask.bool()
        y = torch.where(mask, y, torch.zeros_like(y))  # placeholders (NaN) never enter
        u = y.unsqueeze(-1) - logits  # [B, Q]
        per = torch.maximum(tau * u, (tau - 1.0) * u).mean(dim=-1)  # [B]
        return _masked_mean(per, mask)

    @staticmethod
    def activate(logits: Tensor) -> Tensor:
        return logits

    @staticmethod
    def metrics(
        y: np.ndarray,
        pred: np.ndarray,
        group: np.ndarray | None,
        oracle: np.ndarray | None,
        spec: TaskSpec | None = None,
    ) -> dict[str, float]:
        return metrics.quantile_metrics(y, pred, spec.quantiles if spec is not None else None)


class RankingTask:
    """Scores of the L candidates of G lists, graded relevance labels.

    ``y`` [G, L] holds relevance >= 0 with NaN for padded candidates (lists shorter than L);
    ``mask`` [G] says which lists have labels. Padded candidates and masked lists are replaced
    before any arithmetic, so their scores change neither the loss nor any gradient.

    Losses (``spec.loss``; the default is ``softmax``):

    * ``softmax``: listwise softmax cross-entropy, ``-sum_i (rel_i / sum_j rel_j) *
      log softmax(s)_i`` over a list's real candidates (the target is the relevance
      normalised to sum 1, not ListNet's softmax of it): TF-Ranking's SoftmaxLoss, analysed in
      Bruch et al., "An Analysis of the Softmax Cross Entropy Loss for Learning-to-Rank with
      Binary Relevance", ICTIR 2019. A list without a relevant candidate has no target and is
      left out.
    * ``pairwise``: RankNet (Burges et al., ICML 2005) with sigma = 1 and target 1 for each
      pair of real candidates with ``rel_i > rel_j``: ``log(1 + exp(-(s_i - s_j)))``.
      Averaged over a list's pairs; a list without such a pair is left out.

    Both are then averaged over the lists that count, so every list weighs the same.
    """

    primary = ("ndcg@10", True)

    @staticmethod
    def label_prior(labels: np.ndarray) -> float | None:
        return None

    @staticmethod
    def output_width(spec: TaskSpec) -> int:
        return 1  # one score per candidate; the candidates are the list dimension of the data

    @staticmethod
    def loss(logits: Tensor, y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        if logits.dim() != 2 or y.shape != logits.shape or mask.shape != logits.shape[:1]:
            raise ValueError(
                "ranking expects scores and relevance [lists, candidates] and a mask "
                f"[lists], got {list(logits.shape)}, {list(y.shape)}, {list(mask.shape)}"
            )
        valid = mask.bool().unsqueeze(-1) & ~torch.isnan(y)  # [G, L] real labelled candidates
        rel = torch.where(valid, y, torch.zeros_like(y))
        s = torch.where(valid, logits, torch.zeros_like(logits))
        if spec is not None and spec.resolved_loss == "pairwise":
            return _ranknet_loss(s, rel, valid)
        return _softmax_ranking_loss(s, rel, valid)

    @staticmethod
    def counted_lists(y: Tensor, mask: Tensor, spec: TaskSpec | None = None) -> Tensor:
        """[G] the lists ``loss`` averages over (its denominator): listwise, a list with some
        relevance; pairwise, a list with some ordered pair of labelled candidates. Several
        processes weigh their shards of one batch by it (``train.distributed``)."""
        valid = mask.bool().unsqueeze(-1) & ~torch.isnan(y)
        rel = torch.where(valid, y, torch.zeros_like(y))
        if spec is not None and spec.resolved_loss == "pairwise":
            return _ordered_pairs(rel, valid).flatten(1).any(1)
        return rel.sum(dim=-1) > 0

    @staticmethod
    def activate(logits: Tensor) -> Tensor:
        return logits

    @staticmethod
    def metrics(
        y: np.ndarray,
        pred: np.ndarray,
        group: np.ndarray | None,
        oracle: np.ndarray | None,
        spec: TaskSpec | None = None,
    ) -> dict[str, float]:
        """``ndcg@k``, ``mrr`` and ``n`` (lists). ``y``/``pred`` are [G, L] lists (NaN
        relevance = a pad), or one row per candidate [N] with ``group`` naming its list."""
        k = spec.k if spec is not None else 10
        y = np.asarray(y)
        if y.ndim == 2:
            return metrics.ranking_metrics(y, pred, k)
        if group is None:
            raise ValueError(
                "ranking metrics need [lists, candidates] arrays, or one row per candidate "
                "with the group column naming its list"
            )
        rel, scores = metrics.lists_from_groups(y, pred, group)
        return metrics.ranking_metrics(rel, scores, k)


def _softmax_ranking_loss(s: Tensor, rel: Tensor, valid: Tensor) -> Tensor:
    total = rel.sum(dim=-1)  # [G]
    counts = total > 0
    target = rel / torch.where(counts, total, torch.ones_like(total)).unsqueeze(-1)
    # pads are excluded from the normaliser with the lowest finite value, not -inf: a list that
    # is all pads then still has a finite logsumexp and a finite (zero) gradient
    low = torch.finfo(s.dtype).min
    lse = torch.logsumexp(s.masked_fill(~valid, low), dim=-1, keepdim=True)
    log_p = torch.where(valid, s - lse, torch.zeros_like(s))
    per_list = -(target * log_p).sum(dim=-1)
    return _masked_mean(per_list, counts)


def _ordered_pairs(rel: Tensor, valid: Tensor) -> Tensor:
    """[G, L, L]: candidate i labelled more relevant than labelled candidate j."""
    return valid.unsqueeze(-1) & valid.unsqueeze(-2) & (rel.unsqueeze(-1) > rel.unsqueeze(-2))


def _ranknet_loss(s: Tensor, rel: Tensor, valid: Tensor) -> Tensor:
    diff = s.unsqueeze(-1) - s.unsqueeze(-2)  # [G, L, L]: s_i - s_j
    pairs = _ordered_pairs(rel, valid)
    per_pair = F.softplus(-diff)  # -log sigmoid(s_i - s_j): i should be above j
    n_pairs = pairs.sum(dim=(-2, -1))  # [G]
    per_list = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum(dim=(-2, -1))
    per_list = per_list / n_pairs.clamp(min=1)
    return _masked_mean(per_list, n_pairs > 0)


TASK_TYPES: dict[str, type[TaskType]] = {
    "binary": BinaryTask,
    "regression": RegressionTask,
    "multiclass": MulticlassTask,
    "quantile": QuantileTask,
    "ranking": RankingTask,
}


def out_dim(spec: TaskSpec) -> int:
    """The width of the task's output layer: 1, ``n_classes`` or ``len(quantiles)``."""
    return TASK_TYPES[spec.type].output_width(spec)
