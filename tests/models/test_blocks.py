"""Shared blocks of the zoo: MoE gates and CGC, STAR's partitioned norm and star FC, PEPNet's
gate unit and field lookup, M2M's meta unit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shopmtl.config import ConfigError
from shopmtl.data.dataset import Batch
from shopmtl.nn.layers import FeatureEmbedding, lookup
from shopmtl.nn.moe import CGC, Experts, Gate, mix, mix_parts, read_once
from shopmtl.nn.scenario import (
    GateNU,
    MetaLinear,
    PartitionedNorm,
    StarLinear,
    feature_fields,
)
from shopmtl.registry import build_model
from tests.models.tiny import VOCAB, build, tiny_batch, tiny_schema


def test_gates_mix_experts_with_weights_summing_to_one() -> None:
    x = torch.randn(5, 7)
    experts, gate = Experts(7, 3, (8, 4)), Gate(7, 3)
    e, w = experts(x), gate(x)
    assert e.shape == (5, 3, 4) and w.shape == (5, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    torch.testing.assert_close(mix(e, w), (e * w.unsqueeze(-1)).sum(1))


def test_packed_experts_are_independent_mlps() -> None:
    # expert k of the packed module equals an MLP built from its slices of the weights
    torch.manual_seed(0)
    experts = Experts(7, 3, (8, 5, 4))
    x = torch.randn(6, 7)
    out = experts(x)  # [6, 3, 4]
    w0 = experts.first.weight.view(3, 8, 7)
    b0 = experts.first.bias.view(3, 8)
    for k in range(3):
        h = torch.relu(x @ w0[k].T + b0[k])
        for w, b in zip(experts.weights, experts.biases, strict=True):
            h = torch.relu(h @ w[k] + b[k])
        torch.testing.assert_close(out[:, k], h)
    # expert 1's output does not depend on expert 0's deeper weights
    grads = torch.autograd.grad(out[:, 1].sum(), experts.weights[0])
    assert grads[0][0].abs().sum() == 0 and grads[0][1].abs().sum() > 0
    # one layer: a single packed Linear
    assert Experts(7, 2, (5,))(x).shape == (6, 2, 5)


def test_mix_parts_equals_mix_over_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    groups = [torch.randn(5, n, 4, generator=g, requires_grad=True) for n in (1, 2, 3)]
    w = torch.softmax(torch.randn(5, 6, generator=g), -1).requires_grad_()
    ref = mix(torch.cat(groups, 1), w)
    out = mix_parts(groups, w)
    torch.testing.assert_close(out, ref)
    up = torch.randn(5, 4, generator=g)
    want = torch.autograd.grad((ref * up).sum(), [*groups, w])
    got = torch.autograd.grad((out * up).sum(), [*groups, w])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_lookup_equals_embedding_values_and_gradient_with_repeated_ids() -> None:
    """The sort-free backward adds every occurrence of an id (here ids repeat within and
    across rows, and some rows are never looked up) and leaves torch's thread count as it was."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(11, 4)
    ids = torch.tensor([[1, 1, 3], [3, 0, 1], [7, 7, 7]])
    up = torch.randn(3, 3, 4)
    threads = torch.get_num_threads()
    (ref_grad,) = torch.autograd.grad((table(ids) * up).sum(), [table.weight])
    out = lookup(table, ids)
    assert out.shape == (3, 3, 4)
    torch.testing.assert_close(out, table(ids))
    (grad,) = torch.autograd.grad((out * up).sum(), [table.weight])
    torch.testing.assert_close(grad, ref_grad)
    assert grad[[2, 4, 5, 6, 8, 9, 10]].abs().sum() == 0  # rows never looked up
    torch.testing.assert_close(grad[7], up[2].sum(0))
    assert torch.get_num_threads() == threads


def test_mix_matches_the_einsum() -> None:
    e, w = torch.randn(4, 3, 5), torch.softmax(torch.randn(4, 3), -1)
    torch.testing.assert_close(mix(e, w), torch.einsum("bnh,bn->bh", e, w))


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "esmm"])
def test_input_norm_batch_normalises_the_bottom_input(name: str) -> None:
    model = build(name, input_norm="batch")
    norm = model.input_norm
    assert isinstance(norm, torch.nn.BatchNorm1d)
    assert set(map(id, norm.parameters())) <= set(map(id, model.shared_parameters()))
    batch = tiny_batch(model.schema)
    model.train()
    model(batch)
    assert norm.num_batches_tracked.item() == 1 and norm.running_var.ne(1).any()
    model.eval()  # inference uses the running statistics: a single row gets a finite output
    one = model(tiny_batch(model.schema, n=1))
    assert all(torch.isfinite(v).all() for v in one.values())
    assert isinstance(build(name, input_norm="none").input_norm, torch.nn.Identity)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "esmm"])
