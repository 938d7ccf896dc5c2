import math

import torch

from shopmtl.weighting import gradient_cosine, task_gradient_cosine
from tests.weighting._properties import ToyModel, conflicting_case, symmetric_case


def test_pinned_cosines_and_undefined_zero_rows():
    jac = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cos = gradient_cosine(jac)
    assert cos.shape == (5, 5)
    s = 1 / math.sqrt(2)
    expected = torch.tensor(
        [[1.0, 0.0, -1.0, s], [0.0, 1.0, 0.0, s], [-1.0, 0.0, 1.0, -s], [s, s, -s, 1.0]]
    )
    torch.testing.assert_close(cos[:4, :4], expected)
    assert torch.isnan(cos[4]).all() and torch.isnan(cos[:, 4]).all()


def test_task_gradient_cosine_on_a_toy_model_touches_no_grad():
    toy = ToyModel([0.5, 0.5])
    losses = toy.losses([[1.0, 0.0], [1.0, 1.0]])
    cos = task_gradient_cosine(losses, toy.shared_parameters())
    assert cos[0, 1].item() == torch.tensor(1 / math.sqrt(2)).item()
    assert toy.theta.grad is None
    losses.sum().backward()  # the graph was kept for the training backward
    assert toy.theta.grad is not None


def test_identical_tasks_give_ones_and_conflicting_tasks_negative():
    model, batch = symmetric_case()
    losses = model.task_losses(model(batch), batch)
    cos = task_gradient_cosine(losses, model.shared_parameters())
    torch.testing.assert_close(cos, torch.ones(2, 2), rtol=0, atol=1e-5)
    model, batch = conflicting_case()
    losses = model.task_losses(model(batch), batch)
    cos = task_gradient_cosine(losses, model.shared_parameters())
    assert cos[0, 1] < -0.5 and cos[0, 1] == cos[1, 0]
