"""The joint model federated on Flower's simulation engine: three real text sources (customer
service, reviews, demand) owned by two silos, 2 rounds of FedProx. Every task has per-round
test metrics on its owner silo, only the text adapter crosses the wire, each silo's model
directory loads and answers, a resumed run continues each silo where it stood, and a bad
silo assignment is refused before any data is read."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

from shopmtl.config import ConfigError
from shopmtl.federated.config import JointFederatedRun, federated_from_dict

TINY: dict[str, Any] = {
    "joint": {"sources": [{"name": "bitext", "batch_size": 32, "max_examples": 150},
                          {"name": "reviews", "batch_size": 32, "max_examples": 150},
                          {"name": "retail", "batch_size": 32, "max_examples": 300}],
              "model": {"adapter_hidden": 16, "text_dim": 8, "hidden": [8], "id_dim": 8},
              "text": {"ngram_buckets": 4096},
              "sampling": {"method": "round_robin"},
              "train": {"steps": 40, "lr": 0.003, "threads": 1, "log_every": 0}},
    "federated": {"silos": {"by": "source",
                            "groups": {"service": ["bitext"], "merch": ["reviews", "retail"]}},
                  "strategy": "fedprox", "mu": 1e-4, "rounds": 2},
}
OWNER = {"intent": "service", "category": "service", "rating": "merch", "recommend": "merch",
         "demand_1d": "merch", "demand_7d": "merch"}
ADAPTER = ["text.ngram.weight[rows]", "text.ngram_in.weight", "text.out.2.bias",
           "text.out.2.weight", "text.vec_in.bias", "text.vec_in.weight"]


def raw(**federated: Any) -> dict[str, Any]:
    out = copy.deepcopy(TINY)
    out["federated"].update(federated)
    return out


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The 2-round run through ``shopmtl federate`` (the CLI in this process)."""
    from shopmtl.cli import app

    base = tmp_path_factory.mktemp("fedjoint")
    cfg, out = base / "fed.yaml", base / "run"
    cfg.write_text(json.dumps(raw()))  # JSON is YAML
    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "test intent (silo service): " in res.output
    return out, json.loads((out / "metrics.json").read_text())


def test_every_task_is_scored_on_its_owner_silo_every_round(fed_run) -> None:
    out, metrics = fed_run
    # the engine's workers are gone (Ray is shut down at the end of the run); Flower's
    # telemetry thread may still be running ``file`` (platform.architecture) for a moment
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    assert alive == []
    back = metrics
    assert back["kind"] == "joint" and back["owner"] == OWNER
    assert [r["round"] for r in back["rounds"]] == [1, 2]
    for r in back["rounds"]:
        assert {t: m["silo"] for t, m in r["tasks"].items()} == OWNER
        assert sorted(r["clients"]) == ["merch", "service"] and r["dropped"] == {}
    final = back["final"]["tasks"]
    # intent: 27 classes (chance 0.04); the demand tasks are WAPE-like errors below 1
    assert final["intent"]["test"] > 0.06
    assert 0 < final["demand_7d"]["test"] < 1.0
    # the step plan: round robin over 3 sources, 40 steps in 2 rounds -> 20 a round, a third
    # to service (bitext) and two thirds to merch, in each silo's own loop
    assert back["steps_per_round"] == {"service": 7, "merch": 13}
    assert back["final"]["steps_by_source_total"] == {
        "service": {"bitext": 14}, "merch": {"reviews": 13, "retail": 13}}
    assert back["skipped_stages"] == []
    assert "| 2 |" in (out / "report.md").read_text()


def test_only_the_text_adapter_crosses_the_wire(fed_run) -> None:
    _, metrics = fed_run
    for r in metrics["rounds"]:
        # what the server received from each silo, by array name: the adapter, no head
        assert r["sent_keys"] == {"service": ADAPTER, "merch": ADAPTER}
        assert set(r["bytes_sent"].values()) == {metrics["shared_bytes_per_client"]}


