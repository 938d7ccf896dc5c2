"""The simulated shop (``abtest.shop``): one truth with the world's data, responses drawn from
it, exact expected values, position bias, and experiments played into the event store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from shopmtl.abtest.assign import unit_of
from shopmtl.abtest.events import EventStore, read_events
from shopmtl.abtest.policy import PopularityPolicy, RandomPolicy
from shopmtl.abtest.shop import Experiment, Shop, expected_values, play, rank_batch, truth
from shopmtl.data.synthetic import (
    WorldConfig,
    build_world,
    impressions,
    to_table,
    true_probabilities,
)

SMALL = WorldConfig(rows=5000, n_users=300, n_items=200)


@pytest.fixture(scope="module")
def shop() -> Shop:
    return Shop(SMALL)


def _digest(rows: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(rows):
        v = rows[k]
        h.update(k.encode())
        h.update(v.astype(str).astype("U").tobytes() if v.dtype == object
                 else np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def test_the_truth_refactor_keeps_the_generated_data_bit_identical() -> None:
    # recorded with the code before true_probabilities / draw_items were factored out
    rows = impressions(build_world(WorldConfig(rows=5000, n_users=300, n_items=200)), 4000, 1)
    assert _digest(rows) == "7b5ef05ca979d7d38b0ccae35f7a5da0147f5feb2d297635dc43aef7001a8a5b"


def test_the_data_labels_and_the_shop_share_one_truth() -> None:
    world = build_world(SMALL)
    rows = impressions(world, 3000, 0)
    s = np.searchsorted(np.asarray(SMALL.scenarios), rows["scenario"],
                        sorter=np.argsort(SMALL.scenarios))
    s = np.argsort(SMALL.scenarios)[s]
    p = true_probabilities(world, rows["user_id"], rows["item_id"], s, rows["position"])
    for task in ("click", "conversion", "ad_click"):
        np.testing.assert_array_equal(p[task], rows[f"true_{task}"])


def test_candidates_are_training_rows_at_position_zero(shop: Shop) -> None:
    reqs = list(shop.requests(600, seed=3))
    train = to_table(impressions(shop.world, 50, 0))
    for r in reqs[:50]:
        for name in r.candidates.column_names:
            assert r.candidates.schema.field(name).type == train.schema.field(name).type, name
        assert pc.all(pc.equal(r.candidates["position"], 0)).as_py()
        ids = r.candidates["item_id"].to_pylist()
        assert len(set(ids)) == len(ids) and ids == r.items.tolist()
        assert max(shop.slots) <= len(ids) <= 50
        assert set(r.candidates["user_id"].to_pylist()) == {r.user}
        assert r.k == shop.slots[SMALL.scenarios.index(r.scenario)]
    mix = np.array([sum(r.scenario == s for r in reqs) for s in SMALL.scenarios]) / len(reqs)
    assert np.abs(mix - np.asarray(SMALL.traffic)).max() < 0.07  # 600 draws: sd <= 0.02
    # a pure function of the seed
    again = list(shop.requests(600, seed=3))
    assert [r.user for r in again] == [r.user for r in reqs]
    assert all(a.candidates.equals(r.candidates) for a, r in zip(again, reqs, strict=True))


def test_expected_values_are_the_mean_of_simulated_responses(shop: Shop) -> None:
    reqs = list(shop.requests(150, seed=4))
    rng = np.random.default_rng(0)
    shown = [rng.permutation(len(r.items))[: r.k] for r in reqs]
    exp = {"clicks": 0.0, "conversions": 0.0, "gmv": 0.0}
    var = dict.fromkeys(exp, 0.0)
    for r, sh in zip(reqs, shown, strict=True):
        for k in exp:
            exp[k] += shop.expected(r, sh)[k]
        p = shop.probabilities(r, sh)
        pc_ = p["click"] * p["conversion"]
        var["clicks"] += (p["click"] * (1 - p["click"])).sum()
        var["conversions"] += (pc_ * (1 - pc_)).sum()
        var["gmv"] += (p["price"] ** 2 * pc_ * (1 - pc_)).sum()
    reps = 80
    got = dict.fromkeys(exp, 0.0)
    for _ in range(reps):
        for r, sh in zip(reqs, shown, strict=True):
            resp = shop.respond(r, sh, rng)
            assert not (resp.conversions & ~resp.clicks).any()  # no conversion without a click
            got["clicks"] += resp.clicks.sum()
            got["conversions"] += resp.conversions.sum()
            got["gmv"] += resp.gmv.sum()
    for k in exp:
        sd = np.sqrt(var[k] / reps)
        assert abs(got[k] / reps - exp[k]) < 4 * sd, (k, got[k] / reps, exp[k], sd)


def test_the_same_item_lower_on_the_page_is_clicked_less(shop: Shop) -> None:
    r = next(iter(shop.requests(1, seed=5)))
    k = r.k
    first = shop.probabilities(r, np.arange(k))["click"]
    last = shop.probabilities(r, np.arange(k)[::-1])["click"][::-1]  # item j at position k-1-j
    decay = SMALL.position_decay[r.s]
    z = np.log(first / (1 - first)) - np.log(last / (1 - last))
    np.testing.assert_allclose(z, decay * (k - 1 - 2 * np.arange(k)), atol=1e-9)
    assert first[0] > last[0]  # item 0 at the top beats item 0 at the bottom
    # the expected clicks of a list are higher with its best items on top
    p0 = shop.probabilities(r, np.arange(k))["click"]
    best = np.argsort(-p0)
    assert shop.expected(r, best)["clicks"] > shop.expected(r, best[::-1])["clicks"]


def test_bad_rankings_and_slots_are_refused(shop: Shop) -> None:
    r = next(iter(shop.requests(1, seed=6)))
    with pytest.raises(ValueError, match="at most"):
        shop.expected(r, np.arange(r.k + 1))
    with pytest.raises(ValueError, match=r"must lie in 0\.\."):
        shop.expected(r, np.array([len(r.items)]))
    with pytest.raises(ValueError, match="twice"):
        shop.expected(r, np.array([0, 0]))
    with pytest.raises(ValueError, match=r"slots for 'ad_slot' must lie in 1\.\.4"):
        Shop(SMALL, slots=(10, 10, 5, 10))
    with pytest.raises(ValueError, match="one value per scenario"):
        Shop(SMALL, slots=(10, 10))


class Oracle:
    """Ranks by the world's true click probability at the top slot (the best CTR policy)."""

    name = "oracle"

    def __init__(self, shop: Shop) -> None:
        self.shop = shop

    def scores(self, rows):
        s = np.asarray([SMALL.scenarios.index(x) for x in rows["scenario"].to_pylist()])
        return true_probabilities(self.shop.world, rows["user_id"].to_numpy(),
                                  rows["item_id"].to_numpy(), s, np.zeros(len(s)))["click"]


