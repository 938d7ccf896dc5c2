"""UCI Online Retail: next-day and next-week demand of the 100 top products (a daily panel).

``shared/datasets/online_retail_uci/daily_sales_top100_products.csv``: 100 products x 305
trading days (the shop never trades on Saturdays; SOURCE.md), zero-filled ``quantity``.

Examples: one per (product, forecast origin t), t = the last day whose sales are known, for
every t with ``HISTORY`` = 28 days of history (t >= 27) and a next day (t <= last - 1). Ordered
product-major, origin ascending. Days are trading days (rows of the calendar), so "the next
day" after a Friday is the Sunday, and after the Christmas closure it is the first day back.

Scale: per example, relative to the product's current level. The scale of (p, t) is
``max(MIN_SCALE, level)``, level = the mean daily quantity of product p over the ``LEVEL`` = 28
trading days t-27 .. t (days <= t only; ``_features``). Labels and the lag / mean features
are divided by it, so one model fits products that sell 2 and 170 units a day *and* follows a
product whose level moves (the Q4 peak of the test period) the way the seasonal naive does: a
model scaled by a fixed training-period mean has to extrapolate to levels it never saw.
``MIN_SCALE`` = 1 unit a day floors it: 10% of the training examples (26 products launched or
dormant during the year; <1% of valid / test) have a level below 1 (often 0); dividing by
that would blow a first order up to thousands of "levels", while below 1 unit a day
"relative" is meaningless and units are the natural scale (the floored scale *is* units). The
floor barely matters (floors 0.5 .. 10 moved a quantile tree's test WAPE by < 0.003). A blend
with the product's training mean was not used: for a training example that mean reads days
after t (a leak into the features and labels of training), and it is the stale level this
scaling replaces.
The scale is not stored per example: ``level_28`` (log1p of the level in units) is a numeric
column, and ``metrics`` recomputes the scale from it (``_scale``), so a subset of a split
(``SourceData.sample``) keeps its scales. ``meta["min_scale"]`` holds the floor.

Tasks (quantile, 0.1/0.5/0.9; the median is the point forecast):
- ``demand_1d``: units sold on day t+1.
- ``demand_7d``: units sold on days t+1 .. t+6. Six trading days are one calendar week (no
  Saturdays), the horizon a weekly replenishment order covers.

Numeric features of (p, t), from the product's days <= t only (``_features``; no future day):
- ``lag_0`` .. ``lag_13``: log1p(quantity / scale) of days t, t-1, ..., t-13 (relative to the
  current level);
- ``mean_7``, ``mean_28``: log1p(mean over the last 7 / 28 days / scale): the last week
  against the level; ``mean_28`` is log 2 except where the level is below the floor (kept so
  that "the scaled 28-day mean" still reads back as a forecast, as in ``bench/baselines.py``);
- ``level_28``: log1p(level), in units: the absolute level (what the scaled means no longer
  tell) and the scale's carrier (see Scale);
- ``zero_28``: the share of the last 28 days with no sale (intermittent demand);
- ``dow_0`` .. ``dow_6``: one-hot weekday (Monday = 0) of the target day t+1 (a known date).
Every column is then standardised with the training examples' mean and std (a column constant
in training, e.g. Saturday, becomes 0). The scale of an example reads days <= t only and these
statistics come from the training examples only, so a valid or test day changes nothing before
it.

Requests (``contract``, ``encode``): ``{"product": <stock code>, "history": [{"date", "units"},
...] (at least 28 trading days, dates strictly increasing; the last 28 are read), "date":
<the target day t+1>, "description": <text>}``, ``date`` and ``description`` optional. The
training inputs and a request's inputs come from one function (``_features`` on windows of
28 days' units, then ``_inputs`` standardises with ``meta``): ``load`` takes the windows from
the panel, ``encode`` from the requests; every split's ``raw`` is its examples as requests
(``PanelRequests``, built on demand), and encoding them gives the split's inputs to the bit.
- ``date`` defaults to the next day after the last history day that the shop trades on (never
  a Saturday: after a Friday, the Sunday). Bank holidays and the Christmas closure are not in
  a request's calendar: across them the user gives ``date``. A target weekday the training
  data never had (Saturday) is refused: the model has no forecast for it.
- ``description``: the text input; by default the product's description in training
  (``meta["descriptions"]``); an unknown stock code is the unknown product (id 0, as in
  training) and without a description has no text.
- Answers (``to_user``): the scaled quantiles times the example's scale (recomputed from its
  ``level_28`` input, ``_scale``), i.e. units sold, as ``metrics`` scores them; floored at 0
  and not capped (``contract``).

Split by time: the first 70% of the days are the training target days, the next 15% valid, the
last 15% test; an example belongs to the split of its first target day t+1. A ``demand_7d``
label whose week runs past the end of its split is NaN (masked): no training label contains a
validation day, and the last 5 origins of the test split have no full week.

Metrics are in units (``metrics``): WAPE = sum |y - median| / sum y over every product and day
of the split; MASE = MAE / the MAE of the in-sample seasonal naive (season = 6 trading days = a
week: y[d] predicted by y[d-6], and the weekly sum by the previous week's sum) over the
training days, pooled over the panel (``meta["naive_mae"]``); pinball loss (units, mean over
the quantiles) and the coverage of the 0.1..0.9 interval (ideal 0.8). Labels and predictions
are multiplied by the per-example scale (``_scale``) into units.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl.data.contract import Contract, Field, Output
from shopmtl.data.ingest import DataError
from shopmtl.data.schema import TaskSpec
from shopmtl.data.source import SPLITS, SourceData, SourceSplit
from shopmtl.data.sources._real_common import FRACTIONS, dataset_file, read_csv
from shopmtl.metrics import coverage, pinball, wape

DATASET = "online_retail_uci"
FILE_NAME = "daily_sales_top100_products.csv"
COLUMNS = ("date", "stock_code", "description", "quantity")
HISTORY = 28  # days of history an example needs (the longest feature window)
LEVEL = 28  # trailing days (t-27 .. t) whose mean is an example's level; <= HISTORY
LAGS = 14
SEASON = 6  # trading days in a week (no Saturdays)
WEEK = 6  # days summed by demand_7d
QUANTILES = (0.1, 0.5, 0.9)
MIN_SCALE = 1.0  # units a day: the floor of the per-example scale
TIE_RTOL = 1e-6  # coverage: a label this close (relative) to an interval bound is on it
TASKS = ("demand_1d", "demand_7d")
LEVEL_COLUMN = "level_28"
FEATURES = (
    [f"lag_{k}" for k in range(LAGS)] + ["mean_7", "mean_28", LEVEL_COLUMN, "zero_28"]
    + [f"dow_{d}" for d in range(7)]
)
UNIT = "units sold"
INPUTS = (
    Field("product", "string", "the product's stock code, e.g. 85123A; a code not among the "
          "100 trained products is the unknown product (id 0), as in training"),
    Field("history", "records", f"the product's daily sales, one entry per trading day (a "
          f"day without a sale is 0), oldest first, dates strictly increasing; the last "
          f"{HISTORY} are read", min_items=HISTORY,
          items=(Field("date", "date", "the trading day"),
                 Field("units", "number", "units sold that day", unit=UNIT, ge=0.0))),
    Field("date", "date", "the target day: demand_1d is its sales, demand_7d those of it and "
          "the next 5 trading days; after the last history date. Default: the next trading "
          "day after it (the shop never trades on Saturdays: after a Friday, the Sunday); "
          "give it after a closure (a bank holiday, Christmas)", required=False),
    Field("description", "text", "the product's description (the model's text input). "
          "Default: the product's description in training; an unknown product without one "
          "has no text", required=False),
)
OUTPUT_DOCS = {"demand_1d": "units sold on the target day",
               "demand_7d": "units sold over the target day and the next 5 trading days"}


class RetailDemandSource:
    """The demand source. ``directory``: the dataset folder (default
    ``datasets_dir()/online_retail_uci``)."""

    name = "retail"
    task_names = TASKS  # what load() returns, known without loading (checked at config load)

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = directory

    def load(self) -> SourceData:
        path = dataset_file(self.directory, DATASET, FILE_NAME)
        dates, codes, descriptions, q = _read_panel(path)
        n_days = len(dates)
        n_train = round(FRACTIONS[0] * n_days)
        n_valid = round(FRACTIONS[1] * n_days)
        bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
                  "test": (n_train + n_valid, n_days)}  # target days [start, end) per split
        if n_train - 1 < HISTORY or n_valid < WEEK:
            raise DataError(f"{path}: {n_days} days is too short a calendar for "
                            f"{HISTORY} days of history and a {WEEK}-day target per split")
        # the baseline's interval widths only (its residuals are scaled by the product's
        # training mean, as they were before the per-example scale; see ``baseline``)
        product_scale = np.maximum(q[:, :n_train].mean(axis=1), MIN_SCALE)
        # origins t of each split: its target day t+1 lies in the split; t >= HISTORY - 1
        origins = {s: np.arange(max(lo - 1, HISTORY - 1), hi - 1) for s, (lo, hi) in bounds.items()}
        weekday = np.asarray([d.weekday() for d in dates])
        # the standardisation statistics: the training examples' raw features
        flat = _features(*_panel_windows(q, origins["train"], weekday))[0]
        mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)  # a constant column (Saturday) becomes 0
        meta = {
            "file": str(path),
            "stock_codes": ["<unknown>", *codes],  # product id -> stock code
            # product id -> its description (the text input of a request without one)
            "descriptions": ["", *descriptions],
            # per-example scale = max(min_scale, expm1(level_28)), level_28 destandardised
            "min_scale": MIN_SCALE,
            "level_days": LEVEL,
            # product id -> its training-period mean (floored): the baseline's interval only
            "product_scale": [1.0, *map(float, product_scale)],
            "naive_mae": _naive_mae(q[:, :n_train]),  # task -> units, the MASE denominator
            "season": SEASON,
            "week": WEEK,
            "quantiles": list(QUANTILES),
            "numeric": list(FEATURES),
            "numeric_mean": mean.tolist(),
            "numeric_std": std.tolist(),
            "days": n_days,
            # first / last origin day index and the dates of the first / last (first) target
            # day of each split; product_scale is the mean over the scale_days (train
            # period); examples are product-major, origin ascending: example (p, t) of
            # split s is row (p - 1) * n_origins + (t - first origin)
            "origins": {s: [int(o[0]), int(o[-1])] for s, o in origins.items()},
            "target_dates": {s: [dates[o[0] + 1].isoformat(), dates[o[-1] + 1].isoformat()]
                             for s, o in origins.items()},
            "scale_days": [dates[0].isoformat(), dates[n_train - 1].isoformat()],
            "split": {"method": "by time: target day in the first 70% / next 15% / last 15% "
                      "of the trading days",
                      "sizes": {s: len(codes) * len(origins[s]) for s in SPLITS}},
        }
        cum = np.concatenate([np.zeros((len(codes), 1)), np.cumsum(q, axis=1)], axis=1)
        splits = {}
        for s in SPLITS:
            t = origins[s]
            product = np.repeat(np.arange(1, len(codes) + 1, dtype=np.int64), len(t))
            inputs, scale = _inputs(meta, product, *_panel_windows(q, t, weekday),
                                    [descriptions[p - 1] for p in product])
            y7 = np.full((len(codes), len(t)), np.nan)
            full = t + WEEK < bounds[s][1]  # the week t+1..t+6 lies inside the split
            y7[:, full] = cum[:, t[full] + 1 + WEEK] - cum[:, t[full] + 1]
            labels = {"demand_1d": (q[:, t + 1].reshape(-1) / scale).astype(np.float32),
                      "demand_7d": (y7.reshape(-1) / scale).astype(np.float32)}
            splits[s] = replace(inputs, labels=labels,
                                raw=PanelRequests(dates, meta["stock_codes"], q, product,
                                                  np.tile(t, len(codes))))
        return SourceData(
            name=self.name,
            tasks=tuple(TaskSpec(t, type="quantile", quantiles=QUANTILES) for t in TASKS),
            train=splits["train"], valid=splits["valid"], test=splits["test"],
            id_sizes={"product": len(codes) + 1}, meta=meta,
        )

    def contract(self, data: SourceData) -> Contract:
        """The request fields (module doc, Requests) and the two quantile answers in units
        sold, floored at 0 and not capped above: demand grows past its training range (in
        the Q4 peak of the test period the largest day and week exceed every training label,
        and a third of the products their own training maximum), and a cap at the training
        maximum would clip exactly the forecasts of a growing product. The example is the
        first test example (a real request)."""
        raw = data.test.raw
        example = dict(raw[0]) if raw is not None and len(raw) else {}
        return Contract(
            self.name, INPUTS,
            tuple(Output(t, "quantile", doc, unit=UNIT, low=0.0, quantiles=QUANTILES)
                  for t, doc in OUTPUT_DOCS.items()),
            example, doc="daily demand of the 100 top products (UCI Online Retail)")

    @staticmethod
    def encode(meta: dict[str, Any], rows: list[dict[str, Any]]) -> SourceSplit:
        """Requests (checked by the contract) -> the model's inputs, by the feature function
        and the training statistics that built the training inputs (``_inputs``). A request's
        last ``HISTORY`` days are its window; ``raw`` echoes each request as it was read, with
        its target date filled in."""
        product = {c: i for i, c in enumerate(meta["stock_codes"]) if i}
        closed = _closed_weekdays(meta)
        ids = np.zeros(len(rows), np.int64)
        window = np.empty((len(rows), HISTORY))
        weekday = np.empty(len(rows), np.int64)
        text, raw = [], []
        for i, r in enumerate(rows):
            days = [h["date"] for h in r["history"]][-HISTORY:]
            target = _target_date(r, closed, f"request {i}")
            ids[i] = product.get(r["product"], 0)
            window[i] = [h["units"] for h in r["history"][-HISTORY:]]
            weekday[i] = target.weekday()
            text.append(r.get("description") or meta["descriptions"][ids[i]])
            raw.append(_request(r["product"], target, days, window[i], r.get("description")))
        inputs, _ = _inputs(meta, ids, window, weekday, text)
        return replace(inputs, raw=raw)

    @staticmethod
    def to_user(meta: dict[str, Any], split: SourceSplit, task: str, pred: np.ndarray
                ) -> np.ndarray:
        """Scaled predictions of ``split`` ([n] or [n, Q]) -> units sold: times each
        example's scale, recomputed from its ``level_28`` column (``_scale``); what
        ``metrics`` scores in."""
        if task not in TASKS:
            raise KeyError(f"retail: unknown task {task!r}; known: {list(TASKS)}")
        pred = np.asarray(pred, np.float64)
        scale = _scale(meta, split.numeric)
        return pred * (scale if pred.ndim == 1 else scale[:, None])

    def metrics(self, data: SourceData, split: str, task: str, pred: np.ndarray
                ) -> dict[str, float]:
        """Scaled predictions [n] (point) or [n, Q] (one column per quantile) of ``task`` on
        ``split``, scored in units (see the module doc): n, mae, wape, mase, and for [n, Q] also
        pinball and coverage_80. NaN labels (a week past the split's end) are masked."""
        spec = next((t for t in data.tasks if t.name == task), None)
        if spec is None:
            raise KeyError(f"{self.name}: unknown task {task!r}; known: {list(TASKS)}")
        part = data.split(split)
        quantiles = tuple(getattr(spec, "quantiles", ()) or ())
        pred = np.asarray(pred, np.float64)
        n = len(part)
        if pred.shape not in ((n,), (n, len(quantiles))) or (pred.ndim == 2 and not quantiles):
            raise ValueError(f"{self.name}/{task}: pred has shape {pred.shape}, expected ({n},) "
                             f"or ({n}, {len(quantiles)}) for quantiles {list(quantiles)}")
        y = part.labels[task].astype(np.float64)
        keep = np.isfinite(y)
        # in units: times the per-example scale, from the level_28 column (``to_user``)
        y_units = self.to_user(data.meta, part, task, y)[keep]
        p_units = self.to_user(data.meta, part, task, pred)[keep]
        if pred.ndim == 2 and 0.5 not in quantiles:
            raise ValueError(f"{self.name}/{task}: quantiles {list(quantiles)} lack 0.5, the "
                             "point forecast WAPE and MASE score")
        median = p_units if pred.ndim == 1 else p_units[:, quantiles.index(0.5)]
        mae = float(np.mean(np.abs(y_units - median))) if len(y_units) else math.nan
        # MASE pooled over the panel: one denominator for every product (meta["naive_mae"]),
        # not the M4 mean of per-series MASE (mase_panel), so that, like WAPE, it weighs
        # products by their volume and a product with a near-constant history cannot blow up
        denom = float(data.meta["naive_mae"][task])
        out = {"n": len(y_units), "mae": mae, "wape": wape(y_units, median),
               "mase": mae / denom if denom > 0 else math.nan}
        if pred.ndim == 2:
            width = round(100 * (quantiles[-1] - quantiles[0]))
            out["pinball"] = pinball(y_units, p_units, quantiles)
            # a label on a bound is inside (lo <= y <= hi), also after the float32 round trip
            # of labels, features and scales (~1e-7 relative to the values involved, the bound
            # itself may be a difference of two such values): integer units often sit exactly
            # on a bound (the baseline's: last week's quantity + a residual quantile), and
            # without the tolerance float noise would decide those ties
            lo, hi = p_units[:, 0], p_units[:, -1]
            tol = TIE_RTOL * (1.0 + np.abs(y_units) + np.abs(lo) + np.abs(hi))
            out[f"coverage_{width}"] = coverage(y_units, lo - tol, hi + tol)
        return out

    def baseline(self, data: SourceData) -> dict[str, dict[str, float]]:
        """Seasonal naive: demand_1d = the quantity 6 trading days before the target day (the
        same weekday last week); demand_7d = the sum of the last 6 trading days. The 0.1 / 0.9
        columns add the 0.1 / 0.9 quantiles of the naive's training residuals, in units of the
        product's training mean (``meta["product_scale"]``: the baseline is the one it was
        before the per-example scale, to the float), clipped at 0 units; the median column is
        the naive itself. None of it depends on the per-example scale: the columns are built
        in units and divided by it only to pass them to ``metrics``."""
        scale = {s: _scale(data.meta, data.split(s).numeric) for s in ("train", "test")}
        units = {s: {k: v * scale[s] for k, v in _naive(data, s).items()}
                 for s in ("train", "test")}
        product_scale = np.asarray(data.meta["product_scale"], np.float64)
        p_train = product_scale[data.train.ids["product"]]
        p_test = product_scale[data.test.ids["product"]]
        out = {}
        for spec in data.tasks:
            y = data.train.labels[spec.name] * scale["train"]
            resid = ((y - units["train"][spec.name]) / p_train)[np.isfinite(y)]
            point = units["test"][spec.name]
            cols = [point if q == 0.5
                    else np.maximum(point + np.quantile(resid, q) * p_test, 0.0)
                    for q in spec.quantiles]
            pred = np.stack(cols, axis=1) / scale["test"][:, None]
            out[spec.name] = self.metrics(data, "test", spec.name, pred)
        return out


def _read_panel(path: Path) -> tuple[list[dt.date], list[str], list[str], np.ndarray]:
    """The calendar (sorted dates), stock codes (sorted), a description per code and the
    quantity panel [products, days]; every (code, date) must appear exactly once."""
    table = read_csv(path, COLUMNS)
    cols = table.columns
    parsed: list[dt.date] = []
    for i, v in enumerate(cols["date"]):
        try:
            parsed.append(dt.date.fromisoformat(v))
        except ValueError:
            raise DataError(f"{table.where(i, 'date')}: not a YYYY-MM-DD date") from None
    quantity = np.empty(len(table))
    for i, v in enumerate(cols["quantity"]):
        try:
            quantity[i] = float(v)
        except ValueError:
            raise DataError(f"{table.where(i, 'quantity')}: not a number") from None
        if not (math.isfinite(quantity[i]) and quantity[i] >= 0):
            raise DataError(f"{table.where(i, 'quantity')}: not a finite quantity >= 0")
    for i, v in enumerate(cols["stock_code"]):
        if not v.strip():
            raise DataError(f"{table.where(i, 'stock_code')}: empty value")
    dates = sorted(set(parsed))
    codes = sorted(set(cols["stock_code"]))
    day = {d: k for k, d in enumerate(dates)}
    product = {c: k for k, c in enumerate(codes)}
    q = np.full((len(codes), len(dates)), np.nan)
    descriptions: dict[str, str] = {}
    for i in range(len(table)):
        p, d = product[cols["stock_code"][i]], day[parsed[i]]
        if not math.isnan(q[p, d]):
            raise DataError(f"{table.where(i)}: a second row for stock code "
                            f"{codes[p]} on {dates[d]}")
        q[p, d] = quantity[i]
        descriptions.setdefault(codes[p], cols["description"][i])
    if np.isnan(q).any():
        p, d = np.argwhere(np.isnan(q))[0]
        raise DataError(f"{path}: the panel is not complete: no row for stock code {codes[p]} "
                        f"on {dates[d]} ({int(np.isnan(q).sum())} product-days missing)")
    return dates, codes, [descriptions[c] for c in codes], q


def _panel_windows(q: np.ndarray, origins: np.ndarray, weekday: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The examples (product-major, origin ascending) of origins t of a panel as
    ``_features`` reads them: the units of days t-27 .. t [products * origins, HISTORY] and
    the weekday of the target day t+1 (a calendar fact, the one thing read beyond t)."""
    window = np.lib.stride_tricks.sliding_window_view(q, HISTORY, axis=1)
    w = window[:, origins - HISTORY + 1]  # [P, T, HISTORY], a copy; last = day t
    return w.reshape(-1, HISTORY), np.tile(weekday[origins + 1], len(q))


def _features(w: np.ndarray, weekday: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw features [n, len(FEATURES)] of n examples and the scales [n] = max(MIN_SCALE,
    level) they are relative to: the one feature function of training (``load``, through
    ``_panel_windows``) and of requests (``encode``).

    ``w``: units sold [n, HISTORY] of days t-27 .. t (the last = day t, the origin): the
    features read nothing later; ``weekday``: 0..6 of each target day t+1.
    """
    level = w[:, -LEVEL:].mean(axis=-1)  # [n]: days t-27 .. t
    scale = np.maximum(level, MIN_SCALE)
    rel = w / scale[:, None]
    lags = np.log1p(rel[:, ::-1][:, :LAGS])
    mean_7 = np.log1p(rel[:, -7:].mean(axis=-1))[:, None]
    mean_28 = np.log1p(level / scale)[:, None]
    level_28 = np.log1p(level)[:, None]
    zero_28 = (w == 0).mean(axis=-1)[:, None]
    dow = np.eye(7)[weekday]
    return np.concatenate([lags, mean_7, mean_28, level_28, zero_28, dow], axis=-1), scale


def _inputs(meta: dict[str, Any], product: np.ndarray, w: np.ndarray, weekday: np.ndarray,
            text: list[str]) -> tuple[SourceSplit, np.ndarray]:
    """The model's inputs of n examples (no labels) and their scales: ``_features``,
    standardised with the training statistics in ``meta``. ``load`` and ``encode`` differ
    only in where the windows come from (the panel, the requests)."""
    raw, scale = _features(w, weekday)
    mean = np.asarray(meta["numeric_mean"], np.float64)
    std = np.asarray(meta["numeric_std"], np.float64)
    numeric = ((raw - mean) / std).astype(np.float32)
    return SourceSplit(text=text, numeric=numeric, ids={"product": product}), scale


def _scale(meta: dict[str, Any], numeric: np.ndarray) -> np.ndarray:
    """The per-example scales [n] (units a day) of standardised inputs ``numeric``,
    recomputed from their ``level_28`` column: max(min_scale, expm1(level_28)). Reads the
    inputs only, so it follows any subset of a split's rows (``SourceData.sample``) and
    works on the inputs of requests (``to_user``)."""
    col = meta["numeric"].index(LEVEL_COLUMN)
    x = np.asarray(numeric)[:, col].astype(np.float64)
    level = np.expm1(x * meta["numeric_std"][col] + meta["numeric_mean"][col])
    return np.maximum(level, float(meta["min_scale"]))


def _closed_weekdays(meta: dict[str, Any]) -> set[int]:
    """Weekdays (0 = Monday) that were never a training target day: their ``dow_`` column's
    training mean is 0 (the shop never trades on Saturdays). The model has no forecast for
    them: a request's target day is never one (``_target_date``)."""
    names, mean = meta["numeric"], meta["numeric_mean"]
    return {d for d in range(7) if mean[names.index(f"dow_{d}")] == 0.0}


def _target_date(row: dict[str, Any], closed: set[int], where: str) -> dt.date:
    """A request's target day: its ``date``, or else the day after its last history day,
    skipping days the shop does not trade (after a Friday: the Sunday). A closure (a bank
    holiday, the Christmas break) is not in a request's calendar: its user gives ``date``
    then (the training requests always do: their target is the calendar's next day). History dates
    must increase strictly (one entry per trading day)."""
    days = [h["date"] for h in row["history"]]
    if any(b <= a for a, b in itertools.pairwise(days)):
        raise DataError(f"{where}: field 'history': dates must be strictly increasing")
    target = row.get("date")
    if target is None:
        target = days[-1] + dt.timedelta(days=1)
        while target.weekday() in closed:
            target += dt.timedelta(days=1)
    elif target <= days[-1]:
        raise DataError(f"{where}: field 'date': must be after the last history date")
    if target.weekday() in closed:
        raise DataError(f"{where}: field 'date': a {target.strftime('%A')}, a day the shop "
                        "never traded in training; the model has no forecast for it")
    return target


def _request(code: str, target: dt.date, days: Sequence[dt.date], units: Sequence[float],
             description: str | None = None) -> dict[str, Any]:
    """One request as its user sends it (JSON-able: dates as ``YYYY-MM-DD``)."""
    out: dict[str, Any] = {
        "product": code, "date": target.isoformat(),
        "history": [{"date": d.isoformat(), "units": float(u)}
                    for d, u in zip(days, units, strict=True)]}
    if description is not None:
        out["description"] = description
    return out


class PanelRequests(Sequence[dict[str, Any]]):
    """The raw requests of a split's examples, built on demand from the panel (a list of
    28,000 requests of 28 days each would be ~800,000 dicts): example i is product
    ``product[i]`` (an id; ``codes`` maps ids to stock codes) at origin ``origin[i]`` (a day
    index of ``dates``, the columns of the panel ``q`` [products, days]), asking for day
    origin + 1 with the 28 days up to the origin. ``take(idx)`` is the subset
    ``SourceSplit.sample`` keeps."""

    def __init__(self, dates: list[dt.date], codes: list[str], q: np.ndarray,
                 product: np.ndarray, origin: np.ndarray) -> None:
        self.dates, self.codes, self.q = dates, codes, q
        self.product, self.origin = product, origin

    def __len__(self) -> int:
        return len(self.product)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        p, t = int(self.product[i]), int(self.origin[i])
        days = range(t - HISTORY + 1, t + 1)
        return _request(self.codes[p], self.dates[t + 1], [self.dates[d] for d in days],
                        self.q[p - 1, days.start:days.stop])

    def take(self, idx: np.ndarray) -> PanelRequests:
        return PanelRequests(self.dates, self.codes, self.q, self.product[idx], self.origin[idx])


def _naive_mae(q: np.ndarray) -> dict[str, float]:
    """In-sample seasonal-naive MAE in units over the training days, pooled over products:
    day d by day d - 6 (demand_1d); the 6-day sum starting at d by the one starting at d - 6
    (demand_7d)."""
    week = np.lib.stride_tricks.sliding_window_view(q, WEEK, axis=1).sum(axis=-1)
    return {"demand_1d": float(np.mean(np.abs(q[:, SEASON:] - q[:, :-SEASON]))),
            "demand_7d": float(np.mean(np.abs(week[:, SEASON:] - week[:, :-SEASON])))}


def _naive(data: SourceData, split: str) -> dict[str, np.ndarray]:
    """The scaled seasonal-naive forecasts of a split (relative to each example's scale), read
    back from its lag features (lag_k = log1p(quantity of day t - k / scale), standardised):
    the data is all it needs."""
    names = data.meta["numeric"]
    x = data.split(split).numeric.astype(np.float64)
    mean, std = np.asarray(data.meta["numeric_mean"]), np.asarray(data.meta["numeric_std"])
    lag = {k: np.maximum(np.expm1(x[:, names.index(f"lag_{k}")] * std[names.index(f"lag_{k}")]
                                  + mean[names.index(f"lag_{k}")]), 0.0)
           for k in range(SEASON)}
    # target day t+1 is 6 trading days after t-5: the same weekday one week before
    return {"demand_1d": lag[SEASON - 1], "demand_7d": sum(lag[k] for k in range(WEEK))}
