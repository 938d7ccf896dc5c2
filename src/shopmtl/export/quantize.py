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
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from shopmtl.deps import require

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
