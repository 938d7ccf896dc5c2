"""``federated.select``: the server ranks rounds by the silos' own validation AUC
(``server.validation_score``) and writes the best round's global model, as the one-table run
keeps its best epoch; the best round's arrays live in the round checkpoints, so a resumed run
keeps its best."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shopmtl.config import ConfigError
from shopmtl.federated.config import federated_from_dict
from shopmtl.federated.server import Recorder, run_federated, validation_score
from shopmtl.train.stages import Checkpointer
from tests.federated.conftest import tiny_raw

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _reply(aucs: dict[str, float], rows: int) -> dict[str, Any]:
    """A silo's evaluation record as the server keeps it."""
    return {"num-valid": rows, "valid_auc": {t: {"all": a, "home_feed": 0.0}
                                             for t, a in aucs.items()}}


def test_validation_score_weighs_silos_by_their_validation_rows() -> None:
    both = {"a": _reply({"click": 0.7, "conversion": 0.5}, 100), "b": _reply({"click": 0.9}, 300)}
    # a's mean over its tasks (0.6), b's (0.9), weighted 100 : 300; scenario scopes ignored
    assert validation_score(both, ("a", "b")) == pytest.approx((100 * 0.6 + 300 * 0.9) / 400)
    # a silo missing from the round (its evaluation failed): not comparable, not scored
    assert validation_score({"a": both["a"]}, ("a", "b")) is None
    # a silo without validation rows weighs nothing; none anywhere: no score
    assert validation_score({**both, "c": _reply({}, 0)}, ("a", "b", "c")) == pytest.approx(
        validation_score(both, ("a", "b")))
    assert validation_score({"a": _reply({}, 0)}, ("a",)) is None


def test_the_recorder_keeps_the_earliest_of_equal_best_rounds() -> None:
    rec = Recorder(("a",))
    for rnd, auc in [(1, 0.6), (2, 0.7), (3, 0.7), (4, 0.65)]:
        rec.eval[rnd] = {"a": _reply({"click": auc}, 10)}
    rec.eval[5] = {}  # no reply: not scored
    assert [rec.score(r) for r in (1, 2, 3, 4, 5)] == [True, True, False, False, False]
    assert rec.best == {"round": 2, "score": pytest.approx(0.7)}
    assert rec.valid == pytest.approx({1: 0.6, 2: 0.7, 3: 0.7, 4: 0.65})


def test_select_best_is_refused_with_dp_and_for_a_joint_model(tmp_path: Path) -> None:
    raw = tiny_raw(select="best", strategy="fedavg", mu=0.0, row_aware=False,
                   dp={"mode": "client", "clip": 1.0, "noise": 1.0})
    with pytest.raises(ConfigError, match=r"federated\.select: best ranks rounds by the silos' "
                                          r"plain validation AUC"):
        federated_from_dict(raw)
    from shopmtl.federated.config import load_federated

    with pytest.raises(ConfigError, match=r"federated\.select: not built for a joint model"):
        load_federated(EXAMPLES / "federated_joint.yaml", ["federated.select=best"])


def _model_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _global(out: Path, key: str) -> dict[str, np.ndarray]:
    """The latest round checkpoint's ``arrays`` (the last round) or ``best``."""
    ck = Checkpointer(out / "checkpoints")
    tensors, _ = ck.load(ck.latest())
    return {k: v.numpy() for k, v in tensors.get(key, {}).items()}


def _written_as(out: Path, arrays: dict[str, np.ndarray], raw: dict[str, Any],
                world: Path) -> bool:
    """Whether ``out/model/`` holds ``arrays`` (the global model's shared pieces)."""
    from shopmtl.federated.server import prepare
    from shopmtl.federated.wire import pack

    scratch = out.parent / f"{out.name}-layout"
    if not scratch.exists():
        shutil.copytree(world / "data", scratch / "data")
    _, fed, _ = prepare(federated_from_dict(raw), scratch, log=lambda s: None)
    model = fed.build()
    model.load_state_dict(_model_tensors(out))
    shared, _ = fed.layout(model)
    got = pack(model, shared)
    assert got.keys() == arrays.keys()
    return all(np.allclose(got[k], arrays[k], atol=1e-7) for k in got)


def test_the_best_validated_round_is_written_and_survives_a_resume(tiny_world: Path,
                                                                    tmp_path: Path) -> None:
    # 4 local epochs a round of the tiny world: the silos' validation AUC peaks at round 3
    raw = tiny_raw(select="best", rounds=4, local_epochs=4.0)
    raw["train"]["lr"] = 0.01
    out = tmp_path / "best"
    shutil.copytree(tiny_world / "data", out / "data")
    lines: list[str] = []
    metrics = run_federated(federated_from_dict(raw), out, log=lines.append)
    scores = {r["round"]: r["valid_score"] for r in metrics["rounds"] if "valid_score" in r}
    assert sorted(scores) == [1, 2, 3, 4]
    # the score, recomputed from what metrics.json says of each silo: its validation AUC
    # per task and its validation rows
    for r in metrics["rounds"]:
        if r["round"] == 0:
            continue
        num = sum(metrics["silos"][s]["valid"] * np.mean([v["all"] for v in per.values()])
                  for s, per in r["valid_silos"].items())
        den = sum(metrics["silos"][s]["valid"] for s in r["valid_silos"])
        assert scores[r["round"]] == pytest.approx(num / den, abs=1e-9)
    best = max(scores, key=lambda k: (scores[k], -k))
    sel = metrics["selected"]
    assert sel == {"rule": "best", "round": best, "valid_score": scores[best],
                   "best_round": best}
    assert best != 4, scores  # this seeded run peaks early (else the test below is moot)
    assert _written_as(out, _global(out, "best"), raw, tiny_world)
    assert not _written_as(out, _global(out, "arrays"), raw, tiny_world)  # not the last round's
    assert any(f"select: best: the model of round {best}" in line for line in lines)
    report = (out / "report.md").read_text()
    assert f"`model/` holds round {best}'s global model (select: best" in report
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert meta["federated"]["round"] == best

    # resumed with one more round: the best so far comes back from the checkpoint, and the
    # new round replaces it only with a higher score
    raw5 = tiny_raw(select="best", rounds=5, local_epochs=4.0)
    raw5["train"]["lr"] = 0.01
    again = run_federated(federated_from_dict(raw5), out, log=lines.append, resume=True)
    scores5 = {r["round"]: r["valid_score"] for r in again["rounds"] if "valid_score" in r}
    assert {k: scores5[k] for k in scores} == scores  # the first 4 rounds: the records
    best5 = max(scores5, key=lambda k: (scores5[k], -k))
    assert again["selected"]["round"] == best5
    assert _written_as(out, _global(out, "best"), raw5, tiny_world)

    # select: last writes the last round's model, and its checkpoints keep no best copy
    raw_last = tiny_raw(select="last", rounds=2)
    last = tmp_path / "last"
    shutil.copytree(tiny_world / "data", last / "data")
    m = run_federated(federated_from_dict(raw_last), last, log=lambda s: None)
    assert m["selected"]["rule"] == "last" and m["selected"]["round"] == 2
    assert m["selected"]["valid_score"] == m["rounds"][-1]["valid_score"]
    assert _global(last, "best") == {}
    assert _written_as(last, _global(last, "arrays"), raw_last, tiny_world)
