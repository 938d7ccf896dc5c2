import pytest
import torch

from shopmtl.config import ConfigError
from shopmtl.weighting import StepInfo, build_weighting
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    assert_symmetric_matches_equal,
)


def test_equal_weights_are_ones_and_combine_is_the_sum():
    w = build_weighting("equal", {}, TASKS)
    losses = torch.tensor([0.7, 0.2])
    assert_one_finite_weight_per_task(w.weights(losses, StepInfo()).detach(), 2)
    assert w.combine(losses, StepInfo()).item() == pytest.approx(0.9)


@pytest.mark.parametrize("name", ["equal", "static"])
def test_symmetric_input_gives_the_equal_update(name):
    weights = assert_symmetric_matches_equal(build_weighting(name, {}, TASKS))
    assert weights.tolist() == [1.0, 1.0]


def test_static_pinned_value():
    # 2 * 1.5 + 1 * 4 = 7 (conversion defaults to 1)
    w = build_weighting("static", {"alpha": {"click": 2.0}}, TASKS)
    assert w.combine(torch.tensor([1.5, 4.0]), StepInfo()).item() == pytest.approx(7.0)
    assert w.last_weights.tolist() == [2.0, 1.0]


def test_static_rejects_unknown_task_and_negative_weight():
    with pytest.raises(ConfigError, match="unknown task"):
        build_weighting("static", {"alpha": {"clicks": 1.0}}, TASKS)
    with pytest.raises(ConfigError, match=">= 0"):
        build_weighting("static", {"alpha": {"click": -1.0}}, TASKS)


def test_wrong_number_of_losses_is_an_error():
    w = build_weighting("equal", {}, TASKS)
    with pytest.raises(ValueError, match="one loss per task"):
        w.combine(torch.tensor([1.0, 2.0, 3.0]), StepInfo())
