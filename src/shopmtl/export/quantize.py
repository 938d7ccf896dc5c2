"""int8 weights by onnxruntime's dynamic quantisation (``quantize_dynamic``).

Dynamic quantisation needs no calibration data: weights are stored int8 with a scale, and each
MatMul's activations are quantised on the fly (``DynamicQuantizeLinear`` -> ``MatMulInteger``).
Gemm nodes (every ``nn.Linear`` of the exported graph) are rewritten to MatMul + Add by the
quantiser first, so every dense layer is quantised. ``Gather`` on a weight is the embedding
lookup: its table is stored int8 and only the rows looked up are dequantised. In a
recommendation model the tables are most of the bytes (the quickstart's: docs/DEPLOY.md), so
quantising them is what makes the file small; AUC is measured at export and in the bench.

The exporter writes the shapes of initializers into ``value_info``; the quantiser transposes
a Gemm's weight when it makes it a MatMul and its shape inference then fails on the stale entry
("Inferred shape and existing shape differ"), so ``value_info`` is cleared first (onnx infers
it again).

``quantize_int8_static`` is the calibrated form (``shopmtl export --int8 --calibrate TRAIN``):
onnxruntime's ``quantize_static`` runs the fp32 graph on a sample of training rows, takes each
quantised activation's range there (MinMax) and writes it into the graph as a constant
QuantizeLinear / DequantizeLinear pair (QDQ format). The scales are then fixed: a row's int8
answer no longer depends on the other rows of its onnxruntime call, which dynamic quantisation's
per-call activation scale does (docs/DEPLOY.md: the server combines concurrent requests).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl.config import ConfigError
from shopmtl.data.encoders import Encoded
from shopmtl.data.ingest import BadRowLog, DataError
from shopmtl.data.schema import Schema
from shopmtl.deps import require
from shopmtl.export.runtime import Input, feeds
from shopmtl.export.scenario import select
from shopmtl.predict import read_encoded

OP_TYPES = ("MatMul", "Gemm", "Gather")  # dense layers and embedding tables
INT8_TYPES = (2, 3)  # onnx.TensorProto.UINT8, INT8


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantiser logs a pre-processing advice on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32: Path, out: Path, op_types: tuple[str, ...] = OP_TYPES) -> dict:
    """``fp32`` (an exported graph) quantised into ``out``: weights of ``op_types`` int8
    (symmetric, per tensor). Returns what was quantised: per op type of the fp32 graph, how
    many of its weights became int8 (``quantized``), the op types asked for, the method."""
    onnx = require("onnx", "export", "shopmtl export --int8")
    q = require("onnxruntime.quantization", "export", "shopmtl export --int8")
    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        plain = Path(tmp) / "plain.onnx"
        onnx.save(model, str(plain))
        q.quantize_dynamic(str(plain), str(out), weight_type=q.QuantType.QInt8,
                           op_types_to_quantize=list(op_types))
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    return {"method": "onnxruntime.quantization.quantize_dynamic (weights int8, per tensor; "
                      "MatMul activations quantised at run time)",
            "op_types_asked": list(op_types), "quantized": _quantized_weights(model, quantized)}


def _quantized_weights(before, after) -> dict[str, int]:
    """Per op type of the fp32 graph, how many of its weight initializers the int8 graph holds
    as int8 (the quantiser names them ``<weight>_quantized``)."""
    int8 = {i.name.removesuffix("_quantized") for i in after.graph.initializer
            if i.data_type in INT8_TYPES}
    consumer = {}
    for node in before.graph.node:
        for name in node.input:
            consumer.setdefault(name, node.op_type)
    return dict(sorted(Counter(consumer[w] for w in int8 if w in consumer).items()))


CALIBRATION_ROWS = 2048  # --calibration-rows' default: MinMax ranges settle well before
MIN_CALIBRATION_ROWS = 100  # fewer and a range is a handful of rows' extremes
CALIBRATION_SEED = 0  # the sample of a larger file: the same rows at every export
CALIBRATE_BATCH = 256  # rows per calibration call: the ranges are a max over all calls


@dataclass(frozen=True)
class Calibration:
    """What ``--int8 --calibrate FILE [--calibration-rows N]`` asks for: static int8 with its
    activation ranges taken on ``rows`` rows of ``path`` (training rows)."""

    path: Path
    rows: int = CALIBRATION_ROWS


def check_calibration(cal: Calibration | None, int8: bool, data: Path) -> None:
    """Refusals before any work: calibration only quantises, needs a file that exists, is not
    the held-out ``data`` (its AUC would be measured on the rows that set the ranges), and
    enough rows."""
    if cal is None:
        return
    if not int8:
        raise ConfigError("--calibrate: calibration sets int8 activation ranges; add --int8")
    if cal.rows < MIN_CALIBRATION_ROWS:
        raise ConfigError(f"--calibration-rows {cal.rows}: at least {MIN_CALIBRATION_ROWS}")
    if not cal.path.is_file():
        raise DataError(f"--calibrate {cal.path.name}: no such file")
    if cal.path.resolve() == data.resolve():
        raise ConfigError(f"--calibrate {cal.path.name}: that is the held-out --data the "
                          "export measures on; calibrate on training rows")


def read_calibration(schema: Schema, encoders: Any, chunk_rows: int, cal: Calibration
                     ) -> Encoded:
    """Every row of the calibration file, read and encoded as the export's held-out rows are
    (the model's reader and encoders: a file of another schema is refused by the reader,
    naming the column; a bad row stops the export)."""
    log = BadRowLog("fail", 1.0, stop_at_first=False)
    try:
        enc = read_encoded(schema, encoders, cal.path, log, chunk_rows)
        log.raise_if_bad()
    except DataError as e:
        raise DataError(f"--calibrate {cal.path.name}: {e}") from None
    n = 0 if enc is None else len(enc)
    if enc is None or n < MIN_CALIBRATION_ROWS:
        raise DataError(f"--calibrate {cal.path.name}: {n} usable rows; calibration needs at "
                        f"least {MIN_CALIBRATION_ROWS}")
    return enc


def calibration_sample(enc: Encoded, schema: Schema, cal: Calibration
                       ) -> tuple[Encoded, dict[str, Any]]:
    """At most ``cal.rows`` rows of ``enc`` (a seeded sample without replacement, in file
    order, when there are more) and the record meta.json keeps of them: the file's name and
    SHA-256, the rows used and available, the seed."""
    n = len(enc)
    if n > cal.rows:
        rng = np.random.default_rng(CALIBRATION_SEED)
        enc = select(enc, np.sort(rng.choice(n, cal.rows, replace=False)), schema)
    digest = hashlib.sha256(cal.path.read_bytes()).hexdigest()
    return enc, {"file": cal.path.name, "sha256": digest, "rows": len(enc),
                 "rows_in_file": n, "seed": CALIBRATION_SEED, "method": "MinMax"}


def calibration_batches(inputs: tuple[Input, ...], enc: Encoded
                        ) -> list[dict[str, np.ndarray]]:
    """``enc`` as the graph's inputs, ``CALIBRATE_BATCH`` rows per batch."""
    return [feeds(inputs, enc, s, s + CALIBRATE_BATCH)
            for s in range(0, len(enc), CALIBRATE_BATCH)]


