"""The one training loop (``train.loop``): every weighting trains through ``Loop.step``, the
masked step of a multi-source run, exact streams, and checks before the optimizer moves."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import TaskSpec
from shopmtl.train.loop import Loop, NonFiniteError, Schedule, Stream
from shopmtl.weighting import WEIGHTINGS, build_weighting
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    tiny_batch,
    tiny_model,
)

STEPS_PER_EPOCH = 8
EPOCHS = 3


class BatchSource:
    """One batch per epoch through a zoo model; ``only`` keeps some of its tasks (a joint
    run's source has only its own)."""

    def __init__(self, batch: Batch, name: str = "b", only: tuple[str, ...] = TASKS,
                 n_batches: int = 1, l2: float = 1e-5) -> None:
        self.name, self.batch, self.only, self.n, self.l2 = name, batch, only, n_batches, l2

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return tuple(TaskSpec(t) for t in self.only)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.only

    def num_batches(self) -> int:
        return self.n

    def batches(self, epoch: int, seed: int, skip: int = 0) -> Iterator[Any]:
        for i in range(skip, self.n):
            yield (epoch, i, self.batch)

    def losses(self, model, b) -> dict[str, torch.Tensor]:
        vec = model.task_losses(model(b[2]), b[2])
        out = {t: vec[TASKS.index(t)] for t in self.only}
        if self.l2:
            out["_embedding_l2"] = self.l2 * model.embedding_l2()
        return out

    def evaluate(self, model, split: str) -> dict[str, dict[str, Any]]:
        model.eval()
        with torch.no_grad():
            vec = model.task_losses(model(self.batch), self.batch)
        return {t: {"logloss": float(vec[TASKS.index(t)])} for t in self.only}

    def head(self, model):
        return model


class LossSelector:
    def score(self, valid, history):
        return -sum(m["logloss"] for s in valid.values() for m in s.values()), {}

    def source_score(self, valid, source, history):
        return -sum(m["logloss"] for m in valid[source.name].values())


def _loop(model, sources, name: str = "equal", steps: int = 1, **kw) -> Loop:
    tasks = [t for s in sources for t in s.task_names]
    schedule = Schedule(steps=steps, lr=1e-2, eval_every=STEPS_PER_EPOCH, **kw)
    return Loop(model, sources, build_weighting(name, {}, tasks), schedule, LossSelector())


def total_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model.task_losses(model(batch), batch).sum().item()


@pytest.mark.parametrize("name", sorted(set(WEIGHTINGS) - {"cagrad", "nash_mtl"}))  # extra
def test_every_weighting_trains_through_the_loop(name: str) -> None:
    model, batch = tiny_model(interaction="dot"), tiny_batch()
    before = total_loss(model, batch)
    loop = _loop(model, [BatchSource(batch)], name, steps=STEPS_PER_EPOCH * EPOCHS)
    loop.run()
    assert_one_finite_weight_per_task(loop.weighting.last_weights, len(TASKS))
    assert loop.state.step == STEPS_PER_EPOCH * EPOCHS and len(loop.state.history) == EPOCHS
    after = total_loss(model, batch)
    assert after < 0.95 * before, (name, before, after)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name == "dwa":  # from the third epoch on the weights follow the loss ratios
        assert not torch.allclose(loop.weighting.last_weights, torch.ones(2))


def test_a_learned_weighting_is_in_the_loops_optimizer() -> None:
    model, batch = tiny_model(), tiny_batch()
    loop = _loop(model, [BatchSource(batch)], "uncertainty")
    before = loop.weighting.log_vars.detach().clone()
    loop.train_mode()
    loop.step(loop.sources[0], next(loop.sources[0].batches(0, 0)))
    assert not torch.equal(before, loop.weighting.log_vars.detach())


def test_non_finite_loss_stops_before_touching_the_parameters() -> None:
    model, batch = tiny_model(), tiny_batch()
    batch.labels[0, 0] = float("nan")
    state = copy.deepcopy(model.state_dict())
    loop = _loop(model, [BatchSource(batch)])
    with pytest.raises(NonFiniteError, match="click=nan"):
        loop.run()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_equal_step_matches_the_plain_summed_loss_step() -> None:
    """``equal`` + alpha 1 is sum of losses + embedding L2, clipped, one Adam step."""
    model, batch = tiny_model(), tiny_batch()
    ref = copy.deepcopy(model)
    loop = _loop(model, [BatchSource(batch, l2=1e-3)], steps=3, grad_clip=0.5)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    loop.train_mode()
    for _ in range(3):
        out = loop.step(loop.sources[0], (0, 0, batch))
        loop.state.step += 1
        ref.train()
        losses = ref.task_losses(ref(batch), batch)
        ref_opt.zero_grad(set_to_none=True)
        (losses.sum() + 1e-3 * ref.embedding_l2()).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        assert out == pytest.approx(dict(zip(TASKS, losses.tolist(), strict=True)))
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)


