"""The simulated online shop: requests from the synthetic world, users who respond from its true
probabilities, and the exact expected value of any ranking (docs/ABTEST.md, "The simulated shop").

- ``Shop.requests(n, seed)``: requests arrive per scenario with the world's traffic mix and
  users with the world's activity; each has 30-50 candidate items drawn as the world draws
  impressions (``synthetic.draw_items``: by the user's taste or by popularity) as rows in the
  world's training columns (``synthetic.to_table`` without labels, position 0), so every saved
  model of the world scores them.
- ``Shop.respond(request, shown, rng)``: the user sees the K shown items at positions 0..K-1 and
  clicks each with the world's true probability at that position (the scenario's position bias),
  then converts given the click; GMV = price x conversion. Positions respond independently given
  the item and the slot, as in the world's data.
- ``Shop.expected(request, shown)``: the exact expected clicks, conversions and GMV of that
  ranking (the same ``synthetic.true_probabilities``): a policy's true metrics are the averages
  over many requests, no response noise.
- ``play``: an experiment over many requests (a pre-period on the control arm, the CUPED
  covariate, then the test period), ranked by a pluggable ranker and written to an ``EventStore``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from shopmtl.abtest.assign import assign, check_arms, unit_of
from shopmtl.abtest.events import EventStore, Exposure, Feedback
from shopmtl.abtest.policy import Policy, top_k
from shopmtl.data.synthetic import (
    World,
    WorldConfig,
    build_world,
    draw_items,
    to_table,
    true_probabilities,
)

METRICS = ("ctr", "cvr", "gmv")  # the ratio metrics the truth gives (contract vocabulary)
PER_USER = ("gmv_per_user", "clicks_per_user")  # per-unit sums over the test period
_BATCH = 512  # requests generated (and ranked) at a time: one candidate table per batch


@dataclass(frozen=True)
class Request:
    """One page view: a user in a scenario with candidate rows; ``k`` items get shown."""

    user: int
    scenario: str
    candidates: pa.Table  # the world's training columns, position 0
    k: int
    items: np.ndarray = field(repr=False)  # item index of each candidate row
    s: int = field(default=0, repr=False)  # scenario index


@dataclass(frozen=True)
class Response:
    """What the user did with one shown list, per shown position (best first)."""

    items: np.ndarray  # item ids shown
    clicks: np.ndarray  # bool
    conversions: np.ndarray  # bool (a conversion implies the click)
    gmv: np.ndarray  # price x conversion


def default_slots(cfg: WorldConfig) -> tuple[int, ...]:
    """Items shown per request and scenario: the world's positions, at most 10 (a page)."""
    return tuple(min(m, 10) for m in cfg.max_position)


