"""Adversarial training on the embedding table: FGM (Miyato, Dai & Goodfellow, "Adversarial
Training Methods for Semi-Supervised Text Classification", ICLR 2017).

After the normal backward has filled ``table.grad = g``, the table is moved to
``table + r`` with ``r = epsilon * g / ||g||`` (only the rows the batch looked up have a
non-zero gradient, so only they move), the weighted task loss is recomputed there and its
gradient is accumulated into ``.grad``; the table is then restored bit for bit before the
optimizer steps. The update is therefore the gradient of ``L(theta) + L(theta + r)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from shopmtl.config import ConfigError
from shopmtl.data.dataset import Batch
from shopmtl.models.base import MultiTaskModel


@contextmanager
def fgm_perturbation(weight: Tensor, epsilon: float) -> Iterator[bool]:
    """Inside the block ``weight`` is moved by ``epsilon * g / ||g||`` (g = ``weight.grad``);
    on exit the moved rows are restored exactly. Yields False (and moves nothing) when there
    is no usable gradient (None, zero or non-finite)."""
    g = weight.grad
    norm = None if g is None else torch.linalg.vector_norm(g.detach())
    if norm is None or not (torch.isfinite(norm) and norm > 0):
        yield False  # (not inside no_grad: the caller's block keeps its grad mode)
        return
    with torch.no_grad():
        rows = g.ne(0).any(dim=1).nonzero().squeeze(1)  # the rows the batch touched
        saved = weight[rows].clone()
        weight[rows] += (epsilon / norm) * g[rows]
    try:
        yield True
    finally:
        with torch.no_grad():
            weight[rows] = saved


def fgm_backward(
    model: MultiTaskModel, batch: Batch, task_weights: Tensor, epsilon: float
) -> Tensor | None:
    """Accumulate the gradient of ``sum_i task_weights_i * L_i`` at the FGM-perturbed embedding
    table into ``.grad`` (call after the normal backward, before the optimizer step).

    ``task_weights`` ([T], detached) are the weights the normal step used (alpha x the
    weighting's), so the adversarial term is weighted like the clean one; the weighting itself
    is not consulted again (no second sample of random weights, no state update). Buffers (e.g.
    running moments) are left as the clean forward left them. Returns the adversarial task
    losses [T] (detached), or None when there was no gradient to perturb along.
    """
    if not epsilon > 0:
        raise ConfigError(f"train.adversarial_epsilon: must be > 0, got {epsilon}")
    table = model.embed.table.weight
    # every buffer, integer ones too (BatchNorm's num_batches_tracked counts forwards)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with fgm_perturbation(table, epsilon) as moved:
        if not moved:
            return None
        losses = model.task_losses(model(batch), batch)  # [T]
        if torch.isfinite(losses).all():
            (task_weights.detach().to(losses) * losses).sum().backward()
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    return losses.detach()
