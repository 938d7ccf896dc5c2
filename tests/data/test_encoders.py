from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shopmtl.config import DataConfig, SchemaConfig
from shopmtl.data.encoders import (
    CategoricalEncoder,
    Encoded,
    Encoders,
    NumericEncoder,
    pad_sequences,
)
from shopmtl.data.ingest import BadRowLog, Parsed, read_chunks
from shopmtl.data.pipeline import prepare_data
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec


def parse(path: Path, schema: Schema, chunk_rows: int = 10_000) -> list[Parsed]:
    return list(read_chunks(path, schema, chunk_rows, BadRowLog("fail", 0.0)))


def fit(schema: Schema, parts: list[Parsed]) -> Encoders:
    enc = Encoders(schema)
    for p in parts:
        enc.partial_fit(p)
    return enc.finish()


def transform_all(enc: Encoders, parts: list[Parsed]) -> Encoded:
    return Encoded.concat([enc.transform(p) for p in parts])


def strs(values: list[str | None]) -> pa.Array:
    return pa.array(values, pa.string())


# --- categorical ------------------------------------------------------------------------------


def test_ids_by_frequency_then_value_with_oov_zero() -> None:
    enc = CategoricalEncoder().partial_fit(strs(["b", "a", "b", "c", "b", "a"])).finish()
    assert enc.vocabulary_ == ["b", "a", "c"]
    assert enc.size == 4  # + the OOV row
    ids = enc.transform(strs(["a", "b", "c", "unseen", None]))
    np.testing.assert_array_equal(ids, [2, 1, 3, 0, 0])
    assert ids.dtype == np.int64


def test_partial_fit_accumulates_counts_over_chunks() -> None:
    enc = CategoricalEncoder()
    enc.partial_fit(strs(["x", "y"])).partial_fit(strs(["y", "z", None, "y"]))
    enc.finish()
    assert enc.vocabulary_ == ["y", "x", "z"]  # nulls are never a category


def test_min_count_sends_rare_values_to_oov() -> None:
    enc = CategoricalEncoder(min_count=2).partial_fit(strs(["a", "a", "b", "c", "c", "c"])).finish()
    assert enc.vocabulary_ == ["c", "a"]
    np.testing.assert_array_equal(enc.transform(strs(["a", "b", "c"])), [2, 0, 1])


def test_min_count_from_the_schema(write_csv: Callable[..., Path]) -> None:
    s = Schema((FeatureSpec("u", "categorical", min_count=3),), (TaskSpec("click"),))
    rows = [["a", "1"]] * 3 + [["b", "0"]] * 2 + [["c", "1"]]
    enc = fit(s, parse(write_csv("m.csv", rows, header=["u", "click"]), s))
    assert enc.categorical["u"].vocabulary_ == ["a"]
    assert enc.vocab_size(s.features[0]) == 2


def test_hash_buckets_are_stable_across_processes() -> None:
    # hard-coded: Python's salted hash() would give different ids in another process
    enc = CategoricalEncoder(buckets=1000).finish()
    ids = enc.transform(strs(["item_42", "user-7", None, "item_42"]))
    np.testing.assert_array_equal(ids, [920, 815, 0, 920])
    assert enc.size == 1001
    small = CategoricalEncoder(buckets=97).finish()
    np.testing.assert_array_equal(small.transform(strs(["item_42", "user-7"])), [33, 31])
    # the documented function: blake2b (8 bytes, little endian) mod buckets, + 1 for the OOV row
    digest = hashlib.blake2b(b"item_42", digest_size=8).digest()
    assert int.from_bytes(digest, "little") % 1000 + 1 == 920


def test_hashing_needs_no_fit_and_learns_nothing() -> None:
    enc = CategoricalEncoder(buckets=50).partial_fit(strs(["a", "b"])).finish()
    assert "vocabulary" not in enc.to_json()
    ids = enc.transform(strs([f"v{i}" for i in range(500)]))
    assert ids.min() >= 1 and ids.max() <= 50
    assert len(np.unique(ids)) > 40  # spread over the buckets


# --- fit on train only --------------------------------------------------------------------------