def test_input_norm_layer_is_the_default_and_does_not_depend_on_the_batch(name: str) -> None:
    """LayerNorm normalises each row on its own: a row scores the same alone as in a batch,
    in training mode too, and the normalised input has zero mean and unit variance per row."""
    torch.manual_seed(0)
    model = build(name)
    norm = model.input_norm
    assert isinstance(norm, torch.nn.LayerNorm)
    assert set(map(id, norm.parameters())) <= set(map(id, model.shared_parameters()))
    seen: list[torch.Tensor] = []
    norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    batch = tiny_batch(model.schema, n=16)
    model.train()
    full = model(batch)
    rows = seen[-1]
    torch.testing.assert_close(rows.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    # unit variance up to LayerNorm's eps (1e-5) against inputs whose variance is ~2e-3
    torch.testing.assert_close(rows.var(1, unbiased=False), torch.ones(16), atol=0.03, rtol=0)
    first = Batch(*(None if v is None else v[:1] for v in dataclasses.astuple(batch)))
    one = model(first)
    for task, logits in full.items():
        torch.testing.assert_close(one[task], logits[:1], atol=1e-5, rtol=1e-5)


def test_cgc_levels() -> None:
    x = torch.randn(4, 6)
    low, top = CGC(6, 3, 1, 2, (5,)), CGC(5, 3, 1, 2, (5,), shared_out=False)
    tasks, shared = low([x] * 3, x)
    assert len(tasks) == 3 and all(t.shape == (4, 5) for t in tasks) and shared.shape == (4, 5)
    tasks, shared = top(tasks, shared)
    assert shared is None and top.shared_gate is None
    # a task's output does not depend on another task's specific experts (their weights
    # share one GEMM with task 0's at the first level, so their gradient is zero, not None)
    out = low([x] * 3, x)[0][0]
    grads = torch.autograd.grad(out.sum(), list(low.specific[1].parameters()), allow_unused=True)
    assert all(g is None or not g.abs().sum() for g in grads)
    out = low([x] * 3, x)[0][0]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(
        out.sum(), list(low.specific[0].parameters())))


def test_read_once_equals_each_module_reading_the_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 7, requires_grad=True)
    experts, gates = [Experts(7, 3, (8, 4)), Experts(7, 2, (6,))], [Gate(7, 3), Gate(7, 5)]
    hs, ws = read_once(x, experts, gates)
    ref_h, ref_w = [e(x) for e in experts], [g(x) for g in gates]
    for a, b in zip(hs + ws, ref_h + ref_w, strict=True):
        torch.testing.assert_close(a, b)
    # the same gradients, for the input and for every module's own parameters
    params = [x, *(p for m in experts + gates for p in m.parameters())]
    loss = sum((h ** 2).sum() for h in hs) + sum((w * torch.arange(w.shape[1])).sum() for w in ws)
    ref = sum((h ** 2).sum() for h in ref_h) + sum(
        (w * torch.arange(w.shape[1])).sum() for w in ref_w)
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_cgc_first_level_one_gemm_equals_separate_inputs() -> None:
    # the one-input path (every task reads x) and the per-input path (distinct tensors that
    # hold the same numbers) give the same outputs
    torch.manual_seed(1)
    cgc, x = CGC(6, 3, 2, 2, (5, 4)), torch.randn(4, 6)
    tasks, shared = cgc([x] * 3, x)
    tasks2, shared2 = cgc([x.clone() for _ in range(3)], x.clone())
    for a, b in zip([*tasks, shared], [*tasks2, shared2], strict=True):
        torch.testing.assert_close(a, b)