class Shop:
    """The world's shop. ``slots``: items shown per scenario (<= the world's max_position);
    ``candidates``: the (low, high) number of candidate draws per request (repeats removed)."""

    def __init__(self, world_cfg: WorldConfig, slots: Sequence[int] | None = None,
                 candidates: tuple[int, int] = (30, 50), world: World | None = None) -> None:
        self.cfg = world_cfg
        self.world = world if world is not None else build_world(world_cfg)
        self.slots = tuple(slots) if slots is not None else default_slots(world_cfg)
        if len(self.slots) != len(world_cfg.scenarios):
            raise ValueError(f"shop: 'slots' needs one value per scenario "
                             f"({len(world_cfg.scenarios)}), got {len(self.slots)}")
        for name, k, m in zip(world_cfg.scenarios, self.slots, world_cfg.max_position,
                              strict=True):
            if not 1 <= k <= m:
                raise ValueError(f"shop: slots for '{name}' must lie in 1..{m} "
                                 f"(the world's max_position), got {k}")
        lo, hi = candidates
        if not 1 <= lo <= hi:
            raise ValueError(f"shop: candidates must be (low, high) with 1 <= low <= high, "
                             f"got {candidates}")
        if lo < max(self.slots):
            raise ValueError(f"shop: candidates low ({lo}) must be at least the most slots "
                             f"({max(self.slots)})")
        self.candidates = (lo, hi)
        self._price = np.round(np.exp(self.world.log_price), 2)

    # -- requests ------------------------------------------------------------------------------

    def requests(self, n: int, seed: int) -> Iterator[Request]:
        """n requests, a pure function of (world, seed)."""
        rng = np.random.default_rng([self.cfg.seed, 7, seed])
        done = 0
        while done < n:
            yield from self._batch(rng, min(_BATCH, n - done))
            done += min(_BATCH, n - done)

    def _batch(self, rng: np.random.Generator, n: int) -> list[Request]:
        cfg, w = self.cfg, self.world
        s = rng.choice(len(cfg.scenarios), n, p=np.asarray(cfg.traffic))
        u = rng.choice(cfg.n_users, n, p=w.user_p)
        lo, hi = self.candidates
        draws = rng.integers(lo, hi + 1, n)
        ru, rs = np.repeat(u, draws), np.repeat(s, draws)
        # the shop's catalogue is the established items: the saved models know their ids
        items = draw_items(w, rng, ru, rs, np.zeros(len(ru), bool))
        bounds = np.concatenate([[0], np.cumsum(draws)])
        keep = np.zeros(len(items), bool)
        for r in range(n):  # repeats removed, first draw kept (the draw order is the row order)
            _, first = np.unique(items[bounds[r]:bounds[r + 1]], return_index=True)
            keep[bounds[r] + np.sort(first)] = True
        items, ru, rs = items[keep], ru[keep], rs[keep]
        counts = np.add.reduceat(keep, bounds[:-1]).astype(np.int64)
        table = to_table(self._columns(ru, items, rs))
        out, start = [], 0
        for r in range(n):
            c = int(counts[r])
            out.append(Request(int(u[r]), cfg.scenarios[s[r]], table.slice(start, c),
                               self.slots[s[r]], items[start:start + c], int(s[r])))
            start += c
        return out

    def _columns(self, u: np.ndarray, item: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
        """Candidate rows in the world's training columns (``synthetic.impressions`` without
        labels, truth and day), position 0."""
        w = self.world
        return {
            "user_id": u, "item_id": item, "segment": w.segment[u],
            "age_bucket": w.age_bucket[u], "gender": w.gender[u], "top_category": w.top[item],
            "leaf_category": w.leaf[item], "brand": w.brand[item],
            "position": np.zeros(len(u), np.int64), "price": self._price[item],
            "hist_leaf": w.hist_leaf[u], "scenario": np.asarray(self.cfg.scenarios)[s],
            "is_new_item": w.is_new[item],
        }

    # -- the truth -----------------------------------------------------------------------------

    def probabilities(self, request: Request, shown: np.ndarray) -> dict[str, np.ndarray]:
        """True click and conversion-given-click probabilities of the shown items at their
        positions (0..K-1), and their prices."""
        shown = self._check_shown(request, shown)
        item = request.items[shown]
        n = len(item)
        p = true_probabilities(self.world, np.full(n, request.user), item,
                               np.full(n, request.s), np.arange(n))
        return {"click": p["click"], "conversion": p["conversion"], "price": self._price[item]}

    def expected(self, request: Request, shown: np.ndarray) -> dict[str, float]:
        """Exact expected impressions, clicks, conversions and GMV of showing ``shown``."""
        p = self.probabilities(request, shown)
        pc = p["click"] * p["conversion"]
        return {"impressions": float(len(p["click"])), "clicks": float(p["click"].sum()),
                "conversions": float(pc.sum()), "gmv": float((pc * p["price"]).sum())}

    def respond(self, request: Request, shown: np.ndarray, rng: np.random.Generator) -> Response:
        """The user's clicks and conversions on ``shown`` (candidate indices, best first)."""
        p = self.probabilities(request, shown)
        click = rng.random(len(p["click"])) < p["click"]
        conv = click & (rng.random(len(click)) < p["conversion"])
        items = request.items[np.asarray(shown, np.int64)]
        return Response(items, click, conv, np.where(conv, p["price"], 0.0))

    def _check_shown(self, request: Request, shown: np.ndarray) -> np.ndarray:
        shown = np.asarray(shown, np.int64)
        n = len(request.items)
        if shown.ndim != 1 or len(shown) > request.k:
            raise ValueError(f"shop: a ranker must show at most {request.k} candidates in "
                             f"'{request.scenario}' as a list of indices, got shape "
                             f"{shown.shape}")
        if len(shown) and (shown.min() < 0 or shown.max() >= n):
            raise ValueError(f"shop: shown indices must lie in 0..{n - 1} (the candidates)")
        if len(np.unique(shown)) != len(shown):
            raise ValueError("shop: a ranker showed one candidate twice")
        return shown


# -- ranking many requests at once ----------------------------------------------------------------

def rank_batch(requests: Sequence[Request], policy: Policy) -> list[np.ndarray]:
    """Each request's top k under ``policy``, scored in one call (rows are independent)."""
    if not requests:
        return []
    rows = pa.concat_tables([r.candidates for r in requests]).combine_chunks()
    scores = np.asarray(policy.scores(rows), np.float64)
    if scores.shape != (rows.num_rows,):
        raise ValueError(f"policy '{policy.name}' gave {scores.shape} scores for "
                         f"{rows.num_rows} rows")
    out, start = [], 0
    for r in requests:
        n = r.candidates.num_rows
        out.append(top_k(scores[start:start + n], r.k))
        start += n
    return out


def expected_values(shop: Shop, requests: Sequence[Request], policies: Mapping[str, Policy]
                    ) -> dict[str, dict[str, np.ndarray]]:
    """Per policy, the exact expected impressions / clicks / conversions / gmv of every request
    (arrays aligned with ``requests``): the same requests for every policy (paired)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, policy in policies.items():
        vals: dict[str, list[float]] = {k: [] for k in ("impressions", "clicks", "conversions",
                                                        "gmv")}
        for start in range(0, len(requests), _BATCH):
            chunk = requests[start:start + _BATCH]
            for r, shown in zip(chunk, rank_batch(chunk, policy), strict=True):
                for k, v in shop.expected(r, shown).items():
                    vals[k].append(v)
        out[name] = {k: np.asarray(v) for k, v in vals.items()}
    return out


def ratio_metrics(e: Mapping[str, np.ndarray], scenarios: np.ndarray, names: Sequence[str],
                  users: tuple[int, np.ndarray, Sequence[float]] | None = None
                  ) -> dict[str, dict[str, float]]:
    """True ctr / cvr / gmv (ratios of expectations) for 'all' and each scenario; with
    ``users = (test requests N, user probabilities p_u, traffic shares)`` also the per-user sums
    over a test period of N requests, averaged over the units that made a request there (as the
    analysis averages them): ``N pi_s E[x | s] / sum_u (1 - (1 - p_u pi_s)^N)``."""
    out: dict[str, dict[str, float]] = {m: {} for m in METRICS + (PER_USER if users else ())}
    for scen in ("all", *names):
        m = np.ones(len(scenarios), bool) if scen == "all" else scenarios == scen
        if not m.any():
            continue
        imp, clk = e["impressions"][m].sum(), e["clicks"][m].sum()
        out["ctr"][scen] = float(clk / imp)
        out["cvr"][scen] = float(e["conversions"][m].sum() / clk)
        out["gmv"][scen] = float(e["gmv"][m].mean())
        if users is not None:
            n, p_u, traffic = users
            share = 1.0 if scen == "all" else float(traffic[list(names).index(scen)])
            # expected units with a request there; -expm1(log1p) keeps tiny p_u exact
            units = float(-np.expm1(n * np.log1p(-p_u * share)).sum())
            out["gmv_per_user"][scen] = float(n * share * e["gmv"][m].mean() / units)
            out["clicks_per_user"][scen] = float(n * share * e["clicks"][m].mean() / units)
    return out


def truth(shop: Shop, policies: Mapping[str, Policy], control: str, n: int, seed: int,
          test_requests: int | None = None) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``truth[arm][metric][scenario] = {control, value, abs_lift, rel_lift}`` (the report's
    contract) from the exact expected values of every policy on the same n requests; with
    ``test_requests`` also the per-user metrics of a test period that long."""
    if control not in policies:
        raise ValueError(f"truth: the control '{control}' is not one of the policies")
    reqs = list(shop.requests(n, seed))
    scen = np.asarray([r.scenario for r in reqs])
    exp = expected_values(shop, reqs, policies)
    users = None if test_requests is None else (test_requests, shop.world.user_p,
                                                shop.cfg.traffic)
    values = {a: ratio_metrics(e, scen, shop.cfg.scenarios, users) for a, e in exp.items()}
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for arm, metrics in values.items():
        out[arm] = {}
        for metric, by_scen in metrics.items():
            out[arm][metric] = {}
            for sc, v in by_scen.items():
                c = values[control][metric][sc]
                out[arm][metric][sc] = {"control": c, "value": v, "abs_lift": v - c,
                                        "rel_lift": (v - c) / c if c else float("nan")}
    return out


# -- playing an experiment --------------------------------------------------------------------

Ranker = Callable[[Request], tuple[str, str, np.ndarray]]


@dataclass(frozen=True)
class Experiment:
    """An experiment to play: arms with shares (the first listed is not special: ``control``
    names it), the salt of the assignment, requests before and during the test."""

    name: str
    arms: tuple[tuple[str, float], ...]
    control: str
    salt: str
    pre_requests: int
    test_requests: int
    seed: int = 0
    requests_per_second: float = 50.0  # simulated time: ``ts`` of request i is i / rate

    def __post_init__(self) -> None:
        check_arms(self.arms)
        if self.control not in dict(self.arms):
            raise ValueError(f"experiment '{self.name}': control '{self.control}' is not an arm")
        if self.pre_requests < 0 or self.test_requests < 1:
            raise ValueError(f"experiment '{self.name}': pre_requests must be >= 0 and "
                             f"test_requests >= 1")


def policy_ranker(exp: Experiment, policies: Mapping[str, Policy]) -> Callable[
        [Sequence[Request], str, int], list[tuple[str, str, np.ndarray]]]:
    """The in-process ranker: each request's arm by ``assign`` (the control in the pre-period),
    ranked by that arm's policy, one scoring call per arm and batch."""
    missing = [a for a, _ in exp.arms if a not in policies]
    if missing:
        raise ValueError(f"experiment '{exp.name}': no policy for arm(s) {missing}")

    def rank(reqs: Sequence[Request], period: str, first: int
             ) -> list[tuple[str, str, np.ndarray]]:
        arms = [exp.control if period == "pre" else assign(str(r.user), exp.salt, exp.arms)
                for r in reqs]
        shown: list[np.ndarray | None] = [None] * len(reqs)
        for arm in dict.fromkeys(arms):
            idx = [i for i, a in enumerate(arms) if a == arm]
            for i, sh in zip(idx, rank_batch([reqs[i] for i in idx], policies[arm]),
                             strict=True):
                shown[i] = sh
        return [(a, f"{exp.name}-{period}-{first + i}", sh)
                for i, (a, sh) in enumerate(zip(arms, shown, strict=True))]

    return rank


def play(shop: Shop, exp: Experiment, store: EventStore,
         policies: Mapping[str, Policy] | None = None, ranker: Ranker | None = None) -> dict:
    """Play the experiment's pre-period and test period through ``ranker`` (one request at a
    time: ``(request) -> (arm, request_id, shown)``, e.g. a call to the service) or, by default,
    the arms' ``policies`` in process; write exposures, feedback and meta to ``store``. Returns
    counts per period and arm."""
    if (policies is None) == (ranker is None):
        raise ValueError("play: give either the arms' policies or a ranker")
    batch_rank = policy_ranker(exp, policies) if policies is not None else None
    store.set_meta("experiment", exp.name)
    store.set_meta("arms", dict(exp.arms))
    store.set_meta("control", exp.control)
    rng = np.random.default_rng([shop.cfg.seed, 8, exp.seed])
    counts: dict[str, dict[str, int]] = {}
    t0 = 0.0
    for period, n, seed in (("pre", exp.pre_requests, 2 * exp.seed),
                            ("test", exp.test_requests, 2 * exp.seed + 1)):
        done = 0
        reqs_iter = shop.requests(n, seed)
        while done < n:
            reqs = [next(reqs_iter) for _ in range(min(_BATCH, n - done))]
            if batch_rank is not None:
                ranked = batch_rank(reqs, period, done)
            else:
                assert ranker is not None
                ranked = [ranker(r) for r in reqs]
            _write(shop, exp, store, reqs, ranked, period, t0 + done / exp.requests_per_second,
                   rng, counts)
            done += len(reqs)
        t0 += n / exp.requests_per_second
    return counts


def _write(shop: Shop, exp: Experiment, store: EventStore, reqs: Sequence[Request],
           ranked: Sequence[tuple[str, str, np.ndarray]], period: str, ts0: float,
           rng: np.random.Generator, counts: dict[str, dict[str, int]]) -> None:
    exposures, feedback = [], []
    for i, (r, (arm, rid, shown)) in enumerate(zip(reqs, ranked, strict=True)):
        ts = ts0 + i / exp.requests_per_second
        resp = shop.respond(r, shown, rng)
        items = [str(int(x)) for x in resp.items]
        exposures.append(Exposure(rid, ts, exp.name, period, arm, unit_of(str(r.user), exp.salt),
                                  r.scenario, json.dumps(items)))
        for pos in np.flatnonzero(resp.clicks):
            feedback.append(Feedback(rid, ts + 1.0, "click", items[pos], int(pos)))
        for pos in np.flatnonzero(resp.conversions):
            feedback.append(Feedback(rid, ts + 2.0, "conversion", items[pos], int(pos),
                                     float(resp.gmv[pos])))
        c = counts.setdefault(period, {})
        c[arm] = c.get(arm, 0) + 1
    store.add_exposures(exposures)
    store.add_feedback(feedback)


def read_world(world_json: str | Path) -> WorldConfig:
    """The ``WorldConfig`` a generated world was made with (``DATA/world.json``: the
    quickstart's ``OUT/data/world.json``), strictly parsed; one-line errors."""
    from shopmtl.config import ConfigError, from_dict

    p = Path(world_json)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (a generated world's world.json, e.g. "
                          "OUT/data/world.json of `shopmtl quickstart`)")
    try:
        raw = json.loads(p.read_text())["config"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{p}: not a world.json (no 'config' mapping)") from None
    return from_dict(WorldConfig, raw, "world")
