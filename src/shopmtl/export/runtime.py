"""The plain-tensor signature of an exported zoo model and its forward by onnxruntime.

A zoo model reads a ``Batch``; a deployed one should read what any runtime can feed, named and
typed, derived from the schema alone (no PyTorch, no shopmtl object). The inputs, only those
the schema has, in this order:

  categorical     int64 [B, C]    one column per categorical feature (schema order), encoded ids
  numeric         float32 [B, N]  one column per numeric feature, standardised
  seq_<feature>   int64 [B, L]    one per sequence feature, L its max_len, 0 = padding
  scenario        int64 [B]       the scenario's index in the schema's list (absent when the
                                  schema has one scenario: a constant, e.g. ``--scenario``)

and one output per task, named as the task: its activated output (a binary task's probability)
[B], what ``predict_table`` gives.
The batch axis is dynamic. ``feeds`` cuts ``Encoded`` rows (the encoders' output, the same for
PyTorch and ONNX) into those arrays; ``OnnxForward`` runs them: a ``predict.Forward``, so a
bundle scores through ``predict.score_chunks`` like its source model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shopmtl.data.encoders import Encoded
from shopmtl.data.schema import Schema
from shopmtl.deps import require
from shopmtl.train.checkpoint import CheckpointError

INT64, FLOAT32 = "int64", "float32"
SEQ_PREFIX = "seq_"
BATCH = 4096  # rows per onnxruntime call when scoring a file


@dataclass(frozen=True)
class Input:
    """One graph input: ``name``, numpy ``dtype``, ``width`` (0: a vector [B]) and the columns
    it holds (feature names, or the scenario column)."""

    name: str
    dtype: str
    width: int
    columns: tuple[str, ...]

    def describe(self) -> dict:
        """As written into the bundle's meta.json (what a client of the graph reads)."""
        return {"name": self.name, "dtype": self.dtype,
                "shape": ["batch", self.width] if self.width else ["batch"],
                "columns": list(self.columns)}


def signature(schema: Schema) -> tuple[Input, ...]:
    """The inputs of the exported graph of a model on ``schema`` (module docstring). A schema
    with content features (text, image, vector) is not exported yet: ``graph.exportable``."""
    cats = tuple(f.name for f in schema.of_kind("categorical"))
    nums = tuple(f.name for f in schema.of_kind("numeric"))
    out = []
    if cats:
        out.append(Input("categorical", INT64, len(cats), cats))
    if nums:
        out.append(Input("numeric", FLOAT32, len(nums), nums))
    out += [Input(SEQ_PREFIX + f.name, INT64, f.max_len, (f.name,))
            for f in schema.of_kind("sequence")]
    if schema.scenario is not None and len(schema.scenario_names) > 1:
        out.append(Input("scenario", INT64, 0, (schema.scenario.column,)))
    return tuple(out)


def feeds(inputs: tuple[Input, ...], enc: Encoded, start: int = 0, stop: int | None = None
          ) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of ``enc`` as the graph's inputs (contiguous, typed)."""
    rows = slice(start, stop)
    seq_index = 0
    out = {}
    for i in inputs:
        if i.name == "categorical":
            a = enc.cat[rows]
        elif i.name == "numeric":
            a = enc.num[rows]
        elif i.name == "scenario":
            a = enc.scenario[rows]
        else:  # the sequences, in schema order: enc.seq [n, Fs, L_max]
            a = enc.seq[rows, seq_index, : i.width]
            seq_index += 1
        out[i.name] = np.ascontiguousarray(a, dtype=i.dtype)
    return out


def session_options(threads: int = 0):
    """onnxruntime session options: ``threads`` intra-op threads (0: onnxruntime's default, one
    per core), one inter-op thread, warnings only."""
    ort = require("onnxruntime", "export", "an ONNX bundle")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class OnnxForward:
    """An ONNX graph of ``signature(schema)`` run by onnxruntime on the CPU: called with
    ``Encoded`` rows it returns one float32 array [n] per task (a ``predict.Forward``), scored
    ``batch_size`` rows per call. The graph's input and output names are checked against the
    schema's when it is opened: a graph from another model is refused (``CheckpointError``)."""

    def __init__(self, path: Path, schema: Schema, threads: int = 0, batch_size: int = BATCH
                 ) -> None:
        ort = require("onnxruntime", "export", "an ONNX bundle")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes for a bad file
            raise CheckpointError(f"{path}: not a loadable ONNX model ({type(e).__name__})"
                                  ) from None
        self.inputs, self.tasks = signature(schema), schema.task_names
        self.batch_size = batch_size
        got = ([i.name for i in self.session.get_inputs()],
               [o.name for o in self.session.get_outputs()])
        want = ([i.name for i in self.inputs], list(self.tasks))
        if got != want:
            raise CheckpointError(f"{path}: the graph reads {got[0]} and answers {got[1]}; its "
                                  f"schema needs {want[0]} -> {want[1]}")

    def run(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One onnxruntime call on prepared ``feeds``: one array per task, in task order."""
        return self.session.run(None, batch)

    def __call__(self, enc: Encoded) -> dict[str, np.ndarray]:
        n = len(enc)
        outs: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}
        for start in range(0, n, self.batch_size):
            got = self.run(feeds(self.inputs, enc, start, start + self.batch_size))
            for t, a in zip(self.tasks, got, strict=True):
                outs[t].append(np.asarray(a, np.float32))
        return {t: np.concatenate(v) if v else np.zeros(0, np.float32) for t, v in outs.items()}
