"""A 2-round federated run end to end on Flower's simulation engine (Ray workers): 4 silos,
one per scenario, FedProx; AUC above chance per silo and pooled, metrics.json and the report
written and read back, the global model loadable, and no engine process left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
from typer.testing import CliRunner

from shopmtl.federated.config import federated_from_dict
from shopmtl.federated.server import run_federated
from tests.federated.conftest import tiny_raw


def test_two_rounds_through_flower_simulation(tiny_world: Path, tmp_path: Path) -> None:
    import shopmtl

    out = tmp_path / "run"
    shutil.copytree(tiny_world / "data", out / "data")
    lines: list[str] = []
    metrics = run_federated(federated_from_dict(tiny_raw()), out, log=lines.append)
    # the engine's workers are gone (Ray is shut down at the end of the run)
    assert psutil.Process().children(recursive=True) == []
    back = json.loads((out / "metrics.json").read_text())
    assert back == json.loads(json.dumps(metrics))
    assert [r["round"] for r in back["rounds"]] == [1, 2]
    final = back["rounds"][-1]
    assert final["pooled"]["click"]["all"] > 0.58
    assert set(final["silos"]) == {"home_feed", "search", "ad_slot", "product_page"}
    for silo, per_task in final["silos"].items():
        assert per_task["click"]["all"] > 0.55, silo
        assert ("ad_click" in per_task) == (silo == "ad_slot")  # only its own tasks
    # the pooled model learns across rounds
    assert final["pooled"]["click"]["all"] > back["initial_pooled"]["click"]["all"] + 0.05
    # bytes: every client sends the shared pieces, never the user rows
    assert set(final["bytes_sent"].values()) == {back["shared_bytes_per_client"]}
    assert back["availability"]["ad_slot"]["ad_click"]["ad_slot"] is True
    assert (out / "report.md").read_text().count("| 2 |") == 1
    assert (out / "auc_rounds.png").stat().st_size > 1000
    assert any(line.startswith("round 2/2: pooled test AUC") for line in lines)
    model = shopmtl.load(out / "model")  # the global model is a model directory
    assert model is not None


def test_cli_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    from shopmtl.cli import app

    cfg = tmp_path / "f.yaml"
    cfg.write_text("data: {synthetic: {rows: 2000}}\nfederated: {strategy: fedsgd}\n")
    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "federated.strategy" in res.output
