"""`shopmtl compare` end to end on a tiny synthetic world: the structure of compare.json and
every summary recomputed by hand from the per-seed AUCs it stores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shopmtl.cli import app

TINY = """\
data:
  synthetic: {rows: 20000, n_users: 1500, n_items: 400, seed: 3}
model:
  name: shared_bottom
  args: {embed_dim: 8, bottom: [32], tower: [16]}
train:
  epochs: 1
  batch_size: 1024
  threads: 1
  early_stopping: {metric: valid.click.all.auc}
  # ~16 steps: the single-task conversion baselines are at chance by design (the table's
  # arithmetic is under test), so the label-prior guard is off
  prior_guard: false
"""
MODELS = ["shared_bottom", "mmoe"]
WEIGHTINGS = ["equal", "dwa"]
TASKS = ["click", "conversion", "ad_click"]
SCENARIOS = ["home_feed", "search", "ad_slot", "product_page"]


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    v = np.array([_nan(x) for x in values], float)
    v = v[np.isfinite(v)]
    return float(np.mean(v)), float(np.std(v, ddof=1))


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("compare")
    (root / "tiny.yaml").write_text(TINY)
    args = ["compare", str(root / "tiny.yaml"), "--seeds", "2", "--models", ",".join(MODELS),
            "--weightings", ",".join(WEIGHTINGS), "--out", str(root / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return root, json.loads((root / "out" / "compare.json").read_text()), res.output


def test_structure(compared):
    root, result, output = compared
    assert result["seeds"] == [0, 1] and result["tasks"] == TASKS
    assert result["scenarios"] == SCENARIOS
    assert result["world"]["rows"] == 20000 and result["test_split"] == "test"
    assert "--seeds 2" in result["command"]
    names = [f"{m}+{w}" for m in MODELS for w in WEIGHTINGS]
    assert list(result["combinations"]) == names
    single = result["single_task"]
    assert single["model"] == "shared_bottom"
    # every task x scenario cell where the task exists, plus `all`; two AUCs (one per seed)
    expected_cells = {"click": ["all", *SCENARIOS], "conversion": ["all", *SCENARIOS],
                      "ad_click": ["all", "ad_slot"]}
    for block in [single, *result["combinations"].values()]:
        assert {t: list(per) for t, per in block["auc"].items()} == expected_cells
        for per in block["auc"].values():
            assert all(len(v) == 2 for v in per.values())
    assert 0.5 < result["oracle"]["click"]["all"] < 1.0  # synthetic: the oracle is beside
    assert result["oracle"]["ad_click"]["all"] == result["oracle"]["ad_click"]["ad_slot"]
    mmoe = result["combinations"]["mmoe+dwa"]
    assert mmoe["model_args"]["n_experts"] == 4 and mmoe["model_args"]["embed_dim"] == 8
    assert mmoe["weighting"] == "dwa"
    out = root / "out"
    md = (out / "compare.md").read_text()
    assert "![delta AUC to single-task](compare.png)" in md and "mmoe+dwa" in md
    assert (out / "compare.png").stat().st_size > 1000
    for name in names:
        assert name in output and "Delta_m" in output


def test_summaries_match_a_hand_computation(compared):
    _, result, _ = compared
    single = result["single_task"]
    for name, c in result["combinations"].items():
        rel_by_seed: list[list[float]] = [[], []]
        for t in TASKS:
            for s, vals in c["auc"][t].items():
                ref = single["auc"][t][s]
                if all(v is None for v in vals) or all(v is None for v in ref):
                    assert c["mean"][t][s] is None  # e.g. conversion where no test row clicked
                    continue
                m, sd = _mean_std(vals)
                sm, ssd = _mean_std(ref)
                assert c["mean"][t][s] == pytest.approx(m, abs=1e-12)
                assert c["std"][t][s] == pytest.approx(sd, abs=1e-12)
                assert single["mean"][t][s] == pytest.approx(sm, abs=1e-12)
                assert c["delta"][t][s] == pytest.approx(m - sm, abs=1e-12)
                spread = math.hypot(sd, ssd)
                assert c["delta_std"][t][s] == pytest.approx(spread, abs=1e-12)
                assert c["worse"][t][s] == (m - sm < -spread), (name, t, s)
            for k in range(2):
                mt, st = c["auc"][t]["all"][k], single["auc"][t]["all"][k]
                rel_by_seed[k].append((mt - st) / st)
        # Delta_m: 100 * mean over tasks of (M_i - S_i) / S_i on the seed means of `all`
        hand = 100 * np.mean([
            (np.mean(c["auc"][t]["all"]) - np.mean(single["auc"][t]["all"]))
            / np.mean(single["auc"][t]["all"]) for t in TASKS])
        assert c["delta_m"]["value"] == pytest.approx(hand, abs=1e-9)
        per_seed = [100 * np.mean(r) for r in rel_by_seed]
        assert c["delta_m"]["per_seed"] == pytest.approx(per_seed, abs=1e-9)
        assert c["delta_m"]["std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
        assert c["delta_m"]["tasks"] == TASKS


def test_seeds_differ_and_runs_are_reused(compared):
    root, result, _ = compared
    auc = result["combinations"]["shared_bottom+equal"]["auc"]["click"]["all"]
    assert auc[0] != auc[1]  # train.seed changes the runs; the data does not
    # a second call finds every run finished with the same config: identical numbers
    args = ["compare", str(root / "tiny.yaml"), "--seeds", "2", "--models", ",".join(MODELS),
            "--weightings", ",".join(WEIGHTINGS), "--out", str(root / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    again = json.loads((root / "out" / "compare.json").read_text())
    assert again["combinations"] == result["combinations"]
    assert again["single_task"]["auc"] == result["single_task"]["auc"]


def test_bad_model_is_one_clear_error(compared):
    root, _, _ = compared
    res = CliRunner().invoke(app, ["compare", str(root / "tiny.yaml"), "--seeds", "1",
                                   "--models", "nope", "--out", str(root / "bad")])
    assert res.exit_code == 2
    assert "unknown model 'nope'" in res.output


def test_models_table_quick_regenerates_only_its_block(tmp_path):
    from bench.models_table import END, START, main

    doc = tmp_path / "MODELS.md"
    doc.write_text(f"# Models\n\nhand-written intro\n\n{START}\nold table\n{END}\n\nhand-written "
                   "results\n")
    main(["--quick", "--datasets", "synthetic", "--out", str(doc), "--work",
          str(tmp_path / "work")])
    text = doc.read_text()
    assert "hand-written intro" in text and "hand-written results" in text
    assert "old table" not in text and text.count(START) == 1
    assert "bench/models_table.py --quick --datasets synthetic" in text
    table = text.split("### synthetic", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    # header, oracle, single-task, then shared_bottom/mmoe x equal and shared_bottom x uncertainty
    assert [r.split(" | ")[0:2] for r in rows[3:]] == [
        ["| shared_bottom", "equal"], ["| mmoe", "equal"], ["| shared_bottom", "uncertainty"]]
    assert rows[1].startswith("| oracle") and " ± " in rows[3]
