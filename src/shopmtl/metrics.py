"""Evaluation metrics in pure numpy, per task x scenario.

Binary: AUC, GAUC, logloss, calibration. Regression: RMSE, MAE, WAPE, MASE. Multiclass:
accuracy, macro F1, logloss. Quantile: pinball, median MAE/WAPE, interval coverage. Ranking:
NDCG@k, MRR over padded [lists, candidates] arrays (NaN relevance = a padded candidate).

Ties in ranking. Two candidates of one list with exactly the same score have no order, and
NDCG and MRR need one. ``ties`` chooses how they are ordered; both choices ignore the order the
candidates came in, so no scorer profits from (or is hurt by) how the data was laid out:

- ``"pessimistic"`` (the default): the less relevant candidate first, the worst order of each
  tie. A lower bound: a model that collapses to a constant (or to a few distinct values) gets
  no credit for what it did not rank. Models are evaluated with it.
- ``"average"``: the expected value over all orders of each tie, every order equally likely
  (random tie-breaking; as scikit-learn's ``ndcg_score``). For NDCG each tied candidate gets
  its tie's mean gain at the tie's discounts; for MRR, the expected reciprocal rank of the
  first relevant candidate of the tie that holds it. This is the fair number for a scorer whose
  ties are genuine, such as BM25: it gives many candidates exactly the same score (the same
  matched words), and breaking those ties against it would cut the search source's BM25
  NDCG@10 from 0.75 to 0.62 on its default test split, a baseline weaker than BM25 really is
  (``shopmtl.data.sources.search`` reports its metrics with ``"average"``).

For scores without ties (a model's, in practice) both give the same numbers.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np

EPS = 1e-7


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(n)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney); NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _rank(np.asarray(score, dtype=np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(y: np.ndarray, score: np.ndarray, group: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups that have both classes."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    group = np.asarray(group)
    if len(y) == 0:
        return math.nan
    order = np.lexsort((score, group))
    g, s, t = group[order], score[order], y[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    # ranks within each group, ties averaged: a run is equal (group, score)
    run_start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])])
    run_end = np.r_[run_start[1:], len(g)]
    grp_of_run = np.searchsorted(starts, run_start, side="right") - 1
    avg_rank = (run_start + run_end + 1) / 2.0 - starts[grp_of_run]
    ranks = np.repeat(avg_rank, run_end - run_start)
    grp_id = np.repeat(np.arange(len(starts)), ends - starts)
    n = ends - starts
    n_pos = np.bincount(grp_id, weights=t, minlength=len(starts))
    n_neg = n - n_pos
    rank_sum = np.bincount(grp_id, weights=ranks * t, minlength=len(starts))
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return math.nan
    a = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(a, weights=n[ok]))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) == 0:
        return math.nan
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    group: np.ndarray | None = None,
    oracle: np.ndarray | None = None,
) -> dict[str, float]:
    """AUC, GAUC, logloss, calibration (mean predicted / observed rate), count; oracle beside."""
    n = len(y)
    out: dict[str, float] = {"n": n, "positives": int(np.sum(y))}
    out["auc"] = auc(y, p)
    out["logloss"] = logloss(y, p)
    rate = float(np.mean(y)) if n else math.nan
    out["observed_rate"] = rate
    out["predicted_rate"] = float(np.mean(p)) if n else math.nan
    out["calibration"] = out["predicted_rate"] / rate if n and rate > 0 else math.nan
    if group is not None:
        out["gauc"] = gauc(y, p, group)
    if oracle is not None:
        out["oracle_auc"] = auc(y, oracle)
        out["oracle_logloss"] = logloss(y, oracle)
        if group is not None:
            out["oracle_gauc"] = gauc(y, oracle, group)
        denom = out["oracle_auc"] - 0.5
        out["auc_efficiency"] = (out["auc"] - 0.5) / denom if denom > 0 else math.nan
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    n = len(y)
    if n == 0:
        return {"n": 0, "rmse": math.nan, "mae": math.nan}
    err = np.asarray(pred, np.float64) - np.asarray(y, np.float64)
    return {"n": n, "rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


# ----------------------------------------------------------------------------- multiclass


def accuracy(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Share of rows whose predicted class equals the true class: ``mean(y == y_hat)``."""
    y, y_hat = np.asarray(y), np.asarray(y_hat)
    return float(np.mean(y == y_hat)) if len(y) else math.nan