def test_encoders_are_fit_on_the_training_split_only(ecom, write_csv, tmp_path: Path) -> None:
    train_rows = ecom.rows[:20]
    valid_rows = [
        ["u-new", "i-new", "1000.0", "i-new|i1", "home", "0", "", ""],
        *ecom.rows[20:25],
    ]
    test_rows = [["u0", "i-newer", "2000.0", "", "ad", "1", "0", "1"], *ecom.rows[25:]]
    cfg = DataConfig(
        schema=SchemaConfig(ecom.schema.features, ecom.schema.tasks, ecom.schema.scenario),
        train=str(write_csv("train.csv", train_rows)),
        valid=str(write_csv("valid.csv", valid_rows)),
        test=str(write_csv("test.csv", test_rows)),
    )
    data = prepare_data(cfg, ecom.schema)
    enc = data.encoders
    assert set(enc.categorical["item_id"].vocabulary_) == {r[1] for r in train_rows}
    assert set(enc.categorical["user_id"].vocabulary_) == {r[0] for r in train_rows}
    prices = np.array([float(r[2]) for r in train_rows])
    assert enc.numeric["price"].mean_ == pytest.approx(prices.mean())
    assert enc.numeric["price"].std_ == pytest.approx(prices.std())
    assert len(data.train) == 20 and len(data.valid) == 6 and len(data.test) == 6
    # unseen values in valid/test map to the OOV id 0; seen ones keep their train ids
    item_ids = enc.categorical["item_id"]
    assert data.valid.cat[0].tolist() == [0, 0]
    assert data.valid.seq[0, 0].tolist() == [0, int(item_ids.transform(strs(["i1"]))[0]), 0]
    assert data.test.cat[0, 1] == 0
    assert data.test.cat[0, 0] == int(enc.categorical["user_id"].transform(strs(["u0"]))[0]) > 0
    assert (data.train.cat > 0).all()


# --- numeric ----------------------------------------------------------------------------------


def test_numeric_standardisation_values() -> None:
    enc = NumericEncoder().partial_fit(np.array([1.0, 2.0])).partial_fit(np.array([3.0, 4.0]))
    enc.finish()
    assert enc.mean_ == pytest.approx(2.5)
    assert enc.std_ == pytest.approx(np.sqrt(1.25))  # population std
    out = enc.transform(np.array([2.5, 4.0, 1.0]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 1.5 / np.sqrt(1.25), -1.5 / np.sqrt(1.25)], rtol=1e-6)


def test_constant_numeric_feature_keeps_unit_scale() -> None:
    enc = NumericEncoder().partial_fit(np.full(5, 7.0)).finish()
    assert enc.mean_ == pytest.approx(7.0) and enc.std_ == 1.0
    np.testing.assert_allclose(enc.transform(np.array([7.0, 9.0])), [0.0, 2.0])


def test_numeric_encoding_of_the_fixture(ecom) -> None:
    enc = fit(ecom.schema, parse(ecom.path, ecom.schema))
    prices = np.array([float(r[2]) for r in ecom.rows])
    out = transform_all(enc, parse(ecom.path, ecom.schema)).num[:, 0]
    np.testing.assert_allclose(out, (prices - prices.mean()) / prices.std(), rtol=1e-5)
    assert out.mean() == pytest.approx(0.0, abs=1e-6)
    assert out.std() == pytest.approx(1.0, abs=1e-5)


# --- sequences --------------------------------------------------------------------------------


def test_pad_sequences_keeps_the_last_items() -> None:
    flat = np.arange(1, 10)
    offsets = np.array([0, 5, 6, 6, 9])  # [1..5], [6], [], [7, 8, 9]
    out = pad_sequences(flat, offsets, max_len=3)
    np.testing.assert_array_equal(out, [[3, 4, 5], [6, 0, 0], [0, 0, 0], [7, 8, 9]])
    assert out.dtype == np.int64


def test_pad_sequences_edge_cases() -> None:
    np.testing.assert_array_equal(
        pad_sequences(np.array([4, 5]), np.array([0, 2]), max_len=4), [[4, 5, 0, 0]]
    )
    np.testing.assert_array_equal(
        pad_sequences(np.array([], np.int64), np.array([0, 0, 0]), max_len=2), np.zeros((2, 2))
    )


def test_sequence_shares_the_item_vocabulary(ecom) -> None:
    parts = parse(ecom.path, ecom.schema, chunk_rows=7)
    enc = fit(ecom.schema, parts)
    items = enc.categorical["item_id"]
    hist = ecom.schema.features[3]
    assert enc.vocab_size(hist) == items.size
    seq = transform_all(enc, parts).seq
    assert seq.shape == (len(ecom.rows), 1, 3)
    for r, row in enumerate(ecom.rows):
        tokens = [t for t in row[3].split("|") if t][-3:]  # the 3 most recent
        want = items.transform(strs(tokens)).tolist() if tokens else []
        assert seq[r, 0].tolist() == want + [0] * (3 - len(want)), row[3]


