"""shopmtl.metrics (own numpy code, kept for speed and for its conventions) against
scikit-learn's metrics on random inputs: several seeds, ties, imbalanced classes, multiclass.

Where the two differ by convention the test says how it bridges them:
- logloss: shopmtl clips probabilities to [1e-7, 1 - 1e-7]; inputs stay inside that range.
- NDCG: shopmtl's gain is 2^rel - 1, sklearn's is the label itself, so sklearn gets 2^rel - 1
  (the same ideal order: the gain is increasing in rel); lists without a relevant candidate
  have no NDCG in shopmtl (NaN, left out of the mean) but 0 in sklearn, so every list here has
  one. ``ties="average"`` is sklearn's ``ignore_ties=False``; ``"pessimistic"`` is sklearn on
  scores nudged so that the less relevant candidate of a tie ranks first.
- MRR: sklearn has none; with exactly one relevant candidate per list the pessimistic MRR is
  ``label_ranking_average_precision_score`` (which counts every tied candidate before it).
- GAUC, MASE, pinball over several levels: compositions of sklearn's per-group AUC, MAE and
  ``mean_pinball_loss``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sklearn.metrics as sk  # the 'text' extra, in 'dev': a missing one fails, never skips

from shopmtl.metrics import (
    accuracy,
    auc,
    gauc,
    logloss,
    macro_f1,
    mase,
    mrr,
    multiclass_logloss,
    multiclass_metrics,
    ndcg_at_k,
    ndcg_per_list,
    pinball,
    quantile_metrics,
    regression_metrics,
)

SEEDS = (0, 1, 2, 3, 4)
TOL = 1e-9


def _close(a: float, b: float, tol: float = TOL) -> None:
    assert abs(a - b) <= tol * max(1.0, abs(b)), (a, b)


def _binary(seed: int, n: int, rate: float, tie_decimals: int | None):
    """Labels with positive share ~rate; scores correlated with them, rounded for ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.int64)
    y[:2] = (1, 0)  # both classes present
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y - 2)))
    p = np.clip(p, 1e-3, 1 - 1e-3)
    if tie_decimals is not None:
        p = np.clip(np.round(p, tie_decimals), 1e-3, 1 - 1e-3)
    return y, p


BINARY_CASES = [
    (seed, n, rate, dec)
    for seed in SEEDS
    for n, rate, dec in ((500, 0.5, None), (2000, 0.03, None), (1000, 0.2, 1), (3000, 0.01, 2))
]


@pytest.mark.parametrize(("seed", "n", "rate", "decimals"), BINARY_CASES)
def test_auc_and_logloss_equal_sklearn(seed: int, n: int, rate: float, decimals: int | None):
    y, p = _binary(seed, n, rate, decimals)
    assert 0 < y.sum() < n
    _close(auc(y, p), sk.roc_auc_score(y, p))
    _close(logloss(y, p), sk.log_loss(y, p, labels=[0, 1]))


def test_auc_with_all_scores_tied_is_one_half():
    y = np.array([0, 1, 0, 1, 1])
    _close(auc(y, np.full(5, 0.3)), sk.roc_auc_score(y, np.full(5, 0.3)))


@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_is_the_size_weighted_mean_of_sklearn_per_group_auc(seed: int):
    rng = np.random.default_rng(seed)
    n = 3000
    group = rng.integers(0, 40, n)
    y, p = _binary(seed, n, 0.15, 2)
    num = den = 0.0
    for g in np.unique(group):
        m = group == g
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * sk.roc_auc_score(y[m], p[m])
            den += m.sum()
    _close(gauc(y, p, group), num / den)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


MULTICLASS_CASES = [(seed, c, skew) for seed in SEEDS for c, skew in ((3, 0.0), (11, 1.5),
                                                                      (27, 3.0))]


@pytest.mark.parametrize(("seed", "n_classes", "skew"), MULTICLASS_CASES)
def test_multiclass_metrics_equal_sklearn(seed: int, n_classes: int, skew: float):
    """Imbalanced (Zipf-like with ``skew``) classes; some classes never predicted, some rare
    ones possibly never seen: both count as sklearn's default labels do."""
    rng = np.random.default_rng(seed)
    n = 800
    weights = 1.0 / np.arange(1, n_classes + 1) ** skew
    y = rng.choice(n_classes, n, p=weights / weights.sum())
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    prob = _softmax(logits)
    y_hat = prob.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning: a class never predicted
        f1 = sk.f1_score(y, y_hat, average="macro", zero_division=0.0)
    _close(macro_f1(y, y_hat), f1)
    _close(accuracy(y, y_hat), sk.accuracy_score(y, y_hat))
    _close(multiclass_logloss(y, prob), sk.log_loss(y, prob, labels=np.arange(n_classes)))
    got = multiclass_metrics(y.astype(np.float64), prob)
    _close(got["macro_f1"], f1)
    _close(got["accuracy"], sk.accuracy_score(y, y_hat))


