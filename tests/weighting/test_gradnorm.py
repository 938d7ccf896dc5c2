import pytest
import torch

from shopmtl.weighting import StepInfo, build_weighting
from tests.weighting._properties import (
    TASKS,
    ToyModel,
    assert_one_finite_weight_per_task,
    assert_symmetric_matches_equal,
    tiny_batch,
    tiny_model,
)


def test_symmetric_input_gives_the_equal_update_and_no_weight_change():
    w = build_weighting("gradnorm", {}, TASKS)
    weights = assert_symmetric_matches_equal(w)
    torch.testing.assert_close(weights, torch.ones(2))
    # identical gradient norms and training rates: the GradNorm loss is already minimal
    torch.testing.assert_close(w.task_weights.grad, torch.zeros(2))


def test_pinned_update():
    # theta = 1: L = [1*theta, 2*theta - 1] = [1, 1], ||grad L_i|| = [1, 2], L(0) = [1, 1]
    # G = w * n = [1, 2], target = mean(G) * r^alpha = 1.5 -> dL_grad/dw = sign(G - 1.5) * n
    w = build_weighting("gradnorm", {"alpha": 1.5}, TASKS)
    toy = ToyModel([1.0])
    info = StepInfo(initial_losses=torch.tensor([1.0, 1.0]))
    weights = w.backward(toy.losses([[1.0], [2.0]], [0.0, -1.0]), toy, info)
    assert weights.tolist() == [1.0, 1.0]
    torch.testing.assert_close(toy.theta.grad, torch.tensor([3.0]))  # w1 * 1 + w2 * 2
    torch.testing.assert_close(w.task_weights.grad, torch.tensor([-1.0, 2.0]))
    torch.optim.SGD(w.parameters(), lr=0.1).step()  # w = [1.1, 0.8]
    # renormalised to sum T = 2 before the next use: [2.2, 1.6] / 1.9
    expected = [2.2 / 1.9, 1.6 / 1.9]
    assert w.current_weights().tolist() == pytest.approx(expected, abs=1e-6)
    toy.zero_grad()
    again = w.backward(toy.losses([[1.0], [2.0]], [0.0, -1.0]), toy, info)
    assert again.tolist() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(toy.theta.grad, torch.tensor([(2.2 + 3.2) / 1.9]))


def test_training_rate_raises_the_target_of_the_slow_task():
    # equal norms; task 0 has kept all of its initial loss (r_0 > 1): its weight must go up
    w = build_weighting("gradnorm", {"alpha": 1.0}, TASKS)
    toy = ToyModel([1.0])
    info = StepInfo(initial_losses=torch.tensor([1.0, 2.0]))
    w.backward(toy.losses([[1.0], [1.0]]), toy, info)  # L = [1, 1]: Lt = [1, 0.5]
    g = w.task_weights.grad
    assert g[0] < 0 < g[1]  # gradient descent raises w_0, lowers w_1


def test_records_its_own_initial_losses_when_the_trainer_does_not():
    w = build_weighting("gradnorm", {}, TASKS)
    toy = ToyModel([1.0])
    w.backward(toy.losses([[1.0], [2.0]], [0.0, 1.0]), toy, StepInfo())
    assert w.initial_losses.tolist() == [1.0, 3.0]
    assert bool(w.has_initial)
    state = w.state_dict()
    assert {"task_weights", "initial_losses", "has_initial"} <= set(state)


def test_weights_renormalise_to_task_count_during_training():
    from shopmtl.train.loop import Loop, Schedule
    from tests.train.test_loop import BatchSource, LossSelector

    model, batch = tiny_model(), tiny_batch()
    w = build_weighting("gradnorm", {"lr": 0.2}, TASKS)
    source = BatchSource(batch, l2=0.0)
    loop = Loop(model, [source], w, Schedule(steps=12, lr=1e-2), LossSelector())
    loop.train_mode()
    seen = []
    for _ in range(12):
        loop.step(source, next(source.batches(0, 0)))
        loop.state.step += 1
        assert_one_finite_weight_per_task(w.last_weights, 2)
        assert w.last_weights.sum().item() == pytest.approx(2.0, abs=1e-5)
        seen.append(w.last_weights)
    assert w.current_weights().sum().item() == pytest.approx(2.0, abs=1e-5)
    assert not torch.allclose(seen[0], seen[-1])  # the weights did move
    assert (w.current_weights() > 0).all()
