"""ESMM: pCVR/pCTR logits out, entire-space pCTCVR supervision in log space."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from shopmtl.data.schema import TaskSpec
from shopmtl.nn.chains import GivenChains, bce_from_log_prob, given_order
from tests.models.tiny import build, tiny_batch, tiny_schema


def test_schema_without_a_given_pair_is_refused() -> None:
    schema = tiny_schema((TaskSpec("click"), TaskSpec("ad_click", scenarios=("ad",))))
    with pytest.raises(ValueError, match="given"):
        build("esmm", schema)


def test_ctcvr_loss_is_pctr_times_pcvr_on_every_impression_with_a_click_label() -> None:
    model = build("esmm")
    batch = tiny_batch(model.schema)
    batch.mask[:5, 0] = False  # some impressions without a click label
    batch.mask[:5, 1] = False
    logits = model(batch)
    losses = model.task_losses(logits, batch)
    ctr, cvr = torch.sigmoid(logits["click"]), torch.sigmoid(logits["conversion"])
    y = batch.labels[:, 0] * batch.labels[:, 1]
    rows = batch.mask[:, 0]
    expect = F.binary_cross_entropy(ctr[rows] * cvr[rows], y[rows])
    torch.testing.assert_close(losses[1], expect)
    ctr_loss = F.binary_cross_entropy_with_logits(logits["click"][rows], batch.labels[rows, 0])
    torch.testing.assert_close(losses[0], ctr_loss)
    assert 0 < (batch.labels[:, 0] == 0).sum() < len(batch)  # both kinds of rows were used


def test_extreme_logits_give_finite_losses_and_gradients() -> None:
    model = build("esmm")
    batch = tiny_batch(model.schema)
    for scale in (1e2, 1e4):
        z = (torch.randn(2, len(batch)) * scale).requires_grad_()
        logits = {"click": z[0], "conversion": z[1], "ad_click": torch.zeros(len(batch))}
        losses = model.task_losses(logits, batch)
        assert torch.isfinite(losses).all()
        (grad,) = torch.autograd.grad(losses.sum(), z)
        assert torch.isfinite(grad).all()
    # a certain, correct prediction costs (almost) nothing; a certain wrong one is bounded
    log_p = torch.tensor([0.0, -1e4, 0.0, -1e4])
    yy = torch.tensor([1.0, 0.0, 0.0, 1.0])
    per = [
        bce_from_log_prob(log_p[i : i + 1], yy[i : i + 1], torch.ones(1, dtype=torch.bool))
        for i in range(4)
    ]
    assert per[0] < 1e-6 and per[1] < 1e-6 and 10 < per[2] < 20 and per[3] == 1e4


def test_non_clicks_are_ctcvr_negatives_even_though_conversion_is_masked_there() -> None:
    model = build("esmm")
    batch = tiny_batch(model.schema)
    mask = batch.mask.clone()
    mask[:, 1] = False  # no conversion label anywhere: only the non-clicks speak
    batch = dataclasses.replace(batch, mask=mask)
    losses = model.task_losses(model(batch), batch)
    assert losses[1] > 0
    grads = torch.autograd.grad(losses[1], list(model.towers["conversion"].parameters()))
    assert any(g.any() for g in grads)


def test_chains_multiply_along_given_links() -> None:
    schema = tiny_schema(
        (
            TaskSpec("pay", given="cart"),
            TaskSpec("click"),
            TaskSpec("cart", given="click"),
        )
    )
    assert given_order(schema) == ("click", "cart", "pay")
    chains = GivenChains(schema)
    batch = tiny_batch(schema, n=256)
    labels, mask = chains.targets(batch)
    click, cart, pay = (schema.task_names.index(n) for n in ("click", "cart", "pay"))
    torch.testing.assert_close(
        labels[:, pay], batch.labels[:, click] * batch.labels[:, cart] * batch.labels[:, pay]
    )
    assert torch.equal(mask[:, pay], batch.mask[:, click])  # every impression is supervised
    z = {n: torch.randn(len(batch)) for n in schema.task_names}
    joint = chains.joint_log_probs(z)
    torch.testing.assert_close(
        joint["pay"].exp(),
        torch.sigmoid(z["click"]) * torch.sigmoid(z["cart"]) * torch.sigmoid(z["pay"]),
    )
    model = build("esmm", schema)
    assert torch.isfinite(model.task_losses(model(batch), batch)).all()


def test_a_given_cycle_is_refused() -> None:
    schema = tiny_schema((TaskSpec("a", given="b"), TaskSpec("b", given="a")))
    with pytest.raises(ValueError, match="cycle"):
        build("esmm", schema)
