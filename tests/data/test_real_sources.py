"""The real-data sources of the joint run (Bitext intents, clothing reviews, retail demand):
splits, labels, no future data in the demand features, baselines, metrics pinned by hand, and
clear errors on malformed copies; the demand source's raw requests (contract, encode,
to_user). Reads ``shared/datasets`` (each source is loaded once per module); malformed inputs
are small files written here."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shopmtl.data.contract import Contract
from shopmtl.data.ingest import DataError
from shopmtl.data.schema import TaskSpec
from shopmtl.data.source import SPLITS, SourceData, SourceSplit
from shopmtl.data.sources import _real_common as common
from shopmtl.data.sources import bitext, retail, reviews
from shopmtl.data.sources.bitext import BitextSource
from shopmtl.data.sources.retail import RetailDemandSource
from shopmtl.data.sources.reviews import ReviewsSource

ROOT = common.datasets_dir()
needs_datasets = pytest.mark.skipif(
    not all((ROOT / d / "SOURCE.md").is_file()
            for d in (bitext.DATASET, reviews.DATASET, retail.DATASET)),
    reason="shared/datasets not checked out beside the repository")


@pytest.fixture(scope="module")
def bx() -> tuple[BitextSource, SourceData]:
    src = BitextSource()
    return src, src.load()


@pytest.fixture(scope="module")
def rv() -> tuple[ReviewsSource, SourceData]:
    src = ReviewsSource()
    return src, src.load()


@pytest.fixture(scope="module")
def rt() -> tuple[RetailDemandSource, SourceData]:
    src = RetailDemandSource()
    return src, src.load()


def _same(a: SourceData, b: SourceData) -> None:
    assert a.tasks == b.tasks and a.meta == b.meta and a.id_sizes == b.id_sizes
    for s in SPLITS:
        x, y = a.split(s), b.split(s)
        assert x.text == y.text
        np.testing.assert_array_equal(x.numeric, y.numeric)
        for field in ("ids", "labels"):
            fx, fy = getattr(x, field), getattr(y, field)
            assert fx.keys() == fy.keys()
            for k in fx:
                np.testing.assert_array_equal(fx[k], fy[k])


def _scale(data: SourceData, split: str) -> np.ndarray:
    """The demand scales of a split's examples (units a day), from their level_28 column."""
    return retail._scale(data.meta, data.split(split).numeric)


