import math

import pytest
import torch

from shopmtl.weighting import StepInfo, build_weighting
from shopmtl.weighting import rlw as rlw_module
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    assert_symmetric_matches_equal,
)


def test_symmetric_input_moves_along_the_equal_direction():
    assert_symmetric_matches_equal(build_weighting("rlw", {}, TASKS), exact=False)


def test_pinned_value(monkeypatch):
    # z = [0, ln 3] -> softmax = [1/4, 3/4] -> times T = 2: [0.5, 1.5]
    monkeypatch.setattr(
        rlw_module, "rlw_logits", lambda seed, step, t: torch.tensor([0.0, math.log(3)])
    )
    w = build_weighting("rlw", {}, TASKS)
    assert w.weights(torch.ones(2), StepInfo()).tolist() == pytest.approx([0.5, 1.5])


def test_weights_are_a_function_of_seed_and_step_and_average_to_one():
    a = build_weighting("rlw", {"seed": 3}, TASKS)
    b = build_weighting("rlw", {"seed": 3}, TASKS)
    losses = torch.ones(2)
    draws = torch.stack([a.weights(losses, StepInfo(step=s)) for s in range(2000)])
    assert_one_finite_weight_per_task(draws[0], 2)
    torch.testing.assert_close(draws[7], b.weights(losses, StepInfo(step=7)))
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.sum(1), torch.full((2000,), 2.0))
    assert draws.mean(0).tolist() == pytest.approx([1.0, 1.0], abs=0.05)
    assert (draws > 0).all()
