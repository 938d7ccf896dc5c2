"""One optimisation step under any weighting: forward, per-task losses, the weighting's
backward, optional clipping, optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shopmtl.data.dataset import Batch
from shopmtl.models.base import MultiTaskModel
from shopmtl.weighting.base import StepInfo, Weighting


class NonFiniteLossError(FloatingPointError):
    """A loss, weight or gradient norm was NaN/Inf; the optimizer was not stepped."""


@dataclass(frozen=True)
class StepOutput:
    losses: Tensor  # [T] task losses before the update (detached)
    weights: Tensor  # [T] task weights the weighting used (detached, CPU)
    grad_norm: float | None = None  # total norm before clipping, when grad_clip > 0


def weighted_backward(
    model: MultiTaskModel,
    losses: Tensor,
    weighting: Weighting,
    info: StepInfo,
    extra_loss: Tensor | None = None,
) -> Tensor:
    """Fill ``.grad`` from the [T] task losses (call ``zero_grad`` first); return the weights.

    ``extra_loss`` (e.g. ``embedding_weight_decay * model.embedding_l2()``) is added as is,
    outside the weighting.
    """
    return weighting.backward(losses, model, info, extra_loss)


def check_optimizer(optimizer: torch.optim.Optimizer, weighting: Weighting) -> None:
    """Raise when the weighting learns parameters the optimizer would never update."""
    own = [p for p in weighting.parameters() if p.requires_grad]
    if not own:
        return
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) not in known for p in own):
        raise ValueError(
            f"weighting {type(weighting).__name__} has learnable parameters the optimizer does "
            "not hold: add them with `for g in weighting.param_groups(lr): "
            "optimizer.add_param_group(g)`"
        )


def weighted_step(
    model: MultiTaskModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    weighting: Weighting,
    info: StepInfo,
    *,
    embedding_weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> StepOutput:
    """Train ``model`` on ``batch`` for one step; ``optimizer`` must also hold
    ``weighting.param_groups(lr)`` when the weighting learns parameters.

    Raises NonFiniteLossError before touching the parameters when a loss is NaN/Inf, and before
    the optimizer step when a weight or (with clipping) the gradient norm is.
    """
    check_optimizer(optimizer, weighting)
    model.train()
    weighting.train()
    logits = model(batch)
    losses = model.task_losses(logits, batch)  # [T]
    extra = None
    if embedding_weight_decay > 0:
        extra = embedding_weight_decay * model.embedding_l2()
    bad = not bool(torch.isfinite(losses).all()) or (
        extra is not None and not bool(torch.isfinite(extra))
    )
    if bad:
        detail = ", ".join(
            f"{n}={v:.4g}" for n, v in zip(model.task_names, losses.tolist(), strict=True)
        )
        raise NonFiniteLossError(f"non-finite loss ({detail})")
    optimizer.zero_grad(set_to_none=True)
    weighting.zero_grad(set_to_none=True)
    weights = weighted_backward(model, losses, weighting, info, extra)
    if not bool(torch.isfinite(weights).all()):
        raise NonFiniteLossError(f"non-finite task weights {weights.tolist()}")
    norm = None
    if grad_clip > 0:
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if not bool(torch.isfinite(total)):
            raise NonFiniteLossError("non-finite gradient norm")
        norm = float(total)
    optimizer.step()
    return StepOutput(losses.detach(), weights, norm)