def test_empty_history_is_all_padding_with_its_own_vocabulary(write_csv) -> None:
    s = Schema((FeatureSpec("h", "sequence", max_len=3),), (TaskSpec("click"),))
    path = write_csv(
        "s.csv", [["a|b", "1"], ["", "0"], ["b", "1"], ["a||b", "0"]], header=["h", "click"]
    )
    parts = parse(path, s)
    enc = fit(s, parts)
    assert enc.sequence_vocab["h"].vocabulary_ == ["b", "a"]  # no empty-string token
    a, b = 2, 1
    np.testing.assert_array_equal(
        transform_all(enc, parts).seq[:, 0], [[a, b, 0], [0, 0, 0], [b, 0, 0], [a, b, 0]]
    )


def test_empty_history_is_all_padding_when_hashed(write_csv) -> None:
    s = Schema(
        (FeatureSpec("h", "sequence", vocab="hash", buckets=97, max_len=2),), (TaskSpec("click"),)
    )
    parts = parse(write_csv("s.csv", [["", "1"], ["item_42", "0"]], header=["h", "click"]), s)
    np.testing.assert_array_equal(fit(s, parts).transform(parts[0]).seq[:, 0], [[0, 0], [33, 0]])


# --- JSON round trip --------------------------------------------------------------------------


def _rich_schema() -> Schema:
    return Schema(
        features=(
            FeatureSpec("user_id", "categorical", min_count=2),
            FeatureSpec("item_id", "categorical", vocab="hash", buckets=97),
            FeatureSpec("price", "numeric", transform="log1p"),
            FeatureSpec("hist", "sequence", vocab_from="item_id", max_len=3),
            FeatureSpec("hist_own", "sequence", column="hist", max_len=2),
        ),
        tasks=(
            TaskSpec("click"),
            TaskSpec("conversion", given="click"),
            TaskSpec("ad_click", scenarios=("ad",)),
        ),
        scenario=ScenarioSpec("scenario", ("home", "search", "ad")),
    )


def test_json_round_trip_gives_identical_transforms(ecom, tmp_path: Path) -> None:
    s = _rich_schema()
    parts = parse(ecom.path, s, chunk_rows=7)
    enc = fit(s, parts)
    enc.save(tmp_path / "enc.json")
    raw = json.loads((tmp_path / "enc.json").read_text())  # plain JSON, no pickle
    assert raw["categorical"]["item_id"] == {"type": "categorical", "min_count": 1, "buckets": 97}
    assert raw["categorical"]["user_id"]["vocabulary"] == enc.categorical["user_id"].vocabulary_
    loaded = Encoders.load(s, tmp_path / "enc.json")
    a, b = transform_all(enc, parts), transform_all(loaded, parts)
    for name in ("cat", "num", "seq", "scenario", "labels", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.num.dtype == b.num.dtype == np.float32
    for f in s.features:
        if f.kind != "numeric":
            assert loaded.vocab_size(f) == enc.vocab_size(f)
    # and again through JSON text: floats survive exactly
    again = Encoders.from_json(s, json.loads(json.dumps(loaded.to_json())))
    assert again.numeric["price"].mean_ == enc.numeric["price"].mean_
    assert again.numeric["price"].std_ == enc.numeric["price"].std_


def test_loading_encoders_for_another_schema_fails(ecom, tmp_path: Path) -> None:
    enc = fit(ecom.schema, parse(ecom.path, ecom.schema))
    enc.save(tmp_path / "enc.json")
    other = Schema((FeatureSpec("shop_id", "categorical"),), (TaskSpec("click"),))
    with pytest.raises(ValueError, match="does not match"):
        Encoders.load(other, tmp_path / "enc.json")
    with pytest.raises(ValueError, match="malformed"):
        Encoders.from_json(ecom.schema, {"categorical": {}})


def test_numeric_feature_has_no_vocabulary(ecom) -> None:
    enc = fit(ecom.schema, parse(ecom.path, ecom.schema))
    with pytest.raises(ValueError, match="price"):
        enc.vocab_size(ecom.schema.features[2])
