"""FGM adversarial training on the embedding table: the step adds the gradient at the perturbed
table, restores the table bit for bit before the optimizer steps, and stays deterministic."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shopmtl.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    WeightingConfig,
    load_config,
)
from shopmtl.data.pipeline import prepare_data
from shopmtl.train.adversarial import fgm_backward, fgm_perturbation
from shopmtl.train.trainer import Trainer
from tests.helpers import small_world, world_config_yaml
from tests.models.tiny import SMALL, VOCAB, tiny_batch, tiny_schema

EPS = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(
    tmp_path: Path, adversarial: str = "fgm", weighting: str = "equal", **train
) -> Trainer:
    cfg = ExperimentConfig(
        data=DataConfig(),
        # BatchNorm input: its running moments are buffers the adversarial pass must not move
        model=ModelConfig("shared_bottom", {**SMALL["shared_bottom"], "input_norm": "batch"}),
        train=TrainConfig(threads=1, adversarial=adversarial, adversarial_epsilon=EPS, **train),
        weighting=WeightingConfig(weighting),
    )
    # step() needs no tables (and without a training table there is no output-bias prior)
    data = SimpleNamespace(schema=tiny_schema(), vocab_sizes=VOCAB, train=None)
    return Trainer(cfg, data, tmp_path, progress=False)  # type: ignore[arg-type]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_perturbation_moves_touched_rows_by_epsilon_and_restores_exactly() -> None:
    w = torch.nn.Parameter(torch.randn(6, 3))
    before = w.detach().clone()
    w.grad = torch.zeros(6, 3)
    w.grad[[1, 4]] = torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    w.grad[2] = torch.tensor([0.0, 0.0, 0.0])
    with fgm_perturbation(w, 2.0) as moved:
        assert moved and torch.is_grad_enabled()
        delta = w.detach() - before
        torch.testing.assert_close(torch.linalg.vector_norm(delta), torch.tensor(2.0))
        torch.testing.assert_close(delta[1], torch.tensor([1.2, 0.0, 1.6]))
        assert not delta[[0, 2, 3, 4, 5]].any()
    assert torch.equal(w.detach(), before)
    w.grad = torch.zeros(6, 3)  # nothing to follow: nothing moves
    with fgm_perturbation(w, 2.0) as moved:
        assert not moved and torch.equal(w.detach(), before) and torch.is_grad_enabled()


def test_fgm_step_differs_from_plain_and_is_deterministic(tmp_path: Path) -> None:
    batch = tiny_batch(tiny_schema())
    moved = {}
    for run in ("none", "fgm", "fgm_again"):
        trainer = _trainer(tmp_path / run, adversarial=run.removesuffix("_again"))
        start = _params(trainer)
        for _ in range(2):
            trainer.step(batch)
        moved[run] = {n: p - start[n] for n, p in _params(trainer).items()}
    assert any(not torch.equal(moved["none"][n], moved["fgm"][n]) for n in moved["none"])
    assert all(torch.equal(moved["fgm"][n], moved["fgm_again"][n]) for n in moved["fgm"])


@pytest.mark.parametrize("weighting", ["equal", "upgrad"])
def test_table_is_restored_before_the_optimizer_step_and_grad_is_clean_plus_adversarial(
    tmp_path: Path, weighting: str
) -> None:
    trainer = _trainer(tmp_path, weighting=weighting, embedding_weight_decay=0.0)
    batch = tiny_batch(trainer.schema)
    model = trainer.model
    table = model.embed.table.weight
    before = table.detach().clone()
    reference = copy.deepcopy(model)
    # buffers as the clean forward alone leaves them (BatchNorm's running moments move once)
    clean = copy.deepcopy(model)
    clean.train()
    clean(batch)
    buffers = dict(clean.named_buffers())
    assert any(not torch.equal(b, dict(model.named_buffers())[n]) for n, b in buffers.items())
    seen: dict[str, torch.Tensor] = {}

    def check(opt, args, kwargs) -> None:
        assert torch.equal(table.detach(), before), "table not restored before the step"
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    handle = trainer.opt.register_step_pre_hook(check)
    trainer.step(batch)
    handle.remove()
    assert seen
    # reproduce: gradient of sum_i w_i L_i at the table, plus at the table + eps g / ||g||
    w = trainer.weighting.last_weights * trainer.alpha
    clean_losses = reference.task_losses(reference(batch), batch)
    if weighting == "equal":
        (w * clean_losses).sum().backward()
        g = reference.embed.table.weight.grad.clone()
        with torch.no_grad():
            reference.embed.table.weight += EPS * g / g.norm()
        (w * reference.task_losses(reference(batch), batch)).sum().backward()
        for n, p in reference.named_parameters():
            torch.testing.assert_close(seen[n], p.grad, msg=n)
    else:  # an aggregator: the table is not a shared parameter, it gets sum_i L_i
        clean_losses.sum().backward()
        g = reference.embed.table.weight.grad.clone()
        with torch.no_grad():
            reference.embed.table.weight += EPS * g / g.norm()
        adv = reference.task_losses(reference(batch), batch)
        grad_adv = torch.autograd.grad((w * adv).sum(), reference.embed.table.weight)[0]
        torch.testing.assert_close(seen["embed.table.weight"], g + grad_adv)


def test_fgm_backward_without_gradient_does_nothing(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    batch = tiny_batch(trainer.schema)
    assert fgm_backward(trainer.model, batch, torch.ones(3), EPS) is None
    assert all(p.grad is None for p in trainer.model.parameters())
    with pytest.raises(ConfigError, match="adversarial_epsilon"):
        fgm_backward(trainer.model, batch, torch.ones(3), 0.0)


def test_config_reads_adversarial_keys() -> None:
    from shopmtl.config import from_dict

    t = from_dict(TrainConfig, {"adversarial": "fgm", "adversarial_epsilon": 0.1})
    assert (t.adversarial, t.adversarial_epsilon) == ("fgm", 0.1)
    with pytest.raises(ConfigError, match="adversarial"):
        from_dict(TrainConfig, {"adversarial": "pgd"})


def test_fgm_trains_on_a_tiny_world_with_target_attention(tmp_path: Path) -> None:
    small_world(tmp_path / "world", rows=3000)
    cfg = load_config(
        world_config_yaml(
            tmp_path / "world",
            tmp_path / "exp.yaml",
            epochs=1,
            adversarial="fgm",
            adversarial_epsilon=0.5,
        )
    )
    schema = cfg.data.schema.build()
    feats = tuple(
        dataclasses.replace(f, attend_to=f.vocab_from) if f.kind == "sequence" else f
        for f in schema.features
    )
    schema = dataclasses.replace(schema, features=feats)
    data = prepare_data(cfg.data, schema)
    trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
    assert len(trainer.model.embed.attention) == 1
    state = trainer.fit()
    assert state.global_step >= 3
    assert all(math.isfinite(v) for v in state.history[0]["train_loss"].values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # resuming from the epoch-1 checkpoint gives the same weights as an uninterrupted run
    two = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    full = Trainer(two, data, tmp_path / "full", progress=False)
    full.fit()
    resumed = Trainer(two, data, tmp_path / "run", progress=False)
    resumed.fit(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