def _panel_features(q: np.ndarray, origins: np.ndarray, weekday: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The retail feature function on a panel's windows, as load() calls it, reshaped to
    [products, origins, features] and [products, origins]."""
    raw, scale = retail._features(*retail._panel_windows(q, origins, weekday))
    return raw.reshape(len(q), len(origins), -1), scale.reshape(len(q), len(origins))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a CSV through the csv module (quoted newlines survive), ``edit(rows)`` in between."""
    with src.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    edit(rows)
    with dst.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return dst


# -- where the data is ------------------------------------------------------------------------


def test_datasets_dir_from_env_or_beside_the_repo(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(common.ENV_DATASETS, str(tmp_path))
    assert common.datasets_dir() == tmp_path
    monkeypatch.delenv(common.ENV_DATASETS)
    assert common.datasets_dir() == common.REPO_ROOT.parent / "shared" / "datasets"


@pytest.mark.parametrize("cls,file_name", [(BitextSource, bitext.FILE_NAME),
                                           (ReviewsSource, reviews.FILE_NAME),
                                           (RetailDemandSource, retail.FILE_NAME)])
def test_missing_file_names_the_expected_file(tmp_path, cls, file_name) -> None:
    with pytest.raises(FileNotFoundError, match=file_name):
        cls(tmp_path).load()


# -- splits and labels ------------------------------------------------------------------------


@needs_datasets
def test_bitext_splits_classes_and_labels(bx) -> None:
    src, data = bx
    assert {s: len(data.split(s)) for s in SPLITS} == {"train": 3159, "valid": 677, "test": 678}
    assert [(t.name, t.type, t.n_classes) for t in data.tasks] == [
        ("intent", "multiclass", 27), ("category", "multiclass", 11)]
    assert data.meta["classes"]["intent"] == sorted(data.meta["classes"]["intent"])
    assert len(data.meta["classes"]["category"]) == 11
    rows = np.concatenate([src.rows[s] for s in SPLITS])
    assert np.array_equal(np.sort(rows), np.arange(4514))  # disjoint and complete
    for s in SPLITS:
        part = data.split(s)
        assert part.numeric.shape == (len(part), 0) and len(part.text) == len(part)
        for t in data.tasks:
            y = part.labels[t.name]
            assert y.dtype == np.int64 and y.min() >= 0 and y.max() < t.n_classes
        # stratified: every intent in every split, about 15% of each in test
        assert len(np.unique(part.labels["intent"])) == 27
    share = np.bincount(data.test.labels["intent"]) / np.bincount(
        np.concatenate([data.split(s).labels["intent"] for s in SPLITS]))
    assert share.min() > 0.13 and share.max() < 0.17
    # the category is the intent's group, consistently
    names = data.meta["classes"]
    for i, c in zip(data.train.labels["intent"], data.train.labels["category"], strict=True):
        assert data.meta["intent_category"][names["intent"][i]] == names["category"][c]


@needs_datasets
def test_reviews_splits_labels_and_features(rv) -> None:
    src, data = rv
    assert data.meta["rows"] == 23486 and data.meta["skipped_no_text"] == 844
    sizes = {s: len(data.split(s)) for s in SPLITS}
    assert sum(sizes.values()) == 23486 - 844 and sizes["train"] == 15850
    rows = np.concatenate([src.rows[s] for s in SPLITS])
    assert len(np.unique(rows)) == len(rows)
    assert [(t.name, t.type) for t in data.tasks] == [("rating", "regression"),
                                                       ("recommend", "binary")]
    assert data.id_sizes == {"class_name": 21}
    for s in SPLITS:
        part = data.split(s)
        assert all(part.text)
        assert set(np.unique(part.labels["rating"])) == {1, 2, 3, 4, 5}
        assert set(np.unique(part.labels["recommend"])) == {0.0, 1.0}
        cls = part.ids["class_name"]
        assert cls.min() >= 0 and cls.max() < 21
    assert abs(data.train.numeric.mean()) < 1e-4 and abs(data.train.numeric.std() - 1) < 1e-3


@needs_datasets
def test_retail_panel_split_by_time_and_targets(rt) -> None:
    _, data = rt
    meta = data.meta
    assert [(t.name, t.type, t.quantiles) for t in data.tasks] == [
        ("demand_1d", "quantile", (0.1, 0.5, 0.9)), ("demand_7d", "quantile", (0.1, 0.5, 0.9))]
    assert meta["origins"] == {"train": [27, 212], "valid": [213, 258], "test": [259, 303]}
    assert {s: len(data.split(s)) for s in SPLITS} == {"train": 18600, "valid": 4600,
                                                       "test": 4500}
    assert meta["target_dates"]["test"] == ["2011-10-19", "2011-12-09"]
    assert data.id_sizes == {"product": 101} and len(meta["product_scale"]) == 101
    assert min(meta["product_scale"]) >= retail.MIN_SCALE
    assert meta["numeric"] == retail.FEATURES and "level_28" in meta["numeric"]
    for s in SPLITS:
        part = data.split(s)
        n_origins = meta["origins"][s][1] - meta["origins"][s][0] + 1
        assert part.numeric.shape == (len(part), len(retail.FEATURES))
        assert _scale(data, s).min() >= retail.MIN_SCALE
        assert np.array_equal(part.ids["product"], np.repeat(np.arange(1, 101), n_origins))
        y1, y7 = part.labels["demand_1d"], part.labels["demand_7d"]
        assert np.isfinite(y1).all() and y1.min() >= 0
        # the week of the last 5 origins runs past the split's end: masked, nothing else
        missing = np.isnan(y7).reshape(100, n_origins)
        assert missing[:, -5:].all() and not missing[:, :-5].any()
        assert np.nanmin(y7) >= 0


@needs_datasets
@pytest.mark.parametrize("name", ["bx", "rv", "rt"])
def test_loading_twice_gives_identical_data(name, request) -> None:
    src, data = request.getfixturevalue(name)
    _same(data, type(src)().load())


@needs_datasets
@pytest.mark.parametrize("name", ["bx", "rv", "rt"])
def test_declared_task_names_are_the_loaded_tasks(name, request) -> None:
    """``task_names`` (read when a joint config is loaded, to check train.alpha) is what
    load() returns."""
    src, data = request.getfixturevalue(name)
    assert type(src).task_names == tuple(t.name for t in data.tasks)


# -- no future data in the demand features ----------------------------------------------------


@needs_datasets
def test_retail_features_do_not_see_a_later_day(rt, tmp_path) -> None:
    """Raise one product's sales on a validation day d in a copy of the file: no example with
    origin t < d changes its features or its (scaled) labels, the training split does not
    change at all (its labels and scales stop before the validation period), and the examples
    with t >= d do change. In units only the one label of day d moves: the scaled labels of
    origins d .. d+27 move with their scale (the level of days t-27 .. t), not with the units."""
    _, data = rt
    product, day = 7, 230  # product id (1-based), day index inside the validation period
    dates = sorted({r[0] for r in _rows(retail)[1:]})
    code = data.meta["stock_codes"][product]

    def edit(rows: list[list[str]]) -> None:
        qty = rows[0].index("quantity")
        hits = [r for r in rows[1:] if r[0] == dates[day] and r[1] == code]
        assert len(hits) == 1
        hits[0][qty] = str(int(float(hits[0][qty])) + 5000)

    copy = _rewrite(ROOT / retail.DATASET / retail.FILE_NAME, tmp_path / retail.FILE_NAME, edit)
    changed = RetailDemandSource(tmp_path).load()
    _same_split(data.train, changed.train)
    first, last = data.meta["origins"]["valid"]
    origin = np.tile(np.arange(first, last + 1), 100)
    mine = data.valid.ids["product"] == product
    before = origin < day
    np.testing.assert_array_equal(data.valid.numeric[before], changed.valid.numeric[before])
    assert not np.array_equal(data.valid.numeric[mine & ~before],
                              changed.valid.numeric[mine & ~before])
    # the scaled labels of the other products, and of this one up to the origins whose target
    # holds day d (1d: t = d-1; 7d: t = d-6 .. d-1), do not change
    hit = {"demand_1d": mine & (origin == day - 1),
           "demand_7d": mine & (origin >= day - 6) & (origin <= day - 1)}
    for task, changes in hit.items():
        keep = (before | ~mine) & ~changes
        np.testing.assert_array_equal(data.valid.labels[task][keep],
                                      changed.valid.labels[task][keep])
        assert (changed.valid.labels[task][changes] > data.valid.labels[task][changes]).all()
    # the scale of origins d .. d+27 of the product rose with day d: their scaled labels fell,
    # their labels in units did not move
    rescaled = mine & (origin >= day) & (origin < day + retail.LEVEL)
    assert (_scale(changed, "valid") > _scale(data, "valid"))[rescaled].all()
    a, b = (d.valid.labels["demand_1d"] * _scale(d, "valid") for d in (data, changed))
    other = ~hit["demand_1d"]
    np.testing.assert_allclose(a[other], b[other], rtol=1e-6)
    assert b[~other] == pytest.approx(a[~other] + 5000)
    assert copy.is_file()


def _same_split(a: SourceSplit, b: SourceSplit) -> None:
    np.testing.assert_array_equal(a.numeric, b.numeric)
    for k in a.labels:
        np.testing.assert_array_equal(a.labels[k], b.labels[k])


def _rows(module) -> list[list[str]]:
    with (ROOT / module.DATASET / module.FILE_NAME).open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_retail_feature_function_reads_days_up_to_the_origin_only() -> None:
    """The same on the raw feature function: features and scales of origin t read days <= t."""
    rng = np.random.default_rng(0)
    q = rng.poisson(3.0, size=(3, 60)).astype(float)
    q[2, :40] = 0.0  # a product launched on day 40: its level is below the floor before
    weekday = np.arange(60) % 7
    origins = np.arange(retail.HISTORY - 1, 59)
    base, scale = _panel_features(q, origins, weekday)
    # the scale: the mean of days t-27 .. t, floored at MIN_SCALE
    level = np.stack([q[:, t - retail.LEVEL + 1:t + 1].mean(axis=1) for t in origins], axis=1)
    np.testing.assert_allclose(scale, np.maximum(level, retail.MIN_SCALE))
    assert (scale[2, origins < 40] == retail.MIN_SCALE).all()
    col = retail.FEATURES.index("level_28")
    np.testing.assert_allclose(base[..., col], np.log1p(level))
    np.testing.assert_allclose(base[..., retail.FEATURES.index("lag_3")],
                               np.log1p(q[:, origins - 3] / scale))
    for product, day in ((1, 30), (1, 45), (1, 58), (2, 50)):
        q2 = q.copy()
        q2[product, day] += 40.0
        out, scale2 = _panel_features(q2, origins, weekday)
        before = origins < day
        np.testing.assert_array_equal(base[:, before], out[:, before])
        np.testing.assert_array_equal(scale[:, before], scale2[:, before])
        assert not np.array_equal(base[product, ~before], out[product, ~before])


@needs_datasets
def test_retail_naive_reads_back_the_lagged_quantities(rt) -> None:
    """The baseline recovers the seasonal naive from the standardised lag features; check it
    against the file: same weekday last week (1d) and the sum of the last 6 days (7d)."""
    _, data = rt
    rows = _rows(retail)[1:]
    codes = data.meta["stock_codes"]
    dates = sorted({r[0] for r in rows})
    q = np.zeros((101, len(dates)))
    day = {d: i for i, d in enumerate(dates)}
    for r in rows:
        q[codes.index(r[1]), day[r[0]]] = float(r[3])
    first, last = data.meta["origins"]["test"]
    t = np.tile(np.arange(first, last + 1), 100)
    p = data.test.ids["product"]
    scale = _scale(data, "test")  # recomputed from the level_28 column
    level = sum(q[p, t - k] for k in range(retail.LEVEL)) / retail.LEVEL
    np.testing.assert_allclose(scale, np.maximum(level, retail.MIN_SCALE), rtol=1e-6)
    naive = retail._naive(data, "test")
    np.testing.assert_allclose(naive["demand_1d"] * scale, q[p, t - 5], rtol=1e-4, atol=1e-3)
    week = sum(q[p, t - k] for k in range(6))
    np.testing.assert_allclose(naive["demand_7d"] * scale, week, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(data.test.labels["demand_1d"] * scale, q[p, t + 1], rtol=1e-5)
    full = t + 6 <= last + 1  # the week t+1 .. t+6 lies inside the test period
    week = sum(q[p[full], t[full] + k] for k in range(1, 7))
    y7 = data.test.labels["demand_7d"] * scale
    np.testing.assert_allclose(y7[full], week, rtol=1e-5)


@needs_datasets
def test_retail_metrics_follow_a_sample_of_the_split(rt) -> None:
    """The per-example scale is recomputed from the numeric columns, so the metrics of a
    ``SourceData.sample`` subset are those of the same rows scored in units by hand."""
    src, data = rt
    sub = data.sample(500, seed=4)
    scale = _scale(sub, "test")
    assert len(scale) == 500 and not np.array_equal(scale, _scale(data, "test")[:500])
    y = sub.test.labels["demand_7d"].astype(np.float64)
    pred = np.nan_to_num(y, nan=1.0) * 1.1 + 0.2  # scaled; units = 1.1 y + 0.2 scale
    m = src.metrics(sub, "test", "demand_7d", pred)
    keep = np.isfinite(y)
    err = np.abs(0.1 * y[keep] + 0.2) * scale[keep]
    assert m["n"] == keep.sum()
    assert m["wape"] == pytest.approx(err.sum() / (y[keep] * scale[keep]).sum(), rel=1e-9)


# -- retail requests: contract, encode, to_user -----------------------------------------------


def _read_all(contract: Contract, raw) -> list[dict]:
    """Raw requests through JSON (what a user sends) and the contract's checks."""
    return [contract.read(json.loads(json.dumps(r)), f"request {i}") for i, r in enumerate(raw)]


def _same_inputs(a: SourceSplit, b: SourceSplit) -> None:
    assert a.text == b.text and a.numeric.dtype == b.numeric.dtype
    assert a.numeric.tobytes() == b.numeric.tobytes()  # bit for bit, not close
    assert a.ids.keys() == b.ids.keys()
    for k in a.ids:
        np.testing.assert_array_equal(a.ids[k], b.ids[k])


@needs_datasets
def test_retail_encode_of_the_raw_requests_is_the_split(rt) -> None:
    """The test split's raw requests (and those of a sample of it: the lazy ``raw`` follows
    ``take``), read by the contract and encoded from the checkpoint's meta alone, are the
    split's inputs to the bit; leaving out ``date`` gives the same (no closure in the test
    period: the default next trading day is the calendar's)."""
    src, data = rt
    contract = src.contract(data)
    for part in (data.test, data.sample(300, seed=5).test):
        assert part.raw is not None and len(part.raw) == len(part)
        encoded = src.encode(json.loads(json.dumps(data.meta)), _read_all(contract, part.raw))
        _same_inputs(encoded, part)
        assert encoded.raw == list(part.raw)  # the requests as read, target date filled in
    undated = [{k: v for k, v in r.items() if k != "date"} for r in data.test.raw]
    _same_inputs(src.encode(data.meta, _read_all(contract, undated)), data.test)


def _history(last: dt.date, n: int = retail.HISTORY) -> list[dict]:
    """n trading days (no Saturdays) up to ``last``, 1 .. n units."""
    days: list[dt.date] = []
    d = last
    while len(days) < n:
        if d.weekday() != 5:
            days.append(d)
        d -= dt.timedelta(days=1)
    return [{"date": d.isoformat(), "units": float(i + 1)} for i, d in enumerate(days[::-1])]


def _weekday(data: SourceData, split: SourceSplit) -> np.ndarray:
    """The target weekday of encoded examples, read back from the standardised dow columns."""
    cols = [retail.FEATURES.index(f"dow_{d}") for d in range(7)]
    mean = np.asarray(data.meta["numeric_mean"])[cols]
    std = np.asarray(data.meta["numeric_std"])[cols]
    return np.argmax(split.numeric[:, cols] * std + mean, axis=1)


@needs_datasets
def test_retail_request_defaults_product_and_description(rt) -> None:
    """After a Friday the default target is the Sunday (the shop never trades on
    Saturdays); a Saturday asked for is refused; a known product's text is its training
    description unless the request gives one; an unknown product is id 0, without text."""
    src, data = rt
    contract = src.contract(data)
    friday = dt.date(2011, 11, 25)
    code = data.meta["stock_codes"][3]
    rows = [contract.read(r, "request") for r in (
        {"product": code, "history": _history(friday)},
        {"product": code, "history": _history(friday), "date": "2011-11-28"},
        {"product": code, "history": _history(friday), "description": "RED MUG"},
        {"product": "NO-SUCH-CODE", "history": _history(friday)},
        {"product": "NO-SUCH-CODE", "history": _history(friday), "description": "RED MUG"})]
    out = src.encode(data.meta, rows)
    assert [r["date"] for r in out.raw] == ["2011-11-27", "2011-11-28", *["2011-11-27"] * 3]
    np.testing.assert_array_equal(_weekday(data, out), [6, 0, 6, 6, 6])
    np.testing.assert_array_equal(out.ids["product"], [3, 3, 3, 0, 0])
    assert out.text == [data.meta["descriptions"][3]] * 2 + ["RED MUG", "", "RED MUG"]
    assert out.text[0] == data.train.text[int(np.argmax(data.train.ids["product"] == 3))]
    # the same history gives the same numbers whatever the product or its text
    assert (out.numeric[[0, 2, 3, 4]] == out.numeric[0]).all()
    saturday = contract.read({"product": code, "history": _history(friday),
                              "date": "2011-11-26"}, "request")
    with pytest.raises(DataError, match="request 0: field 'date': a Saturday"):
        src.encode(data.meta, [saturday])


@needs_datasets
@pytest.mark.parametrize("edit, match", [
    (lambda r: r["history"].reverse(), "request 0: field 'history': dates must be strictly "
                                       "increasing"),
    (lambda r: r["history"].__setitem__(5, dict(r["history"][4])), "field 'history': dates"),
    (lambda r: r.__setitem__("date", r["history"][-1]["date"]),
     "field 'date': must be after the last history date"),
])
def test_retail_encode_refuses_bad_dates(rt, edit, match) -> None:
    src, data = rt
    request = json.loads(json.dumps(data.test.raw[0]))
    edit(request)
    with pytest.raises(DataError, match=match):
        src.encode(data.meta, [src.contract(data).read(request, "request 0")])


@needs_datasets
@pytest.mark.parametrize("edit, match", [
    (lambda r: r["history"].pop(0), r"field 'history': expected a list of objects \{date, "
                                    r"units\} \(at least 28\), got a list of 27"),
    (lambda r: r["history"][3].__setitem__("units", -1.0),
     "field 'history' item 3: field 'units': .* outside that range"),
    (lambda r: r["history"][3].__setitem__("units", math.nan),
     "field 'history' item 3: field 'units': .* non-finite"),
    (lambda r: r["history"][3].__setitem__("date", "2011-13-01"),
     "field 'history' item 3: field 'date': expected a date"),
    (lambda r: r.pop("product"), "missing field 'product'"),
])
def test_retail_contract_names_the_bad_field(rt, edit, match) -> None:
    src, data = rt
    request = json.loads(json.dumps(data.test.raw[0]))
    edit(request)
    with pytest.raises(DataError, match=match):
        src.contract(data).read(request, "request 0")


@needs_datasets
def test_retail_to_user_is_the_metrics_unit_conversion(rt) -> None:
    """to_user of the scaled labels is the units sold in the file (what metrics scores);
    a quantile matrix is converted column by column, a sample follows its rows."""
    src, data = rt
    rows = _rows(retail)[1:]
    codes, dates = data.meta["stock_codes"], sorted({r[0] for r in rows})
    day = {d: i for i, d in enumerate(dates)}
    q = np.zeros((101, len(dates)))
    for r in rows:
        q[codes.index(r[1]), day[r[0]]] = float(r[3])
    first, last = data.meta["origins"]["test"]
    t = np.tile(np.arange(first, last + 1), 100)
    y = src.to_user(data.meta, data.test, "demand_1d", data.test.labels["demand_1d"])
    np.testing.assert_allclose(y, q[data.test.ids["product"], t + 1], rtol=1e-5)
    pred = np.stack([data.test.labels["demand_1d"] * f for f in (0.5, 1.0, 2.0)], axis=1)
    units = src.to_user(data.meta, data.test, "demand_1d", pred)
    np.testing.assert_allclose(units, y[:, None] * [0.5, 1.0, 2.0], rtol=1e-6)
    m = src.metrics(data, "test", "demand_1d", pred)
    assert m["wape"] == pytest.approx(0.0) and m["coverage_80"] == 1.0
    sub = data.sample(300, seed=2)
    np.testing.assert_array_equal(
        src.to_user(sub.meta, sub.test, "demand_7d", sub.test.labels["demand_7d"]),
        sub.test.labels["demand_7d"] * _scale(sub, "test"))
    with pytest.raises(KeyError, match="demand_3d"):
        src.to_user(data.meta, data.test, "demand_3d", pred)


@needs_datasets
def test_retail_contract_round_trips_through_json(rt) -> None:
    src, data = rt
    contract = src.contract(data)
    text = json.dumps(contract.to_json())
    back = Contract.from_json(json.loads(text))
    assert back == contract
    assert [o.task for o in back.outputs] == list(retail.TASKS)
    for o in back.outputs:
        assert (o.type, o.quantiles, o.unit, o.low, o.high) == (
            "quantile", retail.QUANTILES, "units sold", 0.0, None)
    assert [f.name for f in back.inputs] == ["product", "history", "date", "description"]
    assert [f.required for f in back.inputs] == [True, True, False, False]
    # the example is a valid request, and encodes like the example it was taken from
    example = contract.read(back.example, "example")
    test = data.test
    first = SourceSplit(test.text[:1], test.numeric[:1], {"product": test.ids["product"][:1]})
    _same_inputs(src.encode(data.meta, [example]), first)


# -- baselines --------------------------------------------------------------------------------


@needs_datasets
def test_bitext_baseline_is_accurate(bx) -> None:
    src, data = bx
    out = src.baseline(data)
    assert out["intent"]["accuracy"] > 0.9 and out["intent"]["macro_f1"] > 0.9
    assert out["category"]["accuracy"] > 0.9
    # a trivial predictor: the training class frequencies for every example
    for t in data.tasks:
        prior = np.bincount(data.train.labels[t.name], minlength=t.n_classes) / len(data.train)
        trivial = src.metrics(data, "test", t.name, np.tile(prior, (len(data.test), 1)))
        assert out[t.name]["logloss"] < trivial["logloss"] / 5


@needs_datasets
def test_reviews_baseline_beats_the_mean(rv) -> None:
    src, data = rv
    out = src.baseline(data)
    assert out["recommend"]["auc"] > 0.85
    mean = float(data.train.labels["rating"].mean())
    trivial = src.metrics(data, "test", "rating", np.full(len(data.test), mean))
    assert out["rating"]["rmse"] < 0.8 * trivial["rmse"]
    rate = float(data.train.labels["recommend"].mean())
    flat = src.metrics(data, "test", "recommend", np.full(len(data.test), rate))
    assert out["recommend"]["logloss"] < 0.7 * flat["logloss"]


@needs_datasets
def test_retail_seasonal_naive(rt) -> None:
    src, data = rt
    out = src.baseline(data)
    for task in ("demand_1d", "demand_7d"):
        m = out[task]
        assert all(math.isfinite(m[k]) for k in ("mae", "wape", "mase", "pinball"))
        assert 0.5 < m["coverage_80"] < 0.95
    # the weekly sum beats forecasting nothing (WAPE 1); a single day's demand is spiky (bulk
    # orders) and the one-day naive does not: its test WAPE is about 1.01 (documented)
    assert out["demand_7d"]["wape"] < 0.7
    assert 0.9 < out["demand_1d"]["wape"] < 1.1
    # pinned: the naive does not depend on the per-example scale (its interval widths come
    # from meta["product_scale"]); these are the numbers of the training-mean scaling, and the
    # coverage is the exact one of integer arithmetic (ties on a bound count as inside)
    assert out["demand_1d"]["wape"] == pytest.approx(1.0117521, abs=1e-6)
    assert out["demand_7d"]["wape"] == pytest.approx(0.5886736, abs=1e-6)
    assert out["demand_1d"]["pinball"] == pytest.approx(30.362590, rel=1e-6)
    assert out["demand_7d"]["pinball"] == pytest.approx(102.016637, rel=1e-6)
    assert out["demand_1d"]["coverage_80"] == pytest.approx(3211 / 4500)
    assert out["demand_7d"]["coverage_80"] == pytest.approx(2767 / 4000)


# -- metrics on hand-made inputs --------------------------------------------------------------


def _data(tasks: tuple[TaskSpec, ...], labels: dict[str, np.ndarray], meta: dict | None = None,
          ids: dict[str, np.ndarray] | None = None, numeric: np.ndarray | None = None
          ) -> SourceData:
    n = len(next(iter(labels.values())))
    part = SourceSplit(text=None, numeric=np.zeros((n, 0), np.float32) if numeric is None
                       else numeric, ids=ids or {}, labels=labels)
    return SourceData("tiny", tasks, part, part, part, meta=meta or {})


def test_multiclass_metrics_by_hand() -> None:
    y = np.array([0, 1, 2, 1, -1])  # -1: missing, masked
    prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6],
                     [1.0, 0.0, 0.0]])
    data = _data((TaskSpec("intent", type="multiclass", n_classes=3),), {"intent": y})
    m = BitextSource().metrics(data, "test", "intent", prob)
    # predicted 0, 1, 0, 2 for 0, 1, 2, 1: F1 class 0 = 2/3, class 1 = 2/3, class 2 = 0
    assert m["n"] == 4 and m["accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["logloss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.1, 0.2])))
    with pytest.raises(ValueError, match="shape"):
        BitextSource().metrics(data, "test", "intent", prob[:, :2])


