"""``shopmtl abtest run``: a strict config, and a tiny run end to end (trained models of a small
world reused, a short experiment, the analysis, OPE and the report) whose truth and estimates
line up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from shopmtl.abtest.run import build_policies, load_abtest_config, world_of
from shopmtl.abtest.shop import Shop, truth
from shopmtl.config import ConfigError
from tests.helpers import cli

EXAMPLE = Path(__file__).parents[2] / "examples" / "abtest.yaml"


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(changes)
    p = tmp_path / "ab.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_the_example_config_loads_and_bad_keys_are_refused(tmp_path: Path) -> None:
    cfg = load_abtest_config(EXAMPLE)
    assert [a.name for a in cfg.arms] == ["single_task", "multi_task", "popularity"]
    assert cfg.control == "single_task" and cfg.ope is not None
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sample_size'\]"):
        load_abtest_config(_write(tmp_path, sample_size=3))
    with pytest.raises(ConfigError, match="control 'treatment' is not an arm"):
        load_abtest_config(_write(tmp_path, control="treatment"))
    with pytest.raises(ConfigError, match=r"ope\.target: the target arm needs a model"):
        load_abtest_config(EXAMPLE, ["ope.target=popularity"])
    with pytest.raises(ConfigError, match=r"arms\[0\]\.policy"):
        load_abtest_config(EXAMPLE, ["arms=[{name: a, policy: oracle, share: 1.0}]"])
    with pytest.raises(ConfigError, match="test_requests: must be >= 1"):
        load_abtest_config(EXAMPLE, ["test_requests=0"])
    # the command: one line, exit 2, nothing written
    proc = cli("abtest", "run", str(_write(tmp_path, sample_size=3)), "--out",
               str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "unknown key(s) ['sample_size']" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "events.db").exists()
    assert "No such command" in cli("abtest", "nonsense").stderr


def test_a_tiny_run_end_to_end(tmp_path: Path, ab_models: Path) -> None:
    out = tmp_path / "run"
    sets = [f"models={ab_models}", "pre_requests=1000", "test_requests=3000",
            "truth_requests=500", "ope.requests=150"]
    # the short form: `shopmtl abtest CONFIG.yaml` is `shopmtl abtest run CONFIG.yaml`
    proc = cli("abtest", str(EXAMPLE), "--out", str(out),
               *[a for s in sets for a in ("--set", s)], check=True)
    for name in ("events.db", "truth.json", "ope.json", "report.html", "results.json",
                 "abtest.json", "abtest.yaml", "command.txt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "abtest.json").read_text())
    rows = summary["comparison"]
    # every (treatment arm, metric, scenario) has a row with the truth beside the estimate
    assert {(r["arm"], r["metric"]) for r in rows} == {
        (a, m) for a in ("multi_task", "popularity")
        for m in ("ctr", "cvr", "gmv", "gmv_per_user", "clicks_per_user")}
    assert {r["scenario"] for r in rows} == {"all", "home_feed", "search", "ad_slot",
                                             "product_page"}
    for r in rows:
        lo, hi = r["abs_ci"]
        assert lo <= r["abs_lift"] <= hi and r["covers"] == (lo <= r["true_abs_lift"] <= hi)
    cov = summary["coverage"]
    assert cov["intervals"] == len(rows) and cov["cover_truth"] == sum(r["covers"] for r in rows)
    assert f"{cov['cover_truth']} of {cov['intervals']} intervals hold the true lift" in proc.stdout
    assert summary["counts"]["pre"] == {"single_task": 1000}
    assert sum(summary["counts"]["test"].values()) == 3000
    # the truth written is the shop's truth of these policies (the same seed: the same numbers)
    cfg = load_abtest_config(EXAMPLE, sets)
    shop = Shop(world_of(ab_models), cfg.shop.slots, tuple(cfg.shop.candidates))
    again = truth(shop, build_policies(cfg, ab_models), "single_task", 500, seed=10_000)
    written = json.loads((out / "truth.json").read_text())
    for arm in again:
        for metric in ("ctr", "cvr", "gmv"):
            assert written[arm][metric]["all"]["value"] == pytest.approx(
                again[arm][metric]["all"]["value"], rel=1e-9)
    # OPE: every estimator with an interval, beside the target's online truth
    o = json.loads((out / "ope.json").read_text())["multi_task"]
    for metric in ("ctr", "gmv"):
        assert o[metric]["online"] == pytest.approx(written["multi_task"][metric]["all"]["value"])
        for e in ("ips", "snips", "dr"):
            lo, hi = o[metric][e]["ci"]
            assert lo <= o[metric][e]["estimate"] <= hi and np.isfinite([lo, hi]).all()
    # the report carries the truth
    results = json.loads((out / "results.json").read_text())
    assert results["truth"]["multi_task"]["ctr"]["all"]["value"] == pytest.approx(
        written["multi_task"]["ctr"]["all"]["value"])
    # a second run into the same folder is refused, in one line (exit 2)
    again_proc = cli("abtest", "run", str(EXAMPLE), "--out", str(out),
                     *[a for s in sets for a in ("--set", s)])
    assert again_proc.returncode == 2 and "events.db exists" in again_proc.stderr
    assert "Traceback" not in again_proc.stderr
