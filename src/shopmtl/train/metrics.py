"""Evaluation metrics in pure numpy: AUC, GAUC, logloss, calibration, per task x scenario."""

from __future__ import annotations

import math

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