def test_truth_of_the_oracle_ranking_beats_random(shop: Shop) -> None:
    pop = Oracle(shop)
    t = truth(shop, {"random": RandomPolicy("random", 1), "pop": pop}, "random", 400, seed=1)
    assert t["random"]["ctr"]["all"]["abs_lift"] == 0.0
    for metric in ("ctr", "cvr", "gmv"):
        for scen in ("all", *SMALL.scenarios):
            e = t["pop"][metric][scen]
            assert e["abs_lift"] == pytest.approx(e["value"] - e["control"])
    # ranked by the true click probability: more clicks than a random page, in every scenario
    for scen in ("all", *SMALL.scenarios):
        assert t["pop"]["ctr"][scen]["abs_lift"] > 0


def test_an_experiment_is_played_into_the_event_store(tmp_path: Path) -> None:
    shop = Shop(WorldConfig(rows=5000, n_users=4000, n_items=200))
    arms = (("a", 0.5), ("b", 0.3), ("c", 0.2))
    exp = Experiment("exp1", arms, "a", "salt-1", pre_requests=300, test_requests=3000, seed=2)
    pols = {a: RandomPolicy(a, i) for i, (a, _) in enumerate(arms)}
    with EventStore(tmp_path / "ev.db") as store:
        counts = play(shop, exp, store, policies=pols)
    ev = read_events(tmp_path / "ev.db")
    assert ev.meta == {"experiment": "exp1", "arms": {"a": 0.5, "b": 0.3, "c": 0.2},
                       "control": "a"}
    ex = ev.exposures.to_pylist()
    assert len(ex) == 3300 and counts["pre"] == {"a": 300}
    assert {e["arm"] for e in ex if e["period"] == "pre"} == {"a"}
    assert max(e["ts"] for e in ex if e["period"] == "pre") < min(
        e["ts"] for e in ex if e["period"] == "test")
    # assignment: units split by the arms' shares (a unit keeps its arm)
    unit_arm: dict[str, str] = {}
    for e in ex:
        if e["period"] == "test":
            assert unit_arm.setdefault(e["unit"], e["arm"]) == e["arm"]
    n = len(unit_arm)
    for arm, share in arms:
        got = sum(a == arm for a in unit_arm.values())
        assert abs(got - share * n) < 4 * np.sqrt(n * share * (1 - share)), (arm, got, n)
    # units are the salted hash, never the raw user id
    users = {unit_of(str(u), "salt-1") for u in range(4000)}
    assert set(unit_arm) <= users
    assert not any(e["unit"].isdigit() and len(e["unit"]) < 16 for e in ex)
    # feedback: positions inside the shown list, a conversion's value is the item's price
    shown = {e["request_id"]: json.loads(e["shown"]) for e in ex}
    price = np.round(np.exp(shop.world.log_price), 2)
    fb = ev.feedback.to_pylist()
    assert fb, "3300 requests bring clicks"
    clicks = {(f["request_id"], f["position"]) for f in fb if f["kind"] == "click"}
    for f in fb:
        assert shown[f["request_id"]][f["position"]] == f["item"]
        if f["kind"] == "conversion":
            assert (f["request_id"], f["position"]) in clicks
            assert f["value"] == pytest.approx(price[int(f["item"])])


