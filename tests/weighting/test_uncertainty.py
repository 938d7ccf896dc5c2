import math

import pytest
import torch

from shopmtl.weighting import StepInfo, build_weighting
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    assert_symmetric_matches_equal,
    grads_after,
    tiny_batch,
    tiny_model,
)


def test_starts_as_equal_weighting_on_symmetric_input():
    weights = assert_symmetric_matches_equal(build_weighting("uncertainty", {}, TASKS))
    assert weights.tolist() == [1.0, 1.0]


def test_pinned_value_and_gradient():
    # s = [0, ln 2], L = [1, 3]: exp(0)*1 + exp(-ln 2)*3 + (0 + ln 2)/2 = 2.5 + ln(2)/2
    w = build_weighting("uncertainty", {}, TASKS)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    total = w.combine(torch.tensor([1.0, 3.0]), StepInfo())
    assert total.item() == pytest.approx(2.5 + math.log(2.0) / 2, abs=1e-6)
    total.backward()
    # d/ds_i = -exp(-s_i) L_i + 1/2 = [-0.5, -1.0]
    torch.testing.assert_close(w.log_vars.grad, torch.tensor([-0.5, -1.0]))
    torch.testing.assert_close(w.last_weights, torch.tensor([1.0, 0.5]))


def test_log_variances_receive_gradients_through_backward():
    w = build_weighting("uncertainty", {"init": 0.3}, TASKS)
    model = tiny_model()
    _, weights = grads_after(w, model, tiny_batch())
    assert_one_finite_weight_per_task(weights, 2)
    assert w.log_vars.grad is not None
    assert torch.isfinite(w.log_vars.grad).all() and w.log_vars.grad.abs().sum() > 0
    torch.testing.assert_close(weights, torch.full((2,), math.exp(-0.3)))


def test_param_groups_carry_the_log_variances_without_weight_decay():
    w = build_weighting("uncertainty", {"lr": 0.05}, TASKS)
    (group,) = w.param_groups(1e-3)
    assert group["params"] == [w.log_vars]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.0
    assert "log_vars" in w.state_dict()
