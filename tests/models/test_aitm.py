"""AITM: unconditional heads with information transfer, conditional logits out, calibrator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shopmtl.data.schema import TaskSpec
from tests.models.tiny import build, tiny_batch, tiny_schema


def _heads(model, batch):
    out = model(batch)
    return out, model._last[1]


def test_returned_logits_are_conditional_on_the_parent() -> None:
    model = build("aitm").eval()
    batch = tiny_batch(model.schema)
    out, head = _heads(model, batch)
    torch.testing.assert_close(out["click"], head["click"])
    ok = F.logsigmoid(head["conversion"]) < F.logsigmoid(head["click"]) - 1e-3
    joint = F.logsigmoid(out["conversion"]) + F.logsigmoid(out["click"])
    torch.testing.assert_close(joint[ok], F.logsigmoid(head["conversion"])[ok])
    assert torch.isfinite(out["conversion"]).all()


def test_calibrator_penalises_a_child_more_likely_than_its_parent() -> None:
    batch = tiny_batch(tiny_schema())
    plain = build("aitm", calibrator=0.0)
    calib = build("aitm", calibrator=5.0)
    calib.load_state_dict(plain.state_dict())
    with torch.no_grad():  # make conversion more likely than click on every row
        calib.heads["conversion"][-1].bias.fill_(20.0)
        plain.heads["conversion"][-1].bias.fill_(20.0)
    a = plain.task_losses(plain(batch), batch)
    b = calib.task_losses(calib(batch), batch)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    assert b[1] > a[1] + 1.0


def test_losses_from_logits_of_another_forward_rebuild_the_joint() -> None:
    model = build("aitm", calibrator=0.0).eval()
    batch = tiny_batch(model.schema)
    out, head = _heads(model, batch)
    assert (head["conversion"] < head["click"] - 0.1).all()  # no clamping at initialisation
    fresh = model.task_losses(out, batch)
    rebuilt = model.task_losses(dict(out), batch)  # not the last forward's dict
    torch.testing.assert_close(fresh, rebuilt, rtol=1e-4, atol=1e-5)


def test_information_flows_from_parent_to_child_only() -> None:
    model = build("aitm")
    batch = tiny_batch(model.schema)
    out = model(batch)
    grads = torch.autograd.grad(
        out["click"].sum(), list(model.towers["conversion"].parameters()), allow_unused=True
    )
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(out["conversion"].sum(), list(model.towers["click"].parameters()))
    assert any(g.any() for g in grads)


def test_without_given_links_aitm_is_independent_towers() -> None:
    schema = tiny_schema((TaskSpec("click"), TaskSpec("ad_click", scenarios=("ad",))))
    model = build("aitm", schema)
    batch = tiny_batch(schema)
    assert len(model.ait) == 0
    losses = model.task_losses(model(batch), batch)
    assert torch.isfinite(losses).all()
