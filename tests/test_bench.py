"""Smoke test of the shopmtl side of the peer benchmark (bench/run_all.py): the split, the
shared metric, one shopmtl run and one minimal-reference run on census for a single epoch, each
in its own process as in the real harness, and the report. No peers venv needed; seconds.
And the scaling benchmark (bench/scaling.py) at two tiny sizes, writing to tmp paths only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.peers import common as C
from bench.peers.prepare import DATASETS, checksum, split_ids
from bench.peers.report import render

needs_datasets = pytest.mark.skipif(
    not (DATASETS / "census_income_kdd" / "SOURCE.md").is_file(),
    reason="shared/datasets not checked out beside the repository")


@needs_datasets
def test_split_is_seeded_disjoint_and_complete() -> None:
    a, b = split_ids(1000), split_ids(1000)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "valid", "test")] == [800, 100, 100]
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(1000))
    assert checksum(a["test"]) == checksum(a["test"][::-1]) != checksum(a["valid"])


@needs_datasets
def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    p = np.round(rng.random(300), 1)  # many ties
    pos, neg = p[y], p[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert C.auc(y, p) == pytest.approx(pairs)
    assert C.auc(np.ones(3), np.arange(3.0)) != C.auc(np.ones(3), np.arange(3.0))  # NaN


@pytest.fixture(scope="module")
def census(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.peers.prepare import prepare

    work = tmp_path_factory.mktemp("bench")
    meta = prepare("census", work)
    assert meta["rows"] == {"test": 1995, "valid": 1995, "train": 15963}
    return work


def _run(module: str, census: Path, library: str, variant: str) -> dict:
    from bench.run_all import run_child

    spec = {"library": library, "variant": variant, "model": "mmoe", "dataset": "census",
            "batch": 2048, "seed": 0, "epochs": 1, "data_dir": str(census / "census"),
            "out": str(census / f"{library}-{variant}.json")}
    path = census / f"{library}-{variant}.spec.json"
    path.write_text(json.dumps(spec))
    rc, rss, _ = run_child([sys.executable, "-m", module, str(path)],
                           census / f"{library}-{variant}.log", timeout=300)
    assert rc == 0, (census / f"{library}-{variant}.log").read_text()[-3000:]
    rec = json.loads(Path(spec["out"]).read_text())
    rec.update(peak_rss_mb=rss, load_average=[0.0, 0.0])
    return rec


@needs_datasets
def test_shopmtl_and_minimal_runs_and_report(census: Path) -> None:
    runs = [_run("bench.peers.run_shopmtl", census, "shopmtl", "matched"),
            _run("bench.peers.run_minimal", census, "minimal", "matched")]
    for r in runs:
        assert set(r["auc"]) == {"income_50k", "never_married"}
        assert all(0 <= v <= 1 for v in r["auc"].values())
        assert r["auc"]["never_married"] > 0.6  # learnt even in one epoch
        assert r["train_samples_per_s"] > 0 and r["infer_samples_per_s"] > 0
        assert r["peak_rss_mb"] > 50 and r["params"] > 0 and r["threads"] == C.THREADS
    shop = runs[0]
    # matched shopmtl MMoE: 39 fields x 16 -> 4 experts [64] (+ gates, towers [32])
    assert shop["flops_per_sample"] == 6 * (4 * 624 * 64 + 2 * 624 * 4 + 2 * (64 * 32 + 32))
    meta = json.loads((census / "census" / "meta.json").read_text())
    doc = {"env": {"command": ".venv/bin/python bench/run_all.py --quick", "started": "now",
                   "cpu": "test", "cores": 2, "threads": 2, "torch_main": "x",
                   "python": "3", "load_average_start": 0.0, "quick": True},
           "datasets": {"census": {k: meta[k] for k in ("rows", "split_sha256", "split_seed",
                                                        "tasks")}},
           "hyperparameters": {"embed_dim": 16, "n_experts": 4, "expert": [64], "tower": [32],
                               "ple": {"levels": 2, "shared": 2, "specific": 2},
                               "esmm_tower": [64, 32], "lr": 1e-3, "epochs": {"census": 1}},
           "ceiling": {"matmul_start": {"gflops": 100.0, "load_average": 0.0}},
           "runs": runs}
    text = render(doc)
    assert "| census | mmoe | 2048 | shopmtl |" in text
    assert meta["split_sha256"]["test"] in text


def test_scaling_benchmark_writes_json_and_docs_block(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.peers.report as report
    from bench.scaling import END, START, render_block, splice

    repo = Path(__file__).resolve().parents[1]
    out, docs = tmp_path / "scaling.json", tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\nthe peers' report\n")
    cmd = [sys.executable, "bench/scaling.py", "--rows", "20000,40000", "--out", str(out),
           "--docs", str(docs), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    env = doc["env"]
    assert env["command"].startswith(".venv/bin/python bench/scaling.py --rows 20000,40000")
    assert env["threads"] == 2 and env["cores"] >= 1 and env["cpu"]
    assert [r["rows"] for r in doc["results"]] == [20000, 40000]
    for r in doc["results"]:
        assert 0 < r["valid_rows"] < r["train_rows"] < r["rows"]
        assert r["epoch_seconds"] > 0 and r["child_wall_seconds"] > r["epoch_seconds"]
        assert r["samples_per_s"] == pytest.approx(r["train_rows"] / r["epoch_seconds"])
        assert r["peak_rss_mb"] > 50 and r["peak_rss_self_mb"] > 50
        assert r["threads"] == 2 and len(r["load_average"]) == 2
        assert set(r["valid_auc"]) == {"click", "conversion", "ad_click"}
        assert r["time_per_row_ratio"] > 0 and r["peak_rss_ratio"] > 0
    assert doc["results"][0]["time_per_row_ratio"] == doc["results"][0]["peak_rss_ratio"] == 1
    # the block was appended between its markers; the rest of the file is kept
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nthe peers' report\n")
    assert text.count(START) == text.count(END) == 1
    block = text[text.index(START):text.index(END) + len(END)]
    assert block == render_block(doc)
    assert "## Scaling: streamed training" in block and env["command"] in block
    assert "| 40,000 |" in block and "time/row ÷ smallest" in block
    assert env["streamed_valid"] and "every split is streamed" in block
    # a rerun replaces only the block
    assert splice(text.replace("| 40,000 |", "| old |"), block) == text
    # bench/run_all.py's regeneration (report.render) renders the block from the JSON
    monkeypatch.setattr(report, "SCALING", out)
    regenerated = report.render({
        "env": {"command": "x", "started": "now", "cpu": "test", "cores": 2, "threads": 2,
                "torch_main": "x", "python": "3", "load_average_start": 0.0, "quick": True},
        "datasets": {"census": {"rows": {}, "split_sha256": {}, "split_seed": 0,
                                "tasks": ["a", "b"]}},
        "hyperparameters": {"embed_dim": 16, "n_experts": 4, "expert": [64], "tower": [32],
                            "ple": {"levels": 2, "shared": 2, "specific": 2},
                            "esmm_tower": [64, 32], "lr": 1e-3, "epochs": {"census": 1}},
        "ceiling": {"matmul_start": {"gflops": 100.0, "load_average": 0.0}}, "runs": []})
    assert block in regenerated


def test_throughput_benchmark_prints_and_writes_samples_per_second(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--rows", "20000", "--steps", "5",
         "--repeats", "1", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shared_bottom" in proc.stdout
    rec = json.loads(out.read_text())["results"][0]
    assert rec["model"] == "shared_bottom"
    train = [v for k, v in rec.items() if "train" in k and isinstance(v, (int, float))]
    infer = [v for k, v in rec.items() if "infer" in k and isinstance(v, (int, float))]
    assert train and infer and all(v > 0 for v in train + infer)


def test_joint_seeds_summary_counts_wins_with_the_metric_direction() -> None:
    from bench.joint_seeds import render, summarise

    def row(task: str, higher: bool, joint: float, base: float) -> dict:
        better = joint > base if higher else joint < base
        return {"source": "s", "task": task, "metric": "m", "higher_is_better": higher,
                "baseline_kind": "baseline", "joint": joint, "baseline": base,
                "joint_beats_baseline": better}

    tables = [[row("auc", True, 0.80, 0.79), row("wape", False, 0.50, 0.55)],
              [row("auc", True, 0.78, 0.79), row("wape", False, 0.52, 0.55)]]
    rows = {r["task"]: r for r in summarise(tables)}
    assert rows["auc"]["joint_mean"] == pytest.approx(0.79)
    assert rows["auc"]["joint_std"] == pytest.approx(np.std([0.80, 0.78], ddof=1))
    assert rows["auc"]["margin"] == pytest.approx(0.0) and rows["auc"]["seeds_beating"] == 1
    # lower is better: joint 0.51 against 0.55 is a positive margin
    assert rows["wape"]["margin"] == pytest.approx(0.04) and rows["wape"]["seeds_beating"] == 2
    md = render(list(rows.values()), 2, "python bench/joint_seeds.py", 1.0)
    assert "| s | wape | m | 0.5100 ± 0.0141 | 0.5500 (baseline) | +0.0400 | 2/2 |" in md


@needs_datasets
@pytest.mark.parametrize("change", ["read_once", "lookup"])
def test_step_ab_times_both_paths_and_restores_the_shipped_one(change: str, tmp_path: Path
                                                               ) -> None:
    import shopmtl.models.mmoe as mmoe
    import shopmtl.nn.layers as layers
    import shopmtl.nn.moe as moe
    from bench.step_ab import main

    shipped = (moe.read_once, mmoe.read_once, layers.lookup, moe.mix_parts)
    out = tmp_path / "ab.json"
    assert main(["--change", change, "--datasets", "census", "--models", "mmoe", "ple",
                 "--batches", "256", "--rounds", "2", "--steps", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["change"] == change
    runs = doc["runs"]
    assert [(r["model"], r["batch"]) for r in runs] == [("mmoe", 256), ("ple", 256)]
    for r in runs:
        assert r["shipped_ms"] > 0 and r["before_ms"] > 0
        assert r["speedup"] == pytest.approx(r["before_ms"] / r["shipped_ms"])
    # the replaced path was patched in for timing only
    assert (moe.read_once, mmoe.read_once, layers.lookup, moe.mix_parts) == shipped


def test_auc_standard_error_matches_the_bootstrap() -> None:
    from sklearn.metrics import roc_auc_score

    from bench.rec_content import auc_se

    rng = np.random.default_rng(0)
    y = rng.random(4000) < 0.08
    score = rng.normal(0, 1, 4000) + 0.8 * y  # AUC about 0.71
    auc = roc_auc_score(y, score)
    boot = []
    for _ in range(300):
        i = rng.integers(0, len(y), len(y))
        boot.append(roc_auc_score(y[i], score[i]))
    se = auc_se(auc, int(y.sum()), int((~y).sum()))
    assert se == pytest.approx(np.std(boot), rel=0.2)
    # fewer positives, a larger error
    assert auc_se(auc, 50, 3950) > 2 * se


def test_protocol_says_when_shopmtl_scales_its_learning_rate() -> None:
    from bench.peers.report import _lr_scaling_note

    hp = {"lr": 1e-3, "shopmtl_lr_scaling": {"rule": "sqrt", "base_batch": 256}}
    note = _lr_scaling_note(hp)
    assert "not matched at batch 2048" in note and "0.00283" in note
    assert _lr_scaling_note({"lr": 1e-3}) == ""  # results written before the rule
    assert _lr_scaling_note({"lr": 1e-3, "shopmtl_lr_scaling": {"rule": "none",
                                                                "base_batch": 256}}) == ""


def test_the_prepared_gpu_run_dry_runs_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_throughput.py is what a lent GPU machine runs (bench/gpu_check.sh); no GPU
    runs it in CI, so its CPU dry run keeps it from rotting: every run of every model and
    batch answers a rate (none an error), and the script that launches it parses."""
    from bench.gpu_throughput import MODELS, VARIANTS, main

    out = tmp_path / "gpu.json"
    result = main(["--device", "cpu", "--rows", "4000", "--steps", "1", "--warmup", "0",
                   "--batches", "256", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    runs = {(r["model"], r["run"]) for r in result["rows"]}
    assert {(m, v) for m in MODELS for v in VARIANTS} <= runs
    for r in result["rows"]:
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and r["peak_mib"] is None  # CPU: no GPU memory
        if r["run"].startswith("shopmtl"):
            assert r["table_on_device"] is False  # resident applies to a GPU only
    check = subprocess.run(["bash", "-n", "bench/gpu_check.sh"], capture_output=True,
                           text=True, cwd=Path(__file__).resolve().parents[1])
    assert check.returncode == 0, check.stderr
