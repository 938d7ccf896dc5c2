"""Calibration of the A/B statistics (shopmtl.abtest.stats / analyze) by simulation.

Thousands of experiments drawn directly in numpy, each analysed by the real functions:
heterogeneous users (each its own click probability, Beta(a, b)), 1 + Poisson impressions per
user, Binomial clicks; a pre period of the same users for CUPED; users arriving in ``looks``
equal batches for the sequential rules. Measured (docs/ABTEST.md, "Calibration"):

- A/A: the share of experiments that reject at alpha on CTR (delta method over users), and the
  impression-level binomial z-test (statsmodels) as the control that ignores clustering;
- sequential A/A over the looks: group-sequential (O'Brien-Fleming spending), mSPRT, and naive
  peeking (reject at the first look with p < alpha);
- coverage of the true absolute and relative lift by the delta-method intervals;
- power at the planner's sample size for an MDE: a per-user rate (proportion z) and clicks per
  user (Welch), measured vs planned;
- CUPED: the variance of the lift across experiments with and without the pre-period
  covariate, and the reduction the analysis reports, for clicks per user (``stats.cuped``) and
  for CTR linearised as ``abtest analyze`` does it (``analyze.cuped_compare``), whose A/A
  rejection and coverage are measured too.

    .venv/bin/python bench/abtest_calibration.py --runs 4000 \\
        --out bench/results/abtest_calibration.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shopmtl.abtest import stats
from shopmtl.abtest.analyze import cuped_compare, sequential_path
from shopmtl.jsonsafe import json_safe


@dataclass(frozen=True)
class World:
    units: int = 3000  # users per arm
    a: float = 1.0  # user click probability ~ Beta(a, b): mean 1/16, strongly heterogeneous
    b: float = 15.0
    impressions: float = 20.0  # mean impressions per user (1 + Poisson)
    lift: float = 0.05  # relative CTR lift of the treatment in the non-A/A runs
    looks: int = 10
    alpha: float = 0.05


def draw_arm(rng: np.random.Generator, w: World, lift: float) -> dict[str, np.ndarray]:
    """One arm's users: test and pre-period impressions and clicks (pre: no treatment)."""
    p = rng.beta(w.a, w.b, w.units)
    imp = 1 + rng.poisson(w.impressions - 1, w.units)
    imp_pre = 1 + rng.poisson(w.impressions - 1, w.units)
    return {"imp": imp, "clicks": rng.binomial(imp, np.minimum(p * (1 + lift), 1.0)),
            "imp_pre": imp_pre, "clicks_pre": rng.binomial(imp_pre, p)}


def true_lift(w: World, lift: float) -> tuple[float, float]:
    """(absolute, relative) CTR lift: E[clicks] / E[impressions] is E[p] (1 + lift) since
    impressions are independent of p (p (1 + lift) > 1 has probability ~1e-20 here)."""
    return lift * w.a / (w.a + w.b), lift


def experiment(rng: np.random.Generator, w: World, lift: float) -> dict[str, float]:
    """One experiment analysed every way: fixed horizon, sequential, CUPED."""
    t, c = draw_arm(rng, w, lift), draw_arm(rng, w, 0.0)
    cmp = stats.compare(stats.ratio(t["clicks"], t["imp"]), stats.ratio(c["clicks"], c["imp"]),
                        w.alpha)
    abs_true, rel_true = true_lift(w, lift)
    naive_p, _ = stats.proportion_z(int(t["clicks"].sum()), int(t["imp"].sum()),
                                    int(c["clicks"].sum()), int(c["imp"].sum()), w.alpha)
    # sequential: users arrive in equal batches; look k sees the first k batches of each arm
    diff, var, n = [], [], []
    for k in range(1, w.looks + 1):
        m = w.units * k // w.looks
        ck = stats.compare(stats.ratio(t["clicks"][:m], t["imp"][:m]),
                           stats.ratio(c["clicks"][:m], c["imp"][:m]), w.alpha)
        diff.append(ck.abs_lift), var.append(ck.se**2), n.append(2 * m)
    seq = sequential_path(np.array(diff), np.array(var), w.alpha, np.array(n, np.float64))
    # CUPED on clicks per user with the pre-period clicks as covariate
    y = np.concatenate([t["clicks"], c["clicks"]]).astype(np.float64)
    x = np.concatenate([t["clicks_pre"], c["clicks_pre"]]).astype(np.float64)
    cu = stats.cuped(y, x)
    nt = w.units
    # CUPED on CTR itself, as ``abtest analyze`` runs it: linearised, pre-period CTR sums
    cat = {k: np.concatenate([t[k], c[k]]).astype(np.float64) for k in t}
    is_t = np.arange(2 * nt) < nt
    cc = cuped_compare(cat["clicks"], cat["imp"], cat["clicks_pre"], cat["imp_pre"], is_t,
                       True, w.alpha)
    return {
        "ctr_lift": cmp.abs_lift, "cuped_ctr_lift": cc["abs_lift"], "cuped_ctr_p": cc["p"],
        "cuped_ctr_cover": cc["abs_ci"][0] <= abs_true <= cc["abs_ci"][1],
        "cuped_ctr_reported": cc["var_reduction"],
        "p": cmp.p, "naive_p": naive_p,
        "abs_cover": cmp.abs_ci[0] <= abs_true <= cmp.abs_ci[1],
        "rel_cover": cmp.rel_ci[0] <= rel_true <= cmp.rel_ci[1],
        "gst": seq["gst_stop"] is not None, "msprt": seq["msprt_stop"] is not None,
        "peek": seq["naive_stop"] is not None,
        "raw_lift": float(y[:nt].mean() - y[nt:].mean()),
        "cuped_lift": float(cu.adjusted[:nt].mean() - cu.adjusted[nt:].mean()),
        "cuped_reported": cu.var_reduction,
    }


