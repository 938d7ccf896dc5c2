"""The numpy metrics of the new task types, each pinned to a value computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from shopmtl.metrics import (
    accuracy,
    coverage,
    lists_from_groups,
    macro_f1,
    mase,
    mase_panel,
    mrr,
    multiclass_logloss,
    multiclass_metrics,
    ndcg_at_k,
    ndcg_per_list,
    pinball,
    quantile_metrics,
    ranking_metrics,
    wape,
)

NAN = math.nan

# ------------------------------------------------------------------------------- multiclass


def test_accuracy_pinned() -> None:
    assert accuracy(np.array([0, 1, 2, 1]), np.array([0, 2, 2, 1])) == 0.75
    assert math.isnan(accuracy(np.array([]), np.array([])))


def test_macro_f1_pinned() -> None:
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 2, fn 0 -> 1/2; class 2: tp 0 -> 0
    y, y_hat = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])
    assert macro_f1(y, y_hat) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # 7/18


def test_macro_f1_ignores_classes_never_seen_nor_predicted() -> None:
    # class 5 appears nowhere: it must not drag the mean down with an undefined 0
    assert macro_f1(np.array([0, 1]), np.array([0, 1])) == 1.0


def test_multiclass_logloss_pinned() -> None:
    prob = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    got = multiclass_logloss(np.array([0.0, 2.0]), prob)  # float class ids, as labels are
    assert got == pytest.approx(-(math.log(0.5) + math.log(0.7)) / 2)


def test_multiclass_logloss_rejects_out_of_range_classes() -> None:
    with pytest.raises(ValueError, match=r"0\.\.2"):
        multiclass_logloss(np.array([3]), np.array([[0.2, 0.3, 0.5]]))


def test_multiclass_metrics_use_the_argmax() -> None:
    prob = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    m = multiclass_metrics(np.array([0.0, 1.0, 1.0]), prob)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    # class 0: F1 1; class 1: tp 1, fn 1 -> 2/3; class 2: fp 1 -> 0
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["logloss"] == pytest.approx(-(math.log(0.6) + math.log(0.2) + math.log(0.8)) / 3)


# -------------------------------------------------------------------- regression and quantile


def test_wape_pinned() -> None:
    # (|1-2| + |2-2| + |-3+1|) / (1 + 2 + 3)
    assert wape(np.array([1.0, 2.0, -3.0]), np.array([2.0, 2.0, -1.0])) == 0.5
    assert math.isnan(wape(np.zeros(3), np.ones(3)))


def test_mase_pinned() -> None:
    history = np.array([1.0, 3.0, 2.0, 5.0])
    y, pred = np.array([4.0, 6.0]), np.array([5.0, 4.0])  # MAE 1.5
    # naive (m=1) in-sample MAE: (|3-1| + |2-3| + |5-2|) / 3 = 2
    assert mase(y, pred, history) == pytest.approx(0.75)
    # seasonal m=2: (|2-1| + |5-3|) / 2 = 1.5
    assert mase(y, pred, history, season=2) == pytest.approx(1.0)


def test_mase_undefined_scale_and_short_history() -> None:
    assert math.isnan(mase(np.array([1.0]), np.array([2.0]), np.array([4.0, 4.0, 4.0])))
    with pytest.raises(ValueError, match="more than season=2"):
        mase(np.array([1.0]), np.array([2.0]), np.array([1.0, 2.0]), season=2)


def test_mase_panel_is_the_mean_of_per_series_mase() -> None:
    ys = [np.array([4.0, 6.0]), np.array([1.0]), np.array([1.0])]
    preds = [np.array([5.0, 4.0]), np.array([0.0]), np.array([2.0])]
    histories = [
        np.array([1.0, 3.0, 2.0, 5.0]),  # MASE 0.75
        np.array([0.0, 0.0, 0.0]),  # constant history: undefined, left out
        np.array([0.0, 2.0]),  # MAE 1 / scale 2 = 0.5
    ]
    assert mase_panel(ys, preds, histories) == pytest.approx((0.75 + 0.5) / 2)


def test_pinball_pinned() -> None:
    # row 1 (y=1): tau .1, u=1 -> .1; tau .9, u=-1 -> .1
    # row 2 (y=3): tau .1, u=1 -> .1; tau .9, u=1 -> .9
    y = np.array([1.0, 3.0])
    q = np.array([[0.0, 2.0], [2.0, 2.0]])
    assert pinball(y, q, (0.1, 0.9)) == pytest.approx(0.3)


def test_pinball_at_the_median_is_half_the_mae() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    assert pinball(y, p[:, None], (0.5,)) == pytest.approx(0.5 * np.mean(np.abs(y - p)))


def test_coverage_pinned() -> None:
    y = np.array([1.0, 3.0, 2.0, 0.0])
    assert coverage(y, np.zeros(4), np.full(4, 2.0)) == 0.75  # 3 outside [0, 2]


def test_quantile_metrics_pinned() -> None:
    y = np.array([1.0, 3.0])
    q = np.array([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]])
    m = quantile_metrics(y, q, (0.1, 0.5, 0.9))
    # pinball: row 1 .1, 0, .1; row 2 (u = 1 for every level) .1, .5, .9 -> 1.7 / 6
    assert m["pinball"] == pytest.approx(1.7 / 6)
    assert m["mae"] == pytest.approx(0.5)  # median column: |1-1|, |3-2|
    assert m["wape"] == pytest.approx(0.25)  # 1 / (1 + 3)
    assert m["coverage"] == 0.5  # 3 is outside [2, 2]
    assert m["coverage_nominal"] == pytest.approx(0.8)
    assert m["n"] == 2
    # without the levels: the middle column and no pinball
    bare = quantile_metrics(y, q)
    assert "pinball" not in bare and bare["mae"] == m["mae"]


def test_quantile_metrics_median_column_is_the_level_nearest_one_half() -> None:
    y = np.array([1.0, 3.0])
    q = np.array([[1.0, 5.0], [3.0, 5.0]])  # column 0 is exact, column 1 is off by 4 and 2
    # 0.1 and 0.9 are equally near 0.5: the lower one (column 0) is the median
    assert quantile_metrics(y, q, (0.1, 0.9))["mae"] == 0.0
    assert quantile_metrics(y, q, (0.9, 0.1))["mae"] == 0.0  # (the metric does not sort)
    assert quantile_metrics(y, q, (0.2, 0.6))["mae"] == 3.0  # 0.6 is nearer


# ----------------------------------------------------------------------------------- ranking


def test_ndcg_pinned_and_padded_candidate_ignored() -> None:
    rel = np.array([[3.0, 2.0, 0.0, NAN]])
    scores = np.array([[0.1, 0.9, 0.5, 99.0]])  # the pad has the top score: it must not count
    # ranked: rel 2, 0, 3 -> gains 3, 0, 7; ideal: 7, 3, 0
    ideal = 7 + 3 / math.log2(3)
    assert ndcg_at_k(rel, scores, 10) == pytest.approx((3 + 7 / 2) / ideal)
    assert ndcg_at_k(rel, scores, 2) == pytest.approx(3 / ideal)
    assert ndcg_at_k(rel, scores, 1) == pytest.approx(3 / 7)
    moved = scores.copy()
    moved[0, 3] = -99.0
    assert ndcg_at_k(rel, moved, 2) == ndcg_at_k(rel, scores, 2)


def test_perfect_ranking_has_ndcg_one() -> None:
    rel = np.array([[0.0, 1.0, 3.0, 2.0], [1.0, 0.0, NAN, NAN]])
    assert ndcg_at_k(rel, np.nan_to_num(rel, nan=-5.0), 3) == pytest.approx(1.0)
    assert ndcg_at_k(rel, -np.nan_to_num(rel), 3) < 1.0


def test_ndcg_breaks_ties_pessimistically() -> None:
    # equal scores: the irrelevant candidate goes first, whatever the input order
    rel = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(ndcg_per_list(rel, np.zeros((2, 2)), 10), 1 / math.log2(3))


def test_ndcg_excludes_lists_without_a_relevant_candidate() -> None:
    rel = np.array([[0.0, 0.0], [1.0, 0.0]])
    scores = np.array([[1.0, 2.0], [2.0, 1.0]])
    assert np.isnan(ndcg_per_list(rel, scores)[0])
    assert ndcg_at_k(rel, scores) == 1.0
    assert math.isnan(ndcg_at_k(rel[:1], scores[:1]))


def test_mrr_pinned() -> None:
    rel = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, NAN], [0.0, 0.0, 0.0]])
    scores = np.array([[3.0, 2.0, 1.0], [2.0, 1.0, 5.0], [1.0, 2.0, 3.0]])
    # list 1: first relevant at rank 2; list 2: rank 1 (the pad is not a candidate);
    # list 3 has no relevant candidate and is left out
    assert mrr(rel, scores) == pytest.approx((1 / 2 + 1) / 2)


def test_mrr_min_grade_counts_grades_at_or_above_it() -> None:
    rel = np.array([[1.0, 2.0, 3.0]])
    scores = np.array([[3.0, 2.0, 1.0]])
    assert mrr(rel, scores) == 1.0  # default: relevance > 0
    assert mrr(rel, scores, min_grade=2) == 0.5  # >= 2, not > 2
    assert mrr(rel, scores, min_grade=3) == pytest.approx(1 / 3)
    assert math.isnan(mrr(rel, scores, min_grade=4))


def test_mrr_min_grade_equals_binarised_labels() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (50, 8)).astype(float)
    y[:, -1] = NAN
    s = rng.random((50, 8))
    binary = np.where(np.isnan(y), NAN, (y >= 2).astype(float))
    assert mrr(y, s, min_grade=2) == pytest.approx(mrr(binary, s))


def test_pads_are_never_relevant_nor_tied() -> None:
    # min_grade 0 makes every real candidate relevant; the pad (score 5, like the first
    # candidate, and above the real ones after it) must neither count nor join a tie
    rel = np.array([[0.0, 2.0, NAN]])
    scores = np.array([[5.0, 1.0, 5.0]])
    for ties in ("pessimistic", "average"):
        assert mrr(rel, scores, min_grade=0, ties=ties) == 1.0
        assert ndcg_at_k(rel, scores, ties=ties) == pytest.approx(1 / math.log2(3))


# ---------------------------------------------------------------------- ranking: tied scores

# list A: a pad (NaN) with the top score is ignored, no ties: ranked 0, 3, 1
# list B: a three-way tie over grades 2, 2, 0 above a grade-1 candidate
TIED_Y = np.array([[3, 0, 1, NAN], [2, 2, 0, 1]])
TIED_S = np.array([[0.2, 0.9, 0.1, 5.0], [1, 1, 1, 0]])
NDCG_A = (7 / math.log2(3) + 1 / 2) / (7 + 1 / math.log2(3))
# B, averaged: each of the three tied candidates has the mean gain (3 + 3 + 0) / 3 = 2
NDCG_B = (2 * (1 + 1 / math.log2(3) + 1 / 2) + 1 / math.log2(5)) / (3 + 3 / math.log2(3) + 1 / 2)
# B, pessimistic: grade 0 first, then the two grade 2, then grade 1
NDCG_B_PESSIMISTIC = (3 / math.log2(3) + 3 / 2 + 1 / math.log2(5)) / (
    3 + 3 / math.log2(3) + 1 / 2
)


def test_tied_ndcg_pinned() -> None:
    assert math.isclose(NDCG_A, 0.6442869262, rel_tol=1e-9)
    assert math.isclose(NDCG_B, 0.8701500909, rel_tol=1e-9)
    np.testing.assert_allclose(
        ndcg_per_list(TIED_Y, TIED_S, ties="average"), [NDCG_A, NDCG_B], rtol=1e-12
    )
    np.testing.assert_allclose(
        ndcg_per_list(TIED_Y, TIED_S), [NDCG_A, NDCG_B_PESSIMISTIC], rtol=1e-12
    )
    assert ndcg_at_k(TIED_Y, TIED_S, ties="average") == pytest.approx((NDCG_A + NDCG_B) / 2)
    # k = 1 cuts the tie: B has the tie's mean gain 2 of the ideal 3; A ranks grade 0 first
    assert ndcg_at_k(TIED_Y, TIED_S, k=1, ties="average") == pytest.approx((0 + 2 / 3) / 2)
    assert ndcg_at_k(TIED_Y, TIED_S, k=1) == 0.0


def test_tied_mrr_pinned() -> None:
    # A (grade >= 2): rank 2; B: the first grade >= 2 is at rank 1 in 2 of the 3 orders of
    # the tie (the grade 0 first: rank 2), so 2/3 * 1 + 1/3 * 1/2 = 5/6; pessimistic: 1/2
    assert mrr(TIED_Y, TIED_S, ties="average", min_grade=2) == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert mrr(TIED_Y, TIED_S, min_grade=2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    # one relevant among four tied after a better-scored irrelevant candidate: ranks 2..5
    rel, scores = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]]), np.array([[9.0, 1, 1, 1, 1]])
    assert mrr(rel, scores, ties="average") == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    assert mrr(rel, scores) == pytest.approx(1 / 5)
    # a constant scorer, two relevant among four: P(first at rank 1, 2, 3) = 1/2, 1/3, 1/6
    rel, scores = np.array([[1.0, 0.0, 1.0, 0.0]]), np.zeros((1, 4))
    assert mrr(rel, scores, ties="average") == pytest.approx(1 / 2 + 1 / 6 + 1 / 18)


def test_tied_ranking_metrics_pinned() -> None:
    m = ranking_metrics(TIED_Y, TIED_S, ties="average", min_grade=2)
    assert m == {"ndcg@10": pytest.approx(0.7572185085), "mrr": pytest.approx(2 / 3), "n": 2}


def test_average_ties_are_the_mean_over_every_order_of_the_ties() -> None:
    # ties of 3 and 2 candidates (and a pad): enumerate the 3! * 2! orders by tiny offsets
    rel = np.array([[2.0, 0.0, 3.0, 1.0, 2.0, 0.0, NAN]])
    scores = np.array([[1.0, 1.0, 1.0, 0.5, 0.5, 2.0, 9.0]])
    ndcg, rr = [], []
    for p in itertools.permutations(range(3)):
        for q in itertools.permutations(range(2)):
            broken = scores.copy()
            broken[0, :3] += 1e-3 * np.array(p)
            broken[0, 3:5] += 1e-3 * np.array(q)
            ndcg.append(ndcg_at_k(rel, broken, 3))
            rr.append(mrr(rel, broken, min_grade=2))
    assert ndcg_at_k(rel, scores, 3, ties="average") == pytest.approx(np.mean(ndcg), rel=1e-12)
    assert mrr(rel, scores, ties="average", min_grade=2) == pytest.approx(np.mean(rr), rel=1e-12)
    # pessimistic is the worst of those orders
    assert ndcg_at_k(rel, scores, 3) == pytest.approx(min(ndcg))
    assert mrr(rel, scores, min_grade=2) == pytest.approx(min(rr))


def test_ties_do_not_matter_without_ties_nor_does_the_input_order() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (50, 8)).astype(float)
    y[:, -1] = NAN
    s = rng.random((50, 8))
    for k in (1, 5, 10):
        assert ndcg_at_k(y, s, k, ties="average") == pytest.approx(ndcg_at_k(y, s, k))
    assert mrr(y, s, ties="average", min_grade=2) == pytest.approx(mrr(y, s, min_grade=2))
    # tied scores: permuting the candidates of every list changes neither tie mode
    tied = np.floor(s * 3)
    perm = rng.permutation(8)
    for ties in ("pessimistic", "average"):
        assert ndcg_at_k(y[:, perm], tied[:, perm], ties=ties) == pytest.approx(
            ndcg_at_k(y, tied, ties=ties)
        )
        assert mrr(y[:, perm], tied[:, perm], ties=ties) == pytest.approx(mrr(y, tied, ties=ties))


def test_ranking_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        ndcg_at_k(TIED_Y, TIED_S[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        mrr(TIED_Y, np.where(TIED_S == 0.9, NAN, TIED_S))
    # a NaN score on a pad is fine: the pad is not ranked
    assert ndcg_at_k(TIED_Y, np.where(np.isnan(TIED_Y), NAN, TIED_S)) == ndcg_at_k(TIED_Y, TIED_S)
    with pytest.raises(ValueError, match="ties"):
        ndcg_at_k(TIED_Y, TIED_S, ties="optimistic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ties"):
        ranking_metrics(TIED_Y, TIED_S, ties="random")  # type: ignore[arg-type]


def test_lists_from_groups_pads_short_lists() -> None:
    rel, sc = lists_from_groups(
        np.array([1.0, 0.0, 2.0, 0.0, 1.0]),
        np.array([0.1, 0.2, 0.3, 0.4, 0.5]),
        np.array(["b", "a", "b", "a", "c"]),
    )
    np.testing.assert_array_equal(rel, [[0.0, 0.0], [1.0, 2.0], [1.0, NAN]])
    np.testing.assert_array_equal(sc, [[0.2, 0.4], [0.1, 0.3], [0.5, 0.0]])


def test_ranking_metrics_keys() -> None:
    rel = np.array([[2.0, 0.0, 1.0]])
    m = ranking_metrics(rel, np.array([[3.0, 1.0, 2.0]]), k=2)
    assert m == {"n": 1, "ndcg@2": pytest.approx(1.0), "mrr": 1.0}