def test_a_batch_with_some_tasks_weighs_only_those() -> None:
    """Two sources, one task each: a step of one leaves the other task's learned weight and
    alpha out; a gradient method refuses such a step by name."""
    model, batch = tiny_model(), tiny_batch()
    a, b = BatchSource(batch, "a", ("click",)), BatchSource(batch, "b", ("conversion",))
    loop = _loop(model, [a, b], "uncertainty", steps=4, sampling="round_robin")
    loop.train_mode()
    s0 = loop.weighting.log_vars.detach().clone()
    loop.step(a, next(a.batches(0, 0)))
    s1 = loop.weighting.log_vars.detach()
    assert s1[0] != s0[0] and s1[1] == s0[1]  # no regulariser pull on the absent task
    static = _loop(tiny_model(), [a, b], "static")
    static.train_mode()
    static.step(a, next(a.batches(0, 0)))
    assert static.weighting.last_weights.tolist() == [1.0, 0.0]
    upgrad = _loop(tiny_model(), [a, b], "upgrad")
    upgrad.train_mode()
    with pytest.raises(ValueError, match=r"every task's gradient.*\['conversion'\]"):
        upgrad.step(a, next(a.batches(0, 0)))
    # round robin: each source every other step, its position kept per source
    loop.run()
    assert loop.state.positions == {"a": [1, 1], "b": [1, 1]}  # 2 epochs of 1 batch each


def test_stream_resumes_at_any_batch() -> None:
    src = BatchSource(tiny_batch(), n_batches=3)
    straight = Stream(src, seed=0)
    seq = [straight.next()[:2] for _ in range(8)]
    assert seq[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    for k in range(8):
        s = Stream(src, seed=0)
        for _ in range(k):
            s.next()
        resumed = Stream(src, 0, s.epoch, s.taken)
        assert [resumed.next()[:2] for _ in range(8 - k)] == seq[k:]


def test_fit_runs_a_bounded_piece_from_given_weights_and_state() -> None:
    """What a federated client does each round: k steps from the global weights, the streams
    going on where they stood; the result carries the new weights, state and metrics."""
    from shopmtl.train.loop import fit

    batch = tiny_batch()
    src = BatchSource(batch, n_batches=3)
    tasks = list(TASKS)
    model = tiny_model()
    start_weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = fit(model, [src], build_weighting("equal", {}, tasks),
                Schedule(steps=4, lr=1e-2, eval_every=2), LossSelector())
    assert first.state.step == 4 and first.state.positions == {"b": [1, 1]}
    assert set(first.valid["b"]) == set(TASKS)
    assert any(not torch.equal(first.weights[k], start_weights[k]) for k in start_weights)
    other = tiny_model(seed=5)
    second = fit(other, [src], build_weighting("equal", {}, tasks),
                 Schedule(steps=7, lr=1e-2, eval_every=2), LossSelector(),
                 weights=first.weights, start=first.state)
    assert second.state.step == 7 and second.state.positions == {"b": [2, 1]}
    assert [r["step"] for r in second.state.history] == [2, 4, 6, 7]
    assert first.state.step == 4  # the caller's state is not changed


def test_a_runaway_loss_stops_the_run_before_anything_is_saved_as_best() -> None:
    """lr 1e6: the losses grow by orders of magnitude (finite or not); the run stops with a
    named error before its first evaluation, so no best weights exist."""

    model, batch = tiny_model(), tiny_batch()
    loop = Loop(model, [BatchSource(batch, n_batches=4)], build_weighting("equal", {}, TASKS),
                Schedule(steps=40, lr=1e6, eval_every=20), LossSelector())
    with pytest.raises(NonFiniteError, match=r"diverged at step \d+|non-finite"):
        loop.run()
    assert loop.best is None and loop.state.history == []


def test_the_divergence_check_follows_the_recent_loss_against_the_first() -> None:
    from shopmtl.train.loop import DivergenceError

    loop = _loop(tiny_model(), [BatchSource(tiny_batch())])
    for v in (0.0, 0.5, 0.4, 0.3, 0.6):  # 0: a batch without labels is no reference
        loop.check_divergence({"click": v})
    assert loop.state.first_loss == {"click": 0.5}
    loop.check_divergence({"click": 40.0})  # one bad batch: the recent mean stays below 100x
    with pytest.raises(DivergenceError, match=r"recent click loss .* over 100x its first "
                                              r"value 0\.5"):
        for _ in range(20):
            loop.check_divergence({"click": 600.0})
    off = _loop(tiny_model(), [BatchSource(tiny_batch())], divergence_factor=0.0)
    for v in (0.5, 1e30):
        off.check_divergence({"click": v})  # switched off


def test_the_metric_selector_scores_the_prior_only_when_its_tasks_have_one() -> None:
    from shopmtl.train.select import MetricSelector

    prior = {"table": {"click": {"auc": 0.5, "logloss": 0.2, "by_scenario": {}},
                       "category": None}}  # a multiclass task: no prior
    assert MetricSelector("valid.click.all.auc", "max", "table").prior(prior) == (0.5, 0.5)
    assert MetricSelector("valid.click.all.logloss", "min", "table").prior(prior) == (-0.2, 0.2)
    assert MetricSelector("valid.all_tasks.auc", "max", "table").prior(prior) is None
    assert MetricSelector("valid.category.all.accuracy", "max", "table").prior(prior) is None
    nan = {"table": {"click": {"auc": float("nan"), "by_scenario": {}}}}  # one class
    assert MetricSelector("valid.click.all.auc", "max", "table").prior(nan) is None