def test_reviews_metrics_by_hand() -> None:
    data = _data((TaskSpec("rating", type="regression"), TaskSpec("recommend")),
                 {"rating": np.array([1, 5, 3, np.nan], np.float32),
                  "recommend": np.array([0, 1, 1, 0], np.float32)})
    src = ReviewsSource()
    m = src.metrics(data, "valid", "rating", np.array([2.0, 4.4, 3.0, 9.0]))
    assert m["n"] == 3
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0.36) / 3))
    assert m["mae"] == pytest.approx(1.6 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)  # rounded 2, 4, 3
    m = src.metrics(data, "valid", "recommend", np.array([0.1, 0.8, 0.25, 0.3]))
    assert m["auc"] == pytest.approx(0.75)
    assert m["logloss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.25, 0.7])))


def test_retail_metrics_in_units_by_hand() -> None:
    """Examples of scale 2, 2, 10 and 10 units a day (levels 2 and 10: the level_28 column is
    log1p(level), standardised with mean 1 and std 0.5); labels and predictions are scaled."""
    spec = TaskSpec("demand_1d", type="quantile", quantiles=(0.1, 0.5, 0.9))
    level = (np.log1p(np.array([2.0, 2.0, 10.0, 10.0])) - 1.0) / 0.5
    data = _data((spec,), {"demand_1d": np.array([1.0, 0.5, np.nan, 0.2], np.float32)},
                 meta={"numeric": ["zero_28", "level_28"], "numeric_mean": [0.0, 1.0],
                       "numeric_std": [1.0, 0.5], "min_scale": 1.0,
                       "naive_mae": {"demand_1d": 2.0}},
                 numeric=np.stack([np.zeros(4), level], axis=1).astype(np.float32))
    # units: y = 2, 1, (masked), 2; median predictions 3, 1, -, 4
    pred = np.array([[0.5, 1.5, 2.0], [0.25, 0.5, 1.0], [0, 0, 0], [0.1, 0.4, 0.5]])
    m = RetailDemandSource().metrics(data, "test", "demand_1d", pred)
    assert m["n"] == 3
    assert m["mae"] == pytest.approx(1.0)  # |2-3| + 0 + |2-4| = 3 over 3
    assert m["wape"] == pytest.approx(3 / 5)
    assert m["mase"] == pytest.approx(0.5)
    # intervals in units: [1, 4] holds 2, [0.5, 2] holds 1, [1, 5] holds 2
    assert m["coverage_80"] == 1.0
    # pinball per quantile 0.1 / 0.5 / 0.9: row 1: .1 + .5 + .2, row 2: .05 + 0 + .1,
    # row 3: .1 + 1 + .3
    assert m["pinball"] == pytest.approx(2.35 / 9)
    point = RetailDemandSource().metrics(data, "test", "demand_1d", pred[:, 1])
    assert point["wape"] == m["wape"] and "pinball" not in point
    with pytest.raises(ValueError, match="shape"):
        RetailDemandSource().metrics(data, "test", "demand_1d", pred[:, :2])
    # a level below the floor: the scale is min_scale (units)
    low = replace(data, meta={**data.meta, "min_scale": 3.0})
    np.testing.assert_allclose(_scale(low, "test"), [3.0, 3.0, 10.0, 10.0], rtol=1e-6)


def test_stratified_split_is_seeded_and_keeps_rare_classes_in_train() -> None:
    strata = ["a"] * 20 + ["b"] * 7 + ["c"]
    a, b = common.stratified_split(strata, 3), common.stratified_split(strata, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(28))
    assert 27 in a["train"]  # the single "c" row
    assert [len(a[k]) for k in SPLITS] == [14 + 5 + 1, 3 + 1, 3 + 1]
    assert not np.array_equal(a["test"], common.stratified_split(strata, 4)["test"])


# -- malformed input --------------------------------------------------------------------------


@needs_datasets
def test_bitext_missing_column_is_named(tmp_path) -> None:
    def edit(rows):
        rows[0][rows[0].index("category")] = "group"

    _rewrite(ROOT / bitext.DATASET / bitext.FILE_NAME, tmp_path / bitext.FILE_NAME, edit)
    with pytest.raises(DataError, match=r"bitext_customer_support_tagged_train\.csv.*'category'"):
        BitextSource(tmp_path).load()


@needs_datasets
def test_bitext_unknown_label_in_test_names_the_row(bx, tmp_path) -> None:
    """A category never seen in training, on a test row: the error names the file, the row and
    the column, not the value (it never echoes cells)."""
    src, _ = bx
    row = int(src.rows["test"][0])

    def edit(rows):
        rows[1 + row][rows[0].index("category")] = "BOGUS"

    _rewrite(ROOT / bitext.DATASET / bitext.FILE_NAME, tmp_path / bitext.FILE_NAME, edit)
    with pytest.raises(DataError, match=rf"data row {row + 1} \(line \d+\), column 'category'"
                       ) as err:
        BitextSource(tmp_path).load()
    assert "BOGUS" not in str(err.value)


def test_bitext_short_row_is_named(tmp_path) -> None:
    header = ["instruction", "intent", "category", "response"]
    (tmp_path / bitext.FILE_NAME).write_text(
        ",".join(header) + '\nhi,greet,CHAT,"two\nlines"\nbye,leave\n', encoding="utf-8")
    # the quoted newline makes data row 2 start on line 4
    with pytest.raises(DataError, match=r"data row 2 \(line 4\) has 2 fields"):
        BitextSource(tmp_path).load()


REVIEW_HEADER = ("Clothing ID,Age,Title,Review Text,Rating,Recommended IND,"
                 "Positive Feedback Count,Division Name,Department Name,Class Name\n")


@pytest.mark.parametrize("bad,where", [
    ('2,40,,"ok",6,1,0,General,Tops,Knits', r"data row 2 .*column 'Rating': outside 1\.\.5"),
    ('2,forty,,"ok",4,1,0,General,Tops,Knits', r"data row 2 .*column 'Age': not an integer"),
    ('2,40,,"ok",4,,0,General,Tops,Knits', r"data row 2 .*column 'Recommended IND'"),
])
def test_reviews_bad_cells_are_named(tmp_path, bad, where) -> None:
    (tmp_path / reviews.FILE_NAME).write_text(
        REVIEW_HEADER + '1,30,Nice,"soft",5,1,0,General,Tops,Knits\n' + bad + "\n",
        encoding="utf-8")
    with pytest.raises(DataError, match=where):
        ReviewsSource(tmp_path).load()


def test_reviews_missing_column_is_named(tmp_path) -> None:
    (tmp_path / reviews.FILE_NAME).write_text(
        REVIEW_HEADER.replace("Recommended IND", "Recommended") + "1,30,a,b,5,1,0,G,T,K\n",
        encoding="utf-8")
    with pytest.raises(DataError, match=r"missing column\(s\) \['Recommended IND'\]"):
        ReviewsSource(tmp_path).load()


RETAIL_HEADER = "date,stock_code,description,quantity,revenue\n"


@pytest.mark.parametrize("rows,where", [
    ("2011-01-02,A,cup,3,1\n2011-01-02,B,mug,lots,1\n",
     r"data row 2 \(line 3\), column 'quantity': not a number"),
    ("2011-01-02,A,cup,3,1\n2011-01-02,B,mug,-4,1\n", r"data row 2 .*'quantity': not a finite"),
    ("2011-01-02,A,cup,3,1\n2011-02-30,B,mug,4,1\n", r"data row 2 .*'date'"),
    ("2011-01-02,A,cup,3,1\n2011-01-02,A,cup,4,1\n", r"data row 2 .*second row for stock code A"),
    ("2011-01-02,A,cup,3,1\n2011-01-03,B,mug,4,1\n", r"no row for stock code A on 2011-01-03"),
])
def test_retail_bad_rows_are_named(tmp_path, rows, where) -> None:
    (tmp_path / retail.FILE_NAME).write_text(RETAIL_HEADER + rows, encoding="utf-8")
    with pytest.raises(DataError, match=where):
        RetailDemandSource(tmp_path).load()


def test_retail_missing_column_and_short_calendar(tmp_path) -> None:
    path = tmp_path / retail.FILE_NAME
    path.write_text("date,stock_code,description,qty\n2011-01-02,A,cup,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"daily_sales_top100_products\.csv.*\['quantity'\]"):
        RetailDemandSource(tmp_path).load()
    path.write_text(RETAIL_HEADER + "2011-01-02,A,cup,3,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="too short a calendar"):
        RetailDemandSource(tmp_path).load()


# -- raw requests: the reviews contract ---------------------------------------------------------


def _reread(src: ReviewsSource, data: SourceData, part: SourceSplit) -> SourceSplit:
    """``part``'s raw requests checked by the contract and encoded from the meta as a model
    directory keeps it (through JSON), as ``shopmtl predict`` does."""
    contract = src.contract(data)
    assert part.raw is not None and len(part.raw) == len(part)
    rows = [contract.read(r, f"request {i}") for i, r in enumerate(part.raw)]
    return ReviewsSource.encode(json.loads(json.dumps(data.meta)), rows)


@needs_datasets
def test_reviews_raw_requests_rebuild_the_inputs(rv) -> None:
    """Training and prediction share one code path: the test split's raw rows, read and
    encoded, give its inputs bit for bit (the sampled split's raw rows too)."""
    src, data = rv
    for part in (data.test, data.sample(300, seed=1).train):
        got = _reread(src, data, part)
        assert got.text == part.text
        assert got.numeric.dtype == np.float32 and got.numeric.shape == (len(part), 1)
        assert got.numeric.tobytes() == part.numeric.tobytes()
        assert got.ids.keys() == part.ids.keys()
        np.testing.assert_array_equal(got.ids["class_name"], part.ids["class_name"])
    # absent optional fields are left out of a raw request, as a user would leave them out
    assert all(v is not None for r in data.test.raw or [] for v in r.values())
    assert any("title" not in r for r in data.test.raw or [])


@needs_datasets
def test_reviews_contract_outputs_example_and_json(rv) -> None:
    src, data = rv
    c = src.contract(data)
    assert [f.name for f in c.inputs] == ["title", "review", "age", "class_name"]
    rating = c.output("rating")
    assert (rating.type, rating.unit, rating.low, rating.high) == ("regression", "stars", 1.0,
                                                                    5.0)
    assert c.output("recommend").type == "binary"
    assert c.example["class_name"] == "Dresses"
    ex = ReviewsSource.encode(data.meta, [c.read(c.example, "example")])
    assert ex.ids["class_name"][0] == data.meta["class_name"].index("Dresses")
    assert Contract.from_json(json.loads(json.dumps(c.to_json()))) == c


@needs_datasets
@pytest.mark.parametrize("request_,message", [
    ({"review": "soft", "age": 200}, r"field 'age'.*0\.\.150"),
    ({"review": "soft", "age": -1}, r"field 'age'.*0\.\.150"),
    ({"review": "soft"}, r"missing field 'age'"),
    ({"title": " ", "age": 30}, r"at least one of the fields \['title', 'review'\]"),
    ({"age": 30, "class_name": "Dresses"}, "at least one of"),
    ({"review": "soft", "age": 30, "stars": 5}, r"unknown field\(s\) \['stars'\]"),
])
def test_reviews_bad_requests_name_the_field(rv, request_, message) -> None:
    src, data = rv
    with pytest.raises(DataError, match=message):
        src.contract(data).read(request_, "request 0")


@needs_datasets
def test_reviews_unknown_or_absent_class_is_id_0(rv) -> None:
    src, data = rv
    c = src.contract(data)
    rows = [c.read(r, "request") for r in ({"review": "soft", "age": "40", "class_name": "Capes"},
                                           {"title": "Nice", "age": 40})]
    got = ReviewsSource.encode(data.meta, rows)
    np.testing.assert_array_equal(got.ids["class_name"], [0, 0])
    assert got.text == ["soft", "Nice"] and got.raw == [
        {"review": "soft", "age": 40.0, "class_name": "Capes"}, {"title": "Nice", "age": 40.0}]
    expected = np.float32((40.0 - data.meta["age_mean"]) / data.meta["age_std"])
    assert got.numeric[0, 0] == expected == got.numeric[1, 0]
