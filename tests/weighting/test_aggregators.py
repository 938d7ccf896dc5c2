"""TorchJD aggregators on the shared dense parameters: embeddings get the summed gradient,
towers their own task's gradient."""

import copy

import pytest
import torch

from shopmtl.weighting import StepInfo, build_weighting
from shopmtl.weighting.aggregators import MissingDependencyError
from shopmtl.weighting.diagnostics import task_jacobian
from tests.weighting._properties import (
    TASKS,
    ToyModel,
    assert_one_finite_weight_per_task,
    assert_symmetric_matches_equal,
    conflicting_case,
    cosine,
    grads_after,
    make,
    shared_names,
    symmetric_case,
    tiny_batch,
    tiny_model,
)

AGGREGATORS = ["upgrad", "mgda", "pcgrad", "imtl_g", "aligned_mtl"]  # cagrad/nash_mtl: extra
# the mean of two identical rows g is g; PCGrad (no conflict) sums them: 2g
SCALE_ON_IDENTICAL = {"pcgrad": 1.0}


@pytest.mark.parametrize("name", AGGREGATORS)
def test_identical_task_gradients_give_the_mean_or_sum(name):
    w = make(name)
    toy = ToyModel([0.3, -0.2])
    weights = w.backward(toy.losses([[1.0, 2.0], [1.0, 2.0]]), toy, StepInfo())
    assert_one_finite_weight_per_task(weights, 2)
    mean = torch.tensor([1.0, 2.0])
    got = toy.theta.grad
    assert torch.allclose(got, mean, atol=1e-3) or torch.allclose(got, 2 * mean, atol=1e-3), got


@pytest.mark.parametrize("name", AGGREGATORS)
def test_symmetric_model_moves_along_the_equal_direction(name):
    w = make(name)
    assert_symmetric_matches_equal(w, exact=False)
    # beyond the direction: everything but the shared layers is exactly the summed gradient
    model, batch = symmetric_case()
    ref, _ = grads_after(build_weighting("equal", {}, TASKS), copy.deepcopy(model), batch)
    got, _ = grads_after(make(name), model, batch)
    for n in set(got) - shared_names(model):
        torch.testing.assert_close(got[n], ref[n], msg=n)


@pytest.mark.parametrize(
    ("name", "jacobian", "expected"),
    [
        # rows g1 = [1, 0], g2 = [-1, 1] conflict; each projected onto the other's half-space:
        # [0.5, 0.5] and [0, 1]; UPGrad averages, PCGrad sums
        ("upgrad", [[1.0, 0.0], [-1.0, 1.0]], [0.25, 0.75]),
        ("pcgrad", [[1.0, 0.0], [-1.0, 1.0]], [0.5, 1.5]),
        # min-norm point of the segment between [1, 0] and [0, 1]
        ("mgda", [[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
        # IMTL-G: equal projections on the unit task directions: d = [2/3, 2/3]
        ("imtl_g", [[1.0, 0.0], [0.0, 2.0]], [2 / 3, 2 / 3]),
        # Aligned-MTL: orthogonal rows rescaled to the smallest singular value (1), averaged
        ("aligned_mtl", [[1.0, 0.0], [0.0, 2.0]], [0.5, 0.5]),
    ],
)
def test_pinned_aggregation(name, jacobian, expected):
    w = make(name)
    toy = ToyModel([0.0, 0.0])
    w.backward(toy.losses(jacobian), toy, StepInfo())
    assert toy.theta.grad.tolist() == pytest.approx(expected, abs=2e-3)


def test_upgrad_never_opposes_a_task_on_conflicting_gradients():
    toy = ToyModel([0.0, 0.0, 0.0])
    jac = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    make("upgrad").backward(toy.losses(jac.tolist()), toy, StepInfo())
    assert (jac @ toy.theta.grad >= -1e-6).all()
    assert toy.theta.grad.tolist() == pytest.approx([0.2929, 1.9004, 1.9004], abs=1e-3)


def test_upgrad_on_a_model_with_conflicting_tasks():
    model, batch = conflicting_case()
    losses = model.task_losses(model(batch), batch)
    shared = model.shared_parameters()
    jac = task_jacobian(losses, shared)
    assert cosine(jac[0], jac[1]) < -0.5  # the case really conflicts
    model.zero_grad()
    make("upgrad").backward(losses, model, StepInfo())
    update = torch.cat([p.grad.flatten() for p in shared])
    assert (jac @ update > 0).all()
    # the summed gradient, by contrast, opposes one of the tasks
    assert (jac @ jac.sum(0)).min() < 0


@pytest.mark.parametrize("name", ["upgrad", "mgda"])
def test_gradient_partition_on_shared_bottom(name):
    """Towers: own task's gradient; embeddings: the summed gradient; shared: aggregate(J)."""
    model, batch = tiny_model(interaction="cross"), tiny_batch()
    losses = model.task_losses(model(batch), batch)
    params = dict(model.named_parameters())
    per_task = [
        dict(
            zip(
                params,
                torch.autograd.grad(
                    losses[i], list(params.values()), retain_graph=True, allow_unused=True
                ),
                strict=True,
            )
        )
        for i in range(2)
    ]
    shared = shared_names(model)
    jac = task_jacobian(losses, [params[n] for n in sorted(shared)])
    w = make(name)
    model.zero_grad()
    weights = w.backward(losses, model, StepInfo())
    assert_one_finite_weight_per_task(weights, 2)
    for n, p in params.items():
        g0, g1 = (t[n] if t[n] is not None else torch.zeros_like(p) for t in per_task)
        if n.startswith("towers.click."):
            torch.testing.assert_close(p.grad, g0, msg=n)
            assert g1.abs().max() == 0
        elif n.startswith("towers.conversion."):
            torch.testing.assert_close(p.grad, g1, msg=n)
        elif n.startswith("embed."):
            torch.testing.assert_close(p.grad, g0 + g1, msg=n)
        else:
            assert n in shared, n
    update = torch.cat([params[n].grad.flatten() for n in sorted(shared)])
    torch.testing.assert_close(update, weights @ jac, rtol=1e-4, atol=1e-6)
    assert not any(hasattr(p, "jac") for p in params.values())


def test_extra_loss_reaches_embeddings_untouched_by_the_aggregator():
    model, batch = tiny_model(), tiny_batch()
    base, _ = grads_after(make("upgrad"), copy.deepcopy(model), batch)
    model.zero_grad()
    losses = model.task_losses(model(batch), batch)
    extra = 0.5 * model.embedding_l2()
    l2_grad = torch.autograd.grad(extra, model.embed.table.weight, retain_graph=True)[0]
    make("upgrad").backward(losses, model, StepInfo(), extra_loss=extra)
    torch.testing.assert_close(model.embed.table.weight.grad, base["embed.table.weight"] + l2_grad)


@pytest.mark.parametrize(("name", "extra"), [("cagrad", "cagrad"), ("nash_mtl", "nash-mtl")])
def test_missing_optional_dependency_names_the_extra(name, extra):
    import importlib.util

    assert importlib.util.find_spec("cvxpy") is None, "this test expects the extra absent"
    with pytest.raises(MissingDependencyError, match=rf"torchjd\[{extra}\]==0\.18\.0"):
        build_weighting(name, {}, TASKS)