def power_rate(rng: np.random.Generator, runs: int, baseline: float, mde: float,
               alpha: float) -> dict[str, float]:
    """A per-user rate (one Bernoulli per user): the planner's n, the z-test's hit rate."""
    pl = stats.plan(mde, baseline_rate=baseline, alpha=alpha)
    k_c = rng.binomial(pl.n_control, baseline, runs)
    k_t = rng.binomial(pl.n_treatment, baseline + mde, runs)
    hits = [stats.proportion_z(int(a), pl.n_treatment, int(b), pl.n_control, alpha)[0] < alpha
            for a, b in zip(k_t, k_c, strict=True)]
    return {"n_per_arm": pl.n_control, "planned": pl.power, "measured": float(np.mean(hits))}


def power_mean(rng: np.random.Generator, runs: int, w: World, rel_mde: float,
               alpha: float) -> dict[str, float]:
    """Clicks per user (skewed, heterogeneous): plan from a pilot's mean and sd, then Welch's
    hit rate at that n with the true lift = the MDE."""
    pilot = draw_arm(rng, World(**{**asdict(w), "units": 200_000}), 0.0)["clicks"]
    pl = stats.plan(rel_mde, mean=float(pilot.mean()), sd=float(pilot.std(ddof=1)),
                    relative=True, alpha=alpha)
    wn = World(**{**asdict(w), "units": pl.n_control})
    hits = [stats.welch(draw_arm(rng, wn, rel_mde)["clicks"],
                        draw_arm(rng, wn, 0.0)["clicks"], alpha).p < alpha
            for _ in range(runs)]
    return {"n_per_arm": pl.n_control, "planned": pl.power, "measured": float(np.mean(hits))}


