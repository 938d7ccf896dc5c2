"""The statistics of an A/B test, as small pure functions on numpy arrays of per-unit values.

Everything is computed over *units* (users), the unit of randomisation: a user's impressions
are not independent (one user clicks more than another), so a metric per impression such as
CTR is a ratio of two per-unit sums, and its variance comes from the delta method over units
(``ratio``), never from a binomial over impressions (``proportion_z`` would understate it:
``design_effect`` says by how much).

- ``srm_test``: sample-ratio mismatch, a chi-square test of the unit counts per arm against the
  configured shares (scipy.stats.chisquare).
- ``mean`` / ``ratio``: an arm's estimate and the variance of that estimate (delta method).
- ``compare``: treatment vs control: absolute lift (normal or Welch t interval) and relative
  lift (delta method on the ratio of the two estimates); ``welch`` is scipy's Welch t-test.
- ``proportion_z``: the two-sample z-test of proportions (statsmodels), for independent trials.
- ``bootstrap_ci``: percentile interval of the lift, resampling units within each arm.
- ``cuped``: the pre-period covariate adjustment (Deng et al. 2013): theta, adjusted values and
  the variance reduction.
- ``msprt``: the always-valid p-value of the mixture SPRT (Johari et al. 2017) and
  ``gst_bounds``: group-sequential boundaries with Lan-DeMets O'Brien-Fleming alpha spending:
  two ways to look at the data as it comes without inflating false positives.
- ``adjust``: Holm or Benjamini-Hochberg across metrics and scenarios (statsmodels).
- ``plan`` / ``power``: units per arm for a minimum detectable effect, and the power of a
  given size (statsmodels NormalIndPower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from shopmtl.deps import require

SRM_ALPHA = 0.001  # a sample-ratio mismatch below this p blocks every decision (module docs)


def _st() -> Any:
    """scipy.stats (the 'abtest' extra), imported where used: the core install has no scipy."""
    return require("scipy.stats", "abtest", "the A/B-test statistics")


def _sm(module: str) -> Any:
    """A statsmodels module (the 'abtest' extra)."""
    return require(f"statsmodels.{module}", "abtest", "the A/B-test statistics")


@dataclass(frozen=True)
class Estimate:
    """One arm's estimate of a metric and the variance of that estimate."""

    value: float
    var: float  # variance of ``value`` (not of a unit's value)
    n: int  # units
    df: float = math.inf  # degrees of freedom of ``value``'s variance (n - 1 for a mean)


@dataclass(frozen=True)
class Comparison:
    control: float
    value: float
    abs_lift: float
    abs_ci: tuple[float, float]
    rel_lift: float
    rel_ci: tuple[float, float]
    se: float  # standard error of abs_lift
    z: float  # abs_lift / se
    p: float


@dataclass(frozen=True)
class SRM:
    chi2: float
    p: float
    ok: bool


def srm_test(counts: np.ndarray, shares: np.ndarray, threshold: float = SRM_ALPHA) -> SRM:
    """Chi-square goodness of fit of the unit counts per arm to the configured shares. A
    mismatch means the assignment or the logging is broken (bots, a crashing arm, a redirect),
    so no comparison of the arms can be trusted: ``ok`` is False when p < ``threshold``."""
    st = _st()
    counts = np.asarray(counts, np.float64)
    shares = np.asarray(shares, np.float64)
    if counts.shape != shares.shape or counts.size < 2:
        raise ValueError("srm_test needs one count and one share per arm, at least two arms")
    res = st.chisquare(counts, f_exp=counts.sum() * shares / shares.sum())
    return SRM(float(res.statistic), float(res.pvalue), bool(res.pvalue >= threshold))


def mean(x: np.ndarray) -> Estimate:
    """The mean of per-unit values and its variance s^2 / n."""
    x = np.asarray(x, np.float64)
    n = x.size
    if n < 2:  # no variance (an arm absent from a scenario, or a single unit)
        return Estimate(float(x[0]) if n else math.nan, math.nan, n, max(n - 1, 0))
    return Estimate(float(x.mean()), float(x.var(ddof=1) / n), n, n - 1)


