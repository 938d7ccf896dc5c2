"""Off-policy evaluation (``abtest.ope``): exact Plackett-Luce propensities and IPS / SNIPS / DR
estimates that are unbiased for the target's simulated online value."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shopmtl.abtest import ope
from shopmtl.abtest.policy import PopularityPolicy
from shopmtl.abtest.shop import Shop
from shopmtl.data.synthetic import WorldConfig


def _enumerate_pl(scores: np.ndarray, k: int) -> np.ndarray:
    """P(candidate a at position j) by summing the Plackett-Luce probability of every ordering."""
    w = np.exp(scores)
    out = np.zeros((len(w), k))
    for perm in itertools.permutations(range(len(w)), k):
        p, left = 1.0, w.sum()
        for i in perm:
            p *= w[i] / left
            left -= w[i]
        for j, i in enumerate(perm):
            out[i, j] += p
    return out


def test_marginals_are_exact_against_enumeration() -> None:
    rng = np.random.default_rng(0)
    for scores in (rng.normal(0, 1.5, 6), np.array([3.0, 0.0, -2.0, 0.5, 0.5])):
        exact = _enumerate_pl(scores, 3)
        np.testing.assert_allclose(ope.pl_marginals(scores, 3, 1.0), exact, atol=1e-7)
    # temperature divides the scores; position 0 is the softmax
    s = rng.normal(0, 3, 40)
    m = ope.pl_marginals(s, 10, 2.0)
    soft = np.exp(s / 2 - (s / 2).max())
    np.testing.assert_allclose(m[:, 0], soft / soft.sum(), atol=1e-7)
    np.testing.assert_allclose(m.sum(0), 1.0, atol=1e-6)
    assert (m.sum(1) <= 1 + 1e-7).all()
    with pytest.raises(ValueError, match="finite"):
        ope.pl_marginals(np.array([0.0, -np.inf]), 1, 1.0)


def test_the_sampler_draws_the_marginals() -> None:
    rng = np.random.default_rng(1)
    s = np.array([1.0, 0.2, -0.5, 0.7, -1.2, 0.0])
    m = ope.pl_marginals(s, 3, 0.7)
    n = 20_000
    counts = np.zeros_like(m)
    for _ in range(n):
        counts[ope.pl_sample(s, 3, 0.7, rng), np.arange(3)] += 1
    se = np.sqrt(m * (1 - m) / n)
    assert (np.abs(counts / n - m) < 4.5 * se + 1e-9).all()


@pytest.fixture(scope="module")
def setting():
    """A small world, fixed requests, a logging policy (noisy popularity, Plackett-Luce at
    temperature 1) and a target (the world's own popularity), with the target's truth."""
    shop = Shop(WorldConfig(rows=5000, n_users=300, n_items=200), slots=(3, 3, 2, 3),
                candidates=(8, 12))
    reqs = list(shop.requests(300, seed=0))
    noise = np.random.default_rng(5).normal(0, 1, 200)
    logging = [np.log(shop.world.item_pop[r.items]) + noise[r.items] for r in reqs]
    props = ope.propensities(reqs, logging, 1.0)
    target = PopularityPolicy("pop", {str(i): float(p) for i, p in
                                      enumerate(shop.world.item_pop)})
    tgt = ope.target_rankings(reqs, target)
    return shop, reqs, logging, props, tgt, ope.online_value(shop, reqs, tgt)


def test_ips_snips_and_dr_are_unbiased_over_repeated_logs(setting) -> None:
    shop, reqs, logging, props, tgt, truth = setting
    # DR's reward model: the truth itself (then DR has little variance) and zero (DR = IPS)
    perfect: dict[str, list[np.ndarray]] = {"ctr": [], "gmv": []}
    for r, t in zip(reqs, tgt, strict=True):
        p = shop.probabilities(r, t)
        perfect["ctr"].append(p["click"])
        perfect["gmv"].append(p["click"] * p["conversion"] * p["price"])
    zero = {m: [np.zeros(len(t)) for t in tgt] for m in ("ctr", "gmv")}
    rng = np.random.default_rng(2)
    runs = 40
    est: dict[str, list[float]] = {"ips": [], "snips": [], "dr": [], "dr0": []}
    covered = 0
    for _ in range(runs):
        log = ope.log_events(shop, reqs, logging, props, 1.0, rng)
        e = ope.estimate(log, tgt, perfect)
        e0 = ope.estimate(log, tgt, zero)
        for name in ("ips", "snips", "dr"):
            est[name].append(e["ctr"][name]["estimate"])
        est["dr0"].append(e0["ctr"]["dr"]["estimate"])
        assert e0["ctr"]["dr"]["estimate"] == pytest.approx(e["ctr"]["ips"]["estimate"])
        lo, hi = e["ctr"]["ips"]["ci"]
        covered += lo <= truth["ctr"] <= hi
    for name, v in est.items():
        v = np.asarray(v)
        tol = 4 * v.std() / np.sqrt(runs) + 1e-3 * truth["ctr"]
        assert abs(v.mean() - truth["ctr"]) < tol, (name, v.mean(), truth["ctr"])
    # a perfect reward model takes out the variance of which item matched, not the users' own
    # Bernoulli noise (most of it with rare clicks): DR varies less, not much less
    assert np.std(est["dr"]) < np.std(est["ips"])
    assert covered >= 0.8 * runs  # nominal 95%


def test_estimates_need_one_target_per_request(setting) -> None:
    shop, reqs, logging, props, tgt, _ = setting
    log = ope.log_events(shop, reqs, logging, props, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="target rankings"):
        ope.estimate(log, tgt[:-1])
    e = ope.estimate(log, tgt)  # no reward model: no DR
    assert set(e["ctr"]) == {"ips", "snips"} and set(e) == {"ctr", "gmv"}
