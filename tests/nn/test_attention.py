"""DIN target attention: masking, shape, gradient, set semantics; every registered model runs
with a schema whose history attends to its target item."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shopmtl.data.schema import FeatureSpec, Schema, TaskSpec
from shopmtl.nn.attention import TargetAttention
from shopmtl.nn.layers import FeatureEmbedding
from shopmtl.registry import MODELS
from tests.models.tiny import VOCAB, build, tiny_batch, tiny_schema

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(b: int = 5, n: int = 6, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g)
    keys = torch.randn(b, n, d, generator=g)
    present = torch.rand(b, n, generator=g) < 0.6
    present[0] = False  # an empty history
    present[1] = True  # a full one
    return q, keys, present


@pytest.mark.parametrize("softmax", [False, True])
def test_shape_and_padding_never_contributes(softmax: bool) -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,), softmax=softmax)
    q, keys, present = _inputs()
    out = unit(q, keys, present)
    assert out.shape == (5, 4) and torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(4))  # all padding -> zeros
    noisy = torch.where(present.unsqueeze(-1), keys, torch.randn_like(keys) * 100)
    torch.testing.assert_close(unit(q, noisy, present), out)


def test_no_softmax_is_the_score_weighted_sum() -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,))
    q, keys, present = _inputs()
    s = unit.scores(q, keys) * present
    torch.testing.assert_close(unit(q, keys, present), (s.unsqueeze(-1) * keys).sum(1))


def test_softmax_weights_sum_to_one_over_real_items() -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,), softmax=True)
    q, keys, present = _inputs()
    same = keys[:, :1].expand_as(keys)  # every item equal: the pooled vector is that item
    out = unit(q, same, present)
    rows = present.any(1)
    torch.testing.assert_close(out[rows], keys[rows, 0])


@pytest.mark.parametrize("softmax", [False, True])
def test_gradient_flows_and_is_finite_for_empty_rows(softmax: bool) -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,), softmax=softmax)
    q, keys, present = _inputs()
    q.requires_grad_(True)
    keys.requires_grad_(True)
    unit(q, keys, present).square().sum().backward()
    for t in [q, keys, *unit.parameters()]:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert q.grad[1:].any() and all(p.grad.any() for p in unit.parameters())
    assert not keys.grad[~present].any()  # padding gets no gradient
    assert not q.grad[0].any()  # an empty history says nothing about the target


@pytest.mark.parametrize("softmax", [False, True])
def test_permuting_the_history_gives_the_same_vector(softmax: bool) -> None:
    torch.manual_seed(0)
    unit = TargetAttention(4, (8,), softmax=softmax)
    q, keys, present = _inputs()
    perm = torch.randperm(keys.shape[1])
    torch.testing.assert_close(unit(q, keys[:, perm], present[:, perm]), unit(q, keys, present))


# -- schema and FeatureEmbedding -------------------------------------------------------------


def attention_schema() -> Schema:
    base = tiny_schema()
    feats = tuple(
        dataclasses.replace(f, attend_to="item_id") if f.name == "hist_item" else f
        for f in base.features
    )
    return Schema(feats, base.tasks, base.scenario)


def test_schema_validates_attend_to() -> None:
    cat, task = FeatureSpec("item", "categorical"), (TaskSpec("click"),)
    Schema((cat, FeatureSpec("h", "sequence", vocab_from="item", attend_to="item")), task)
    bad = [
        (FeatureSpec("h", "sequence", vocab_from="item", attend_to="nope"), "not a categorical"),
        (FeatureSpec("h", "sequence", attend_to="item"), "vocab_from"),
        (FeatureSpec("x", "categorical", attend_to="item"), "not a sequence"),
    ]
    for spec, match in bad:
        with pytest.raises(ValueError, match=match):
            Schema((cat, spec), task)


def test_feature_embedding_pools_by_attention_only_where_asked() -> None:
    schema = attention_schema()
    torch.manual_seed(0)
    emb = FeatureEmbedding(schema, VOCAB, 8)
    torch.manual_seed(0)
    plain = FeatureEmbedding(tiny_schema(), VOCAB, 8)
    assert len(emb.attention) == 1 and len(plain.attention) == 0
    plain.load_state_dict(emb.state_dict(), strict=False)  # same table and dense vectors
    batch = tiny_batch(schema, n=16)
    a, b = emb(batch), plain(batch)
    assert a.shape == b.shape == (16, emb.num_fields, 8)
    hist = 3  # fields: user, item, segment, hist_item, query, price, scenario
    others = [i for i in range(emb.num_fields) if i != hist]
    assert torch.equal(a[:, others], b[:, others]) and not torch.equal(a[:, hist], b[:, hist])
    # the query is the target item's row of the shared table
    ids = batch.seq[:, 0] + emb.seq_offsets[0]
    want = emb.attention[0](
        emb.table(batch.cat[:, 1] + emb.cat_offsets[1]), emb.table(ids), batch.seq[:, 0] > 0
    )
    torch.testing.assert_close(a[:, hist], want)


def test_config_reads_attend_to() -> None:
    from shopmtl.config import from_dict

    f = from_dict(
        FeatureSpec, {"name": "h", "kind": "sequence", "vocab_from": "i", "attend_to": "i"}
    )
    assert f.attend_to == "i"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_with_target_attention(name: str) -> None:
    schema = attention_schema()
    model = build(name, schema)
    assert len(model.embed.attention) == 1
    batch = tiny_batch(schema, n=32)
    model.train()
    out = model(batch)
    assert list(out) == list(model.task_names)
    assert all(v.shape == (32,) and torch.isfinite(v).all() for v in out.values())
    losses = model.task_losses(out, batch)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.embed.attention.parameters())
    # a fully masked task still gives exactly zero loss and gradient
    j = model.task_names.index("ad_click")
    mask = batch.mask.clone()
    mask[:, j] = False
    masked = dataclasses.replace(batch, mask=mask)
    model.zero_grad(set_to_none=True)
    lj = model.task_losses(model(masked), masked)[j]
    assert lj.item() == 0.0
    lj.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # weights round trip
    other = build(name, schema, seed=1)
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    a, b = model(batch), other(batch)
    assert all(torch.equal(a[n], b[n]) for n in model.task_names)
