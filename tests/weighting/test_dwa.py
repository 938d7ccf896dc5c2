import math

import pytest
import torch

from shopmtl.weighting import StepInfo, build_weighting
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    assert_symmetric_matches_equal,
)


def info(*epochs):
    return StepInfo(step=10, epoch=len(epochs), prev_epoch_losses=tuple(map(torch.tensor, epochs)))


def test_equal_until_two_epochs_have_finished():
    w = build_weighting("dwa", {}, TASKS)
    losses = torch.tensor([0.5, 0.1])
    for i in (info(), info([1.0, 2.0])):
        assert w.weights(losses, i).tolist() == [1.0, 1.0]


def test_symmetric_history_gives_the_equal_update():
    weights = assert_symmetric_matches_equal(
        build_weighting("dwa", {}, TASKS), info=info([0.9, 0.9], [0.6, 0.6])
    )
    torch.testing.assert_close(weights, torch.ones(2))


def test_pinned_value():
    # r = L(e-1) / L(e-2) = [1/2, 2/2]; tau = 2; w = 2 softmax([0.25, 0.5])
    w = build_weighting("dwa", {"temperature": 2.0}, TASKS)
    got = w.weights(torch.tensor([0.3, 0.3]), info([2.0, 2.0], [1.0, 2.0]))
    a, b = math.exp(0.25), math.exp(0.5)
    assert got.tolist() == pytest.approx([2 * a / (a + b), 2 * b / (a + b)], abs=1e-6)
    assert got.tolist() == pytest.approx([0.875647, 1.124353], abs=1e-6)
    assert_one_finite_weight_per_task(got, 2)


def test_only_the_last_two_epochs_count_and_a_label_free_epoch_is_neutral():
    w = build_weighting("dwa", {}, TASKS)
    got = w.weights(torch.ones(2), info([9.0, 9.0], [2.0, 0.0], [1.0, 0.0]))
    a, b = math.exp(0.25), math.exp(0.5)  # r = [0.5, 1 (0/0 -> no change)]
    assert got.tolist() == pytest.approx([2 * a / (a + b), 2 * b / (a + b)], abs=1e-6)


def test_from_history_reads_trainer_records():
    hist = [
        {"train_loss": {"click": 2.0, "conversion": 2.0}},
        {"train_loss": {"click": 1.0, "conversion": 2.0}},
    ]
    i = StepInfo.from_history(5, 2, hist, TASKS, initial_losses=[0.7, 0.7])
    assert [t.tolist() for t in i.prev_epoch_losses] == [[2.0, 2.0], [1.0, 2.0]]
    assert i.initial_losses.tolist() == pytest.approx([0.7, 0.7])
    got = build_weighting("dwa", {}, TASKS).weights(torch.ones(2), i)
    assert got.tolist() == pytest.approx([0.875647, 1.124353], abs=1e-6)
