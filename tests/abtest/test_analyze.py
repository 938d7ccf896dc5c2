"""shopmtl.abtest.analyze and ``shopmtl abtest analyze / plan`` on hand-built event stores: the
per-unit sums by hand, a planted lift and guardrail harm detected, an SRM that blocks every
verdict, and bad inputs as one clear line."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from shopmtl.abtest.analyze import AnalysisError, ArgumentError, analyze, request_table, unit_sums
from shopmtl.abtest.events import EventStore, Exposure, Feedback, read_events
from tests.abtest import eventgen
from tests.helpers import assert_one_error_line


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """CTR +40 %, latency +3 ms and 5 % errors in the treatment."""
    path = tmp_path_factory.mktemp("ab") / "events.db"
    eventgen.write(path, eventgen.Spec(users=2500, ctr_lift=0.4, latency_shift=3.0,
                                       error_rate=0.05, seed=1))
    return analyze(read_events(path), n_boot=200)


def test_per_unit_sums_by_hand(tmp_path: Path):
    with EventStore(tmp_path / "e.db") as store:
        store.add_exposures([
            Exposure("r1", 1.0, "x", "test", "a", "u1", "s1", '["1","2","3"]', 10.0),
            Exposure("r2", 2.0, "x", "test", "a", "u1", "s2", '["4"]', 30.0, 500),
            Exposure("r3", 3.0, "x", "test", "b", "u2", "s1", "[]"),
            Exposure("r0", 0.5, "x", "pre", "a", "u1", "s1", '["9","8"]'),
        ])
        store.add_feedback([Feedback("r1", 1.1, "click", "2", 1),
                            Feedback("r1", 1.2, "click", "3", 2),
                            Feedback("r1", 1.3, "conversion", "3", 2, 19.5),
                            Feedback("r2", 9.0, "click", "4", 0)])
    req = request_table(read_events(tmp_path / "e.db"))
    u = unit_sums(req, "test", None).sort_by("unit").to_pylist()
    assert u[0] == {"arm": "a", "unit": "u1", "requests": 2, "impressions": 4, "clicks": 3,
                    "conversions": 1, "gmv": 19.5, "errors": 1, "latency_sum": 40.0,
                    "latency_n": 2}
    assert u[1]["impressions"] == 0 and u[1]["latency_n"] == 0 and u[1]["clicks"] == 0
    assert unit_sums(req, "test", "s2", by=("unit",)).to_pylist()[0]["clicks"] == 1
    assert unit_sums(req, "pre", None, by=("unit",)).to_pylist()[0]["impressions"] == 2
    # feedback after a cut time is not seen at that look
    early = unit_sums(request_table(read_events(tmp_path / "e.db"), until=5.0), "test", None)
    assert early.sort_by("unit").to_pylist()[0]["clicks"] == 2


def test_planted_lift_and_guardrails_are_detected(planted: dict):
    r = planted
    json.dumps(r, allow_nan=False)  # JSON-safe as promised
    assert r["srm"]["ok"] and r["control"] == "control" and r["scenarios"] == [
        "all", "home_feed", "search"]
    m = r["arms"]["treatment"]["metrics"]
    ctr = m["ctr"]["all"]
    assert ctr["decision"] == "better" and ctr["p_adj"] < 1e-4
    assert ctr["rel_ci"][0] < 0.4 < ctr["rel_ci"][1]  # the planted lift (p x 1.4 < 1 here)
    assert ctr["value"] - ctr["control"] == pytest.approx(ctr["abs_lift"])
    assert ctr["boot_abs_ci"][0] < ctr["abs_lift"] < ctr["boot_abs_ci"][1]
    assert m["clicks_per_user"]["all"]["decision"] == "better"
    assert m["latency_ms"]["all"]["decision"] == "worse"
    assert m["latency_ms"]["all"]["abs_lift"] == pytest.approx(3.0, abs=0.5)
    assert m["error_rate"]["all"]["decision"] == "worse"
    assert m["error_rate"]["all"]["abs_lift"] == pytest.approx(0.048, abs=0.015)
    for metric, by in m.items():  # every metric x scenario, contract fields
        assert set(by) == {"all", "home_feed", "search"}, metric
        for e in by.values():
            assert {"control", "value", "abs_lift", "abs_ci", "rel_lift", "rel_ci", "p",
                    "p_adj", "decision", "n_units", "n_requests"} <= set(e)
            assert e["p_adj"] is None or e["p_adj"] >= e["p"]
    seq = r["sequential"]["arms"]["treatment"]["ctr"]
    assert len(seq["z"]) == 10 and seq["gst_stop"] is not None
    assert seq["msprt_p"] == sorted(seq["msprt_p"], reverse=True)  # never rises
    cu = r["cuped"]["treatment"]["clicks_per_user"]["all"]
    assert cu["var_reduction"] > 0.02 and cu["theta"] > 0  # pre clicks predict test clicks
    assert r["power"]["treatment"]["ctr"]["mde_rel_80"] < 0.4
    assert r["clustering"]["ctr_design_effect"] > 1.2


def test_aa_finds_nothing_and_sample_ratio_mismatch_blocks(tmp_path: Path):
    aa = analyze(read_events(eventgen.write(tmp_path / "aa.db",
                                            eventgen.Spec(users=1500, seed=2))), n_boot=0)
    primary = [e["decision"] for m, by in aa["arms"]["treatment"]["metrics"].items()
               for e in by.values() if not aa["metrics"][m]["guardrail"]]
    assert set(primary) == {"no difference"}
    srm = analyze(read_events(eventgen.write(
        tmp_path / "srm.db", eventgen.Spec(users=1500, ctr_lift=0.4, drop_treatment=0.25,
                                           latency=False, seed=3))), n_boot=0)
    assert not srm["srm"]["ok"] and srm["srm"]["p"] < 0.001
    assert srm["srm"]["counts"]["treatment"] < 0.85 * srm["srm"]["counts"]["control"]
    decisions = {e["decision"] for by in srm["arms"]["treatment"]["metrics"].values()
                 for e in by.values()}
    assert decisions == {"blocked (SRM)"}
    assert srm["arms"]["treatment"]["metrics"]["ctr"]["all"]["p"] < 1e-4  # lift still shown
    assert "latency_ms" not in srm["metrics"] and any("latency" in n for n in srm["notes"])


def _store(path: Path, rows: list[Exposure], meta: dict | None = None) -> Path:
    with EventStore(path) as store:
        store.add_exposures(rows)
        for k, v in (meta or {}).items():
            store.set_meta(k, v)
    return path


def test_bad_inputs_are_clear_errors(tmp_path: Path):
    one = _store(tmp_path / "one.db", [Exposure(f"r{i}", i, "x", "test", "a", f"u{i}", "s",
                                                "[]") for i in range(5)])
    with pytest.raises(AnalysisError, match="only one arm"):
        analyze(read_events(one), control="a")
    pre = _store(tmp_path / "pre.db", [Exposure("r1", 1, "x", "pre", "a", "u1", "s", "[]")])
    with pytest.raises(AnalysisError, match="no test-period exposures"):
        analyze(read_events(pre))
    two = _store(tmp_path / "two.db", [Exposure(f"r{i}", i, "x", "test", "ab"[i % 2], f"u{i}",
                                                "s", "[]") for i in range(6)],
                 {"arms": {"a": 0.5, "c": 0.5}})
    with pytest.raises(ArgumentError, match="unknown control arm 'zz'"):
        analyze(read_events(two), control="zz")
    with pytest.raises(ArgumentError, match="no control arm"):
        analyze(read_events(two))
    with pytest.raises(AnalysisError, match=r"arms \['b'\] are in the events but not in meta"):
        analyze(read_events(two), control="a")
    with pytest.raises(ArgumentError, match="alpha"):
        analyze(read_events(two), control="a", alpha=0.7)
    with pytest.raises(ArgumentError, match="holm or bh"):
        analyze(read_events(two), control="a", correction="bonferroni")


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``shopmtl abtest ARGS`` in process (typer's runner), as a finished process."""
    from typer.testing import CliRunner

    from shopmtl.cli import app

    res = CliRunner().invoke(app, ["abtest", *args])
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def test_cli_analyze_plan_and_their_errors(tmp_path: Path):
    events = eventgen.write(tmp_path / "e.db", eventgen.Spec(users=600, ctr_lift=0.4, seed=4))
    ok = _cli("analyze", str(events), "--out", str(tmp_path / "out"), "--looks", "4",
              "--n-boot", "50")
    assert ok.returncode == 0, ok.stderr
    assert "SRM: ok" in ok.stdout and "treatment vs control" in ok.stdout
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(doc["sequential"]["arms"]["treatment"]["ctr"]["z"]) == 4
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000
    plan = _cli("plan", "--mde", "0.01", "--baseline-rate", "0.05", "--units", "16286")
    assert plan.returncode == 0 and "control:   8143 units" in plan.stdout
    assert "power with 16286 units (8143 control, 8143 treatment): 0.800" in plan.stdout
    assert_one_error_line(_cli("plan", "--mde", "0.01", "--baseline-rate", "0.05", "--units",
                               "3"), "fewer than 2 units", code=2)
    assert_one_error_line(_cli("analyze", str(tmp_path / "missing.db")), "no event store",
                          code=1)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 200)
    assert_one_error_line(_cli("analyze", str(bad)), "not a shopmtl event store", code=1)
    assert_one_error_line(_cli("analyze", str(events), "--out", str(tmp_path / "o2"),
                               "--control", "nope"), "unknown control arm 'nope'", code=2)
    assert_one_error_line(_cli("plan", "--mde", "0.01"), "--baseline-rate", code=2)


