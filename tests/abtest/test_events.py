"""The event store and the assignment: round trip, stable and independent arms, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shopmtl.abtest.assign import assign, bucket, check_arms, unit_of
from shopmtl.abtest.events import EventStore, Exposure, Feedback, read_events


def test_events_round_trip(tmp_path):
    path = tmp_path / "events.db"
    with EventStore(path) as store:
        store.add_exposures([
            Exposure("r1", 1.0, "exp", "test", "a", unit_of("u1", "s"), "search", '["7","3"]',
                     12.5, 200),
            Exposure("r2", 2.0, "exp", "pre", "a", unit_of("u2", "s"), "home_feed", "[]"),
        ])
        store.add_feedback([Feedback("r1", 1.2, "click", "3", 1),
                            Feedback("r1", 1.4, "conversion", "3", 1, 19.99)])
        store.set_meta("dropped", {"exposures": 0})
    ev = read_events(path)
    assert ev.exposures.num_rows == 2 and ev.feedback.num_rows == 2
    assert ev.exposures.column("latency_ms").to_pylist() == [12.5, None]
    assert json.loads(ev.exposures.column("shown")[0].as_py()) == ["7", "3"]
    assert ev.feedback.column("value").to_pylist() == [0.0, 19.99]
    assert ev.meta == {"dropped": {"exposures": 0}}
    # the raw user id is never stored
    assert "u1" not in path.read_bytes().decode("latin-1")


def test_bad_events_are_refused(tmp_path):
    with EventStore(tmp_path / "e.db") as store:
        with pytest.raises(Exception, match="CHECK constraint"):
            store.add_feedback([Feedback("r1", 1.0, "purchase", "3", 0)])
        store.add_exposures([Exposure("r1", 1.0, "e", "test", "a", "u", "s", "[]")])
        with pytest.raises(Exception, match="UNIQUE"):
            store.add_exposures([Exposure("r1", 1.0, "e", "test", "a", "u", "s", "[]")])
    assert read_events(tmp_path / "e.db").exposures.num_rows == 1
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a shopmtl event store"):
        read_events(bad)
    with pytest.raises(FileNotFoundError, match="no event store"):
        read_events(tmp_path / "missing.db")


def test_assignment_is_stable_balanced_and_independent():
    arms = [("control", 0.5), ("treatment", 0.5)]
    users = [f"user{i}" for i in range(20_000)]
    a1 = [assign(u, "exp1", arms) for u in users]
    assert a1 == [assign(u, "exp1", arms) for u in users]  # stable
    share = np.mean([a == "treatment" for a in a1])
    assert abs(share - 0.5) < 0.015  # 4.2 standard errors
    a2 = [assign(u, "exp2", arms) for u in users]
    # independent across experiments: the 2x2 table is balanced
    both = np.mean([x == "treatment" and y == "treatment" for x, y in zip(a1, a2, strict=True)])
    assert abs(both - 0.25) < 0.015
    # uneven shares
    a3 = [assign(u, "exp3", [("a", 0.9), ("b", 0.1)]) for u in users]
    assert abs(np.mean([a == "b" for a in a3]) - 0.1) < 0.01
    assert 0 <= bucket("x", "s") < 1 and unit_of("x", "s") != unit_of("x", "t")


@pytest.mark.parametrize("arms, match", [
    ([("a", 1.0)], "at least two"),
    ([("a", 0.5), ("a", 0.5)], "unique"),
    ([("a", 0.5), ("b", 0.6)], "sum to 1"),
    ([("a", 0.0), ("b", 1.0)], r"\(0, 1\]"),
])
def test_bad_arms(arms, match):
    with pytest.raises(ValueError, match=match):
        check_arms(arms)
