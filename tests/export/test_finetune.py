"""``shopmtl export --prune R --finetune FILE``: the pruned model fine-tuned, then exported.

One small SharedBottom (a 20,000-row synthetic world, one epoch) is pruned by half and
fine-tuned one epoch on the world's training file by the CLI, once per module. The tests check
that the fine-tune ran through the one training loop and moved the weights, that it helped the
held-out AUC it records, that the graph is the fine-tuned model (recomputed here: the fine-tune
is seeded, so the same call gives the same model), and the refusals.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import shopmtl
from shopmtl.export.bundle import held_out_rows, load_source, variant
from shopmtl.export.checks import FP32_TOLERANCE
from shopmtl.export.finetune import FineTune, training_rows
from shopmtl.predict import predict_in_memory
from tests.export.world import trained_zoo
from tests.helpers import assert_one_error_line, cli

TASKS = ("click", "conversion", "ad_click")
BATCH = 256  # world_config_yaml's train.batch_size


@dataclass
class Tuned:
    model: Path  # the zoo model directory
    train: Path  # the world's training rows (the fine-tune file)
    test: Path  # its held-out rows (--data)
    bundle: Path  # pruned by half, fine-tuned one epoch
    printed: str


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    root = tmp_path_factory.mktemp("finetune")
    model = trained_zoo(root)
    train, test = root / "w" / "train.parquet", root / "w" / "test.parquet"
    proc = cli("export", str(model), "--out", str(root / "ft"), "--data", str(test), "--prune",
               "0.5", "--finetune", str(train), check=True)
    return Tuned(model, train, test, root / "ft", proc.stdout)


def meta(bundle: Path) -> dict:
    return json.loads((bundle / "meta.json").read_text())


def test_the_fine_tune_is_recorded_and_helped(tuned: Tuned) -> None:
    report = meta(tuned.bundle)["pruning"]
    fine = report["finetune"]
    rows = pq_rows(tuned.train)
    assert fine["file"] == "train.parquet" and str(tuned.train.parent) not in json.dumps(fine)
    # one epoch: every row once, the last batch partial
    assert (fine["rows"], fine["epochs"], fine["steps"]) == (rows, 1, math.ceil(rows / BATCH))
    assert fine["seconds"] > 0 and fine["optimizer"] == "adam"
    assert "1 epoch(s)" in report["criteria"]["fine_tune"]
    # the module-level criteria are not mutated: a plain prune still says "none"
    from shopmtl.export.prune import CRITERIA
    assert CRITERIA["fine_tune"] == "none"
    before, after = fine["auc_before"], fine["auc_after"]
    assert set(before) == set(after) == set(TASKS)
    # a learnable world, a model trained one epoch and cut by half: one more epoch on the
    # training rows helps the main task, and does not hurt any task beyond noise
    assert after["click"] > before["click"] + 0.002, (before, after)
    for t in TASKS:
        assert after[t] >= before[t] - 0.01, (t, before, after)
    quality = meta(tuned.bundle)["checks"]["quality"]
    for t in TASKS:
        assert quality["pytorch_fp32"][t]["auc"] == pytest.approx(after[t])
        assert quality["onnx_fp32"][t]["auc"] == pytest.approx(after[t], abs=1e-5)
    assert set(quality) == {"pytorch_fp32_unpruned", "pytorch_fp32", "onnx_fp32"}
    assert "fine-tuned on train.parquet: 1 epoch(s)" in tuned.printed
    assert f"click {before['click']:.4f} -> {after['click']:.4f}" in tuned.printed


def max_diff(a, b) -> float:
    """The largest difference of any task's probability between two prediction tables."""
    return max(float(np.abs(a.column(t).to_numpy() - b.column(t).to_numpy()).max())
               for t in TASKS)


def pq_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def test_the_graph_is_the_fine_tuned_model(tuned: Tuned, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """The same prune and fine-tune, in process (seeded: the same model), through a spy on
    the one loop's ``fit`` that calls it: the loop ran, the weights moved, and the bundle
    scores as this model does."""
    import shopmtl.export.finetune as ft

    calls = []
    real_fit = ft.fit

    def spy(model, sources, *args, **kwargs):
        calls.append([type(s).__name__ for s in sources])
        return real_fit(model, sources, *args, **kwargs)

    source = load_source(tuned.model)
    enc = held_out_rows(source, tuned.test)
    pruned = variant(source, enc, 0.5).model
    monkeypatch.setattr(ft, "fit", spy)
    fine = FineTune(tuned.train, 1)
    rows = training_rows(source.schema, source.encoders, source.cfg, tuned.train)
    v = variant(source, enc, 0.5, fine=fine, fine_rows=rows)
    assert calls == [["TableSource"]]
    moved = {k: float((v.model.state_dict()[k] - w).abs().max())
             for k, w in pruned.state_dict().items()}
    assert min(moved.values()) > 0, moved  # every tensor of the pruned model was trained
    assert meta(tuned.bundle)["pruning"]["finetune"]["auc_after"] == pytest.approx(
        v.info["pruning"]["finetune"]["auc_after"], abs=1e-6)  # seeded: the same fine-tune
    # the bundle through shopmtl.load (its reader and encoders) on the held-out file
    rows = pq.read_table(tuned.test)
    bundle = shopmtl.load(tuned.bundle)
    got = bundle.predict(rows)
    want = predict_in_memory(v.model, bundle.schema, bundle.encoders, rows, None, "fail", ())
    assert max_diff(got, want) <= FP32_TOLERANCE
    # and not the pruned model as it was before the fine-tune
    unfine = predict_in_memory(pruned, bundle.schema, bundle.encoders, rows, None, "fail", ())
    assert max_diff(got, unfine) > 1e-3


@pytest.mark.parametrize("case", ["no_prune", "same_file", "missing", "epochs"])
def test_fine_tune_refusals_are_one_line(tuned: Tuned, tmp_path: Path, case: str) -> None:
    base = ("export", str(tuned.model), "--out", str(tmp_path / "b"), "--data", str(tuned.test))
    if case == "no_prune":
        proc = cli(*base, "--finetune", str(tuned.train))
        assert_one_error_line(proc, "--finetune", "--prune", code=2)
    elif case == "same_file":  # the held-out file under another spelling of its path
        other = tmp_path / "link"
        other.symlink_to(tuned.test.parent)
        proc = cli(*base, "--prune", "0.5", "--finetune", str(other / "test.parquet"))
        assert_one_error_line(proc, "--finetune test.parquet", "held-out --data", code=2)
    elif case == "missing":
        proc = cli(*base, "--prune", "0.5", "--finetune", str(tmp_path / "nope.parquet"))
        assert_one_error_line(proc, "--finetune nope.parquet", "no such file", code=1)
    else:
        proc = cli(*base, "--prune", "0.5", "--finetune", str(tuned.train),
                   "--finetune-epochs", "0")
        assert_one_error_line(proc, "--finetune-epochs 0", "at least 1", code=2)
    assert not (tmp_path / "b").exists()  # nothing written


def test_too_few_fine_tune_rows_are_refused(tuned: Tuned, tmp_path: Path) -> None:
    from shopmtl.data.ingest import DataError

    small = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(tuned.train).slice(0, BATCH - 1), small)
    source = load_source(tuned.model)
    with pytest.raises(DataError, match=f"--finetune few.parquet: {BATCH - 1} usable rows"):
        training_rows(source.schema, source.encoders, source.cfg, small)
