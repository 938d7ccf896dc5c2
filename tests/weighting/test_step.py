"""weighted_step: a tiny SharedBottom trained for a few steps with every weighting."""

import copy

import pytest
import torch

from shopmtl.weighting import WEIGHTINGS, StepInfo, build_weighting, weighted_step
from shopmtl.weighting.step import NonFiniteLossError
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    make,
    tiny_batch,
    tiny_model,
)

STEPS_PER_EPOCH = 8
EPOCHS = 3


def total_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model.task_losses(model(batch), batch).sum().item()


def train(name, model, batch, **args):
    w = make(name, **args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for group in w.param_groups(1e-2):
        opt.add_param_group(group)
    history, first, step = [], None, 0
    for epoch in range(EPOCHS):
        sums = torch.zeros(len(TASKS))
        for _ in range(STEPS_PER_EPOCH):
            hist = [{"train_loss": dict(zip(TASKS, h.tolist(), strict=True))} for h in history]
            info = StepInfo.from_history(step, epoch, hist, TASKS, first)
            out = weighted_step(model, opt, batch, w, info, embedding_weight_decay=1e-5)
            assert_one_finite_weight_per_task(out.weights, len(TASKS))
            first = out.losses if first is None else first
            sums += out.losses
            step += 1
        history.append(sums / STEPS_PER_EPOCH)
    return w, history


@pytest.mark.parametrize("name", sorted(set(WEIGHTINGS) - {"cagrad", "nash_mtl"}))  # extra
def test_training_decreases_the_loss(name):
    model, batch = tiny_model(interaction="dot"), tiny_batch()
    before = total_loss(model, batch)
    w, _ = train(name, model, batch)
    after = total_loss(model, batch)
    assert after < 0.95 * before, (name, before, after)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name == "dwa":  # from the third epoch on the weights follow the loss ratios
        assert not torch.allclose(w.last_weights, torch.ones(2))


def test_learned_weighting_parameters_must_be_in_the_optimizer():
    model, batch = tiny_model(), tiny_batch()
    w = build_weighting("uncertainty", {}, TASKS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="param_groups"):
        weighted_step(model, opt, batch, w, StepInfo())
    for group in w.param_groups(1e-2):
        opt.add_param_group(group)
    before = w.log_vars.detach().clone()
    weighted_step(model, opt, batch, w, StepInfo())
    assert not torch.equal(before, w.log_vars.detach())


def test_non_finite_loss_stops_before_touching_the_parameters():
    model, batch = tiny_model(), tiny_batch()
    batch.labels[0, 0] = float("nan")
    state = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(NonFiniteLossError, match="click=nan"):
        weighted_step(model, opt, batch, build_weighting("equal", {}, TASKS), StepInfo())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_equal_step_matches_the_plain_summed_loss_step():
    """``equal`` reproduces the trainer's current step (sum of losses + embedding L2, clip)."""
    model, batch = tiny_model(), tiny_batch()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for step in range(3):
        out = weighted_step(
            model, opt, batch, build_weighting("equal", {}, TASKS), StepInfo(step=step),
            embedding_weight_decay=1e-3, grad_clip=0.5,
        )  # fmt: skip
        ref.train()
        losses = ref.task_losses(ref(batch), batch)
        ref_opt.zero_grad(set_to_none=True)
        (losses.sum() + 1e-3 * ref.embedding_l2()).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        torch.testing.assert_close(out.losses, losses.detach())
        assert out.grad_norm == pytest.approx(float(norm))
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)
