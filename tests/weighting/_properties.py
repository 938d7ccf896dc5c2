"""Reusable fixtures and assertions for the weighting tests: a tiny SharedBottom and batch
(built directly, no files), a symmetric variant (identical towers and labels, so every task has
the same loss and gradient), a toy model whose task gradients are set by hand, and the property
checks every weighting must pass."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec
from shopmtl.models.shared_bottom import SharedBottom, SharedBottomConfig
from shopmtl.weighting import (
    StepInfo,
    Weighting,
    build_weighting,
    split_parameters,
)

TASKS = ("click", "conversion")


def tiny_schema(tasks: Sequence[str] = TASKS) -> Schema:
    return Schema(
        features=(
            FeatureSpec("user", "categorical"),
            FeatureSpec("item", "categorical"),
            FeatureSpec("price", "numeric"),
            FeatureSpec("hist", "sequence", max_len=3, vocab_from="item"),
        ),
        tasks=tuple(TaskSpec(t) for t in tasks),
        scenario=ScenarioSpec("scenario", ("feed", "search")),
    )


def tiny_model(
    seed: int = 0, interaction: str = "cross", tasks: Sequence[str] = TASKS
) -> SharedBottom:
    torch.manual_seed(seed)
    # no input BatchNorm: the cases below rely on logits that hardly depend on the input at
    # initialisation (a clean gradient conflict), which batch statistics would rescale
    cfg = SharedBottomConfig(embed_dim=4, interaction=interaction, bottom=(8,), tower=(4,),
                             input_norm="none")
    return SharedBottom(tiny_schema(tasks), {"user": 12, "item": 9}, cfg)


def tiny_batch(n: int = 48, seed: int = 0, num_tasks: int = len(TASKS)) -> Batch:
    """Labels follow the user id (learnable); conversion is masked on a third of the rows."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack(
        [torch.randint(1, 12, (n,), generator=g), torch.randint(1, 9, (n,), generator=g)], 1
    )
    seq = torch.randint(0, 9, (n, 1, 3), generator=g)
    click = (cat[:, 0] % 2 == 0).float()
    labels = torch.stack([click, ((cat[:, 1] + cat[:, 0]) % 3 == 0).float()], 1)
    labels = torch.cat([labels] * num_tasks, 1)[:, :num_tasks]
    mask = torch.ones(n, num_tasks, dtype=torch.bool)
    if num_tasks > 1:
        mask[: n // 3, 1] = False
    return Batch(
        cat=cat,
        num=torch.randn(n, 1, generator=g),
        seq=seq,
        scenario=torch.randint(0, 2, (n,), generator=g),
        labels=labels,
        mask=mask,
    )


def symmetric_case(seed: int = 0) -> tuple[SharedBottom, Batch]:
    """Two tasks with identical towers, labels and masks: identical losses and gradients."""
    model = tiny_model(seed)
    towers = list(model.towers.values())
    towers[1].load_state_dict(copy.deepcopy(towers[0].state_dict()))
    batch = tiny_batch(seed=seed)
    batch.labels[:, 1] = batch.labels[:, 0]
    batch.mask[:, 1] = batch.mask[:, 0]
    return model, batch


def conflicting_case(seed: int = 0) -> tuple[SharedBottom, Batch]:
    """Identical towers; one task's labels are all 1, the other's mostly 0: one task pushes the
    logits up, the other down, so their gradients on the shared layers conflict (cosine near
    -1 at initialisation, where the logits hardly depend on the input)."""
    model, batch = symmetric_case(seed)
    batch.labels[:, 0] = 1.0
    batch.labels[:, 1] = (torch.arange(len(batch)) % 4 == 0).float()
    return model, batch


class ToyModel(nn.Module):
    """L_i = a_i . theta + c_i with theta the only (shared) parameter: the Jacobian is A."""

    def __init__(self, theta: Sequence[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float32))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.theta]

    def losses(self, a: Sequence[Sequence[float]], c: Sequence[float] | None = None) -> Tensor:
        out = torch.tensor(a, dtype=torch.float32) @ self.theta
        return out if c is None else out + torch.tensor(c, dtype=torch.float32)


def make(name: str, task_names: Sequence[str] = TASKS, **args: object) -> Weighting:
    """build_weighting with keyword args."""
    return build_weighting(name, args, task_names)


def grads_after(
    weighting: Weighting,
    model: nn.Module,
    batch: Batch,
    info: StepInfo | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Run the weighting's backward once; return ({param name: grad}, weights)."""
    model.zero_grad(set_to_none=True)
    losses = model.task_losses(model(batch), batch)
    weights = weighting.backward(losses, model, info or StepInfo())
    grads = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
    }
    return grads, weights


def assert_one_finite_weight_per_task(weights: Tensor, num_tasks: int) -> None:
    assert isinstance(weights, Tensor)
    assert weights.shape == (num_tasks,), weights.shape
    assert torch.isfinite(weights).all(), weights
    assert not weights.requires_grad


def shared_names(model: nn.Module) -> set[str]:
    ids = {id(p) for p in split_parameters(model)[0]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def assert_symmetric_matches_equal(
    weighting: Weighting, exact: bool = True, info: StepInfo | None = None
) -> Tensor:
    """On identical task losses and gradients the update is the equal weighting's: exactly
    (``exact``: weights of 1) or, for methods whose scale differs (aggregators, random weights),
    along the same direction for every parameter tensor."""
    model, batch = symmetric_case()
    ref_model = copy.deepcopy(model)
    ref, _ = grads_after(build_weighting("equal", {}, TASKS), ref_model, batch, info)
    got, weights = grads_after(weighting, model, batch, info)
    assert_one_finite_weight_per_task(weights, len(TASKS))
    for name, g in got.items():
        if exact:
            torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)
        elif ref[name].abs().max() > 1e-8:
            assert cosine(g, ref[name]) > 0.999, name
    return weights