def calibration_reader(q, batches: Sequence[dict[str, np.ndarray]]):
    """A ``CalibrationDataReader`` over prepared ``runtime.feeds`` batches (onnxruntime asks
    for one batch at a time until it gets None)."""

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return Reader()


def quantize_int8_static(fp32: Path, out: Path, batches: Sequence[dict[str, np.ndarray]],
                         op_types: tuple[str, ...] = OP_TYPES) -> dict:
    """``fp32`` quantised into ``out`` with fixed activation scales taken from ``batches``
    (the graph's inputs, ``runtime.feeds`` of calibration rows): weights of ``op_types`` int8
    (symmetric, per tensor), their activations uint8 (asymmetric) with MinMax ranges, QDQ
    format: onnxruntime's CPU kernels fuse it into uint8 x int8 integer MatMuls (int8
    activations ran up to 7x slower here; per-channel weights are refused at run time on
    MMoE's batched expert MatMul; Percentile and Entropy ranges gave no better AUC:
    bench/export_int8_forms.py, docs/DEPLOY.md). Returns what was quantised, as
    ``quantize_int8`` does."""
    onnx = require("onnx", "export", "shopmtl export --int8 --calibrate")
    q = require("onnxruntime.quantization", "export", "shopmtl export --int8 --calibrate")
    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        plain = Path(tmp) / "plain.onnx"
        onnx.save(model, str(plain))
        q.quantize_static(str(plain), str(out), calibration_reader(q, batches),
                          quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    return {"method": "onnxruntime.quantization.quantize_static (QDQ; weights int8 per tensor; "
                      "activations uint8, MinMax ranges fixed by calibration)",
            "op_types_asked": list(op_types), "quantized": _quantized_weights(model, quantized)}
