"""``shopmtl export --int8 --calibrate TRAIN``: static int8, activation scales fixed at export.

One small SharedBottom (a 20,000-row synthetic world, one epoch) is exported once per module
by the CLI with static int8 (calibrated on the world's training file) and by the API with
dynamic int8, the control. The tests check that the static bundle loads and scores close to
its model, that a row's answer does not depend on the other rows of its onnxruntime call
(and that the same check fails for dynamic int8, so it can fail), what meta.json records of
the calibration, that the calibration is reproducible, and the refusals.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import shopmtl
from shopmtl.config import ConfigError
from shopmtl.data.ingest import DataError
from shopmtl.export.bundle import export_bundle, held_out_rows, load_source
from shopmtl.export.quantize import (
    CALIBRATION_SEED,
    MIN_CALIBRATION_ROWS,
    Calibration,
    calibration_batches,
    calibration_sample,
    quantize_int8_static,
    read_calibration,
)
from shopmtl.export.runtime import OnnxForward, feeds, signature
from tests.export.world import trained_zoo
from tests.helpers import assert_one_error_line, cli

TASKS = ("click", "conversion", "ad_click")
ROWS = 500  # --calibration-rows: fewer than the training file holds, so it is a sample
AUC_DROP = 0.01  # a one-epoch model on 4,000 test rows: int8's AUC within this of fp32's


@dataclass
class Exported:
    model: Path  # the zoo model directory
    train: Path  # the world's training rows (the calibration file)
    test: Path  # its held-out rows (--data)
    static: Path  # --int8 --calibrate train
    dynamic: Path  # --int8
    printed: str  # what `shopmtl export --int8 --calibrate` printed


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("static")
    model = trained_zoo(root)
    train, test = root / "w" / "train.parquet", root / "w" / "test.parquet"
    proc = cli("export", str(model), "--out", str(root / "static"), "--data", str(test),
               "--int8", "--calibrate", str(train), "--calibration-rows", str(ROWS), check=True)
    export_bundle(model, root / "dynamic", test, int8=True)
    return Exported(model, train, test, root / "static", root / "dynamic", proc.stdout)


def meta(bundle: Path) -> dict:
    return json.loads((bundle / "meta.json").read_text())


def graph_of(bundle: Path, exported: Exported) -> OnnxForward:
    """The bundle's int8 graph on one thread, one call per ``run``."""
    return OnnxForward(bundle / "model.int8.onnx", load_source(exported.model).schema, threads=1)


def solo_vs_batch(forward: OnnxForward, exported: Exported, n: int = 64) -> float:
    """The largest difference, over rows 0..n-1 of the test file and every task, between a
    row scored alone and the same row scored in one call with the rows after it."""
    source = load_source(exported.model)
    enc = held_out_rows(source, exported.test)
    inputs = signature(source.schema)
    worst = 0.0
    for i in range(n):
        solo = forward.run(feeds(inputs, enc, i, i + 1))
        shared = forward.run(feeds(inputs, enc, i, i + 200))  # row i first, then 199 others
        worst = max(worst, *(float(abs(a[0] - b[0])) for a, b in zip(solo, shared, strict=True)))
    return worst


