"""Gradient-conflict diagnostics: cosine similarity of the task gradients on shared parameters.

A negative entry means two tasks pull the shared layers in opposing directions (the situation
PCGrad/UPGrad/MGDA are designed for). Pure functions: no ``.grad`` is touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def gradient_cosine(jacobian: Tensor, eps: float = 1e-12) -> Tensor:
    """[T, T] cosine similarities of the rows of a [T, P] Jacobian (rows are task gradients).

    An entry involving a zero gradient (a task with no labels in the batch) is NaN: the angle is
    undefined, and 0 would read as "orthogonal".
    """
    if jacobian.ndim != 2:
        raise ValueError(f"expected a [T, P] matrix, got shape {tuple(jacobian.shape)}")
    j = jacobian.detach().double()
    norms = torch.linalg.vector_norm(j, dim=1)
    gram = j @ j.T
    cos = gram / (norms[:, None] * norms[None, :]).clamp(min=eps)
    cos = cos.clamp(-1.0, 1.0)
    zero = norms <= eps
    cos[zero, :] = float("nan")
    cos[:, zero] = float("nan")
    return cos.to(jacobian.dtype if jacobian.is_floating_point() else torch.float32)


def task_jacobian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """[T, P] gradients of each loss w.r.t. ``params`` (flattened, concatenated); the graph is
    kept, so a training backward can follow."""
    rows = []
    params = list(params)
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def task_gradient_cosine(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """[T, T] cosine similarity of the task gradients of ``losses`` ([T]) on ``params`` (e.g.
    ``model.shared_parameters()``). Costs T backward passes; the graph is kept."""
    return gradient_cosine(task_jacobian(losses, params))
