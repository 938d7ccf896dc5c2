"""What every joint-optimisation method implements.

Two families:

* ``LossWeighting``: the update is the gradient of one scalar, ``sum_i w_i L_i (+ a
  regulariser)``. Subclasses say how ``weights`` are chosen (static, learned, from loss history,
  random); ``combine`` builds the scalar and ``backward`` differentiates it.
* ``GradientWeighting``: the method needs per-task gradients (GradNorm, UPGrad, MGDA, ...), so
  ``backward`` runs the backward pass(es) itself and fills ``.grad`` of the model parameters.

Both expose ``backward(losses, model, info, extra_loss=None) -> Tensor[T]`` (the task weights
used, detached), so a training step never needs to know which family it runs. A weighting is an
``nn.Module``: learned weights (uncertainty log-variances, GradNorm weights) are parameters the
trainer adds to its optimizer through ``param_groups``, and any state goes into ``state_dict``
so checkpoints can carry it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class SharedModel(Protocol):
    """What a gradient method needs from a model: all parameters and the shared ones."""

    def parameters(self) -> Iterable[nn.Parameter]: ...

    def shared_parameters(self) -> list[nn.Parameter]: ...


@dataclass(frozen=True, eq=False)
class StepInfo:
    """Where training stands when a step is made (what history-based weightings read).

    step: global step index (0-based) of the update being made.
    epoch: epoch in progress (0-based).
    initial_losses: [T] task losses of the first training step, when the trainer recorded them
        (GradNorm's L_i(0)); GradNorm records its own first losses when this is None.
    prev_epoch_losses: [T] mean training loss of every finished epoch, oldest first (DWA).
    present: [T] bool, the tasks this batch has (a joint run's batch comes from one source and
        carries only its tasks); None: every task. An absent task's loss is a constant 0: a
        loss weighting gives it weight 0 and no regulariser term; a gradient method, which
        needs every task's gradient at one point, refuses such a step.
    """

    step: int = 0
    epoch: int = 0
    initial_losses: Tensor | None = None
    prev_epoch_losses: tuple[Tensor, ...] = field(default=())
    present: Tensor | None = None

    @staticmethod
    def from_history(
        step: int,
        epoch: int,
        history: Sequence[Mapping[str, Any]],
        task_names: Sequence[str],
        initial_losses: Sequence[float] | Tensor | None = None,
    ) -> StepInfo:
        """Build from the trainer's per-epoch records (each with a ``train_loss`` task -> float
        mapping), so a resumed run sees the same history as an uninterrupted one."""
        prev = tuple(
            torch.tensor([float(rec["train_loss"][n]) for n in task_names]) for rec in history
        )
        init = None if initial_losses is None else torch.as_tensor(initial_losses).float()
        return StepInfo(step, epoch, init, prev)


class Weighting(nn.Module):
    """Common base: task names, the last weights used, optimizer parameter groups."""

    #: True when ``backward`` needs per-task gradients (costs ~T extra backward passes).
    needs_gradients: bool = False

    def __init__(self, task_names: Sequence[str], lr: float | None = None) -> None:
        super().__init__()
        if not task_names:
            raise ValueError("a weighting needs at least one task")
        self.task_names = tuple(task_names)
        self.lr = lr
        #: the [T] weights of the last step (detached, on the CPU), for logging
        self.last_weights = torch.ones(len(self.task_names))

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def param_groups(self, default_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the weighting's own learnable parameters (none for
        most methods): add them with ``optimizer.add_param_group`` before loading a checkpoint.
        No weight decay: decaying log-variances or loss weights would bias them."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        lr = default_lr if self.lr is None else self.lr
        return [{"params": params, "lr": lr, "weight_decay": 0.0}]

    def backward(
        self,
        losses: Tensor,
        model: SharedModel,
        info: StepInfo,
        extra_loss: Tensor | None = None,
    ) -> Tensor:  # pragma: no cover - abstract
        """Fill ``.grad`` of the model (and weighting) parameters; return the [T] weights used.

        ``extra_loss`` (e.g. the sparse embedding L2) is added with weight 1, outside the
        weighting. ``.grad`` is accumulated into, as ``Tensor.backward`` does: zero it first.
        """
        raise NotImplementedError

    def _check(self, losses: Tensor, info: StepInfo | None = None) -> None:
        if self.needs_gradients and info is not None and info.present is not None \
                and not bool(info.present.all()):
            absent = [t for t, p in zip(self.task_names, info.present.tolist(), strict=True)
                      if not p]
            raise ValueError(f"{type(self).__name__} needs every task's gradient on one batch, "
                             f"but this batch has no {absent}: use a loss weighting")
        if losses.ndim != 1 or losses.shape[0] != self.num_tasks:
            raise ValueError(
                f"expected one loss per task ({self.num_tasks}: {list(self.task_names)}), "
                f"got shape {tuple(losses.shape)}"
            )

    def _remember(self, weights: Tensor) -> Tensor:
        self.last_weights = weights.detach().float().cpu().clone()
        return self.last_weights


class LossWeighting(Weighting):
    """``sum_i w_i L_i + regulariser``: one backward pass."""

    def weights(self, losses: Tensor, info: StepInfo) -> Tensor:  # pragma: no cover - abstract
        """[T] weights for these losses (may carry gradient to the weighting's parameters)."""
        raise NotImplementedError

    def regularizer(self, present: Tensor | None = None) -> Tensor | None:
        """A term added to the combined loss (learned weightings), over the ``present`` tasks
        only; None for most."""
        return None

    def combine(self, losses: Tensor, info: StepInfo) -> Tensor:
        """The scalar to differentiate."""
        self._check(losses)
        w = self.weights(losses, info).to(losses)
        if info.present is not None:
            w = w * info.present.to(w)
        total = (w * losses).sum()
        reg = self.regularizer(info.present)
        if reg is not None:
            total = total + reg
        self._remember(w)
        return total

    def backward(
        self,
        losses: Tensor,
        model: SharedModel,
        info: StepInfo,
        extra_loss: Tensor | None = None,
    ) -> Tensor:
        total = self.combine(losses, info)
        if extra_loss is not None:
            total = total + extra_loss
        total.backward()
        return self.last_weights.clone()


class GradientWeighting(Weighting):
    """A method that looks at per-task gradients on ``model.shared_parameters()``; its
    ``backward`` runs the backward pass(es) itself."""

    needs_gradients = True

    def backward(
        self,
        losses: Tensor,
        model: SharedModel,
        info: StepInfo,
        extra_loss: Tensor | None = None,
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def split_parameters(model: SharedModel) -> tuple[list[Tensor], list[Tensor]]:
    """(shared dense parameters, every other trainable parameter) of a model, each once."""
    shared = [p for p in _unique(model.shared_parameters()) if p.requires_grad]
    if not shared:
        raise ValueError("the model reports no trainable shared parameters")
    ids = {id(p) for p in shared}
    rest = [p for p in _unique(model.parameters()) if p.requires_grad and id(p) not in ids]
    return shared, rest


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