def test_each_silo_model_dir_loads_holds_the_global_adapter_and_predicts(fed_run) -> None:
    from safetensors.numpy import load_file

    import shopmtl
    from shopmtl.predict import OptionError
    from shopmtl.train.stages import Checkpointer

    out, metrics = fed_run
    service = shopmtl.load(out / metrics["models"]["service"])
    merch = shopmtl.load(out / metrics["models"]["merch"])
    got = service.predict([{"text": "I want to cancel my order"}], task="intent", top_k=3)
    assert got.num_rows == 1
    # a merch task: not in service's model
    with pytest.raises(OptionError, match=r"unknown task 'rating'"):
        service.predict([{"text": "lovely dress"}], task="rating")
    # both hold the final global adapter (the last round checkpoint's arrays), their own heads
    latest = Checkpointer(out / "checkpoints").latest()
    arrays = load_file(str(latest / "arrays.safetensors"))
    for model in (service, merch):
        weights = model.model.state_dict()
        for name, value in arrays.items():
            np.testing.assert_array_equal(weights[name.removesuffix("[rows]")].numpy(), value)
    assert set(service.model.heads) == {"bitext"}
    assert set(merch.model.heads) == {"reviews", "retail"}


def test_a_resumed_run_continues_each_silo_where_it_stood(fed_run, tmp_path: Path) -> None:
    from shopmtl.federated.joint import run_joint_federated

    out, first = fed_run
    again = tmp_path / "run"
    shutil.copytree(out, again)
    # what a server killed during round 2 leaves: round 1's checkpoint the latest (the
    # clients' round-2 state files are there too: a resumed client reads its round-1 one)
    shutil.rmtree(again / "checkpoints" / "ckpt-00-000000002")
    (again / "checkpoints" / "latest").write_text("ckpt-00-000000001")
    metrics = run_joint_federated(federated_from_dict(raw()), again, log=lambda s: None,
                            resume=True)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    final = metrics["final"]
    assert final["restored"] == {"service": 1, "merch": 1}
    assert final["steps_by_source_total"]["service"] == {"bitext": 14}  # 7 restored + 7
    # the same round 2 as the uninterrupted run's (CPU, same weights, streams and seeds)
    for task, got in final["tasks"].items():
        assert got["test"] == pytest.approx(first["final"]["tasks"][task]["test"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"federated\.rounds differs"):
        run_joint_federated(federated_from_dict(raw(rounds=3)), again, log=lambda s: None,
                      resume=True)


@pytest.mark.parametrize(("groups", "message"), [
    ({"service": ["bitext"], "merch": ["reviews"]}, r"sources \['retail'\] are in no silo"),
    ({"service": ["bitext", "retail"], "merch": ["reviews", "retail"]},
     "source 'retail' is in more than one silo"),
    ({"service": ["bitext", "search"], "merch": ["reviews", "retail"]},
     r"\['search'\] are not sources of the joint config"),
    ({"service": [], "merch": ["bitext", "reviews", "retail"]}, r"groups\.service: a silo needs"),
    ({"../up": ["bitext"], "merch": ["reviews", "retail"]}, "a silo's name is letters"),
])
def test_a_bad_silo_assignment_is_refused(groups: dict[str, list[str]], message: str) -> None:
    bad = raw()
    bad["federated"]["silos"]["groups"] = groups
    with pytest.raises(ConfigError, match=message):
        federated_from_dict(bad)


@pytest.mark.parametrize(("federated", "message"), [
    ({"silos": {"by": "scenario"}}, r"federated\.silos\.by: a joint model's silos"),
    ({"share": ["text", "towers"]}, r"federated\.share: a joint model shares"),
    ({"strategy": "median"}, r"federated\.strategy: a joint model takes"),
    ({"local_epochs": 1.0}, r"federated\.local_epochs: not used by a joint model"),
    ({"dp": {"mode": "client", "noise": 1.0}, "row_aware": False}, r"federated\.dp: not built"),
])
def test_what_a_joint_federation_does_not_do_is_refused(federated: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        federated_from_dict(raw(**federated))


def test_the_config_file_names_a_joint_config_and_takes_overrides(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "examples" / "federated_joint.yaml"
    run = federated_from_dict({"joint": "joint_tiny.yaml",
                               "federated": {"silos": {"by": "source", "groups": {
                                   "recsys": ["rec", "search"], "service": ["bitext"],
                                   "merch": ["reviews", "retail"]}}}},
                              ["joint.train.steps=12"], example.parent)
    assert isinstance(run, JointFederatedRun)
    assert run.joint.train.steps == 12 and run.federated.share == ("text",)
    assert run.silos["recsys"] == ("rec", "search")
    # the zoo path refuses the joint-only settings
    with pytest.raises(ConfigError, match="are for a joint model"):
        federated_from_dict({"data": {"synthetic": {"rows": 2000}},
                             "federated": {"share": ["text"]}})


def test_bad_source_args_are_refused_before_the_engine_starts(tmp_path: Path) -> None:
    from shopmtl.federated.joint import run_joint_federated

    bad = raw()
    bad["joint"]["sources"][0]["args"] = {"nonsense": 1}
    with pytest.raises(ConfigError, match=r"source 'bitext': bad args \['nonsense'\]"):
        run_joint_federated(federated_from_dict(bad), tmp_path / "o", log=lambda s: None)
    assert not (tmp_path / "o" / "silos").exists()


def test_cli_refuses_a_source_in_no_silo_with_exit_2(tmp_path: Path) -> None:
    from shopmtl.cli import app

    bad = raw()
    bad["federated"]["silos"]["groups"] = {"service": ["bitext"], "merch": ["reviews"]}
    cfg = tmp_path / "f.yaml"
    cfg.write_text(json.dumps(bad))  # JSON is YAML
    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "are in no silo" in res.output
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_the_step_plan_gives_each_source_its_joint_sampler_share() -> None:
    from shopmtl.federated.joint import plan_steps
    from shopmtl.joint.config import joint_config_from_dict

    joint = copy.deepcopy(TINY["joint"])
    joint["sampling"] = {"method": "proportional"}
    joint["train"]["steps"] = 100
    cfg = joint_config_from_dict(joint)
    sizes = [{"bitext": 10, "retail": 10}, {"reviews": 40}]
    # 4 rounds of 25 steps: proportional, silo 0 holds 20 of 60 batches -> 25 / 3
    assert plan_steps(cfg, 4, sizes) == [8, 17]
    joint["sampling"] = {"method": "round_robin"}  # two sources of three -> 25 * 2 / 3
    assert plan_steps(joint_config_from_dict(joint), 4, sizes) == [17, 8]


def test_the_adapter_average_weighs_each_silo_by_its_steps(identity) -> None:
    """FedProx, row-aware, as a joint run builds it: a dense array is the steps-weighted mean
    of the silos' arrays (not the rows-weighted one), an n-gram row the steps-weighted mean
    over the silos that moved it."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from shopmtl.federated.config import FederatedConfig
    from shopmtl.federated.server import make_strategy

    def keep(replies, key):
        return MetricRecord({"clients": len(replies)})

    s = make_strategy(FederatedConfig(strategy="fedprox", mu=1e-4), 2, keep, keep,
                      weighted_by="steps")
    table = np.zeros((3, 2), np.float32)

    class Grid:  # configure_train asks the grid for its nodes
        def get_node_ids(self):
            return [1, 2]

    s.configure_train(1, ArrayRecord({"text.ngram.weight[rows]": Array(table),
                                      "text.vec_in.bias": Array(np.zeros(2, np.float32))}),
                      ConfigRecord(), Grid())
    moved = [np.array([[1, 1], [0, 0], [0, 0]], np.float32),
             np.array([[4, 4], [0, 0], [6, 6]], np.float32)]
    replies = [Message(content=RecordDict({
        "arrays": ArrayRecord({"text.ngram.weight[rows]": Array(m),
                               "text.vec_in.bias": Array(np.full(2, b, np.float32))}),
        "metrics": MetricRecord({"num-examples": rows, "steps": steps})}),
        dst_node_id=i + 1, message_type="train")
        for i, (m, b, rows, steps) in enumerate([(moved[0], 1.0, 24000, 30),
                                                 (moved[1], 4.0, 150, 10)])]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["text.vec_in.bias"].numpy(), [1.75, 1.75])  # 3:1
    np.testing.assert_allclose(arrays["text.ngram.weight[rows]"].numpy(),
                               [[1.75, 1.75], [0, 0], [6, 6]])