def calibrate(runs: int, w: World, seed: int, power_runs: int | None = None) -> dict:
    """Every measurement of the module docstring over ``runs`` experiments each."""
    rng = np.random.default_rng(seed)
    aa = [experiment(rng, w, 0.0) for _ in range(runs)]
    ab = [experiment(rng, w, w.lift) for _ in range(runs)]

    def rate(rows: list[dict], key: str) -> float:
        return float(np.mean([bool(r[key]) for r in rows]))

    raw = np.array([r["raw_lift"] for r in aa + ab])
    adj = np.array([r["cuped_lift"] for r in aa + ab])
    # the variance across experiments, each arm set centred on its own true lift
    raw_var = np.var(raw[:runs], ddof=1) + np.var(raw[runs:], ddof=1)
    adj_var = np.var(adj[:runs], ddof=1) + np.var(adj[runs:], ddof=1)
    pr = power_runs or runs
    return {
        "world": asdict(w), "runs": runs, "seed": seed,
        "aa_reject": float(np.mean([r["p"] < w.alpha for r in aa])),
        "aa_reject_binomial_z": float(np.mean([r["naive_p"] < w.alpha for r in aa])),
        "aa_gst": rate(aa, "gst"), "aa_msprt": rate(aa, "msprt"), "aa_peek": rate(aa, "peek"),
        "coverage_abs": rate(ab, "abs_cover"), "coverage_rel": rate(ab, "rel_cover"),
        "coverage_abs_aa": rate(aa, "abs_cover"),
        "power_fixed": float(np.mean([r["p"] < w.alpha for r in ab])),
        "power_gst": rate(ab, "gst"), "power_msprt": rate(ab, "msprt"),
        "power_rate": power_rate(rng, pr, 0.05, 0.01, w.alpha),
        "power_clicks_per_user": power_mean(rng, max(pr // 4, 10), w, 0.05, w.alpha),
        "cuped_var_reduction_measured": float(1 - adj_var / raw_var),
        "cuped_var_reduction_reported": float(np.mean([r["cuped_reported"] for r in aa + ab])),
        "cuped_ctr_aa_reject": float(np.mean([r["cuped_ctr_p"] < w.alpha for r in aa])),
        "cuped_ctr_coverage": rate(ab, "cuped_ctr_cover"),
        "cuped_ctr_var_reduction_measured": float(1 - _var2(aa, ab, "cuped_ctr_lift")
                                                  / _var2(aa, ab, "ctr_lift")),
        "cuped_ctr_var_reduction_reported": float(np.mean([r["cuped_ctr_reported"]
                                                           for r in aa + ab])),
    }


def _var2(aa: list[dict], ab: list[dict], key: str) -> float:
    """Variance of an estimate across experiments: A/A and A/B each about its own mean."""
    return float(np.var([r[key] for r in aa], ddof=1) + np.var([r[key] for r in ab], ddof=1))


def table(res: dict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    n = res["runs"]
    se = math.sqrt(0.05 * 0.95 / n)
    rows = [
        ("A/A reject, CTR by delta method (fixed horizon)", pct(res["aa_reject"]), "4-6%"),
        ("A/A reject, binomial z over impressions (ignores users)",
         pct(res["aa_reject_binomial_z"]), "control: inflated"),
        (f"A/A reject, group-sequential over {res['world']['looks']} looks", pct(res["aa_gst"]),
         "4-6%"),
        ("A/A reject, mSPRT over the looks", pct(res["aa_msprt"]), "<= 5% (conservative)"),
        ("A/A reject, naive peeking (any look p < 0.05)", pct(res["aa_peek"]),
         "control: inflated"),
        ("coverage of the true absolute lift", pct(res["coverage_abs"]), "93-97%"),
        ("coverage of the true relative lift", pct(res["coverage_rel"]), "93-97%"),
        (f"power at +{100 * res['world']['lift']:.0f}% CTR: fixed / GST / mSPRT",
         f"{pct(res['power_fixed'])} / {pct(res['power_gst'])} / {pct(res['power_msprt'])}",
         "-"),
        (f"power, rate 0.05 -> 0.06 at n = {res['power_rate']['n_per_arm']:,}/arm",
         f"{pct(res['power_rate']['measured'])} (planned "
         f"{pct(res['power_rate']['planned'])})", "within 5 points"),
        (f"power, clicks/user +5% at n = {res['power_clicks_per_user']['n_per_arm']:,}/arm",
         f"{pct(res['power_clicks_per_user']['measured'])} (planned "
         f"{pct(res['power_clicks_per_user']['planned'])})", "within 5 points"),
        ("CUPED variance reduction, clicks/user: measured across runs / reported",
         f"{pct(res['cuped_var_reduction_measured'])} / "
         f"{pct(res['cuped_var_reduction_reported'])}", "agree"),
        ("CUPED variance reduction, CTR (linearised): measured / reported",
         f"{pct(res['cuped_ctr_var_reduction_measured'])} / "
         f"{pct(res['cuped_ctr_var_reduction_reported'])}", "agree"),
        ("CUPED CTR: A/A reject / coverage of the true lift",
         f"{pct(res['cuped_ctr_aa_reject'])} / {pct(res['cuped_ctr_coverage'])}",
         "4-6% / 93-97%"),
    ]
    out = [f"{n:,} A/A and {n:,} A/B experiments, {res['world']['units']:,} users per arm, "
           f"seed {res['seed']} (a 5% rate's standard error at this n: {100 * se:.2f} points)",
           "", "| measurement | result | target |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=4000, help="A/A and A/B experiments each")
    ap.add_argument("--units", type=int, default=World.units, help="users per arm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/abtest_calibration.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = calibrate(args.runs, World(units=args.units), args.seed)
    res["env"] = {"command": "python bench/abtest_calibration.py "
                             + " ".join(argv if argv is not None else sys.argv[1:]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "python": platform.python_version(), "cpu": platform.processor() or
                  platform.machine(), "seconds": time.perf_counter() - t0}
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(res), indent=1, allow_nan=False))
    print(f"wrote {args.out} ({res['env']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
