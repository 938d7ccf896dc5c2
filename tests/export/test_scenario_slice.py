"""``--scenario S`` keeps only S's copy of every per-scenario weight (``export.scenario``).

Every model of the zoo has a scenario embedding; STAR adds its star-topology FC and partitioned
norm. Their initial per-scenario weights are all alike (ones / zeros), so each test first gives
every scenario its own (``distinct_scenarios``): a slice that read the wrong scenario's copy
would then change the outputs, and the tests would see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import shopmtl
from shopmtl.export.checks import FP32_TOLERANCE, ParityError
from shopmtl.export.scenario import ScenarioModel, for_scenario, sliced_parity, sub_model
from shopmtl.models.base import MultiTaskModel
from shopmtl.nn.layers import ScenarioTable
from shopmtl.nn.scenario import PartitionedNorm, StarLinear
from tests.helpers import small_world, world_config_yaml
from tests.models.tiny import SCENARIOS, SMALL, build, tiny_batch, tiny_schema


@torch.no_grad()
def distinct_scenarios(model: MultiTaskModel, seed: int = 0) -> MultiTaskModel:
    """Every per-scenario weight of ``model`` drawn at random (a positive variance for the
    norm's running one), so no two scenarios compute the same; returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, scale: float, shift: float = 0.0) -> None:
        t.copy_(shift + scale * torch.randn(t.shape, generator=g))

    for m in model.modules():
        if isinstance(m, ScenarioTable):
            draw(m.weight, 2.0)
        elif isinstance(m, StarLinear):
            draw(m.weight_s, 0.5, 1.0)
            draw(m.bias_s, 0.2)
        elif isinstance(m, PartitionedNorm):
            draw(m.gamma_s, 0.3, 1.0)
            draw(m.beta_s, 0.3)
            draw(m.running_mean, 0.5)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def per_scenario_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, buffer elements) a one-scenario slice must remove: every scenario's copy
    but one of the scenario table, the star FC's W_s and b_s whole (folded into the shared W
    and b, which keep their size), the norm's gamma_s and beta_s whole (folded with gamma and
    beta) and its running moments whole (folded too)."""
    params = buffers = 0
    for m in model.modules():
        if isinstance(m, ScenarioTable):
            params += m.weight.numel() - m.embedding_dim
        elif isinstance(m, StarLinear):
            params += m.weight_s.numel() + m.bias_s.numel()
        elif isinstance(m, PartitionedNorm):
            params += m.gamma_s.numel() + m.beta_s.numel()
            buffers += m.running_mean.numel() + m.running_var.numel()
    return params, buffers


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: MultiTaskModel, batch) -> dict[str, np.ndarray]:
    return {t: p.numpy() for t, p in model.predict(batch).items()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[t] - b[t]).max()) for t in a)


# -- every zoo model, in PyTorch ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_keeps_one_scenario_and_computes_the_same(name: str) -> None:
    schema = tiny_schema()
    model = distinct_scenarios(build(name, schema))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch(schema, n=32)
    index = SCENARIOS.index("ad")  # not the first: reading row 0 instead would show
    want = outputs(ScenarioModel(model, schema, index), batch)
    other = outputs(ScenarioModel(model, schema, 0), batch)
    assert max_diff(want, other) > 20 * FP32_TOLERANCE  # the scenarios do differ

    sliced, report = for_scenario(model, index)
    got = outputs(ScenarioModel(sliced, schema, 0), batch)
    assert max_diff(want, got) <= FP32_TOLERANCE
    # the sliced model ignores the scenario it is given (every in-range index: 0)
    assert not [m for m in sliced.modules() if hasattr(m, "for_scenario")]
    params, buffers = per_scenario_params(model)
    assert n_params(model) - n_params(sliced) == params > 0
    assert report["params"] == {"before": n_params(model), "after": n_params(sliced)}
    assert report["buffers"]["before"] - report["buffers"]["after"] == buffers
    assert report["layers"]["embed.scenario"] == {
        "layer": "ScenarioTable", "as": "Embedding",
        "params_before": len(SCENARIOS) * model.embed.dim, "params_after": model.embed.dim,
        "buffers_before": 0, "buffers_after": 0}
    # the source is untouched: same tensors, same values, still every scenario's copy
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert outputs(ScenarioModel(model, schema, index), batch).keys() == want.keys()


def test_star_folds_its_star_fc_and_norm_into_plain_layers() -> None:
    schema = tiny_schema()
    star = distinct_scenarios(build("star", schema))
    sliced, report = for_scenario(star, 1)
    layers = report["layers"]
    assert {k: (v["layer"], v["as"]) for k, v in layers.items()} == {
        "embed.scenario": ("ScenarioTable", "Embedding"),
        "norm": ("PartitionedNorm", "ScaleShift"),
        "star.layers.0": ("StarLinear", "FoldedLinear"),
        "star.layers.1": ("StarLinear", "FoldedLinear")}
    first = star.star.layers[0]
    folded = sliced.star.layers[0]
    torch.testing.assert_close(folded.weight.T, first.weight * first.weight_s[1])
    torch.testing.assert_close(folded.bias, first.bias + first.bias_s[1])
    assert layers["star.layers.0"]["params_after"] == first.weight.numel() + first.bias.numel()
    width = star.norm.gamma.numel()
    assert layers["norm"]["params_before"] == 2 * width * (1 + len(SCENARIOS))
    assert (layers["norm"]["params_after"], layers["norm"]["buffers_after"]) == (2 * width, 0)


def test_a_slice_that_changes_the_outputs_is_refused() -> None:
    """``sliced_parity`` is what the export runs before it writes anything: a sub-model whose
    folded weight is off by 1e-2 is not the full model any more."""
    from shopmtl.data.encoders import Encoded

    schema = tiny_schema()
    star = distinct_scenarios(build("star", schema))
    b = tiny_batch(schema, n=64)
    enc = Encoded(cat=b.cat.numpy(), num=b.num.numpy(), seq=b.seq.numpy(),
                  scenario=b.scenario.numpy(), labels=b.labels.numpy(), mask=b.mask.numpy(),
                  oracle=None, group=np.zeros(len(b.scenario), np.int64))
    full = ScenarioModel(star, schema, 2).eval()
    sub, _ = sub_model(star, schema, 2)
    assert sliced_parity(full, sub.eval(), enc) <= FP32_TOLERANCE
    with torch.no_grad():
        sub.inner.star.layers[0].bias += 1e-2
    with pytest.raises(ParityError, match="sliced to one scenario's weights differs"):
        sliced_parity(full, sub, enc)


# -- the bundle: STAR and PEPNet model directories exported with --scenario ----------------------

SCENARIO = "search"  # index 1 of the world's four; ad_click is not defined there
ARGS = {"star": "{embed_dim: 8, star: [32, 16], tower: [16], aux: [8]}",
        "pepnet": "{embed_dim: 8, tower: [32, 16], gate_hidden: 16}"}


@dataclass
class Bundles:
    test: Path  # held-out rows
    models: dict[str, Path]  # zoo model directories
    sub: dict[str, Path]  # each model's --scenario SCENARIO bundle
    stored: dict[str, int]  # each model's parameters and buffer elements
    removed: dict[str, int]  # what the slice must remove of them
    towers: dict[str, int]  # parameters of the dropped task's tower
    star_full: Path  # the STAR model's full graph (export_onnx)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """A 50,000-row world (its test split has ~1,200 search rows: the checks need 1,000), a
    tiny STAR and PEPNet on its encoders with distinct per-scenario weights (untrained: the
    slice is arithmetic, training adds nothing to check), each written as a model directory and
    exported as the search sub-model (the bundle, every check); STAR's full graph beside it.
    Three ONNX exports (~3 s each) are the fixture's cost."""
    from shopmtl.config import load_config
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.export.bundle import export_bundle
    from shopmtl.export.graph import export_onnx
    from shopmtl.registry import build_model
    from shopmtl.train.trainer import save_model_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("scenario_slice")
        small_world(root / "w", rows=50_000)
        yaml = world_config_yaml(root / "w", root / "base.yaml")
        out = Bundles(root / "w" / "test.parquet", {}, {}, {}, {}, {}, root / "star.onnx")
        encoders = None
        for i, (name, args) in enumerate(ARGS.items()):
            cfg = load_config(yaml, [f"model.name={name}", f"model.args={args}"])
            schema = cfg.data.schema.build()
            if encoders is None:
                encoders = prepare_data(cfg.data, schema).encoders
            sizes = {f.name: encoders.vocab_size(f) for f in schema.features
                     if f.kind != "numeric"}
            torch.manual_seed(i)
            model = distinct_scenarios(build_model(name, cfg.model.args, schema, sizes), i)
            out.stored[name] = n_params(model) + sum(b.numel() for b in model.buffers())
            out.removed[name] = sum(per_scenario_params(model))
            out.towers[name] = n_params(model.towers["ad_click"])
            out.models[name] = root / name
            save_model_dir(out.models[name], model, cfg, schema, encoders)
            if name == "star":
                export_onnx(model, schema, out.star_full)
            out.sub[name] = root / f"{name}-{SCENARIO}"
            export_bundle(out.models[name], out.sub[name], out.test, scenario=SCENARIO)
        return out
    finally:
        torch.set_num_threads(threads)


