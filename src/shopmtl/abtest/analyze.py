"""``shopmtl abtest analyze``: an event store -> the verdict per arm, metric and scenario.

Steps (docs/ABTEST.md, "Statistics"):

1. Requests: one row per exposure with its feedback summed (clicks, conversions, GMV) and its
   impressions (the length of ``shown``), errors (status != 200) and latency.
2. Units: the requests of the test period summed per (arm, unit), for scenario "all" and for
   each scenario (a unit counts in a scenario when it made a request there). The pre-period sums
   per unit are the CUPED covariate of the same metric.
3. Sample-ratio mismatch: units per arm vs ``meta["arms"]``'s shares. p < 0.001
   (``stats.SRM_ALPHA``) blocks every decision: "blocked (SRM)".
4. Each metric x scenario, each arm vs control: ratio metrics (ctr, cvr, gmv, the guardrails)
   by the delta method over units, per-unit metrics by Welch's t; relative lift by the delta
   method; a bootstrap interval over units beside them; Holm (or BH) across metrics x scenarios
   within an arm (the guardrails are their own family, so that a harm is not diluted).
5. CUPED, sequential monitoring over ``looks`` time slices (group-sequential O'Brien-Fleming
   spending, the mSPRT always-valid p-value and the naive fixed-horizon p as a control), and the
   MDE the sample had 80 % power for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shopmtl.abtest import stats
from shopmtl.abtest.events import Events
from shopmtl.jsonsafe import json_safe


class AnalysisError(ValueError):
    """The events cannot be analysed (one arm only, no test period, unknown arm shares)."""


class ArgumentError(ValueError):
    """An argument the analysis cannot work with (an unknown control arm, alpha out of range)."""


@dataclass(frozen=True)
class Metric:
    num: str  # per-unit column summed into the numerator
    den: str | None  # per-unit denominator column; None: a per-unit mean (Welch t)
    higher_is_better: bool = True
    guardrail: bool = False
    doc: str = ""


METRICS: dict[str, Metric] = {
    "ctr": Metric("clicks", "impressions", doc="clicks / impressions (delta method over units)"),
    "cvr": Metric("conversions", "clicks", doc="conversions / clicks (delta method)"),
    "gmv": Metric("gmv", "requests", doc="GMV / requests (delta method)"),
    "gmv_per_user": Metric("gmv", None, doc="GMV per unit over the test period (Welch t)"),
    "clicks_per_user": Metric("clicks", None, doc="clicks per unit (Welch t)"),
    "latency_ms": Metric("latency_sum", "latency_n", higher_is_better=False, guardrail=True,
                         doc="service latency per request (guardrail, delta method)"),
    "error_rate": Metric("errors", "requests", higher_is_better=False, guardrail=True,
                         doc="share of requests with status != 200 (guardrail, delta method)"),
}
SUMS = ("requests", "impressions", "clicks", "conversions", "gmv", "errors", "latency_sum",
        "latency_n")


def request_table(events: Events, until: float | None = None) -> pa.Table:
    """One row per exposure (ts <= ``until``) with the feedback up to ``until`` summed."""
    ex, fb = events.exposures, events.feedback
    if until is not None:
        ex = ex.filter(pc.less_equal(ex["ts"], until))
        fb = fb.filter(pc.less_equal(fb["ts"], until))
    click = pc.equal(fb["kind"], "click")
    conv = pc.equal(fb["kind"], "conversion")
    per_fb = pa.table({
        "request_id": fb["request_id"],
        "clicks": pc.cast(click, pa.int64()),
        "conversions": pc.cast(conv, pa.int64()),
        "gmv": pc.if_else(conv, fb["value"], 0.0),
    })
    agg = per_fb.group_by("request_id").aggregate(
        [("clicks", "sum"), ("conversions", "sum"), ("gmv", "sum")]).rename_columns(
        ["request_id", "clicks", "conversions", "gmv"])
    # impressions = items in the JSON list ``shown``: commas + 1 unless empty (item ids are
    # numbers or words, never holding a comma; json.loads per row would cost seconds)
    shown = ex["shown"]
    empty = pc.equal(shown, "[]")
    impressions = pc.if_else(empty, 0, pc.add(pc.count_substring(shown, ","), 1))
    lat = ex["latency_ms"]
    req = pa.table({
        "request_id": ex["request_id"], "ts": ex["ts"], "period": ex["period"],
        "arm": ex["arm"], "unit": ex["unit"], "scenario": ex["scenario"],
        "requests": pa.array(np.ones(ex.num_rows, np.int64)),
        "impressions": pc.cast(impressions, pa.int64()),
        "errors": pc.cast(pc.not_equal(ex["status"], 200), pa.int64()),
        "latency_sum": pc.fill_null(lat, 0.0),
        "latency_n": pc.cast(pc.is_valid(lat), pa.int64()),
    })
    req = req.join(agg, "request_id", join_type="left outer")
    for c in ("clicks", "conversions", "gmv"):
        req = req.set_column(req.schema.get_field_index(c), c,
                             pc.fill_null(req[c], 0 if c != "gmv" else 0.0))
    return req


def unit_sums(req: pa.Table, period: str, scenario: str | None,
              by: Sequence[str] = ("arm", "unit")) -> pa.Table:
    """``SUMS`` per unit (and arm) over one period, one scenario or all (None)."""
    mask = pc.equal(req["period"], period)
    if scenario is not None:
        mask = pc.and_(mask, pc.equal(req["scenario"], scenario))
    t = req.filter(mask)
    out = t.group_by(list(by)).aggregate([(c, "sum") for c in SUMS])
    # pyarrow names the sums "<column>_sum"; keep the column names
    return out.rename_columns([c[:-4] if c.endswith("_sum") and c[:-4] in SUMS else c
                               for c in out.column_names])


def _arrays(units: pa.Table, arm: str, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    t = units.filter(pc.equal(units["arm"], arm))
    num = t[metric.num].to_numpy().astype(np.float64)
    den = (t[metric.den].to_numpy().astype(np.float64) if metric.den
           else np.ones(num.size))
    return num, den


def estimate(num: np.ndarray, den: np.ndarray, metric: Metric) -> stats.Estimate:
    return stats.ratio(num, den) if metric.den else stats.mean(num)


def _lin(num: np.ndarray, den: np.ndarray, metric: Metric) -> np.ndarray:
    """Values whose mean's variance is the estimate's: linearised ratio, or the raw values."""
    if not metric.den:
        return num
    if den.sum() <= 0:
        return np.zeros(num.size)
    return stats.linearize(num, den)


def _shares(events: Events, arms: list[str]) -> tuple[dict[str, float], str | None]:
    meta = events.meta.get("arms")
    if isinstance(meta, list):  # [[arm, share], ...] is accepted too
        meta = {a: s for a, s in meta}
    if not meta:
        return ({a: 1 / len(arms) for a in arms},
                "meta has no arm shares: the SRM check assumes equal shares")
    unknown = sorted(set(arms) - set(meta))
    if unknown:
        raise AnalysisError(f"arms {unknown} are in the events but not in meta['arms'] "
                            f"({sorted(meta)})")
    return {a: float(meta[a]) for a in meta}, None


def _entry(cmp: stats.Comparison, boot: dict, n_units: int, n_requests: int) -> dict[str, Any]:
    return {"control": cmp.control, "value": cmp.value, "abs_lift": cmp.abs_lift,
            "abs_ci": list(cmp.abs_ci), "rel_lift": cmp.rel_lift, "rel_ci": list(cmp.rel_ci),
            "se": cmp.se, "p": cmp.p, "boot_abs_ci": list(boot["abs_ci"]),
            "boot_rel_ci": list(boot["rel_ci"]), "n_units": n_units,
            "n_requests": n_requests}


def _decide(entry: dict, metric: Metric, alpha: float, srm_ok: bool) -> str:
    if not srm_ok:
        return "blocked (SRM)"
    p = entry["p_adj"]
    if p is None or not math.isfinite(p) or p >= alpha:
        return "no difference"
    up = entry["abs_lift"] > 0
    return "better" if up == metric.higher_is_better else "worse"


def _validate(events: Events, control: str | None, alpha: float, correction: str,
              looks: int) -> tuple[str, list[str]]:
    if not 0 < alpha < 0.5:
        raise ArgumentError(f"--alpha must lie in (0, 0.5), got {alpha}")
    if correction not in ("holm", "bh"):
        raise ArgumentError(f"--correction must be holm or bh, got {correction!r}")
    if looks < 1:
        raise ArgumentError(f"--looks must be >= 1, got {looks}")
    ex = events.exposures
    test = ex.filter(pc.equal(ex["period"], "test"))
    if test.num_rows == 0:
        raise AnalysisError(f"no test-period exposures in the events ({ex.num_rows} rows, "
                            "all 'pre' or none)")
    arms = sorted(pc.unique(test["arm"]).to_pylist())
    if len(arms) < 2:
        raise AnalysisError(f"only one arm ({arms[0]!r}) in the test period: nothing to compare")
    control = control or events.meta.get("control")
    if control is None:
        raise ArgumentError(f"no control arm: pass --control (one of {arms})")
    if control not in arms:
        raise ArgumentError(f"unknown control arm {control!r}; the arms are {arms}")
    return control, arms


def analyze(events: Events, control: str | None = None, alpha: float = 0.05,
            correction: Literal["holm", "bh"] = "holm", looks: int = 10, n_boot: int = 400,
            seed: int = 0) -> dict[str, Any]:
    """The results dict of docs/ABTEST.md (JSON-safe: NaN is None)."""
    control, arms = _validate(events, control, alpha, correction, looks)
    treatments = [a for a in arms if a != control]
    notes: list[str] = []
    req = request_table(events)
    scenarios = sorted(pc.unique(req.filter(pc.equal(req["period"], "test"))["scenario"])
                       .to_pylist())
    has_latency = pc.sum(req["latency_n"]).as_py() > 0
    names = [m for m in METRICS if m != "latency_ms" or has_latency]
    if not has_latency:
        notes.append("no latency in the events (a pure simulation): no latency guardrail")

    # 3. sample-ratio mismatch over the units of the test period
    units_all = unit_sums(req, "test", None)
    mixed = units_all.group_by("unit").aggregate([("arm", "count_distinct")])
    n_mixed = int(pc.sum(pc.greater(mixed["arm_count_distinct"], 1)).as_py() or 0)
    if n_mixed:
        notes.append(f"{n_mixed} units appear in more than one arm (broken assignment)")
    shares, note = _shares(events, arms)
    if note:
        notes.append(note)
    counts = {a: int(pc.sum(pc.equal(units_all["arm"], a)).as_py()) for a in shares}
    srm = stats.srm_test(np.array(list(counts.values())), np.array(list(shares.values())))
    srm_ok = srm.ok and n_mixed == 0

    # 4. every metric x scenario, each treatment vs control; CUPED beside it
    scen_list: list[str | None] = [None, *scenarios]
    results: dict[str, Any] = {a: {"metrics": {m: {} for m in names}} for a in treatments}
    cuped: dict[str, Any] = {a: {m: {} for m in names} for a in treatments}
    for scen in scen_list:
        sname = scen or "all"
        units = units_all if scen is None else unit_sums(req, "test", scen)
        pre = unit_sums(req, "pre", scen, by=("unit",))
        joined = units.join(pre, "unit", join_type="left outer", right_suffix="_pre")
        for mname in names:
            m = METRICS[mname]
            c_num, c_den = _arrays(units, control, m)
            for arm in treatments:
                t_num, t_den = _arrays(units, arm, m)
                cmp = stats.compare(estimate(t_num, t_den, m), estimate(c_num, c_den, m), alpha)
                if not m.den and t_num.size > 1 and c_num.size > 1:  # scipy's Welch p
                    cmp = stats.welch(t_num, c_num, alpha)
                boot = (stats.bootstrap_ci(t_num, t_den, c_num, c_den, alpha, n_boot, seed)
                        if t_den.sum() > 0 and c_den.sum() > 0 and n_boot > 0
                        else {"abs_ci": (math.nan,) * 2, "rel_ci": (math.nan,) * 2})
                n_req = int(pc.sum(pc.filter(units["requests"],
                                             pc.is_in(units["arm"], pa.array([arm, control]))))
                            .as_py() or 0)
                results[arm]["metrics"][mname][sname] = _entry(
                    cmp, boot, int(t_num.size + c_num.size), n_req)
                cuped[arm][mname][sname] = _cuped(joined, arm, control, m, alpha)

    # corrections: per arm, the primary metrics x scenarios, then the guardrails
    for arm in treatments:
        for guard in (False, True):
            cells = [(m, s) for m in names if METRICS[m].guardrail == guard
                     for s in results[arm]["metrics"][m]]
            p = np.array([results[arm]["metrics"][m][s]["p"] for m, s in cells], np.float64)
            for (m, s), q in zip(cells, stats.adjust(p, correction), strict=True):
                e = results[arm]["metrics"][m][s]
                e["p_adj"] = float(q)
                e["decision"] = _decide(e, METRICS[m], alpha, srm_ok)

    seq = _sequential(events, req, control, treatments, names, alpha, looks)
    power = {arm: {m: _power(results[arm]["metrics"][m]["all"], alpha) for m in names}
             for arm in treatments}
    clustering = _clustering(units_all, control)
    out = {
        "experiment": events.meta.get("experiment"), "control": control, "arm_names": arms,
        "alpha": alpha, "correction": correction, "srm_threshold": stats.SRM_ALPHA,
        "srm": {"p": srm.p, "chi2": srm.chi2, "ok": srm_ok, "counts": counts,
                "expected": shares, "mixed_units": n_mixed},
        "scenarios": ["all", *scenarios],
        "metrics": {n: {"definition": METRICS[n].doc, "ratio": METRICS[n].den is not None,
                        "higher_is_better": METRICS[n].higher_is_better,
                        "guardrail": METRICS[n].guardrail} for n in names},
        "arms": results, "cuped": cuped, "sequential": seq, "power": power,
        "clustering": clustering, "notes": notes,
    }
    return json_safe(out)


def _cuped(joined: pa.Table, arm: str, control: str, m: Metric, alpha: float
           ) -> dict[str, Any]:
    """``cuped_compare`` on one arm and the control, the pre-period sums joined per unit."""
    both = joined.filter(pc.is_in(joined["arm"], pa.array([arm, control])))

    def col(name: str | None) -> np.ndarray:
        if name is None:
            return np.ones(both.num_rows)
        return pc.fill_null(both[name], 0).to_numpy().astype(np.float64)

    is_t = pc.equal(both["arm"], arm).to_numpy(zero_copy_only=False)
    return cuped_compare(col(m.num), col(m.den), col(f"{m.num}_pre"),
                         col(f"{m.den}_pre" if m.den else None), is_t, m.den is not None,
                         alpha)


def cuped_compare(num: np.ndarray, den: np.ndarray, x_num: np.ndarray, x_den: np.ndarray,
                  is_t: np.ndarray, ratio: bool, alpha: float) -> dict[str, Any]:
    """The lift of sum(num)/sum(den) (ratio) or mean(num), adjusted by the same metric's
    pre-period per-unit value (0 for a unit without one): each arm's linearised values y,
    the pooled linearised covariate x, theta pooled over both arms, and each arm's estimate
    minus theta times its mean x. ``var_reduction``: 1 - var(adjusted lift) / var(raw)."""
    m = METRICS["ctr"] if ratio else METRICS["clicks_per_user"]  # only den matters here
    if (ratio and x_den.sum() <= 0) or is_t.all() or not is_t.any():
        return {"theta": None, "var_reduction": None, "note": "no pre-period covariate"}
    raw = stats.compare(estimate(num[is_t], den[is_t], m), estimate(num[~is_t], den[~is_t], m),
                        alpha)
    # y: each arm's own linearisation (its variance is the raw estimate's); x: pooled
    y = np.empty(num.size)
    y[is_t] = _lin(num[is_t], den[is_t], m)
    y[~is_t] = _lin(num[~is_t], den[~is_t], m)
    x = _lin(x_num, x_den, m) if ratio else x_num - x_num.mean()
    cu = stats.cuped(y, x)
    est = []
    for sel, base in ((is_t, raw.value), (~is_t, raw.control)):
        adj = y[sel] - cu.theta * x[sel]
        est.append(stats.Estimate(base - cu.theta * float(x[sel].mean()),
                                  float(adj.var(ddof=1) / sel.sum()), int(sel.sum())))
    cmp = stats.compare(est[0], est[1], alpha)
    raw_var = raw.se**2
    return {"theta": cu.theta,
            "var_reduction": 1 - cmp.se**2 / raw_var if raw_var > 0 else None,
            "abs_lift": cmp.abs_lift, "abs_ci": list(cmp.abs_ci), "rel_lift": cmp.rel_lift,
            "rel_ci": list(cmp.rel_ci), "p": cmp.p}


def _power(entry: dict, alpha: float) -> dict[str, Any]:
    """The lift this sample detects with 80 % power (two-sided at alpha), from its SE: the
    honest power statement after the fact (the power at the observed lift is not)."""
    se = entry["se"]
    k = stats.default_tau(1.0, alpha, 0.8)  # z_{1-alpha/2} + z_{0.8}
    mde = k * se if se is not None and math.isfinite(se) else math.nan
    c = entry["control"]
    return {"se": se, "mde_abs_80": mde, "mde_rel_80": mde / abs(c) if c else math.nan}


def _clustering(units: pa.Table, control: str) -> dict[str, Any]:
    """CTR of the control arm: delta-method variance over units vs the binomial over
    impressions (the design effect), i.e. why an impression-level z-test is wrong here."""
    num, den = _arrays(units, control, METRICS["ctr"])
    if den.sum() <= 0 or num.size < 2:
        return {}
    return {"ctr_design_effect": stats.design_effect(num, den),
            "impressions_per_unit": float(den.mean()),
            "note": "impressions of one user are correlated: CTR is tested over units by the "
                    "delta method; a binomial z-test over impressions would understate its "
                    "variance by this factor"}


def _sequential(events: Events, req: pa.Table, control: str, treatments: list[str],
                names: list[str], alpha: float, looks: int) -> dict[str, Any]:
    """The primary metrics (scenario "all") at ``looks`` equally spaced cut times of the test
    period: z, the group-sequential boundary at each look's information fraction (final
    variance / variance then), the mSPRT always-valid p and the naive p."""
    test_ts = req.filter(pc.equal(req["period"], "test"))["ts"].to_numpy()
    t0, t1 = float(test_ts.min()), float(test_ts.max())
    cuts = [t0 + (t1 - t0) * (k + 1) / looks for k in range(looks)]
    cuts[-1] = math.inf  # the last look is all the data, late feedback included
    per: dict[str, dict[str, list]] = {}
    for cut in cuts:
        units = unit_sums(request_table(events, None if math.isinf(cut) else cut), "test", None)
        for arm in treatments:
            for mname in names:
                m = METRICS[mname]
                if m.guardrail:
                    continue
                t_num, t_den = _arrays(units, arm, m)
                c_num, c_den = _arrays(units, control, m)
                d = per.setdefault(f"{arm}\0{mname}", {"diff": [], "var": [], "n": [], "w": []})
                if t_num.size < 2 or c_num.size < 2:
                    d["diff"].append(math.nan), d["var"].append(math.nan), d["n"].append(0)
                    d["w"].append(0.0)
                    continue
                cmp = stats.compare(estimate(t_num, t_den, m), estimate(c_num, c_den, m),
                                    alpha)
                d["diff"].append(cmp.abs_lift)
                d["var"].append(cmp.se**2)
                d["n"].append(int(t_num.size + c_num.size))
                # a ratio's information grows with its denominator (impressions, clicks,
                # requests); a per-unit sum's with the units
                d["w"].append(float(t_den.sum() + c_den.sum()) if m.den else float(
                    t_num.size + c_num.size))
    out: dict[str, Any] = {arm: {} for arm in treatments}
    for key, d in per.items():
        arm, mname = key.split("\0")
        # information as sample size: the denominator's total for a ratio, units for a
        # per-unit sum (whose variance grows with the period as each unit's sum grows). Not
        # 1 / variance: an early variance estimate from a few units can be far too small,
        # which would put the first look at full information and spend all of alpha there
        info = np.array(d["w"], np.float64)
        out[arm][mname] = sequential_path(np.array(d["diff"]), np.array(d["var"]), alpha, info)
        out[arm][mname]["n_units"] = d["n"]
    return {"looks": looks, "cut_ts": [c if math.isfinite(c) else t1 for c in cuts],
            "rule": "group-sequential, Lan-DeMets O'Brien-Fleming alpha spending over the "
                    "information fraction; mSPRT (normal mixture, tau = the effect the final "
                    "sample detects with 80 % power) and the naive fixed-horizon p at every "
                    "look (the peeking control) beside it",
            "arms": out}


@functools.lru_cache(maxsize=256)
def _gst(frac: tuple[float, ...], alpha: float) -> np.ndarray:
    """``stats.gst_bounds``, cached: equally spaced looks recur (the calibration runs
    thousands of experiments with the same schedule)."""
    out = stats.gst_bounds(np.array(frac), alpha)
    out.flags.writeable = False
    return out


def sequential_path(diff: np.ndarray, var: np.ndarray, alpha: float,
                    info: np.ndarray | None = None) -> dict[str, Any]:
    """One metric's sequential record over the looks (NaN looks, too early to estimate, are
    skipped by the boundaries and never cross). ``info``: the information at each look
    (default 1 / var); only its fraction of the last look's matters."""
    ok = np.isfinite(diff) & np.isfinite(var) & (var > 0)
    z = np.where(ok, diff / np.sqrt(np.where(ok, var, 1.0)), np.nan)
    bound = np.full(diff.size, np.nan)
    msprt_p = np.full(diff.size, np.nan)
    msprt_b = np.full(diff.size, np.nan)
    if ok.any():
        v = var[ok]
        raw = 1 / v if info is None else np.asarray(info, np.float64)[ok]
        # information never shrinks: a noisy variance estimate is held at its running max
        frac = np.minimum(np.maximum.accumulate(raw / raw[-1]), 1.0)
        # strictly increasing for the recursion: a look adding no information gets 1e-9
        frac = frac + np.arange(frac.size) * 1e-9
        bound[ok] = _gst(tuple(np.round(frac / frac[-1], 12)), alpha)
        tau = stats.default_tau(float(v[-1]), alpha)
        msprt_p[ok] = stats.msprt(diff[ok], v, tau)
        msprt_b[ok] = stats.msprt_bound(v, tau, alpha)
    naive = 2 * stats._st().norm.sf(np.abs(z))
    crossed = np.flatnonzero(np.nan_to_num(np.abs(z)) >= np.nan_to_num(bound, nan=np.inf))
    m_crossed = np.flatnonzero(np.nan_to_num(msprt_p, nan=1.0) <= alpha)
    n_crossed = np.flatnonzero(np.nan_to_num(naive, nan=1.0) < alpha)
    return {"z": z.tolist(), "gst_bound": bound.tolist(), "msprt_p": msprt_p.tolist(),
            "msprt_bound": msprt_b.tolist(), "naive_p": naive.tolist(),
            "gst_stop": int(crossed[0]) if crossed.size else None,
            "msprt_stop": int(m_crossed[0]) if m_crossed.size else None,
            "naive_stop": int(n_crossed[0]) if n_crossed.size else None}
