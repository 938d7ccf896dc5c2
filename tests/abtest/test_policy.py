"""Ranking policies (``abtest.policy``): a saved model's combined score, per-task models, the
position feature held at 0, popularity from the training file, random, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopmtl.abtest.policy import (
    ModelPolicy,
    RandomPolicy,
    model_policy,
    popularity_policy,
    top_k,
)
from shopmtl.abtest.run import world_of
from shopmtl.abtest.shop import Shop
from shopmtl.modeldir import load

GMV = {"click": 1.0, "conversion": 1.0, "price": 1.0}


@pytest.fixture(scope="module")
def rows(ab_models: Path) -> pa.Table:
    shop = Shop(world_of(ab_models))
    return next(iter(shop.requests(1, seed=0))).candidates


def test_a_model_ranks_by_pctr_x_pcvr_x_price(ab_models: Path, rows: pa.Table) -> None:
    pol = model_policy("mt", ab_models / "model", GMV)
    pred = load(ab_models / "model").predict(rows, task=["click", "conversion"])
    p = {t: pred.column(t).to_numpy(zero_copy_only=False) for t in ("click", "conversion")}
    price = rows.column("price").to_numpy()
    want = np.log(p["click"]) + np.log(p["conversion"]) + np.log(price)
    got = pol.scores(rows)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    shown = top_k(got, 5)
    expected_gmv = p["click"] * p["conversion"] * price
    assert list(shown) == list(np.argsort(-expected_gmv, kind="stable")[:5])
    # click only: ranks by pCTR
    only = model_policy("ctr", ab_models / "model", {"click": 1.0}).scores(rows)
    assert list(top_k(only, 3)) == list(np.argsort(-p["click"], kind="stable")[:3])


def test_the_position_feature_is_held_at_zero(ab_models: Path, rows: pa.Table) -> None:
    pol = model_policy("mt", ab_models / "model", GMV)
    i = rows.column_names.index("position")
    moved = rows.set_column(i, "position", pa.array(np.arange(rows.num_rows) % 10))
    np.testing.assert_array_equal(pol.scores(moved), pol.scores(rows))


def test_single_task_models_combine_like_one(ab_models: Path, rows: pa.Table) -> None:
    st = ab_models / "single_task"
    pol = model_policy("st", {"click": st / "click" / "model",
                              "conversion": st / "conversion" / "model"}, GMV)
    c = load(st / "click" / "model").predict(rows, task="click").column("click")
    v = load(st / "conversion" / "model").predict(rows, task="conversion").column("conversion")
    want = (np.log(c.to_numpy(zero_copy_only=False)) + np.log(v.to_numpy(zero_copy_only=False))
            + np.log(rows.column("price").to_numpy()))
    np.testing.assert_allclose(pol.scores(rows), want, rtol=1e-6)
    # one directory for two tasks is loaded once
    same = model_policy("x", {"click": ab_models / "model", "conversion": ab_models / "model"},
                        GMV)
    assert same.models["click"] is same.models["conversion"]


def test_policy_errors_name_the_problem(ab_models: Path) -> None:
    click_only = ab_models / "single_task" / "click" / "model"
    with pytest.raises(ValueError, match="does not predict 'conversion'"):
        model_policy("p", click_only, GMV)
    with pytest.raises(ValueError, match="no model predicts 'conversion'"):
        model_policy("p", {"click": click_only}, GMV)
    with pytest.raises(ValueError, match="non-zero task weight"):
        ModelPolicy("p", {}, {"click": 0.0})
    with pytest.raises(FileNotFoundError, match="no training file"):
        popularity_policy("pop", ab_models / "missing.parquet")
    bad = ab_models.parent / "no_click.parquet"
    pq.write_table(pa.table({"item_id": [1, 2]}), bad)
    with pytest.raises(ValueError, match=r"no column\(s\) \['click'\]"):
        popularity_policy("pop", bad)


def test_popularity_counts_training_clicks(ab_models: Path, rows: pa.Table) -> None:
    train = ab_models / "data" / "train.parquet"
    pol = popularity_policy("pop", train)
    t = pq.read_table(train, columns=["item_id", "click"]).to_pydict()
    counts: dict[str, float] = {}
    for i, c in zip(t["item_id"], t["click"], strict=True):
        counts[str(i)] = counts.get(str(i), 0.0) + c
    assert pol.item_scores == counts
    unknown = pa.table({"item_id": pa.array([10**6, int(t["item_id"][0])])})
    s = pol.scores(unknown)
    assert s[0] == -np.inf and top_k(s, 1)[0] == 1  # never seen: ranked last


def test_random_is_seeded_and_ties_keep_row_order(rows: pa.Table) -> None:
    a, b = RandomPolicy("r", 3), RandomPolicy("r", 3)
    np.testing.assert_array_equal(a.scores(rows), b.scores(rows))
    assert not np.array_equal(a.scores(rows), RandomPolicy("r", 4).scores(rows))
    assert list(top_k(np.array([1.0, 2.0, 2.0, 0.0]), 3)) == [1, 2, 0]
    assert len(top_k(np.zeros(3), 0)) == 0


def test_an_exported_bundle_ranks_as_its_pytorch_model(ab_models: Path, rows: pa.Table,
                                                       tmp_path: Path) -> None:
    from shopmtl.export.bundle import export_bundle

    export_bundle(ab_models / "model", tmp_path / "bundle", ab_models / "data" / "test.parquet")
    torch_arm = model_policy("pt", ab_models / "model", GMV)
    onnx_arm = model_policy("onnx", tmp_path / "bundle", GMV)
    assert type(onnx_arm.models["click"]).__name__ == "OnnxBundle"
    a, b = torch_arm.scores(rows), onnx_arm.scores(rows)
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert list(top_k(a, 10)) == list(top_k(b, 10))
