"""String / thresholded labels (TaskSpec.positive, .threshold), MovieLens preparation and the
dataset registry, on small files written here and on the real staged datasets."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopmtl.config import ConfigError, from_dict, load_config
from shopmtl.data.ingest import BadRowLog, DataError, read_chunks
from shopmtl.data.schema import FeatureSpec, Schema, TaskSpec
from shopmtl.data.sources import DATASETS, DATASETS_ROOT, EXAMPLES, require_dataset
from shopmtl.data.sources.movielens import FILE_NAME, GENRE_GROUPS, SCENARIOS, prepare_movielens


def _read(path, schema, policy="quarantine"):
    log = BadRowLog(policy, 1.0)
    parts = list(read_chunks(path, schema, 1000, log))
    assert len(parts) == 1
    return parts[0], log


def _schema(*tasks: TaskSpec) -> Schema:
    return Schema((FeatureSpec("x", "numeric"),), tasks)


# -- positive ---------------------------------------------------------------------------------


def test_positive_maps_stripped_strings_to_one_and_empty_to_missing(tmp_path):
    path = tmp_path / "census.csv"
    path.write_text(
        "x,income\n"
        "1, 50000+.\n"  # UCI style: leading blank
        "2, - 50000.\n"
        "3,50000+.  \n"
        "4,\n"  # empty: missing (masked), not a negative
        "5,something else\n"
    )
    schema = _schema(TaskSpec("rich", column="income", positive=("50000+.",), required=False))
    p, log = _read(path, schema)
    assert not log.rows
    assert p.labels[:, 0].tolist() == [1, 0, 1, 0, 0]
    assert p.mask[:, 0].tolist() == [True, True, True, False, True]


def test_positive_several_values_and_a_missing_required_label_is_a_bad_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("x,marital\n1,Never married\n2,Divorced\n3,\n4,Widowed\n")
    schema = _schema(TaskSpec("alone", column="marital", positive=("Never married", "Widowed")))
    p, log = _read(path, schema)
    assert p.labels[:, 0].tolist() == [1, 0, 1]
    assert [(b.line, b.reason) for b in log.rows] == [(4, "missing or NaN label")]
    with pytest.raises(DataError, match="line 4, column 'marital': missing or NaN label"):
        _read(path, schema, policy="fail")


def test_positive_parent_drives_given(tmp_path):
    # the child exists only where the *mapped* parent is 1, not where the raw cell is "1"
    path = tmp_path / "g.csv"
    path.write_text("x,clicked,bought\n1,yes,1\n2,no,\n3,yes,0\n4,YES,\n")
    schema = _schema(
        TaskSpec("click", column="clicked", positive=("yes",)),
        TaskSpec("buy", column="bought", given="click"),
    )
    p, log = _read(path, schema)
    assert not log.rows  # rows 2 and 4 are not clicks (case matters), so no buy label needed
    assert p.labels[:, 0].tolist() == [1, 0, 1, 0]
    assert p.mask[:, 1].tolist() == [True, False, True, False]
    assert p.labels[:, 1].tolist() == [1, 0, 0, 0]


def test_positive_on_parquet_integers_and_empty_strings(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {
                "x": [1.0, 2.0, 3.0, 4.0],
                "code": pa.array([3, 7, None, 3], pa.int64()),
                "s": ["a", "", None, " b "],
            }
        ),
        path,
    )
    schema = _schema(
        TaskSpec("three", column="code", positive=("3",), required=False),
        TaskSpec("ab", column="s", positive=("a", "b"), required=False),
    )
    p, _ = _read(path, schema)
    assert p.labels.tolist() == [[1, 1], [0, 0], [0, 0], [1, 1]]
    assert p.mask.tolist() == [[True, True], [True, False], [False, False], [True, True]]


# -- threshold --------------------------------------------------------------------------------


def test_threshold_makes_numbers_binary(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("x,rating\n1,3.5\n2,4\n3,4.5\n4,\n5,five\n6,0.5\n")
    schema = _schema(
        TaskSpec("like", column="rating", threshold=4.0, required=False),
        TaskSpec("love", column="rating", threshold=4.5, required=False),
    )
    p, log = _read(path, schema)
    assert [(b.line, b.reason) for b in log.rows] == [(6, "non-numeric label")]
    assert p.labels.tolist() == [[0, 0], [1, 0], [1, 1], [0, 0], [0, 0]]
    assert p.mask.tolist() == [[True, True]] * 3 + [[False, False], [True, True]]


def test_threshold_on_parquet_floats(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "rating": [4.0, 3.99, 5.0]}), path)
    p, log = _read(path, _schema(TaskSpec("like", column="rating", threshold=4)))
    assert not log.rows
    assert p.labels[:, 0].tolist() == [1, 0, 1]


def test_without_positive_or_threshold_a_string_label_is_still_a_bad_row(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("x,income\n1,50000+.\n")
    with pytest.raises(DataError, match="non-numeric label"):
        _read(path, _schema(TaskSpec("rich", column="income")), policy="fail")


def test_positive_and_threshold_are_validated():
    with pytest.raises(ValueError, match="type 'binary'"):
        TaskSpec("r", type="regression", threshold=4.0)
    with pytest.raises(ValueError, match="not both"):
        TaskSpec("r", positive=("a",), threshold=4.0)
    with pytest.raises(ConfigError, match="not both"):
        from_dict(TaskSpec, {"name": "r", "positive": ["a"], "threshold": 1})
    with pytest.raises(ConfigError, match=r"positive\[0\]: expected a string"):
        from_dict(TaskSpec, {"name": "r", "positive": [1]})
    t = from_dict(TaskSpec, {"name": "r", "threshold": 4})
    assert t.threshold == 4.0 and isinstance(t.threshold, float)


# -- MovieLens --------------------------------------------------------------------------------


def test_prepare_movielens(tmp_path):
    out = prepare_movielens(require_dataset("movielens_latest_small"), tmp_path / "ml")
    assert out == tmp_path / "ml" / FILE_NAME
    t = pq.read_table(out)
    assert t.column_names == [
        "userId",
        "movieId",
        "genre_group",
        "genres",
        "hour",
        "weekday",
        "movie_age",
        "rating",
        "timestamp",
    ]
    assert t.num_rows == 100_004  # every rating, in file order
    assert t.slice(0, 2).to_pydict()["movieId"] == [31, 1029]
    d = t.to_pydict()
    groups = {g: d["genre_group"].count(g) for g in SCENARIOS}
    assert groups == {"action": 37_610, "comedy": 30_316, "drama": 21_038, "thriller": 11_040}
    assert set(GENRE_GROUPS.values()) == set(SCENARIOS)
    ratings = np.asarray(d["rating"])
    assert int((ratings >= 4).sum()) == 51_568  # the like count in SOURCE.md
    assert set(d["hour"]) <= set(range(24)) and set(d["weekday"]) == set(range(1, 8))
    ages = [a for a in d["movie_age"] if a is not None]
    assert len(ages) == 100_004 - 7 and all(math.isfinite(a) for a in ages)
    # first row: user 1 rated "Dangerous Minds (1995)" (Drama) in Dec 2009
    assert (d["genre_group"][0], d["genres"][0], d["movie_age"][0]) == ("drama", "Drama", 14.0)


def test_movielens_module_cli(tmp_path):
    from shopmtl.data.sources.movielens import main

    main([str(tmp_path), "--root", str(DATASETS_ROOT / "movielens_latest_small")])
    assert (tmp_path / FILE_NAME).is_file()


# -- registry ---------------------------------------------------------------------------------


def test_registry_returns_loadable_example_configs():
    assert list(DATASETS) == [
        "census_income_kdd",
        "movielens_latest_small",
        "ali_ccp",
        "aliexpress_us",
    ]
    for name, fn in DATASETS.items():
        require_dataset(name)
        path = fn()
        assert path.parent == EXAMPLES and path.is_file(), name
        cfg = load_config(path)
        for p in (cfg.data.train, cfg.data.valid, cfg.data.test):
            assert p is None or os.path.isfile(p), (name, p)


def test_require_dataset_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match=r"shared/datasets/' beside the repository"):
        require_dataset("no_such_dataset")