def test_a_pluggable_ranker_writes_the_same_events(tmp_path: Path) -> None:
    shop = Shop(SMALL)
    arms = (("a", 0.5), ("b", 0.5))
    exp = Experiment("exp2", arms, "a", "s", pre_requests=0, test_requests=200, seed=1)
    pop = PopularityPolicy("p", {str(i): float(p) for i, p in enumerate(shop.world.item_pop)})
    pols = {"a": pop, "b": pop}
    with EventStore(tmp_path / "in.db") as store:
        play(shop, exp, store, policies=pols)
    seen = iter(range(10**6))

    def ranker(r):  # e.g. the service: one request at a time
        from shopmtl.abtest.assign import assign

        return assign(str(r.user), "s", arms), f"exp2-test-{next(seen)}", rank_batch([r], pop)[0]

    with EventStore(tmp_path / "out.db") as store:
        play(shop, exp, store, ranker=ranker)
    a, b = read_events(tmp_path / "in.db"), read_events(tmp_path / "out.db")
    assert a.exposures.drop(["ts"]).equals(b.exposures.drop(["ts"]))
    assert a.feedback.drop(["ts"]).equals(b.feedback.drop(["ts"]))
    with pytest.raises(ValueError, match="either"):
        play(shop, exp, EventStore(tmp_path / "x.db"))


def test_per_user_truth_is_the_mean_over_units_that_came(shop: Shop) -> None:
    pop = PopularityPolicy("p", {str(i): float(p) for i, p in enumerate(shop.world.item_pop)})
    n = 1500
    t = truth(shop, {"p": pop}, "p", 3000, seed=1, test_requests=n)["p"]
    got = []
    for seed in range(5):  # test periods of n requests: each unit's exact expected sum
        reqs = list(shop.requests(n, seed=100 + seed))
        e = expected_values(shop, reqs, {"p": pop})["p"]
        users = np.array([r.user for r in reqs])
        search = np.array([r.scenario == "search" for r in reqs])
        per = []
        for mask, key in ((np.ones(n, bool), "clicks"), (np.ones(n, bool), "gmv"),
                          (search, "clicks")):
            _, inv = np.unique(users[mask], return_inverse=True)
            per.append(np.bincount(inv, weights=e[key][mask]).mean())
        got.append(per)
    g = np.asarray(got)
    want = [t["clicks_per_user"]["all"]["value"], t["gmv_per_user"]["all"]["value"],
            t["clicks_per_user"]["search"]["value"]]
    tol = 4 * g.std(0, ddof=1) / np.sqrt(len(g)) + 0.02 * np.asarray(want)
    assert (np.abs(g.mean(0) - want) < tol).all(), (g.mean(0), want)
