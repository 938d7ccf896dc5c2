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
import math
from pathlib import Path

import numpy as np

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
        raw, scale = {}, {}
        for s in SPLITS:
            raw[s], scale[s] = _features(q, origins[s], weekday)
        flat = raw["train"].reshape(-1, len(FEATURES))
        mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)  # a constant column (Saturday) becomes 0
        cum = np.concatenate([np.zeros((len(codes), 1)), np.cumsum(q, axis=1)], axis=1)
        splits = {}
        for s in SPLITS:
            t = origins[s]
            y7 = np.full((len(codes), len(t)), np.nan)
            full = t + WEEK < bounds[s][1]  # the week t+1..t+6 lies inside the split
            y7[:, full] = cum[:, t[full] + 1 + WEEK] - cum[:, t[full] + 1]
            splits[s] = SourceSplit(
                text=[descriptions[p] for p in range(len(codes)) for _ in t],
                numeric=((raw[s] - mean) / std).reshape(-1, len(FEATURES)).astype(np.float32),
                ids={"product": np.repeat(np.arange(1, len(codes) + 1, dtype=np.int64), len(t))},
                labels={"demand_1d": (q[:, t + 1] / scale[s]).reshape(-1).astype(np.float32),
                        "demand_7d": (y7 / scale[s]).reshape(-1).astype(np.float32)},
            )
        return SourceData(
            name=self.name,
            tasks=tuple(TaskSpec(t, type="quantile", quantiles=QUANTILES) for t in TASKS),
            train=splits["train"], valid=splits["valid"], test=splits["test"],
            id_sizes={"product": len(codes) + 1},
            meta={
                "file": str(path),
                "stock_codes": ["<unknown>", *codes],  # product id -> stock code
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
                          "sizes": {s: len(splits[s]) for s in SPLITS}},
            },
        )

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
        scale = _scale(data, split)  # per example, from its level_28 column
        y = part.labels[task].astype(np.float64)
        keep = np.isfinite(y)
        y_units = y[keep] * scale[keep]
        p_units = pred[keep] * (scale[keep] if pred.ndim == 1 else scale[keep, None])
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
        units = {s: {k: v * _scale(data, s) for k, v in _naive(data, s).items()}
                 for s in ("train", "test")}
        product_scale = np.asarray(data.meta["product_scale"], np.float64)
        p_train = product_scale[data.train.ids["product"]]
        p_test = product_scale[data.test.ids["product"]]
        test_scale = _scale(data, "test")
        out = {}
        for spec in data.tasks:
            y = data.train.labels[spec.name] * _scale(data, "train")
            resid = ((y - units["train"][spec.name]) / p_train)[np.isfinite(y)]
            point = units["test"][spec.name]
            cols = [point if q == 0.5
                    else np.maximum(point + np.quantile(resid, q) * p_test, 0.0)
                    for q in spec.quantiles]
            pred = np.stack(cols, axis=1) / test_scale[:, None]
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


def _features(q: np.ndarray, origins: np.ndarray, weekday: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Raw features [products, origins, len(FEATURES)] of origins t from days <= t only, and
    the scales [products, origins] = max(MIN_SCALE, level) they are relative to.

    ``q``: quantities [products, days]; ``weekday[d]``: 0..6 of day d (only weekday[t + 1], a
    calendar fact, is read beyond t). Every origin needs t >= HISTORY - 1 (>= LEVEL - 1).
    """
    window = np.lib.stride_tricks.sliding_window_view(q, HISTORY, axis=1)
    w = window[:, origins - HISTORY + 1]  # [P, T, HISTORY] in units, last = day t
    level = w[..., -LEVEL:].mean(axis=-1)  # [P, T]: days t-27 .. t
    scale = np.maximum(level, MIN_SCALE)
    rel = w / scale[..., None]
    lags = np.log1p(rel[..., ::-1][..., :LAGS])
    mean_7 = np.log1p(rel[..., -7:].mean(axis=-1))[..., None]
    mean_28 = np.log1p(level / scale)[..., None]
    level_28 = np.log1p(level)[..., None]
    zero_28 = (w == 0).mean(axis=-1)[..., None]
    dow = np.eye(7)[weekday[origins + 1]]  # [T, 7]
    dow = np.broadcast_to(dow, (len(q), *dow.shape))
    return np.concatenate([lags, mean_7, mean_28, level_28, zero_28, dow], axis=-1), scale


def _scale(data: SourceData, split: str) -> np.ndarray:
    """The per-example scales [n] of a split (units a day), recomputed from its standardised
    ``level_28`` column: max(min_scale, expm1(level_28)). Reads ``split.numeric``, so it
    follows any subset of the rows (``SourceData.sample``)."""
    meta = data.meta
    col = meta["numeric"].index(LEVEL_COLUMN)
    x = data.split(split).numeric[:, col].astype(np.float64)
    level = np.expm1(x * meta["numeric_std"][col] + meta["numeric_mean"][col])
    return np.maximum(level, float(meta["min_scale"]))


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