def test_macro_f1_with_a_class_predicted_but_never_seen():
    y, y_hat = np.array([0, 0, 1, 1, 1]), np.array([0, 2, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close(macro_f1(y, y_hat), sk.f1_score(y, y_hat, average="macro", zero_division=0.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_and_quantile_metrics_equal_sklearn(seed: int):
    rng = np.random.default_rng(seed)
    n = 1000
    y = rng.gamma(2.0, 3.0, n)  # skewed, like demand
    pred = y + rng.normal(0, 2.0, n)
    reg = regression_metrics(y, pred)
    _close(reg["rmse"], sk.root_mean_squared_error(y, pred))
    _close(reg["mae"], sk.mean_absolute_error(y, pred))
    taus = (0.1, 0.5, 0.9)
    q = np.stack([pred + rng.normal(0, 0.5, n) + (t - 0.5) * 4 for t in taus], axis=1)
    want = np.mean([sk.mean_pinball_loss(y, q[:, j], alpha=t) for j, t in enumerate(taus)])
    _close(pinball(y, q, taus), want)
    qm = quantile_metrics(y, q, taus)
    _close(qm["pinball"], want)
    _close(qm["mae"], sk.mean_absolute_error(y, q[:, 1]))
    history = rng.poisson(5.0, 60).astype(np.float64)
    for season in (1, 7):
        scale = sk.mean_absolute_error(history[season:], history[:-season])
        _close(mase(y, pred, history, season), sk.mean_absolute_error(y, pred) / scale)


def _lists(seed: int, g: int, length: int, grades: int, tie_decimals: int | None):
    """Graded relevance [g, length] with >= 1 relevant candidate per list, and scores."""
    rng = np.random.default_rng(seed)
    rel = rng.integers(0, grades, (g, length)).astype(np.float64)
    rel[np.arange(g), rng.integers(0, length, g)] = rng.integers(1, grades, g)
    scores = rel * 0.5 + rng.normal(size=(g, length))
    if tie_decimals is not None:
        scores = np.round(scores, tie_decimals)
    return rel, scores


NDCG_CASES = [(seed, length, grades, dec, k) for seed in SEEDS[:3]
              for length, grades, dec, k in ((10, 2, None, 5), (30, 4, None, 10),
                                             (20, 5, 0, 10), (8, 3, 1, 3), (40, 2, 0, 40))]


@pytest.mark.parametrize(("seed", "length", "grades", "decimals", "k"), NDCG_CASES)
def test_ndcg_equals_sklearn(seed: int, length: int, grades: int, decimals: int | None, k: int):
    rel, scores = _lists(seed, 60, length, grades, decimals)
    gains = np.exp2(rel) - 1.0
    # average: the expected NDCG over the orders of each tie (sklearn's default)
    want_avg = [sk.ndcg_score(gains[i:i + 1], scores[i:i + 1], k=k) for i in range(len(rel))]
    np.testing.assert_allclose(ndcg_per_list(rel, scores, k, ties="average"), want_avg,
                               rtol=TOL, atol=TOL)
    _close(ndcg_at_k(rel, scores, k, ties="average"), sk.ndcg_score(gains, scores, k=k))
    # pessimistic: the less relevant candidate of a tie first (the nudge is below any gap)
    nudged = scores - 1e-6 * rel
    _close(ndcg_at_k(rel, scores, k), sk.ndcg_score(gains, nudged, k=k, ignore_ties=True))


@pytest.mark.parametrize("seed", SEEDS)
def test_padded_lists_equal_sklearn_on_their_real_candidates(seed: int):
    rng = np.random.default_rng(seed)
    rel, scores = _lists(seed, 40, 12, 3, 1)
    lengths = rng.integers(2, 13, len(rel))
    for i, n in enumerate(lengths):
        rel[i, n:] = np.nan
        rel[i, rng.integers(0, n)] = 2.0  # a relevant real candidate
    got = ndcg_per_list(rel, scores, 5, ties="average")
    for i, n in enumerate(lengths):
        want = sk.ndcg_score(np.exp2(rel[i:i + 1, :n]) - 1.0, scores[i:i + 1, :n], k=5)
        _close(got[i], want)


@pytest.mark.parametrize(("seed", "decimals"), [(s, d) for s in SEEDS for d in (None, 0, 1)])
def test_mrr_with_one_relevant_candidate_equals_sklearn_lrap(seed: int, decimals: int | None):
    rng = np.random.default_rng(seed)
    g, length = 80, 15
    rel = np.zeros((g, length))
    rel[np.arange(g), rng.integers(0, length, g)] = 1.0
    scores = rel * 0.8 + rng.normal(size=(g, length))
    if decimals is not None:
        scores = np.round(scores, decimals)
    _close(mrr(rel, scores), sk.label_ranking_average_precision_score(rel, scores))