def test_the_static_bundle_loads_and_scores_close_to_fp32(exported: Exported) -> None:
    import onnx

    graph = onnx.load(str(exported.static / "model.int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    # fixed scales (QDQ pairs), no per-call activation scale
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    m = meta(exported.static)
    assert m["precision"] == "int8" and m["model_file"] == "model.int8.onnx"
    q = m["checks"]["quality"]
    for t in TASKS:
        assert abs(q["onnx_int8"][t]["auc"] - q["pytorch_fp32"][t]["auc"]) <= AUC_DROP, t
    # the same weights int8 as dynamic, plus a scale and zero point per activation (a tiny
    # model's graph is mostly dense layers: 0.6x fp32 here, the quickstart's 0.29x)
    size = m["checks"]["size_bytes"]
    assert size["int8"] <= 0.7 * size["fp32"]
    assert size["int8"] <= 1.2 * meta(exported.dynamic)["checks"]["size_bytes"]["int8"]
    # scored through shopmtl.load like any bundle (its manifest verified), near its model
    rows = pq.read_table(exported.test).slice(0, 1000)
    got = shopmtl.load(exported.static).predict(rows)
    ref = shopmtl.load(exported.model).predict(rows)
    worst = max(float(np.abs(got.column(t).to_numpy() - ref.column(t).to_numpy()).max())
                for t in TASKS)
    assert 0 < worst <= 0.05  # int8: not fp32, and not far from it
    assert worst <= 2 * m["checks"]["parity_int8"]["max"] + 1e-3
    assert "static int8, calibrated on 500 of" in exported.printed


def test_static_int8_is_batch_invariant_and_dynamic_is_not(exported: Exported) -> None:
    assert solo_vs_batch(graph_of(exported.static, exported), exported) <= 1e-7
    # the control: the same check on dynamic int8 (activation scale per call) fails
    assert solo_vs_batch(graph_of(exported.dynamic, exported), exported) > 1e-5


def test_the_manifest_records_the_calibration(exported: Exported) -> None:
    m = meta(exported.static)
    cal = m["quantization"]["calibration"]
    n_train = pq.read_metadata(exported.train).num_rows
    assert cal == {"file": "train.parquet",
                   "sha256": hashlib.sha256(exported.train.read_bytes()).hexdigest(),
                   "rows": ROWS, "rows_in_file": n_train, "seed": CALIBRATION_SEED,
                   "method": "MinMax"}
    assert "quantize_static" in m["quantization"]["method"]
    assert m["quantization"]["quantized"] == meta(exported.dynamic)["quantization"]["quantized"]
    assert "calibration" not in meta(exported.dynamic)["quantization"]
    manifest = json.loads((exported.static / "manifest.json").read_text())
    meta_sha = hashlib.sha256((exported.static / "meta.json").read_bytes()).hexdigest()
    assert meta_sha in json.dumps(manifest)


def test_the_calibration_is_reproducible(exported: Exported, tmp_path: Path) -> None:
    """The same file and row count give the same sample and the same graph bytes; another
    row count another sample."""
    source = load_source(exported.model)
    enc = read_calibration(source.schema, source.encoders, 8192, Calibration(exported.train))
    a, _ = calibration_sample(enc, source.schema, Calibration(exported.train, ROWS))
    b, _ = calibration_sample(enc, source.schema, Calibration(exported.train, ROWS))
    c, _ = calibration_sample(enc, source.schema, Calibration(exported.train, ROWS + 1))
    assert np.array_equal(a.cat, b.cat) and not np.array_equal(a.cat[:ROWS], c.cat[:ROWS])
    fp32 = tmp_path / "model.onnx"
    from shopmtl.export.graph import export_onnx

    export_onnx(source.model.eval(), source.schema, fp32)
    batches = calibration_batches(signature(source.schema), a)
    quantize_int8_static(fp32, tmp_path / "1.onnx", batches)
    quantize_int8_static(fp32, tmp_path / "2.onnx", batches)
    assert (tmp_path / "1.onnx").read_bytes() == (tmp_path / "2.onnx").read_bytes()
    # and the bundle's graph is that graph: the CLI calibrated on the same sample
    assert (tmp_path / "1.onnx").read_bytes() == (
        exported.static / "model.int8.onnx").read_bytes()


def test_calibrate_without_int8_is_a_usage_error(exported: Exported, tmp_path: Path) -> None:
    proc = cli("export", str(exported.model), "--out", str(tmp_path / "b"), "--data",
               str(exported.test), "--calibrate", str(exported.train))
    assert_one_error_line(proc, "--calibrate", "--int8", code=2)
    assert not (tmp_path / "b").exists()


def test_the_calibration_refusals(exported: Exported, tmp_path: Path) -> None:
    def export(cal: Calibration) -> None:
        export_bundle(exported.model, tmp_path / "b", exported.test, int8=True, calibrate=cal)

    with pytest.raises(DataError, match=r"--calibrate nowhere\.parquet: no such file"):
        export(Calibration(tmp_path / "nowhere.parquet"))
    with pytest.raises(ConfigError, match="held-out --data"):
        export(Calibration(exported.test))
    with pytest.raises(ConfigError, match=f"--calibration-rows 10: at least "
                                          f"{MIN_CALIBRATION_ROWS}"):
        export(Calibration(exported.train, 10))
    table = pq.read_table(exported.train)
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"--calibrate empty\.parquet: 0 usable rows"):
        export(Calibration(tmp_path / "empty.parquet"))
    pq.write_table(table.slice(0, 50), tmp_path / "few.parquet")
    with pytest.raises(DataError, match=r"--calibrate few\.parquet: 50 usable rows"):
        export(Calibration(tmp_path / "few.parquet"))
    # another schema: a column the model reads is missing; the error names it
    missing = "hist_leaf"
    assert missing in table.column_names
    pq.write_table(table.drop_columns([missing]), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=f"--calibrate other.parquet: .*{missing}"):
        export(Calibration(tmp_path / "other.parquet"))
    assert not (tmp_path / "b").exists()


def test_a_sub_model_calibrates_on_its_scenario_rows(exported: Exported) -> None:
    """With ``--scenario S`` the sample is S's rows, encoded as the sub-bundle reads them (one
    scenario, index 0), and the record counts S's rows of the file."""
    from shopmtl.export.bundle import calibration_rows, variant

    source = load_source(exported.model)
    s = source.schema.scenario.values[0]
    # the variant's own rows only need 1,000 of S's: the training file has them
    v = variant(source, held_out_rows(source, exported.train), scenario=s)
    rows, record = calibration_rows(source, v, Calibration(exported.train, ROWS))
    column = source.schema.scenario.column
    in_file = int((pq.read_table(exported.train).column(column).to_numpy() == s).sum())
    assert 0 < in_file < pq.read_metadata(exported.train).num_rows
    assert record["rows_in_file"] == in_file and record["rows"] == len(rows) == min(ROWS,
                                                                                    in_file)
    assert set(np.unique(rows.scenario)) == {0}
    batches = calibration_batches(signature(v.schema), rows)
    assert "scenario" not in batches[0]  # the sub-model's graph has no scenario input
