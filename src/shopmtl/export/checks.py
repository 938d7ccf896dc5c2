"""What ``shopmtl export`` measures before it writes a bundle, all on held-out labelled rows.

- parity: the max abs difference of every task's output between the PyTorch model and the
  ONNX graph, on the first ``PARITY_ROWS`` rows scored ``b`` rows per call for every ``b`` of
  ``PARITY_BATCHES`` (PyTorch at the same batch size: a kernel may sum in another order at
  another size, and that is not the graph's error). An fp32 graph further than
  ``FP32_TOLERANCE`` from its model is refused (``ParityError``): it is not the same model.
- quality: AUC and logloss per task (``train.evaluate.metrics_by_scenario``, over all rows of
  the file), PyTorch fp32 beside the ONNX variant: what int8 costs.
- latency: p50 / p99 of one onnxruntime call on 1 row and on 100 rows (one intra-op thread:
  what one request gets on a busy server), the PyTorch model on the same tensors beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shopmtl.data.dataset import TensorTable
from shopmtl.data.encoders import Encoded
from shopmtl.data.schema import Schema
from shopmtl.export.graph import TensorModel
from shopmtl.export.runtime import OnnxForward, feeds, signature
from shopmtl.models.base import MultiTaskModel
from shopmtl.predict import Forward, torch_forward
from shopmtl.train.evaluate import metrics_by_scenario

MIN_ROWS = 1000  # the floor for a parity check
PARITY_ROWS = 1024  # >= MIN_ROWS: at batch 1 each row is one call of each runtime
PARITY_BATCHES = (1, 7, 512)
FP32_TOLERANCE = 1e-5
LATENCY = ((1, 500), (100, 200))  # (rows per call, timed calls)
WARMUP = 20
QUALITY_KEYS = ("n", "auc", "logloss", "rmse")


class ParityError(RuntimeError):
    """An exported fp32 graph does not compute what its PyTorch model does."""


def max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Per task, the max abs difference of two sets of outputs (0 for no rows)."""
    return {t: float(np.max(np.abs(a[t] - b[t]), initial=0.0)) for t in a}


def head(enc: Encoded, n: int) -> Encoded:
    """The first ``n`` rows of ``enc``."""
    return Encoded(**{k: None if (v := getattr(enc, k)) is None else v[:n]
                      for k in Encoded.__dataclass_fields__})


def reference(model: MultiTaskModel, enc: Encoded) -> dict[int, dict[str, np.ndarray]]:
    """The PyTorch model's outputs on the first ``PARITY_ROWS`` rows, scored ``b`` rows per
    call for each ``b`` of ``PARITY_BATCHES``: what ``parity`` compares a graph with
    (computed once for the fp32 and the int8 graph)."""
    rows = head(enc, PARITY_ROWS)
    return {b: torch_forward(model, b)(rows) for b in PARITY_BATCHES}


def parity(ref: dict[int, dict[str, np.ndarray]], onnx_at: Callable[[int], Forward],
           enc: Encoded) -> dict[str, Any]:
    """Max abs difference per task between the PyTorch outputs ``ref`` (``reference``) and
    ``onnx_at(b)`` (the graph scoring ``b`` rows per call) on the same rows at the same batch
    size; ``max`` over all of them."""
    rows = head(enc, PARITY_ROWS)
    by_batch = {str(b): max_abs(want, onnx_at(b)(rows)) for b, want in ref.items()}
    worst = max((v for per in by_batch.values() for v in per.values()), default=0.0)
    return {"rows": len(rows), "batches": list(ref), "by_batch": by_batch, "max": worst}


def quality(schema: Schema, enc: Encoded, preds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per task, over every labelled row: n and the type's metrics among ``QUALITY_KEYS``."""
    m = metrics_by_scenario(schema, TensorTable(enc), preds)
    return {t: {k: per["all"][k] for k in QUALITY_KEYS if k in per["all"]}
            for t, per in m.items() if "all" in per}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "calls": len(ms)}


def _timed(call: Callable[[int, int], object], n: int) -> dict[str, dict[str, float]]:
    """p50/p99 of ``call(start, stop)`` for each (rows, calls) of ``LATENCY``, over rows that
    move through the first ``n`` (a new row each time, not one cached answer)."""
    out = {}
    for rows, calls in LATENCY:
        starts = [(i * rows) % max(n - rows + 1, 1) for i in range(WARMUP + calls)]
        seconds = []
        for i, s in enumerate(starts):
            t0 = time.perf_counter()
            call(s, s + rows)
            if i >= WARMUP:
                seconds.append(time.perf_counter() - t0)
        out[f"batch_{rows}"] = _percentiles(seconds)
    return out


def onnx_latency(path: Path, schema: Schema, enc: Encoded) -> dict[str, dict[str, float]]:
    """Latency of one onnxruntime call (one intra-op thread) on prepared inputs."""
    fwd = OnnxForward(path, schema, threads=1)
    return _timed(lambda s, e: fwd.run(feeds(fwd.inputs, enc, s, e)), len(enc))


def torch_latency(model: MultiTaskModel, schema: Schema, enc: Encoded
                  ) -> dict[str, dict[str, float]]:
    """Latency of the PyTorch model's forward (one thread, inference mode) on the same inputs
    as ``onnx_latency``: the reference the graph is compared with."""
    wrapper = TensorModel(model.eval(), schema).eval()
    inputs = signature(schema)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return _timed(lambda s, e: wrapper(*(torch.from_numpy(a) for a in
                                                 feeds(inputs, enc, s, e).values())), len(enc))
    finally:
        torch.set_num_threads(threads)