def initializer_shapes(path: Path, suffix: str) -> list[tuple[int, ...]]:
    import onnx

    graph = onnx.load(str(path)).graph
    return [tuple(t.dims) for t in graph.initializer if t.name.endswith(suffix)]


def initializer_elements(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path)).graph
    return sum(int(np.prod(t.dims)) for t in graph.initializer)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_the_sub_bundle_stores_one_scenario_s_weights(bundles: Bundles, name: str) -> None:
    """The graph's stored weights (its initializers) are the model's parameters and buffers
    less the other scenarios' copies and the dropped task's tower, within 3% of the model: the
    exporter adds a few constants (shapes, index tables) and keeps rows of a shared output layer
    for the dropped task (STAR's auxiliary network, PEPNet's gates)."""
    meta = json.loads((bundles.sub[name] / "meta.json").read_text())
    sliced = meta["scenario"]["sliced"]
    params, _ = per_scenario_params_of(sliced)
    assert sliced["params"]["before"] - sliced["params"]["after"] == params > 0
    assert 0 <= sliced["parity_with_full"] <= FP32_TOLERANCE
    assert "embed.scenario" in sliced["layers"]
    want = bundles.stored[name] - bundles.removed[name] - bundles.towers[name]
    got = initializer_elements(bundles.sub[name] / "model.onnx")
    assert abs(got - want) <= 0.03 * bundles.stored[name], (got, want)
    # the scenario table, by name: S's row alone (PEPNet's only per-scenario weight, 3 x 8
    # of its 48k: too few for the count above to see)
    tables = initializer_shapes(bundles.sub[name] / "model.onnx", "embed.scenario.weight")
    assert tables == [(1, 8)]


