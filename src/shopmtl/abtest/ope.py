"""Off-policy evaluation (docs/ABTEST.md, "Off-policy evaluation"): a new ranking policy's CTR
and GMV per request estimated from events logged under a randomised policy, before it goes
online.

- Logging: Plackett-Luce sampling of the current policy's scores at a temperature
  (``pl_sample``: the Gumbel-top-k trick): weights ``exp(score / temperature)``.
- Propensities: the *exact* marginal probability that candidate ``a`` lands at position ``j``
  (``pl_marginals``). Plackett-Luce is an exponential race (candidate i's time is exponential
  with rate ``lambda_i``), so ``P(a at j) = int lambda_a e^(-lambda_a t) P(exactly j others
  before t) dt``: a Poisson-binomial count (a dynamic programme) under a one-dimensional
  integral, taken on a fine grid in ``log t`` (the integrand is smooth and vanishes at both
  ends, so the trapezoid rule converges fast; every position's column sums to 1 within 1e-7).
- Estimators (the item-position model, Li et al. 2018): the user's response at position j
  depends on the item there and on j alone, not on the other items shown. The synthetic world
  responds exactly so (``abtest.shop``). Then the target's value is the sum over its positions
  of E[y | target item at j, position j], and a logged match at j weighs ``1 / P(item at j)``:
  - IPS: ``mean_r sum_j w_rj y_rj`` with ``w_rj = 1{logged_j = target_j} / P(target_j at j)``;
  - SNIPS: per (scenario, position), ``sum w y / sum w`` (self-normalised);
  - DR: ``mean_r sum_j [q_rj + w_rj (y_rj - q_rj)]`` with ``q`` a reward model's prediction of
    the target's item at that position (a saved model's pCTR, pCTR x pCVR x price).
- Intervals: normal (CLT) intervals from each estimator's influence function, clustered by
  user (a user's requests are not independent).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pyarrow as pa

from shopmtl.abtest.policy import Policy
from shopmtl.abtest.shop import Request, Shop, rank_batch

ESTIMATORS = ("ips", "snips", "dr")
OPE_METRICS = ("ctr", "gmv")


def pl_sample(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator
              ) -> np.ndarray:
    """One Plackett-Luce ranking of the top k (indices, best first): sort by score / T + Gumbel."""
    keys = np.asarray(scores, np.float64) / temperature + rng.gumbel(size=len(scores))
    return np.argsort(-keys, kind="stable")[:k]


def pl_marginals(scores: np.ndarray, k: int, temperature: float, step: float = 0.1
                 ) -> np.ndarray:
    """``[n, k]``: the exact probability that candidate a is at position j (0-based) of a
    Plackett-Luce ranking with weights ``exp(score / temperature)`` (the integral in the module
    docstring, on a grid of ``step`` in log time)."""
    z = np.asarray(scores, np.float64) / temperature
    if not np.isfinite(z).all():
        raise ValueError("pl_marginals: scores must be finite")
    n, k = len(z), min(k, len(z))
    z = z - z.max()
    lam = np.exp(z)
    # the race time of a has log-density ~ Gumbel around -z_a: cover every candidate's
    y = np.arange(float((-z).min()) - 20.0, float((-z).max()) + 4.0, step)
    t = np.exp(y)
    lt = lam[:, None] * t[None, :]  # [n, T]
    before = -np.expm1(-lt)  # P(candidate i finished before t)
    dens = lt * np.exp(-lt)  # density of a's time in log t
    # leave-one-out Poisson-binomial over the others, counts 0..k-1: dp[a, T, c]
    dp = np.zeros((n, len(t), k))
    dp[:, :, 0] = 1.0
    eye = np.eye(n, dtype=bool)
    for j in range(n):
        pj = np.where(eye[:, j, None], 0.0, before[j][None, :])[..., None]  # [n, T, 1]
        new = dp * (1.0 - pj)
        new[..., 1:] += dp[..., :-1] * pj
        dp = new
    return np.einsum("at,atc->ac", dens, dp) * step


@dataclass(frozen=True)
class Log:
    """Requests logged under a Plackett-Luce policy: what was shown, how users responded and
    the exact marginal propensities ``[n_candidates, k]`` of each request."""

    requests: tuple[Request, ...]
    shown: tuple[np.ndarray, ...]
    clicks: tuple[np.ndarray, ...]
    gmv: tuple[np.ndarray, ...]
    propensities: tuple[np.ndarray, ...]
    temperature: float


def logging_scores(requests: Sequence[Request], policy: Policy) -> list[np.ndarray]:
    """The logging policy's scores of each request's candidates (one scoring call)."""
    rows = pa.concat_tables([r.candidates for r in requests]).combine_chunks()
    s = np.asarray(policy.scores(rows), np.float64)
    out, start = [], 0
    for r in requests:
        out.append(s[start:start + r.candidates.num_rows])
        start += r.candidates.num_rows
    return out


def propensities(requests: Sequence[Request], scores: Sequence[np.ndarray], temperature: float
                 ) -> tuple[np.ndarray, ...]:
    """Each request's exact marginals (they depend on the scores, not on the draw: compute once
    for repeated logs of the same requests)."""
    return tuple(pl_marginals(s, r.k, temperature) for r, s in zip(requests, scores, strict=True))


def log_events(shop: Shop, requests: Sequence[Request], scores: Sequence[np.ndarray],
               props: Sequence[np.ndarray], temperature: float, rng: np.random.Generator) -> Log:
    """One log: a Plackett-Luce draw per request, the users' responses from the shop."""
    shown, clicks, gmv = [], [], []
    for r, s in zip(requests, scores, strict=True):
        sh = pl_sample(s, r.k, temperature, rng)
        resp = shop.respond(r, sh, rng)
        shown.append(sh)
        clicks.append(resp.clicks.astype(np.float64))
        gmv.append(resp.gmv)
    return Log(tuple(requests), tuple(shown), tuple(clicks), tuple(gmv), tuple(props),
               temperature)