def test_a_missing_abtest_extra_is_one_line(tmp_path: Path):
    from tests.test_extras import cli_without

    proc = cli_without(["scipy", "statsmodels"], "abtest", "plan", "--mde", "0.01",
                       "--baseline-rate", "0.05")
    assert_one_error_line(proc, "is not installed",
                          "pip install 'shopmtl[abtest]'", code=1)


def test_unit_sums_match_numpy_on_generated_events(tmp_path: Path):
    """The pyarrow aggregation against a plain-Python recount of the same store."""
    events = read_events(eventgen.write(tmp_path / "e.db", eventgen.Spec(users=200, seed=5)))
    u = unit_sums(request_table(events), "test", None)
    ex = events.exposures.to_pylist()
    fb = events.feedback.to_pylist()
    test = {e["request_id"]: e for e in ex if e["period"] == "test"}
    clicks: dict[str, int] = {}
    for f in fb:
        if f["kind"] == "click" and f["request_id"] in test:
            unit = test[f["request_id"]]["unit"]
            clicks[unit] = clicks.get(unit, 0) + 1
    imps: dict[str, int] = {}
    for e in test.values():
        imps[e["unit"]] = imps.get(e["unit"], 0) + len(json.loads(e["shown"]))
    got = dict(zip(u["unit"].to_pylist(), u["clicks"].to_pylist(), strict=True))
    assert got == {k: clicks.get(k, 0) for k in got} and set(got) == set(imps)
    got_imp = dict(zip(u["unit"].to_pylist(), u["impressions"].to_pylist(), strict=True))
    assert got_imp == imps
    assert np.sum(u["requests"].to_numpy()) == len(test)


def test_an_arm_absent_from_a_scenario_and_no_pre_period(tmp_path: Path):
    """Scenario s2 has control users only, and nothing ran before the test: the cells that
    cannot be estimated are None with "no difference", CUPED says why, nothing warns."""
    rows = [Exposure(f"r{i}", float(i), "x", "test", "ab"[i % 2], f"u{i % 40}",
                     "s1" if i % 2 or i < 100 else "s2", '["1","2"]') for i in range(200)]
    path = _store(tmp_path / "e.db", rows, {"arms": {"a": 0.5, "b": 0.5}, "control": "a"})
    with EventStore(path) as store:
        store.add_feedback([Feedback(f"r{i}", i + 0.5, "click", "1", 0)
                            for i in range(0, 200, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r = analyze(read_events(path), n_boot=50)
    ctr = r["arms"]["b"]["metrics"]["ctr"]
    assert ctr["s2"]["value"] is None and ctr["s2"]["decision"] == "no difference"
    assert ctr["all"]["n_units"] == 40 and ctr["all"]["p"] > 0.05
    assert r["cuped"]["b"]["ctr"]["all"]["note"] == "no pre-period covariate"
    json.dumps(r, allow_nan=False)
