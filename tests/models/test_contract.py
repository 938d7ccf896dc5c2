"""The contract every registered model keeps: one finite logit [B] per task, learning, masking,
safetensors round trip and strict configuration. Parametrized over ``registry.MODELS``, so a
model added to the registry is checked without touching this file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shopmtl.config import ConfigError
from shopmtl.data.dataset import Batch
from shopmtl.registry import MODELS, build_model
from tests.models.tiny import SMALL, VOCAB, build, tiny_batch, tiny_schema

NAMES = sorted(MODELS)


def test_registry_holds_the_zoo() -> None:
    zoo = {"shared_bottom", "mmoe", "ple", "esmm", "aitm", "star", "pepnet", "m2m"}
    assert zoo <= set(MODELS)
    assert set(SMALL) >= set(MODELS), "give a new model small test widths in tests/models/tiny"


@pytest.mark.parametrize("name", NAMES)
def test_config_is_a_frozen_dataclass_and_defaults_build(name: str) -> None:
    _, cfg_cls = MODELS[name]
    assert dataclasses.is_dataclass(cfg_cls) and cfg_cls.__dataclass_params__.frozen
    model = build_model(name, {}, tiny_schema(), VOCAB)  # defaults alone are a valid model
    out = model(tiny_batch(model.schema, n=8))
    assert set(out) == set(model.task_names)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_one_finite_logit_per_task(name: str) -> None:
    model = build(name)
    batch = tiny_batch(model.schema)
    for train in (True, False):
        model.train(train)
        out = model(batch)
        assert list(out) == list(model.task_names)
        for v in out.values():
            assert v.shape == (len(batch),) and v.dtype == torch.float32
            assert torch.isfinite(v).all()
    probs = model.predict(batch)
    assert all(((p >= 0) & (p <= 1)).all() for p in probs.values())
    losses = model.task_losses(model(batch), batch)
    assert losses.shape == (len(model.task_names),) and torch.isfinite(losses).all()


@pytest.mark.parametrize("kind", ["none", "cross"])
@pytest.mark.parametrize("name", NAMES)
def test_every_interaction_kind_runs(name: str, kind: str) -> None:
    model = build(name, interaction=kind)
    batch = tiny_batch(model.schema, n=16)
    losses = model.task_losses(model(batch), batch)
    losses.sum().backward()
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_on_a_repeated_batch(name: str) -> None:
    model = build(name)
    batch = tiny_batch(model.schema)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    history = []
    for _ in range(30):
        loss = model.task_losses(model(batch), batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.8 * history[0], history


def _mask_out(batch: Batch, j: int, parent: int | None) -> Batch:
    """Task j carries no label information at all: its mask is False everywhere and, for a
    conditional task, its condition is positive wherever known (a negative condition is itself
    a known negative of the joint event, which entire-space models such as ESMM supervise)."""
    labels, mask = batch.labels.clone(), batch.mask.clone()
    mask[:, j] = False
    if parent is not None:
        labels[:, parent] = torch.where(mask[:, parent], 1.0, labels[:, parent])
    return dataclasses.replace(batch, labels=labels, mask=mask)


@pytest.mark.parametrize("task", ["click", "conversion", "ad_click"])
@pytest.mark.parametrize("name", NAMES)
def test_a_fully_masked_task_has_zero_loss_and_gradient(name: str, task: str) -> None:
    model = build(name)
    model.train()
    schema = model.schema
    j = schema.task_names.index(task)
    given = schema.task(task).given
    parent = None if given is None else schema.task_names.index(given)
    batch = _mask_out(tiny_batch(schema), j, parent)
    losses = model.task_losses(model(batch), batch)
    assert losses[j].item() == 0.0
    # tasks not conditioned on the masked one keep learning
    free = [i for i, t in enumerate(schema.tasks) if i != j and t.given != task]
    assert (losses[free] > 0).all()
    model.zero_grad(set_to_none=True)
    losses[j].backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or not p.grad.any(), f"{pname} got gradient from masked '{task}'"
    # and the masked task adds nothing to the gradient of the total
    model.zero_grad(set_to_none=True)
    losses = model.task_losses(model(batch), batch)
    full = torch.autograd.grad(losses.sum(), list(model.parameters()), allow_unused=True)
    losses = model.task_losses(model(batch), batch)
    rest = torch.autograd.grad(
        losses.sum() - losses[j], list(model.parameters()), allow_unused=True
    )
    for a, b in zip(full, rest, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_round_trip_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    model = build(name, seed=0)
    batch = tiny_batch(model.schema)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):  # move weights (and running statistics) away from their initial values
        loss = model.task_losses(model(batch), batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    other = build(name, seed=1)
    other.load_state_dict(load_file(str(path)))
    model.eval()
    other.eval()
    a, b = model(batch), other(batch)
    for n in model.task_names:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_unknown_config_key_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="no_such_key"):
        build_model(name, {"no_such_key": 1}, tiny_schema(), VOCAB)
    with pytest.raises(ConfigError, match="interaction"):
        build_model(name, {"interaction": "outer"}, tiny_schema(), VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_shared_parameters_are_model_parameters_that_every_task_trains(name: str) -> None:
    model = build(name)
    shared = model.shared_parameters()
    assert shared, "a multi-task model shares something"
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in shared)
    # gradient methods build per-task Jacobians of these: never the [vocab, D] table
    assert all(p is not model.embed.table.weight for p in shared)
    batch = tiny_batch(model.schema)
    losses = model.task_losses(model(batch), batch)
    for j, task in enumerate(model.task_names):
        grads = torch.autograd.grad(losses[j], shared, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.any() for g in grads), f"'{task}' trains no shared param"