def reward_model(requests: Sequence[Request], target: Sequence[np.ndarray], model: object,
                 ) -> dict[str, list[np.ndarray]]:
    """DR's reward model: a saved model's (``shopmtl.load``) pCTR and pCTR x pCVR x price of
    each target item at its target position."""
    rows, sizes = [], []
    for r, t in zip(requests, target, strict=True):
        part = r.candidates.take(pa.array(t))
        i = part.column_names.index("position")
        rows.append(part.set_column(i, "position", pa.array(np.arange(len(t), dtype=np.int64))))
        sizes.append(len(t))
    table = pa.concat_tables(rows).combine_chunks()
    pred = model.predict(table, task=["click", "conversion"])  # type: ignore[attr-defined]
    pc = pred.column("click").to_numpy(zero_copy_only=False).astype(np.float64)
    pv = pred.column("conversion").to_numpy(zero_copy_only=False).astype(np.float64)
    price = table.column("price").to_numpy(zero_copy_only=False).astype(np.float64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    gmv = pc * pv * price
    return {"ctr": [pc[a:b] for a, b in itertools.pairwise(bounds)],
            "gmv": [gmv[a:b] for a, b in itertools.pairwise(bounds)]}


def _clustered_ci(psi: np.ndarray, users: np.ndarray, alpha: float) -> float:
    """Half-width of a normal interval of a mean with influence values ``psi`` (centred),
    clustered by user."""
    n = len(psi)
    _, inv = np.unique(users, return_inverse=True)
    sums = np.bincount(inv, weights=psi)
    se = float(np.sqrt((sums**2).sum()) / n)
    return float(NormalDist().inv_cdf(1 - alpha / 2) * se)


def estimate(log: Log, target: Sequence[np.ndarray], rewards: Mapping[str, Sequence[np.ndarray]]
             | None = None, alpha: float = 0.05) -> dict[str, dict[str, dict]]:
    """``out[metric][estimator] = {"estimate", "ci"}`` for the target's ``ctr`` (clicks /
    impressions) and ``gmv`` (per request), ``target``: the target's shown indices per request.
    DR needs ``rewards`` (``reward_model``)."""
    n = len(log.requests)
    if len(target) != n:
        raise ValueError(f"ope: {len(target)} target rankings for {n} logged requests")
    users = np.asarray([r.user for r in log.requests])
    scen = np.asarray([r.s for r in log.requests])
    k = np.asarray([len(t) for t in target], np.float64)
    kmax = int(k.max())
    # per request and target position: the weight, the response, the reward model
    w = np.zeros((n, kmax))
    valid = np.zeros((n, kmax), bool)
    ys = {m: np.zeros((n, kmax)) for m in OPE_METRICS}
    qs = {m: np.zeros((n, kmax)) for m in OPE_METRICS}
    for r, t in enumerate(target):
        kt = len(t)
        valid[r, :kt] = True
        sh = log.shown[r]
        match = np.zeros(kt, bool)
        m = min(kt, len(sh))
        match[:m] = sh[:m] == t[:m]
        w[r, :kt] = match / log.propensities[r][t, np.arange(kt)]
        for metric, y in (("ctr", log.clicks[r]), ("gmv", log.gmv[r])):
            ys[metric][r, :m] = np.where(match[:m], y[:m], 0.0)
            if rewards is not None:
                qs[metric][r, :kt] = rewards[metric][r]
    out: dict[str, dict[str, dict]] = {}
    kbar = k.mean()
    for metric in OPE_METRICS:
        y, q = ys[metric], qs[metric]
        per: dict[str, np.ndarray] = {"ips": (w * y).sum(1)}
        if rewards is not None:
            per["dr"] = (np.where(valid, q, 0.0) + w * (y - q)).sum(1)
        res: dict[str, dict] = {}
        for name, x in per.items():
            res[name] = _finish(metric, x.mean(), x - x.mean(), k, kbar, users, alpha)
        # SNIPS: self-normalised within each (scenario, position) cell
        value = np.zeros(n)
        corr = np.zeros(n)
        for s in np.unique(scen):
            rows = scen == s
            for j in range(int(k[rows].max())):
                cell = rows & valid[:, j]
                bw = w[cell, j].mean()
                if bw == 0:  # no match in the cell: estimate 0, as IPS does
                    continue
                v = (w[cell, j] * y[cell, j]).sum() / w[cell, j].sum()
                value[cell] += v
                corr[cell] += (w[cell, j] * y[cell, j] - v * w[cell, j]) / bw
        est = value.mean()
        res["snips"] = _finish(metric, est, value - est + corr, k, kbar, users, alpha)
        out[metric] = {e: res[e] for e in ESTIMATORS if e in res}
    return out


def _finish(metric: str, per_request: float, psi: np.ndarray, k: np.ndarray, kbar: float,
            users: np.ndarray, alpha: float) -> dict:
    """Per-request value (gmv) or its ratio to the mean impressions per request (ctr)."""
    if metric == "ctr":
        est = per_request / kbar
        psi = (psi - est * (k - kbar)) / kbar
    else:
        est = per_request
    h = _clustered_ci(psi, users, alpha)
    return {"estimate": float(est), "ci": [float(est - h), float(est + h)]}


def online_value(shop: Shop, requests: Sequence[Request], target: Sequence[np.ndarray]
                 ) -> dict[str, float]:
    """The target's true ctr and gmv per request on these requests (exact expectations)."""
    e = [shop.expected(r, t) for r, t in zip(requests, target, strict=True)]
    clicks = sum(x["clicks"] for x in e)
    return {"ctr": clicks / sum(x["impressions"] for x in e),
            "gmv": sum(x["gmv"] for x in e) / len(e)}


def target_rankings(requests: Sequence[Request], policy: Policy) -> list[np.ndarray]:
    """The target policy's shown lists (deterministic top k)."""
    return rank_batch(requests, policy)
