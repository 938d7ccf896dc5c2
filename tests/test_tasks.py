"""Task types: binary (pos_weight, focal), regression, multiclass, quantile and ranking losses,
their masked-mean semantics, head widths, metrics and TaskSpec validation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shopmtl.data.schema import TaskSpec
from shopmtl.metrics import pinball
from shopmtl.tasks import (
    TASK_TYPES,
    BinaryTask,
    MulticlassTask,
    QuantileTask,
    RankingTask,
    RegressionTask,
    focal_loss_with_logits,
    out_dim,
)


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


# ------------------------------------------------------------------------ new task types

NAN = math.nan
MULTI = TaskSpec("kind", type="multiclass", n_classes=3)
QUANT = TaskSpec("sales", type="quantile", quantiles=(0.1, 0.5, 0.9))
RANK = TaskSpec("rank", type="ranking")
PAIRWISE = TaskSpec("rank", type="ranking", loss="pairwise")


def test_out_dim_is_a_function_of_the_spec() -> None:
    assert out_dim(TaskSpec("c")) == 1
    assert out_dim(TaskSpec("r", type="regression")) == 1
    assert out_dim(MULTI) == 3
    assert out_dim(QUANT) == 3
    assert out_dim(RANK) == 1  # one score per candidate
    assert set(TASK_TYPES) == {"binary", "regression", "multiclass", "quantile", "ranking"}


def test_default_loss_of_each_type() -> None:
    assert TaskSpec("c").loss is None and TaskSpec("c").resolved_loss == "bce"
    assert TaskSpec("c", loss="focal").resolved_loss == "focal"
    assert TaskSpec("r", type="regression").resolved_loss == "mse"
    assert MULTI.resolved_loss == "cross_entropy"
    assert QUANT.resolved_loss == "pinball"
    assert RANK.resolved_loss == "softmax" and PAIRWISE.resolved_loss == "pairwise"


def test_multiclass_loss_pinned() -> None:
    # row 1: uniform over 3 classes, y=1 -> ln 3; row 2: softmax [1/2, 1/4, 1/4], y=0 -> ln 2;
    # rows 3 and 4 are masked and hold NaN and -1: they must neither count nor index
    logits = torch.tensor(
        [[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [5.0, 1.0, 0.0], [1.0, 2.0, 3.0]]
    )
    y = torch.tensor([1.0, 0.0, NAN, -1.0])
    mask = torch.tensor([True, True, False, False])
    got = MulticlassTask.loss(logits, y, mask, MULTI)
    assert got.item() == pytest.approx((math.log(3) + math.log(2)) / 2)
    ref = F.cross_entropy(logits[:2], y[:2].long())
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("bad", [3.0, -1.0, 1.5, NAN])
def test_multiclass_rejects_labels_that_are_not_class_ids(bad: float) -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"task 'kind'.*class ids 0..2"):
        MulticlassTask.loss(logits, torch.tensor([0.0, bad]), torch.tensor([True, True]), MULTI)


def test_multiclass_logits_must_match_n_classes() -> None:
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        MulticlassTask.loss(
            torch.zeros(2, 4), torch.zeros(2), torch.ones(2, dtype=torch.bool), MULTI
        )


def test_multiclass_activate_and_metrics() -> None:
    p = MulticlassTask.activate(torch.tensor([[0.0, math.log(3)]]))
    torch.testing.assert_close(p, torch.tensor([[0.25, 0.75]]))
    m = MulticlassTask.metrics(
        np.array([1.0, 0.0]), np.array([[0.25, 0.75], [0.4, 0.6]]), None, None
    )
    assert m["accuracy"] == 0.5 and m["n"] == 2
    assert m["logloss"] == pytest.approx(-(math.log(0.75) + math.log(0.4)) / 2)


def test_quantile_loss_pinned() -> None:
    # row 1 (y=1): tau .1, u=1 -> .1; tau .9, u=-1 -> .1; mean .1
    # row 2 (y=3): u=1 for both -> (.1 + .9) / 2 = .5; row 3 masked (NaN label)
    spec = TaskSpec("s", type="quantile", quantiles=(0.1, 0.9))
    logits = torch.tensor([[0.0, 2.0], [2.0, 2.0], [7.0, 8.0]])
    y = torch.tensor([1.0, 3.0, NAN])
    got = QuantileTask.loss(logits, y, torch.tensor([True, True, False]), spec)
    assert got.item() == pytest.approx(0.3)


def test_quantile_loss_matches_the_pinball_metric() -> None:
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(40, 3, generator=g), torch.randn(40, generator=g)
    mask = torch.rand(40, generator=g) < 0.6
    got = QuantileTask.loss(logits, y, mask, QUANT).item()
    assert got == pytest.approx(pinball(y[mask].numpy(), logits[mask].numpy(), QUANT.quantiles))


def test_quantile_single_level_accepts_squeezed_logits() -> None:
    spec = TaskSpec("m", type="quantile", quantiles=(0.5,))
    logits, y = torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0])
    got = QuantileTask.loss(logits, y, torch.tensor([True, True]), spec)
    assert got.item() == pytest.approx(0.5 * (1 + 3) / 2)  # half the MAE at tau = 0.5


def test_quantile_loss_needs_the_spec() -> None:
    with pytest.raises(ValueError, match="quantiles"):
        QuantileTask.loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, dtype=torch.bool))


def test_quantile_metrics_take_the_levels_from_the_spec() -> None:
    y, q = np.array([1.0, 3.0]), np.array([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]])
    m = QuantileTask.metrics(y, q, None, None, QUANT)
    assert m["pinball"] == pytest.approx(1.7 / 6) and m["coverage"] == 0.5
    assert "pinball" not in QuantileTask.metrics(y, q, None, None)  # evaluate's old call


def _ranking_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four lists of up to 3 candidates: a padded one, a graded one, a masked one (its labels
    NaN-free but unlabelled) and one without a relevant candidate."""
    logits = torch.tensor(
        [
            [0.0, 0.0, 99.0],  # the third is a pad
            [math.log(3), 0.0, 0.0],
            [4.0, -2.0, 1.0],  # masked list
            [1.0, 2.0, 3.0],  # no relevant candidate
        ]
    )
    y = torch.tensor([[1.0, 0.0, NAN], [1.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([True, True, False, True])
    return logits, y, mask


def test_softmax_ranking_loss_pinned() -> None:
    logits, y, mask = _ranking_batch()
    # list 1: softmax over the 2 real candidates [1/2, 1/2], target [1, 0] -> ln 2
    # list 2: softmax [3/5, 1/5, 1/5], target [1/2, 1/2, 0] -> -(ln .6 + ln .2) / 2
    # lists 3 (masked) and 4 (no target distribution) do not count
    want = (math.log(2) - (math.log(0.6) + math.log(0.2)) / 2) / 2
    assert RankingTask.loss(logits, y, mask, RANK).item() == pytest.approx(want)
    assert RankingTask.loss(logits, y, mask).item() == pytest.approx(want)  # the default


def test_pairwise_ranking_loss_pinned() -> None:
    logits = torch.tensor([[1.0, 0.0, 2.0, 50.0], [0.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([[2.0, 1.0, 0.0, NAN], [1.0, 0.0, NAN, NAN]])
    mask = torch.tensor([True, True])
    # list 1 pairs (i above j): (0,1) s diff 1, (0,2) -1, (1,2) -2 -> log(1 + e^-d) each
    l1 = (math.log1p(math.exp(-1)) + math.log1p(math.e) + math.log1p(math.exp(2))) / 3
    l2 = math.log1p(math.e)  # one pair, diff 0 - 1 = -1
    got = RankingTask.loss(logits, y, mask, PAIRWISE)
    assert got.item() == pytest.approx((l1 + l2) / 2)


@pytest.mark.parametrize("spec", [RANK, PAIRWISE])
def test_padded_candidates_and_masked_lists_change_nothing(spec: TaskSpec) -> None:
    logits, y, mask = _ranking_batch()
    a = logits.clone().requires_grad_(True)
    loss_a = RankingTask.loss(a, y, mask, spec)
    loss_a.backward()
    moved = logits.clone()
    moved[0, 2] = -1e6  # the pad
    moved[2] = torch.tensor([NAN, math.inf, -7.0])  # the masked list: even non-finite scores
    b = moved.requires_grad_(True)
    loss_b = RankingTask.loss(b, y, mask, spec)
    loss_b.backward()
    assert loss_a.item() == loss_b.item()
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad[0, 2] == 0 and not a.grad[2].any()


def _fully_masked_cases() -> list[tuple[str, TaskSpec, torch.Tensor, torch.Tensor]]:
    nan_y = torch.full((4,), NAN)
    return [
        ("multiclass", MULTI, torch.randn(4, 3), nan_y),
        ("quantile", QUANT, torch.randn(4, 3), nan_y),
        ("ranking", RANK, torch.randn(4, 5), torch.rand(4, 5).round()),
        ("ranking", PAIRWISE, torch.randn(4, 5), torch.rand(4, 5).round()),
        ("ranking", RANK, torch.randn(4, 5), torch.full((4, 5), NAN)),  # all pads
    ]


@pytest.mark.parametrize("case", range(5))
def test_fully_masked_new_types_give_zero_loss_and_gradient(case: int) -> None:
    torch.manual_seed(case)
    kind, spec, logits, y = _fully_masked_cases()[case]
    logits.requires_grad_(True)
    loss = TASK_TYPES[kind].loss(logits, y, torch.zeros(4, dtype=torch.bool), spec)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def _fit(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], steps: int = 40
) -> tuple[float, float]:
    """The loss before and after ``steps`` Adam steps on one repeated batch."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = last = math.nan
    for i in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        first, last = (loss.item(), loss.item()) if i == 0 else (first, loss.item())
    return first, last


def test_multiclass_loss_decreases_on_a_repeated_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(1).float()
    mask = torch.rand(48, generator=g) < 0.8
    y = torch.where(mask, y, NAN)
    torch.manual_seed(0)
    first, last = _fit(torch.nn.Linear(4, 3), lambda m: MulticlassTask.loss(m(x), y, mask, MULTI))
    assert last < 0.5 * first


def test_quantile_loss_decreases_and_orders_the_levels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = x @ torch.randn(4, generator=g) + torch.randn(200, generator=g)
    mask = torch.ones(200, dtype=torch.bool)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    first, last = _fit(model, lambda m: QuantileTask.loss(m(x), y, mask, QUANT), steps=150)
    assert last < 0.7 * first
    q = model(x).detach()
    below = (y.unsqueeze(1) < q).float().mean(0)  # empirical level of each output column
    assert below[0] < below[1] < below[2]


@pytest.mark.parametrize("spec", [RANK, PAIRWISE])
def test_ranking_loss_decreases_on_a_repeated_batch(spec: TaskSpec) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, 4, generator=g)  # 16 lists of 6 candidates
    rel = (x @ torch.randn(4, generator=g)).clamp(min=0).round()  # graded 0, 1, 2, ...
    rel[::3, 4:] = NAN  # every third list has only 4 real candidates
    mask = torch.ones(16, dtype=torch.bool)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    first, last = _fit(model, lambda m: RankingTask.loss(m(x).squeeze(-1), rel, mask, spec))
    assert last < 0.8 * first
    scores = model(x).squeeze(-1).detach().numpy()
    m = RankingTask.metrics(rel.numpy(), scores, None, None, TaskSpec("r", "ranking", k=3))
    assert m["ndcg@3"] > 0.9 and m["n"] == 16


def test_ranking_metrics_from_rows_and_groups_equal_the_list_form() -> None:
    rel = np.array([1.0, 0.0, 2.0, 0.0, 1.0])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    group = np.array([7, 3, 7, 3, 9])
    rows = RankingTask.metrics(rel, score, group, None, RANK)
    lists = RankingTask.metrics(
        np.array([[0.0, 0.0], [1.0, 2.0], [1.0, NAN]]),
        np.array([[0.2, 0.4], [0.1, 0.3], [0.5, 0.0]]),
        None,
        None,
        RANK,
    )
    assert rows == lists and rows["n"] == 3 and "ndcg@10" in rows
    with pytest.raises(ValueError, match="group"):
        RankingTask.metrics(rel, score, None, None)


def test_perfect_scores_give_ndcg_one_through_the_task() -> None:
    rel = np.array([[3.0, 0.0, 1.0, NAN], [0.0, 2.0, NAN, NAN]])
    m = RankingTask.metrics(rel, np.nan_to_num(rel, nan=-1.0), None, None)
    assert m["ndcg@10"] == 1.0 and m["mrr"] == 1.0


def test_ranking_loss_rejects_row_shaped_input() -> None:
    with pytest.raises(ValueError, match="lists, candidates"):
        RankingTask.loss(torch.zeros(5), torch.zeros(5), torch.ones(5, dtype=torch.bool), RANK)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"type": "multiclass"}, "n_classes >= 2"),
        ({"type": "multiclass", "n_classes": 1}, "n_classes >= 2"),
        ({"n_classes": 3}, "n_classes needs type 'multiclass'"),
        ({"type": "quantile"}, r"e\.g\. quantiles: \[0\.1, 0\.5, 0\.9\]"),
        ({"type": "quantile", "quantiles": (0.0, 0.5)}, r"\(0, 1\)"),
        ({"type": "quantile", "quantiles": (0.5, 1.2)}, r"\(0, 1\)"),
        ({"type": "quantile", "quantiles": (0.5, 0.5)}, "strictly increasing"),
        ({"type": "quantile", "quantiles": (0.9, 0.1)}, "strictly increasing"),
        ({"type": "regression", "quantiles": (0.5,)}, "quantiles need type 'quantile'"),
        ({"loss": "softmax"}, "needs type 'ranking'"),
        ({"type": "ranking", "loss": "bce"}, "softmax' or 'pairwise"),
        ({"type": "ranking", "loss": "focal"}, "needs type 'binary'"),
        ({"type": "quantile", "quantiles": (0.5,), "loss": "pairwise"}, "'pinball'"),
        ({"type": "ranking", "k": 0}, "k"),
        ({"k": 5}, "k .*needs type 'ranking'"),
        ({"type": "ordinal"}, "type is one of"),
        ({"type": "multiclass", "n_classes": 3, "positive": ("x",)}, "binary"),
    ],
)
def test_invalid_task_spec_raises_naming_the_task(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        TaskSpec("my_task", **kwargs)
    assert "task 'my_task'" in str(err.value)


def test_task_spec_new_fields() -> None:
    q = TaskSpec("s", type="quantile", quantiles=[0.25, 0.75])  # type: ignore[arg-type]
    assert q.quantiles == (0.25, 0.75) and hash(q)  # a list becomes a (hashable) tuple
    assert TaskSpec("r", type="ranking", k=5, loss="pairwise").k == 5
    # saved configs and checkpoints hold the old default loss 'bce' for regression tasks
    assert TaskSpec("r", type="regression", loss="bce") == TaskSpec("r", type="regression")


def test_config_reads_the_type_fields() -> None:
    from shopmtl.config import ConfigError, from_dict

    m = from_dict(TaskSpec, {"name": "k", "type": "multiclass", "n_classes": 4})
    q = from_dict(TaskSpec, {"name": "s", "type": "quantile", "quantiles": [0.1, 0.5, 0.9]})
    r = from_dict(TaskSpec, {"name": "r", "type": "ranking", "loss": "pairwise", "k": 5})
    assert (m.n_classes, q.quantiles, r.loss, r.k) == (4, (0.1, 0.5, 0.9), "pairwise", 5)
    with pytest.raises(ConfigError, match=r"quantiles: \[0\.1, 0\.5, 0\.9\]"):
        from_dict(TaskSpec, {"name": "s", "type": "quantile"})
    with pytest.raises(ConfigError, match="n_classes"):
        from_dict(TaskSpec, {"name": "k", "type": "multiclass", "n_classes": 2.5})


def _registered() -> list[str]:
    from shopmtl.registry import MODELS

    return sorted(MODELS)


NEW_TYPE_MODELS = _registered()  # every model of the zoo


@pytest.mark.parametrize("name", NEW_TYPE_MODELS)
def test_models_build_multiclass_and_quantile_heads(name: str) -> None:
    from tests.models.tiny import build, tiny_batch, tiny_schema

    schema = tiny_schema(
        (
            TaskSpec("click"),
            TaskSpec("conversion", given="click"),
            TaskSpec("kind", type="multiclass", n_classes=2),  # the tiny labels are 0/1
            TaskSpec("sales", type="quantile", quantiles=(0.1, 0.5, 0.9)),
        )
    )
    model = build(name, schema)
    batch = tiny_batch(schema, n=16)
    out = model(batch)
    assert out["click"].shape == (16,)
    assert out["kind"].shape == (16, 2) and out["sales"].shape == (16, 3)
    losses = model.task_losses(out, batch)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    losses.sum().backward()
    probs = model.predict(batch)["kind"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