def test_partitioned_norm_keeps_statistics_per_scenario() -> None:
    torch.manual_seed(0)
    norm = PartitionedNorm(3, 4, momentum=1.0)
    scen = torch.tensor([0] * 50 + [1] * 50 + [2])  # scenario 2: one row, scenario 3: none
    x = torch.randn(101, 3) + scen.unsqueeze(1) * 5.0
    y = norm(x, scen)
    for s in (0, 1):
        rows = y[scen == s]
        torch.testing.assert_close(rows.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
        torch.testing.assert_close(norm.running_mean[s], x[scen == s].mean(0))
    # too few rows to estimate: running statistics are used and left alone
    assert torch.equal(norm.running_mean[2:], torch.zeros(2, 3))
    torch.testing.assert_close(y[-1], x[-1] / (1 + 1e-5) ** 0.5)
    norm.eval()
    torch.testing.assert_close(norm(x, scen)[:100], y[:100], atol=0.05, rtol=0)


def test_star_linear_is_shared_times_scenario_weights() -> None:
    lin = StarLinear(4, 3, 2)
    with torch.no_grad():
        lin.weight_s.normal_()
        lin.bias_s.normal_()
    x, scen = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    expect = torch.stack(
        [
            x[i] @ (lin.weight * lin.weight_s[s]) + lin.bias + lin.bias_s[s]
            for i, s in enumerate(scen.tolist())
        ]
    )
    torch.testing.assert_close(lin(x, scen), expect)


def test_star_scenario_parameters_only_touch_their_scenario() -> None:
    model = build("star").eval()
    batch = tiny_batch(model.schema)
    before = model(batch)
    with torch.no_grad():
        model.star.layers[0].weight_s[2].mul_(3.0)
    after = model(batch)
    changed = before["click"] != after["click"]
    assert torch.equal(changed, batch.scenario == 2)


def test_gate_unit_range() -> None:
    gate = GateNU(5, 7, 4, gamma=2.0)
    g = gate(torch.randn(100, 5) * 10)
    assert g.shape == (100, 7) and (g > 0).all() and (g < 2).all()


def test_meta_linear_generates_weights_from_the_condition() -> None:
    lin = MetaLinear(4, 3, 2)
    with torch.no_grad():
        lin.u.normal_()
    x, s = torch.randn(5, 4), torch.randn(5, 2)
    w = lin.base.weight.T + torch.einsum("bj,jio->bio", s, lin.v)  # [B, in, out] per row
    expect = torch.einsum("bi,bio->bo", x, w) + lin.base.bias + s @ lin.u
    torch.testing.assert_close(lin(x, s), expect)


def test_feature_fields_match_the_embedding_layout() -> None:
    schema = tiny_schema()
    emb = FeatureEmbedding(schema, VOCAB, 4)
    batch = tiny_batch(schema, n=8)
    fields = emb(batch)  # [B, F, D]
    item, price, query = feature_fields(schema, ("item_id", "price", "query"), "x")
    off = VOCAB["user_id"]
    torch.testing.assert_close(fields[:, item], emb.table(batch.cat[:, 1] + off))
    torch.testing.assert_close(fields[:, price], batch.num[:, :1] * emb.num_weight + emb.num_bias)
    assert query == 4 and fields.shape[1] == emb.num_fields == 7
    with pytest.raises(ConfigError, match="nope"):
        feature_fields(schema, ("nope",), "model.args.prior_features")


@pytest.mark.parametrize(
    ("name", "key"),
    [("pepnet", "prior_features"), ("pepnet", "domain_features"), ("m2m", "domain_features")],
)
def test_unknown_feature_names_in_model_args_raise_config_error(name: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_model(name, {key: ["nope"]}, tiny_schema(), VOCAB)
    model = build(name, **{key: ["segment"]})
    batch = tiny_batch(model.schema, n=8)
    assert torch.isfinite(torch.stack(list(model(batch).values()))).all()


def test_pepnet_gates_read_the_general_embedding_through_a_stop_gradient() -> None:
    model = build("pepnet")
    batch = tiny_batch(model.schema, n=8)
    seen: dict[str, torch.Tensor] = {}
    model.epnet.register_forward_hook(lambda m, i, o: seen.__setitem__("ep", o))
    model.ppnet[0].register_forward_hook(lambda m, i, o: seen.__setitem__("pp", o))
    model(batch)
    table, scen = model.embed.table.weight, model.embed.scenario.weight
    # EPNet: the domain side (scenario) trains the gate input, the general embedding does not
    g_table, g_scen = torch.autograd.grad(seen["ep"].sum(), [table, scen], retain_graph=True)
    assert not g_table.any() and g_scen.any()
    # PPNet: the priors (ids in the table) get gradient, the EPNet-gated tower input does not
    g = torch.autograd.grad(seen["pp"].sum(), [table, *model.epnet.parameters()], allow_unused=True)
    assert g[0].any() and all(x is None or not x.any() for x in g[1:])