def linearize(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Per-unit influence values of the ratio sum(num) / sum(den): their mean's variance is the
    delta-method variance of the ratio (Deng et al. 2018), and they are what CUPED adjusts."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    r = num.sum() / den.sum()
    return (num - r * den) / den.mean()


def ratio(num: np.ndarray, den: np.ndarray) -> Estimate:
    """sum(num) / sum(den) over units, with the delta-method variance
    (var(num) - 2 r cov(num, den) + r^2 var(den)) / (n mean(den)^2)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if num.shape != den.shape:
        raise ValueError("ratio: numerator and denominator need one value per unit each")
    n = num.size
    if n < 2 or den.sum() <= 0:
        return Estimate(math.nan, math.nan, n)
    lin = linearize(num, den)
    return Estimate(float(num.sum() / den.sum()), float(lin.var(ddof=1) / n), n)


def _welch_df(t: Estimate, c: Estimate) -> float:
    """Welch-Satterthwaite degrees of freedom; inf (a normal interval) for ratio estimates."""
    if math.isinf(t.df) or math.isinf(c.df):
        return math.inf
    if not (t.df >= 1 and c.df >= 1):  # an arm with fewer than 2 units: no variance
        return math.nan
    denom = t.var**2 / t.df + c.var**2 / c.df
    return (t.var + c.var) ** 2 / denom if denom > 0 else math.inf


def compare(t: Estimate, c: Estimate, alpha: float = 0.05) -> Comparison:
    """Treatment ``t`` vs control ``c``: absolute lift with a Welch t (means) or normal (ratio)
    interval, and relative lift t/c - 1 with its delta-method interval
    var(t/c) = var_t / c^2 + t^2 var_c / c^4."""
    st = _st()
    lift = t.value - c.value
    se = math.sqrt(t.var + c.var) if t.var + c.var >= 0 else math.nan
    df = _welch_df(t, c)
    q = float(st.t.ppf(1 - alpha / 2, df)) if math.isfinite(df) else float(
        st.norm.ppf(1 - alpha / 2))
    z = lift / se if se > 0 else math.nan
    if not math.isfinite(z):
        p = math.nan
    else:
        p = float(2 * (st.t.sf(abs(z), df) if math.isfinite(df) else st.norm.sf(abs(z))))
    rel = t.value / c.value - 1 if c.value else math.nan
    rel_se = (math.sqrt(t.var / c.value**2 + t.value**2 * c.var / c.value**4)
              if c.value else math.nan)
    return Comparison(c.value, t.value, lift, (lift - q * se, lift + q * se), rel,
                      (rel - q * rel_se, rel + q * rel_se), se, z, p)


def welch(x_t: np.ndarray, x_c: np.ndarray, alpha: float = 0.05) -> Comparison:
    """Welch's t-test of two means (scipy.stats.ttest_ind, equal_var=False), with the intervals
    of ``compare`` (the same numbers: the p-value is scipy's)."""
    st = _st()
    cmp = compare(mean(x_t), mean(x_c), alpha)
    p = float(st.ttest_ind(x_t, x_c, equal_var=False).pvalue)
    return replace(cmp, p=p)


def proportion_z(k_t: int, n_t: int, k_c: int, n_c: int,
                 alpha: float = 0.05) -> tuple[float, tuple[float, float]]:
    """Two-sample z-test of proportions k/n (independent trials; statsmodels, Wald, unpooled):
    (p-value, interval of the difference). Valid for one trial per unit; for impressions
    clustered by user it is too narrow (``design_effect``)."""
    prop = _sm("stats.proportion")
    res = prop.test_proportions_2indep(k_t, n_t, k_c, n_c, method="wald", compare="diff")
    lo, hi = prop.confint_proportions_2indep(k_t, n_t, k_c, n_c, method="wald", compare="diff",
                                        alpha=alpha)
    return float(res.pvalue), (float(lo), float(hi))


def design_effect(num: np.ndarray, den: np.ndarray) -> float:
    """Variance of the ratio by the delta method over units / the binomial variance over
    trials r (1 - r) / sum(den): how much an impression-level test understates the variance."""
    est = ratio(num, den)
    r = est.value
    return est.var / (r * (1 - r) / float(np.sum(den)))


def bootstrap_ci(num_t: np.ndarray, den_t: np.ndarray, num_c: np.ndarray, den_c: np.ndarray,
                 alpha: float = 0.05, n_boot: int = 1000, seed: int = 0,
                 ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the absolute and relative lift of
    sum(num)/sum(den) (den = 1 for a mean), resampling units within each arm so that a unit's
    numerator and denominator stay together (scipy.stats.bootstrap resamples each sample on
    its own, which would break those pairs)."""
    rng = np.random.default_rng(seed)

    def draws(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
        n = num.size
        out = np.empty(n_boot)
        step = max(1, 2_000_000 // max(n, 1))  # resamples per chunk: ~16 MB of indices
        for i in range(0, n_boot, step):
            idx = rng.integers(0, n, (min(step, n_boot - i), n))
            out[i:i + idx.shape[0]] = num[idx].sum(1) / den[idx].sum(1)
        return out

    # a resample may have no denominator (no clicks for cvr) or a zero control: NaN, and
    # the percentiles below then say NaN rather than a number
    with np.errstate(divide="ignore", invalid="ignore"):
        rt, rc = draws(num_t, den_t), draws(num_c, den_c)
        rel = rt / rc - 1
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    d = rt - rc
    a = np.percentile(d, q) if np.isfinite(d).all() else (math.nan, math.nan)
    r = np.percentile(rel, q) if np.isfinite(rel).all() else (math.nan, math.nan)
    return {"abs_ci": (float(a[0]), float(a[1])), "rel_ci": (float(r[0]), float(r[1]))}


@dataclass(frozen=True)
class Cuped:
    theta: float
    var_reduction: float  # 1 - var(adjusted) / var(raw), pooled over arms
    adjusted: np.ndarray  # per-unit adjusted values, in the order given


def cuped(y: np.ndarray, x: np.ndarray) -> Cuped:
    """CUPED: y - theta (x - mean(x)) with theta = cov(y, x) / var(x), pooled over all units
    of both arms (so the adjustment is the same for every arm and cannot favour one). x is a
    pre-period covariate: unaffected by the treatment, so the adjusted lift stays unbiased and
    its variance shrinks by the squared correlation."""
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    vx = x.var(ddof=1)
    theta = float(np.cov(y, x, ddof=1)[0, 1] / vx) if vx > 0 else 0.0
    adj = y - theta * (x - x.mean())
    vy = y.var(ddof=1)
    return Cuped(theta, float(1 - adj.var(ddof=1) / vy) if vy > 0 else 0.0, adj)


def msprt_lr(diff: np.ndarray, var: np.ndarray, tau: float) -> np.ndarray:
    """The normal-mixture likelihood ratio of H1: effect ~ N(0, tau^2) vs H0: effect 0, for an
    estimated difference ``diff`` with variance ``var``:
    sqrt(var / (var + tau^2)) exp(tau^2 diff^2 / (2 var (var + tau^2)))."""
    diff, var = np.asarray(diff, np.float64), np.asarray(var, np.float64)
    s = var + tau**2
    return np.sqrt(var / s) * np.exp(tau**2 * diff**2 / (2 * var * s))


def msprt(diff: np.ndarray, var: np.ndarray, tau: float) -> np.ndarray:
    """Always-valid p-values at each look (Johari et al. 2017): running min of 1 / LR. Stop
    and reject the first time p <= alpha: over any number of looks the false-positive rate
    stays <= alpha (it is conservative: a stopping rule valid at every moment). ``tau`` is the
    spread of effects the test is tuned to; ``default_tau`` sets it to the effect the final
    sample detects with 80 % power, so the test is most powerful near the planned MDE."""
    lr = msprt_lr(diff, var, tau)
    return np.minimum.accumulate(np.minimum(1.0, 1.0 / lr))


def msprt_bound(var: np.ndarray, tau: float, alpha: float = 0.05) -> np.ndarray:
    """|z| at which the mSPRT rejects: LR >= 1/alpha solved for diff / sqrt(var)."""
    var = np.asarray(var, np.float64)
    s = var + tau**2
    return np.sqrt(s / tau**2 * (2 * math.log(1 / alpha) + np.log(s / var)))


def default_tau(final_var: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The mixture's spread: the effect the final sample detects with ``power`` (two-sided)."""
    st = _st()
    return float((st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)) * math.sqrt(final_var))


def obf_spending(t: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Lan-DeMets O'Brien-Fleming-type alpha spending: 2 - 2 Phi(z_{alpha/2} / sqrt(t))."""
    st = _st()
    t = np.asarray(t, np.float64)
    return 2 - 2 * st.norm.cdf(st.norm.ppf(1 - alpha / 2) / np.sqrt(t))


def _crossing(c: float, tk: float, sd: float, s: np.ndarray | None,
              dens: np.ndarray | None) -> float:
    """P(no earlier crossing, |Z_k| >= c): the sub-density ``dens`` of S on the grid ``s`` at
    the previous look, moved on by an independent N(0, sd^2) increment (None: the first look)."""
    st = _st()
    if s is None or dens is None:
        return float(2 * st.norm.sf(c))
    b = c * math.sqrt(tk)
    tail = st.norm.sf((b - s) / sd) + st.norm.cdf((-b - s) / sd)
    return float(np.trapezoid(dens * tail, s))


def gst_bounds(t: np.ndarray, alpha: float = 0.05, grid: int = 801) -> np.ndarray:
    """Two-sided |z| boundaries of a group-sequential test at information fractions ``t``
    (increasing, last 1): the alpha each look may spend is ``obf_spending``'s increment, and the
    boundary c_k solves P(no earlier crossing, |Z_k| >= c_k) = that increment under H0, by the
    recursive numerical integration of Armitage, McPherson and Rowe (1969) on the score
    S_k = Z_k sqrt(t_k), a Brownian motion in information time."""
    st = _st()
    brentq = require("scipy.optimize", "abtest", "the A/B-test statistics").brentq
    t = np.asarray(t, np.float64)
    if t.ndim != 1 or t.size == 0 or np.any(np.diff(t) <= 0) or t[0] <= 0 or t[-1] > 1 + 1e-9:
        raise ValueError("gst_bounds: information fractions must increase within (0, 1]")
    spend = np.diff(np.concatenate([[0.0], obf_spending(t, alpha)]))
    bounds = np.empty(t.size)
    s: np.ndarray | None = None  # grid of S over the continuation region
    dens: np.ndarray | None = None  # the sub-density of S there (paths not yet stopped)
    prev_t = 0.0
    for k, tk in enumerate(t):
        sd = math.sqrt(tk - prev_t)
        if spend[k] <= 1e-15:
            bounds[k] = 40.0  # nothing to spend: a boundary never crossed
        else:
            bounds[k] = brentq(lambda c, k=k, tk=tk, sd=sd, s=s, dens=dens:
                               _crossing(c, tk, sd, s, dens) - spend[k], 0.1, 40.0, xtol=1e-10)
        b = bounds[k] * math.sqrt(tk)
        s_new = np.linspace(-b, b, grid)
        if s is None or dens is None:
            dens = st.norm.pdf(s_new / sd) / sd
        else:
            kern = st.norm.pdf((s_new[:, None] - s[None, :]) / sd) / sd
            dens = np.trapezoid(kern * dens[None, :], s, axis=1)
        s, prev_t = s_new, tk
    return bounds


def adjust(p: np.ndarray, method: Literal["holm", "bh"] = "holm") -> np.ndarray:
    """Adjusted p-values across a family (statsmodels multipletests): Holm controls the
    family-wise error, Benjamini-Hochberg the false discovery rate. NaN p-values are left out
    of the family and stay NaN."""
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    if ok.any():
        name = {"holm": "holm", "bh": "fdr_bh"}[method]
        out[ok] = _sm("stats.multitest").multipletests(p[ok], method=name)[1]
    return out


@dataclass(frozen=True)
class Plan:
    n_control: int  # units in the control arm
    n_treatment: int  # units in the treatment arm
    effect_size: float  # standardised: absolute MDE / sd (Cohen's d, or h for a rate)
    power: float  # the power the rounded-up sizes achieve


def _effect(mde: float, baseline_rate: float | None, mean: float | None, sd: float | None,
            relative: bool) -> float:
    if baseline_rate is not None:
        if not 0 < baseline_rate < 1:
            raise ValueError(f"baseline rate must lie in (0, 1), got {baseline_rate}")
        target = baseline_rate * (1 + mde) if relative else baseline_rate + mde
        if not 0 < target < 1:
            raise ValueError(f"baseline rate + MDE = {target:.4g} is not a rate in (0, 1)")
        return abs(float(_sm("stats.proportion").proportion_effectsize(target, baseline_rate)))
    if mean is None or sd is None or sd <= 0:
        raise ValueError("plan needs --baseline-rate, or --baseline-mean with a positive --sd")
    return abs(mde * mean if relative else mde) / sd


def plan(mde: float, *, baseline_rate: float | None = None, mean: float | None = None,
         sd: float | None = None, relative: bool = False, alpha: float = 0.05,
         power: float = 0.8, share: float = 0.5) -> Plan:
    """Units per arm to detect ``mde`` (absolute, or relative to the baseline) with a two-sided
    test at ``alpha`` and the given ``power``; ``share`` is the treatment's share of the
    experiment's units (control gets the rest). A rate uses Cohen's h (the arcsine transform,
    statsmodels proportion_effectsize), a mean mde / sd."""
    if mde == 0:
        raise ValueError("the minimum detectable effect must not be 0")
    if not 0 < share < 1:
        raise ValueError(f"--share must lie in (0, 1), got {share}")
    es = _effect(mde, baseline_rate, mean, sd, relative)
    ratio_tc = share / (1 - share)  # statsmodels' ratio = nobs2 / nobs1; nobs1 = control
    n_c = _sm("stats.power").NormalIndPower().solve_power(effect_size=es, alpha=alpha, power=power,
                                       ratio=ratio_tc, alternative="two-sided")
    n_c = math.ceil(n_c)
    n_t = math.ceil(n_c * ratio_tc)
    return Plan(n_c, n_t, es, achieved_power(es, n_c, n_t, alpha))


def achieved_power(effect_size: float, n_control: int, n_treatment: int,
                   alpha: float = 0.05) -> float:
    """Power of the two-sided z-test for a standardised effect with these arm sizes."""
    return float(_sm("stats.power").NormalIndPower().power(effect_size=effect_size, nobs1=n_control,
                                        ratio=n_treatment / n_control, alpha=alpha,
                                        alternative="two-sided"))