def per_scenario_params_of(sliced: dict) -> tuple[int, int]:
    """(parameters, buffer elements) removed, summed over meta.json's sliced layers."""
    layers = sliced["layers"].values()
    return (sum(v["params_before"] - v["params_after"] for v in layers),
            sum(v["buffers_before"] - v["buffers_after"] for v in layers))


def test_the_star_sub_bundle_is_smaller_than_the_full_graph_by_that_much(
        bundles: Bundles) -> None:
    """Against the full graph: the other three scenarios' star FC and norm weights and the
    tower gone (~66% of this tiny STAR's graph). The exporter folds constants in both graphs
    (the full one stores W * W_s of its second star layer instead of W and W_s), so the counts
    agree within 3% of the full graph; the file shrinks by at least 4 bytes a weight."""
    full = initializer_elements(bundles.star_full)
    sub = initializer_elements(bundles.sub["star"] / "model.onnx")
    gone = bundles.removed["star"] + bundles.towers["star"]
    assert bundles.removed["star"] > 0.5 * full  # what the 3% below must see
    assert abs((full - sub) - gone) <= 0.03 * full, (full, sub, gone)
    assert initializer_shapes(bundles.star_full, "embed.scenario.weight") == [(4, 8)]
    size_full = bundles.star_full.stat().st_size
    size_sub = (bundles.sub["star"] / "model.onnx").stat().st_size
    assert size_sub <= size_full - 4 * (full - sub), (size_full, size_sub)
    assert size_sub < 0.45 * size_full


@pytest.mark.parametrize("name", sorted(ARGS))
def test_the_sub_bundle_predicts_as_the_full_model_on_its_rows(bundles: Bundles,
                                                               name: str) -> None:
    meta = json.loads((bundles.sub[name] / "meta.json").read_text())
    assert 0 <= meta["checks"]["parity_fp32"]["max"] <= FP32_TOLERANCE
    rows = pq.read_table(bundles.test)
    mine = rows.filter(pc.equal(rows.column("scenario"), SCENARIO))
    assert meta["checks"]["rows"] == mine.num_rows >= 1000
    sub = shopmtl.load(bundles.sub[name])
    assert sub.tasks == ("click", "conversion")
    got, want = sub.predict(mine), shopmtl.load(bundles.models[name]).predict(mine)
    for t in sub.tasks:
        diff = np.abs(got.column(t).to_numpy() - want.column(t).to_numpy())
        assert diff.max() <= FP32_TOLERANCE, (t, diff.max())
