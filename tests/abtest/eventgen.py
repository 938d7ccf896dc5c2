"""A hand-built experiment written through the real EventStore: heterogeneous users (each its
own click rate), Poisson requests per user in a pre and a test period, K items shown per
request, Bernoulli clicks, conversions and prices; a planted relative CTR lift, latency shift
and error rate in the treatment, and an optional sample-ratio mismatch (treatment users
dropped). Seeded: the same arguments write the same events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shopmtl.abtest.assign import assign, unit_of
from shopmtl.abtest.events import EventStore, Exposure, Feedback

K = 4  # items shown per request
SCENARIOS = ("home_feed", "search")


@dataclass(frozen=True)
class Spec:
    users: int = 2000
    ctr_lift: float = 0.0  # relative lift of every treatment user's click probability
    latency_shift: float = 0.0  # ms added to the treatment's latency
    error_rate: float = 0.0  # the treatment's share of status-500 requests (control: 0.002)
    drop_treatment: float = 0.0  # share of treatment users whose events are lost (SRM)
    latency: bool = True  # False: latency_ms NULL, as in a pure simulation
    seed: int = 0


def write(path: Path, spec: Spec) -> Path:
    rng = np.random.default_rng(spec.seed)
    arms = [("control", 0.5), ("treatment", 0.5)]
    exposures: list[Exposure] = []
    feedback: list[Feedback] = []
    rid = 0
    for u in range(spec.users):
        user = f"user{u}"
        arm = assign(user, "exp", arms)
        if arm == "treatment" and rng.random() < spec.drop_treatment:
            continue
        unit = unit_of(user, "exp")
        p = rng.beta(2, 30)  # the user's own click probability (mean 0.0625)
        for period, t0, n in (("pre", 0.0, rng.poisson(3)), ("test", 1000.0, 1 + rng.poisson(3))):
            for _ in range(n):
                rid += 1
                ts = t0 + rng.uniform(0, 1000)
                treat = period == "test" and arm == "treatment"
                q = min(p * (1 + spec.ctr_lift), 1.0) if treat else p
                err = rng.random() < (spec.error_rate if treat else 0.002)
                lat = (12.0 + rng.exponential(3.0) + (spec.latency_shift if treat else 0.0)
                       if spec.latency else None)
                shown = [str(i) for i in rng.choice(500, K, replace=False)]
                exposures.append(Exposure(f"r{rid}", ts, "exp", period,
                                          arm if period == "test" else "control", unit,
                                          SCENARIOS[int(rng.integers(2))], json.dumps(shown),
                                          lat, 500 if err else 200))
                for pos in np.flatnonzero(rng.random(K) < q):
                    feedback.append(Feedback(f"r{rid}", ts + 1, "click", shown[pos], int(pos)))
                    if rng.random() < 0.1:
                        feedback.append(Feedback(f"r{rid}", ts + 2, "conversion", shown[pos],
                                                 int(pos), float(rng.uniform(5, 50))))
    with EventStore(path) as store:
        store.add_exposures(exposures)
        store.add_feedback(feedback)
        store.set_meta("arms", dict(arms))
        store.set_meta("control", "control")
        store.set_meta("experiment", "exp")
    return path
