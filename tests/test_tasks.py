"""Task losses: pos_weight and focal loss for class imbalance, masked-mean semantics kept."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shopmtl.data.schema import TaskSpec
from shopmtl.tasks import BinaryTask, RegressionTask, focal_loss_with_logits


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * 3
    y = (torch.rand(n, generator=g) < 0.3).float()
    mask = torch.rand(n, generator=g) < 0.7
    return logits, y, mask


def test_default_spec_is_the_plain_masked_bce() -> None:
    logits, y, mask = _data()
    plain = BinaryTask.loss(logits, y, mask)
    assert torch.equal(BinaryTask.loss(logits, y, mask, TaskSpec("t")), plain)
    ref = F.binary_cross_entropy_with_logits(logits[mask], y[mask])
    torch.testing.assert_close(plain, ref)


def test_pos_weight_matches_torch_bce_with_logits() -> None:
    logits, y, mask = _data()
    got = BinaryTask.loss(logits, y, mask, TaskSpec("t", pos_weight=4.5))
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(4.5))(logits[mask], y[mask])
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("pos_weight", [1.0, 3.0])
def test_focal_with_gamma_zero_is_bce(pos_weight: float) -> None:
    logits, y, mask = _data()
    focal = BinaryTask.loss(
        logits, y, mask, TaskSpec("t", loss="focal", focal_gamma=0.0, pos_weight=pos_weight)
    )
    bce = BinaryTask.loss(logits, y, mask, TaskSpec("t", pos_weight=pos_weight))
    torch.testing.assert_close(focal, bce)


def test_focal_pinned_values() -> None:
    # hand-computed: FL = -(1-p)^g log p for y=1, -p^g log(1-p) for y=0, p = sigmoid(x)
    def ref(x: float, y: float, gamma: float, pw: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(pw * y * (1 - p) ** gamma * math.log(p) + (1 - y) * p**gamma * math.log(1 - p))

    xs = torch.tensor([0.0, 2.0, -1.5, 3.0], dtype=torch.float64)
    ys = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    got = focal_loss_with_logits(xs, ys, gamma=2.0, pos_weight=1.0)
    want = [ref(x, y, 2.0, 1.0) for x, y in zip(xs.tolist(), ys.tolist(), strict=True)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got[0].item() == pytest.approx(0.25 * math.log(2))  # x=0, y=1: 0.5^2 * log 2
    # pos_weight scales only the positive term
    got_pw = focal_loss_with_logits(xs, ys, gamma=2.0, pos_weight=3.0)
    torch.testing.assert_close(got_pw, torch.where(ys == 1, 3 * got, got))
    # the masked mean over the first three (mask drops the fourth)
    mean = BinaryTask.loss(
        xs, ys, torch.tensor([True, True, True, False]), TaskSpec("t", loss="focal")
    )
    assert mean.item() == pytest.approx(sum(want[:3]) / 3)


def test_focal_down_weights_easy_examples() -> None:
    x = torch.tensor([4.0, 0.1])  # a confident correct positive, a hesitant one
    y = torch.ones(2)
    ratio = focal_loss_with_logits(x, y, 2.0) / F.binary_cross_entropy_with_logits(
        x, y, reduction="none"
    )
    assert ratio[0] < 1e-3 and ratio[1] > 0.2


def test_focal_is_finite_with_finite_gradients_at_extreme_logits() -> None:
    x = torch.tensor([-1e4, -80.0, 80.0, 1e4], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = focal_loss_with_logits(x, y, 2.0, 2.0).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "spec",
    [TaskSpec("t"), TaskSpec("t", pos_weight=5.0), TaskSpec("t", loss="focal", pos_weight=2.0)],
)
def test_fully_masked_task_gives_zero_loss_and_gradient(spec: TaskSpec) -> None:
    logits, y, _ = _data()
    logits.requires_grad_(True)
    loss = BinaryTask.loss(logits, y, torch.zeros_like(y, dtype=torch.bool), spec)
    loss.backward()
    assert loss.item() == 0.0
    assert not logits.grad.any()


def test_masked_rows_get_no_gradient() -> None:
    logits, y, mask = _data()
    logits.requires_grad_(True)
    BinaryTask.loss(logits, y, mask, TaskSpec("t", loss="focal", pos_weight=3.0)).backward()
    assert not logits.grad[~mask].any() and logits.grad[mask].any()


def test_regression_accepts_and_ignores_a_spec() -> None:
    logits, y, mask = _data()
    spec = TaskSpec("r", type="regression")
    plain = RegressionTask.loss(logits, y, mask)
    assert torch.equal(RegressionTask.loss(logits, y, mask, spec), plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pos_weight": 0.0}, "pos_weight"),
        ({"pos_weight": -1.0}, "pos_weight"),
        ({"pos_weight": math.nan}, "pos_weight"),
        ({"loss": "hinge"}, "loss"),
        ({"loss": "focal", "focal_gamma": -1.0}, "focal_gamma"),
        ({"type": "regression", "loss": "focal"}, "binary"),
        ({"type": "regression", "pos_weight": 2.0}, "binary"),
    ],
)
def test_invalid_imbalance_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskSpec("t", **kwargs)


def test_model_losses_use_the_task_spec() -> None:
    from tests.models.tiny import build, tiny_batch, tiny_schema

    plain = tiny_schema()
    weighted = tiny_schema(
        (
            TaskSpec("click", pos_weight=3.0),
            TaskSpec("conversion", given="click"),
            TaskSpec("ad_click", scenarios=("ad",), loss="focal"),
        )
    )
    a, b = build("shared_bottom", plain), build("shared_bottom", weighted)
    batch = tiny_batch(plain)
    la, lb = a.task_losses(a(batch), batch), b.task_losses(b(batch), batch)
    assert lb[0] > la[0] and lb[1] == la[1] and lb[2] < la[2]


def test_config_reads_the_new_task_fields() -> None:
    from shopmtl.config import ConfigError, from_dict

    t = from_dict(TaskSpec, {"name": "c", "pos_weight": 2, "loss": "focal", "focal_gamma": 1})
    assert (t.pos_weight, t.loss, t.focal_gamma) == (2.0, "focal", 1.0)
    with pytest.raises(ConfigError, match="loss"):
        from_dict(TaskSpec, {"name": "c", "loss": "hinge"})
