"""Content features from a catalog: key -> row, the no-content row 0, strict catalog errors that
never echo a value, encoders saved and loaded with their matrices, config surface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopmtl.config import ConfigError, load_config
from shopmtl.data.content import ContentEncoder
from shopmtl.data.encoders import Encoders
from shopmtl.data.ingest import BadRowLog, DataError, read_chunks
from shopmtl.data.schema import FeatureSpec, Schema, TaskSpec

SECRET = "s3cret title nobody may log"


def _catalog(path: Path, **cols: list) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def _vector(path: Path, dim: int = 3) -> FeatureSpec:
    return FeatureSpec("emb", "vector", key="item_id", table=str(path), dim=dim)


def test_vector_rows_and_missing_key_maps_to_row_zero(tmp_path: Path) -> None:
    cat = _catalog(tmp_path / "items.parquet", item_id=[10, 11, 12],
                   emb=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], None])
    enc = ContentEncoder(_vector(cat)).fit()
    assert enc.rows == 4
    values = enc.arrays_["values"]
    np.testing.assert_array_equal(values[0], 0.0)  # no content
    np.testing.assert_array_equal(values[2], [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(values[3], 0.0)  # an empty cell: the zero vector
    rows = enc.transform(pa.array(["11", "99", None, "10"]))  # ids read as strings
    assert rows.tolist() == [2, 0, 0, 1]


def test_image_rows_are_chw_and_blank_for_missing(tmp_path: Path) -> None:
    img = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    cat = _catalog(tmp_path / "items.parquet", item_id=["a"],
                   pic=pa.array([img.tobytes()], pa.binary()))
    spec = FeatureSpec("pic", "image", key="item_id", table=str(cat), image_size=(2, 4))
    enc = ContentEncoder(spec).fit()
    values = enc.arrays_["values"]
    assert values.shape == (2, 3, 2, 4) and values.dtype == np.uint8
    np.testing.assert_array_equal(values[1], img.transpose(2, 0, 1))
    np.testing.assert_array_equal(values[0], 0)


@pytest.mark.parametrize(
    ("cols", "spec_args", "expected"),
    [
        ({"item_id": [1, 2, 1], "emb": [[0.0] * 3] * 3}, {}, "row 3, column 'item_id': duplicate"),
        ({"item_id": [1, 2], "emb": [[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]]}, {},
         "row 2, column 'emb': NaN"),
        ({"item_id": [1, 2], "emb": [[0.0, 1.0, 2.0], [0.0, 1.0]]}, {},
         "row 2, column 'emb': vector of length 2, expected dim 3"),
        ({"item_id": [1], "other": [[0.0] * 3]}, {}, "missing column(s) ['emb']"),
        ({"item_id": [1, None], "emb": [[0.0] * 3] * 2}, {}, "row 2, column 'item_id': empty key"),
    ],
)
def test_malformed_vector_catalogs_name_file_column_and_row(
    tmp_path: Path, cols: dict, spec_args: dict, expected: str
) -> None:
    cat = _catalog(tmp_path / "items.parquet", **cols)
    with pytest.raises(DataError) as e:
        ContentEncoder(_vector(cat)).fit()
    assert "items.parquet" in str(e.value)
    assert expected in str(e.value)


def test_wrong_image_size_and_text_values_are_never_echoed(tmp_path: Path) -> None:
    cat = _catalog(tmp_path / "items.parquet", item_id=[1, 2],
                   pic=pa.array([bytes(12), bytes(7)], pa.binary()))
    spec = FeatureSpec("pic", "image", key="item_id", table=str(cat), image_size=(2, 2))
    with pytest.raises(DataError, match=r"row 2, column 'pic': image of 7 bytes, expected 2x2x3"):
        ContentEncoder(spec).fit()
    # a duplicate key in a text catalog: the message names the row, never the title
    csv = tmp_path / "titles.csv"
    csv.write_text(f"item_id,title\n1,{SECRET}\n1,{SECRET}\n")
    spec = FeatureSpec("title", "text", key="item_id", table=str(csv))
    with pytest.raises(DataError) as e:
        ContentEncoder(spec).fit()
    assert "titles.csv: line 3, column 'item_id': duplicate key (first at line 2)" in str(e.value)
    assert SECRET not in str(e.value)


def test_missing_catalog_file_and_missing_key_or_table(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        ContentEncoder(_vector(tmp_path / "nope.parquet")).fit()
    tasks = (TaskSpec("click"),)
    with pytest.raises(ValueError, match="needs `key`"):
        Schema((FeatureSpec("emb", "vector", dim=3),), tasks)
    with pytest.raises(ValueError, match="dim >= 1"):
        Schema((FeatureSpec("emb", "vector", key="i", table="t.parquet"),), tasks)
    with pytest.raises(ValueError, match="image_size"):
        Schema((FeatureSpec("p", "image", key="i", table="t", image_size=(4,)),), tasks)


def _impressions(path: Path, items: list[str]) -> Path:
    n = len(items)
    pq.write_table(pa.table({"user_id": [f"u{i % 3}" for i in range(n)], "item_id": items,
                             "click": [i % 2 for i in range(n)],
                             "is_new": [int(i >= n - 2) for i in range(n)]}), path)
    return path


def test_encoders_carry_content_rows_and_slices_and_round_trip(tmp_path: Path) -> None:
    cat = _catalog(tmp_path / "items.parquet", item_id=["a", "b", "c"],
                   emb=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    schema = Schema(
        (FeatureSpec("user_id", "categorical"), FeatureSpec("item_id", "categorical"),
         _vector(cat)),
        (TaskSpec("click"),), slices=("is_new",),
    )
    # "c" and "zz" never appear in training: OOV for the id, but "c" still has its content
    train = _impressions(tmp_path / "train.parquet", ["a", "b", "a", "b"])
    test = _impressions(tmp_path / "test.parquet", ["a", "b", "c", "zz"])
    log = BadRowLog("fail", 0.0)
    enc = Encoders(schema)
    for p in read_chunks(train, schema, 100, log):
        enc.partial_fit(p)
    enc.finish()
    out = enc.transform(next(read_chunks(test, schema, 100, log)))
    assert out.cat[:, 1].tolist() == [1, 2, 0, 0] or out.cat[:, 1].tolist() == [2, 1, 0, 0]
    assert out.content[:, 0].tolist() == [1, 2, 3, 0]
    assert out.slices[:, 0].tolist() == [False, False, True, True]
    enc.save(tmp_path / "enc.json")
    assert (tmp_path / "enc.content.safetensors").is_file()
    loaded = Encoders.load(schema, tmp_path / "enc.json")
    np.testing.assert_array_equal(loaded.content["emb"].arrays_["values"],
                                  enc.content["emb"].arrays_["values"])
    again = loaded.transform(next(read_chunks(test, schema, 100, log)))
    np.testing.assert_array_equal(again.content, out.content)


def test_slice_column_must_be_zero_or_one(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"x": ["a", "b"], "click": [0, 1], "is_new": [0, 2]}), path)
    schema = Schema((FeatureSpec("x", "categorical"),), (TaskSpec("click"),), slices=("is_new",))
    with pytest.raises(DataError, match="row 2, column 'is_new': slice column not 0 or 1"):
        list(read_chunks(path, schema, 100, BadRowLog("fail", 0.0)))


def test_config_content_is_strict_and_tables_resolve_relative_to_the_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "cfg.yaml").write_text(
        "data:\n  train: rows.parquet\n  schema:\n    features:\n"
        "      - {name: item_id, kind: categorical}\n"
        "      - {name: title, kind: text, key: item_id, table: catalog/items.parquet}\n"
        "    tasks: [{name: click}]\n    slices: [is_new_item]\n"
    )
    cfg = load_config(tmp_path / "cfg.yaml")
    title = cfg.data.schema.features[1]
    assert title.table == str((tmp_path / "catalog" / "items.parquet").resolve())
    assert title.encoder == "minilm" and title.mode == "frozen"
    assert cfg.data.schema.build().slices == ("is_new_item",)
    with pytest.raises(ConfigError, match="only for a synthetic world"):
        load_config(tmp_path / "cfg.yaml", ["data.content=[title]"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(tmp_path / "cfg.yaml", ["data.schema.features=[{name: t, kind: text, "
                                            "key: k, table: x, mode: full}]"])