def macro_f1(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Unweighted mean over classes of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``.

    The classes are those present in ``y`` or ``y_hat`` (as scikit-learn's default
    ``labels``): a class never seen nor predicted has no defined F1 and is left out, while a
    class that is seen but never predicted (or the reverse) counts with F1 = 0.
    """
    y, y_hat = np.asarray(y).astype(np.int64), np.asarray(y_hat).astype(np.int64)
    if len(y) == 0:
        return math.nan
    classes = np.union1d(y, y_hat)
    f1 = []
    for c in classes:
        tp = np.sum((y == c) & (y_hat == c))
        fp = np.sum((y != c) & (y_hat == c))
        fn = np.sum((y == c) & (y_hat != c))
        f1.append(2 * tp / (2 * tp + fp + fn))  # > 0 denominator: c is in y or y_hat
    return float(np.mean(f1))


def multiclass_logloss(y: np.ndarray, prob: np.ndarray) -> float:
    """``-mean_i log p_i[y_i]`` for class probabilities ``prob`` [N, C]; the probability is
    clipped to [EPS, 1] (not renormalised), as the binary ``logloss``."""
    y = np.asarray(y).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    _check_classes(y, prob.shape[1])
    p = np.clip(prob[np.arange(len(y)), y], EPS, 1.0)
    return float(-np.mean(np.log(p)))


def multiclass_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and logloss of class probabilities ``prob`` [N, C] against class ids
    ``y`` [N] (float ids are fine: they are cast), and the count; the prediction is the argmax."""
    y = np.asarray(y).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    n = len(y)
    if n == 0:
        return {"n": 0, "accuracy": math.nan, "macro_f1": math.nan, "logloss": math.nan}
    y_hat = prob.argmax(axis=1)
    return {
        "n": n,
        "accuracy": accuracy(y, y_hat),
        "macro_f1": macro_f1(y, y_hat),
        "logloss": multiclass_logloss(y, prob),
    }


def _check_classes(y: np.ndarray, n_classes: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"class labels must be 0..{n_classes - 1}, got values in [{y.min()}, {y.max()}]"
        )


# ------------------------------------------------------------------- regression and quantile


def wape(y: np.ndarray, pred: np.ndarray) -> float:
    """Weighted absolute percentage error ``sum|y - pred| / sum|y|``: the MAE in units of the
    mean absolute label, defined when a single label is zero (unlike MAPE); NaN if all are."""
    y = np.asarray(y, np.float64)
    denom = float(np.sum(np.abs(y)))
    if len(y) == 0 or denom == 0.0:
        return math.nan
    return float(np.sum(np.abs(y - np.asarray(pred, np.float64))) / denom)


def mase(y: np.ndarray, pred: np.ndarray, y_train_history: np.ndarray, season: int = 1) -> float:
    """Mean absolute scaled error of one series (Hyndman & Koehler, IJF 2006):
    ``mean|y - pred| / mean_t |h_t - h_{t-m}|``, the denominator being the in-sample MAE of the
    seasonal-naive forecast (period ``m = season``; 1 = the naive forecast) on the training
    history ``h``. Below 1 the forecast beats seasonal-naive. NaN when the history is constant
    at lag m (the scale is 0) or ``y`` is empty.
    """
    h = np.asarray(y_train_history, np.float64)
    if season < 1:
        raise ValueError(f"season must be >= 1, got {season}")
    if len(h) <= season:
        raise ValueError(f"the history needs more than season={season} points, got {len(h)}")
    y = np.asarray(y, np.float64)
    scale = float(np.mean(np.abs(h[season:] - h[:-season])))
    if len(y) == 0 or scale == 0.0:
        return math.nan
    return float(np.mean(np.abs(y - np.asarray(pred, np.float64))) / scale)


def mase_panel(
    ys: list[np.ndarray],
    preds: list[np.ndarray],
    histories: list[np.ndarray],
    season: int = 1,
) -> float:
    """MASE of a panel of series: the mean of the per-series MASE (the M4 competition's
    convention), so each series counts once whatever its length or scale; series with an
    undefined MASE (constant history, no points) are left out. NaN if none is defined.
    """
    if not (len(ys) == len(preds) == len(histories)):
        raise ValueError("ys, preds and histories need one entry per series")
    per = [mase(y, p, h, season) for y, p, h in zip(ys, preds, histories, strict=True)]
    ok = [v for v in per if not math.isnan(v)]
    return float(np.mean(ok)) if ok else math.nan


def pinball(y: np.ndarray, q_pred: np.ndarray, quantiles: tuple[float, ...] | np.ndarray) -> float:
    """Mean pinball (quantile) loss over rows and quantile levels (Koenker & Bassett, 1978):
    ``rho_tau(u) = max(tau * u, (tau - 1) * u)`` with ``u = y - q_tau``; ``q_pred`` is [N, Q],
    one column per level of ``quantiles``. At tau = 0.5 it is half the absolute error."""
    y = np.asarray(y, np.float64)
    q = np.asarray(q_pred, np.float64).reshape(len(y), -1)
    tau = np.asarray(quantiles, np.float64)
    if q.shape[1] != len(tau):
        raise ValueError(f"q_pred has {q.shape[1]} columns for {len(tau)} quantiles")
    if len(y) == 0:
        return math.nan
    u = y[:, None] - q
    return float(np.mean(np.maximum(tau * u, (tau - 1.0) * u)))


def coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Share of labels inside the predicted interval ``lo <= y <= hi``."""
    y = np.asarray(y, np.float64)
    return float(np.mean((y >= lo) & (y <= hi))) if len(y) else math.nan


def quantile_metrics(
    y: np.ndarray, q_pred: np.ndarray, quantiles: tuple[float, ...] | None = None
) -> dict[str, float]:
    """Metrics of quantile predictions ``q_pred`` [N, Q] (one column per level, increasing).

    ``mae`` and ``wape`` are those of the median column: the level closest to 0.5 (the lower
    on a tie), or, without ``quantiles``, the middle column ``(Q - 1) // 2``. ``coverage`` is
    the share of labels within [first column, last column]; with ``quantiles`` it is reported
    beside its nominal value ``coverage_nominal = tau_last - tau_first``, and ``pinball`` (which
    needs the levels) is added.
    """
    y = np.asarray(y, np.float64)
    q = np.asarray(q_pred, np.float64).reshape(len(y), -1)
    n = len(y)
    if quantiles is not None:
        dist = np.abs(np.asarray(quantiles, np.float64) - 0.5)
        # a tolerance, so that 0.1 and 0.9 tie despite rounding (0.5 - 0.1 != 0.9 - 0.5)
        mid = int(np.flatnonzero(dist <= dist.min() + 1e-9)[0])
    else:
        mid = (q.shape[1] - 1) // 2
    out: dict[str, float] = {"n": n}
    if quantiles is not None:
        out["pinball"] = pinball(y, q, quantiles)
    out["mae"] = float(np.mean(np.abs(y - q[:, mid]))) if n else math.nan
    out["wape"] = wape(y, q[:, mid])
    out["coverage"] = coverage(y, q[:, 0], q[:, -1])
    if quantiles is not None and len(quantiles) > 1:
        out["coverage_nominal"] = float(quantiles[-1] - quantiles[0])
    return out


# ----------------------------------------------------------------------------------- ranking


Ties = Literal["pessimistic", "average"]
TIES: tuple[str, ...] = ("pessimistic", "average")


class _Ranking(NamedTuple):
    """Every list's candidates in ranked order [G, L]: relevance (pads as 0), whether the
    candidate is real (not a pad), and the 0-based id of its run of tied candidates."""

    rel: np.ndarray
    real: np.ndarray
    run: np.ndarray


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def _ranked(rel: np.ndarray, scores: np.ndarray) -> _Ranking:
    """Candidates ranked by descending score, real ones first and pads (NaN relevance) last;
    tied scores are ordered pessimistically (the less relevant candidate first). A run is a
    maximal stretch of real candidates with equal scores (the pads make one run of their own):
    what ``ties="average"`` averages over."""
    rel = np.asarray(rel, np.float64)
    scores = np.asarray(scores, np.float64)
    if rel.ndim != 2 or rel.shape != scores.shape:
        raise ValueError(
            "rel and scores must both have the shape [lists, candidates], got "
            f"{rel.shape} and {scores.shape}"
        )
    pad = np.isnan(rel)
    if np.isnan(scores[~pad]).any():
        raise ValueError("the scores of real candidates (non-NaN relevance) must not be NaN")
    rel0 = np.where(pad, 0.0, rel)
    s0 = np.where(pad, 0.0, scores)
    # lexsort: the last key is the primary one -> real candidates first, then score down, then
    # relevance up
    order = np.lexsort((rel0, -s0, pad), axis=-1)
    ranked_s = np.take_along_axis(s0, order, axis=-1)
    real = np.take_along_axis(~pad, order, axis=-1)
    new_run = np.ones(rel.shape, bool)
    new_run[:, 1:] = (ranked_s[:, 1:] != ranked_s[:, :-1]) | (real[:, 1:] != real[:, :-1])
    run = np.cumsum(new_run, axis=1) - 1
    return _Ranking(np.take_along_axis(rel0, order, axis=-1), real, run)


def _run_mean(x: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Each entry of ``x`` [G, L] replaced by the mean of its run (``run``: ids per row)."""
    if x.size == 0:
        return x
    gid = (run + np.arange(run.shape[0])[:, None] * run.shape[1]).ravel()
    total = np.bincount(gid, weights=x.ravel())
    count = np.bincount(gid)
    return (total[gid] / count[gid]).reshape(x.shape)


def ndcg_per_list(
    rel: np.ndarray, scores: np.ndarray, k: int = 10, *, ties: Ties = "pessimistic"
) -> np.ndarray:
    """NDCG@k of each list [G] (Jarvelin & Kekalainen, 2002, with exponential gains):
    ``DCG@k = sum_{r=1..k} (2^rel_r - 1) / log2(r + 1)`` over candidates ranked by score,
    divided by the DCG@k of the ideal (relevance-sorted) order. ``rel`` [G, L] holds graded
    relevance with NaN for padded candidates; a list with no relevant candidate (ideal DCG 0)
    has no NDCG: NaN. ``ties``: how tied scores are ordered ("Ties in ranking" in the module
    docstring); with ``"average"`` each tied candidate counts with its tie's mean gain, which
    is the expected DCG@k over all orders of the tie (also when the tie straddles rank k).
    """
    _check_ties(ties)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _ranked(rel, scores)
    gains = np.exp2(r.rel) - 1.0
    if ties == "average":
        gains = _run_mean(gains, r.run)
    kk = min(k, gains.shape[1])
    disc = 1.0 / np.log2(np.arange(2, kk + 2))  # rank r -> 1 / log2(r + 1)
    ideal = np.exp2(-np.sort(-r.rel, axis=1)[:, :kk]) - 1.0
    dcg, idcg = gains[:, :kk] @ disc, ideal @ disc
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def ndcg_at_k(
    rel: np.ndarray, scores: np.ndarray, k: int = 10, *, ties: Ties = "pessimistic"
) -> float:
    """Mean NDCG@k over the lists that have a relevant candidate (``ndcg_per_list``); lists
    without one are excluded, as any ranking of them is equally good. NaN if none has one."""
    per = ndcg_per_list(rel, scores, k, ties=ties)
    ok = ~np.isnan(per)
    return float(per[ok].mean()) if ok.any() else math.nan


def mrr(
    rel: np.ndarray,
    scores: np.ndarray,
    *,
    ties: Ties = "pessimistic",
    min_grade: float | None = None,
) -> float:
    """Mean reciprocal rank: mean over lists of ``1 / rank`` of the best-ranked relevant
    candidate; lists without a relevant candidate are excluded, NaN if none has one.

    ``min_grade``: a candidate is relevant when its relevance is ``>= min_grade`` (graded
    labels where only the good grades count: the search source's ``min_grade=2``); the default
    ``None`` counts every relevance ``> 0`` (binary labels, or any positive grade). ``ties``:
    how tied scores are ordered ("Ties in ranking" in the module docstring); with
    ``"average"`` a list counts with the expected reciprocal rank over all orders of the tie
    that holds its first relevant candidate.
    """
    _check_ties(ties)
    r = _ranked(rel, scores)
    hit = r.real & ((r.rel > 0) if min_grade is None else (r.rel >= min_grade))
    ok = hit.any(axis=1)
    if not ok.any():
        return math.nan
    hit, run = hit[ok], r.run[ok]
    first = hit.argmax(axis=1)  # 0-based rank of the first relevant candidate (pessimistic)
    if ties == "pessimistic":
        return float(np.mean(1.0 / (first + 1)))
    # the tie (run) holding the first relevant candidate: it starts at rank a + 1 and holds m
    # candidates, n of them relevant (those below it rank after every relevant one anyway)
    in_run = run == np.take_along_axis(run, first[:, None], axis=1)
    a = in_run.argmax(axis=1)[:, None]
    m = in_run.sum(axis=1)[:, None]
    n = (hit & in_run).sum(axis=1)[:, None]
    # J, the offset of the first relevant candidate within the tie, over all orders of it:
    # P(J >= j) = C(m - j, n) / C(m, n) = prod_{i < j} (m - n - i) / (m - i), and
    # P(J = j) = P(J >= j) * n / (m - j) (= C(m - 1 - j, n - 1) / C(m, n)), for j <= m - n
    j = np.arange(hit.shape[1])[None, :]
    free = j < m - n  # offsets that a relevant candidate can still be after
    step = np.where(free, (m - n - j) / np.maximum(m - j, 1), 0.0)
    at_least = np.cumprod(np.c_[np.ones(len(m)), step[:, :-1]], axis=1)  # P(J >= j)
    p = np.where(j <= m - n, at_least * n / np.maximum(m - j, 1), 0.0)
    return float(np.mean((p / (a + j + 1)).sum(axis=1)))


def lists_from_groups(
    y: np.ndarray, score: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a list id ``group`` [N] -> padded relevance [G, L] (NaN pads) and scores
    [G, L] (0 pads), one list per distinct id in sorted id order, candidates in row order;
    L is the longest list. This is how row-per-candidate data (one row per shown item, the
    group column naming the request) reaches the list metrics."""
    y = np.asarray(y, np.float64)
    score = np.asarray(score, np.float64)
    _, gid = np.unique(np.asarray(group), return_inverse=True)
    gid = gid.reshape(-1)
    order = np.argsort(gid, kind="stable")
    counts = np.bincount(gid)
    n_lists, width = len(counts), int(counts.max()) if len(counts) else 0
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    pos = np.arange(len(order)) - np.repeat(starts, counts)  # position within its list
    rel = np.full((n_lists, width), np.nan)
    sc = np.zeros((n_lists, width))
    rel[gid[order], pos] = y[order]
    sc[gid[order], pos] = score[order]
    return rel, sc


def ranking_metrics(
    rel: np.ndarray,
    scores: np.ndarray,
    k: int = 10,
    *,
    ties: Ties = "pessimistic",
    min_grade: float | None = None,
) -> dict[str, float]:
    """``ndcg@k``, ``mrr`` (both over the lists with a relevant candidate) and ``n``, the
    number of lists, for relevance [G, L] (NaN pads) and scores [G, L]; ``ties`` (both
    metrics) and ``min_grade`` (MRR's relevant grade) as in ``ndcg_at_k`` and ``mrr``."""
    rel = np.asarray(rel, np.float64)
    return {
        "n": int(rel.shape[0]),
        f"ndcg@{k}": ndcg_at_k(rel, scores, k, ties=ties),
        "mrr": mrr(rel, scores, ties=ties, min_grade=min_grade),
    }
