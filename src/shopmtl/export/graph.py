"""A zoo model behind the plain-tensor signature (``runtime.signature``), exported to ONNX.

``TensorModel`` rebuilds the ``Batch`` the model reads from the signature's tensors (a missing
group is a zero-width tensor, as the encoders give it) and returns each task's activated output
(``MultiTaskModel.predict``), so the graph computes exactly what ``predict_table`` does.

The exporter is torch's own (``torch.onnx.export(dynamo=True)``: ``torch.export`` + onnxscript,
the default since torch 2.9): the graph it writes is what the model computes and no more
(37 nodes for the quickstart's SharedBottom where the legacy TorchScript exporter, which warns
that it is being removed, wrote 130 with its shape arithmetic spelt out). The batch axis is a
``torch.export.Dim``; the weights are kept inside the one ``.onnx`` file (no external data), so
the bundle's manifest hashes every byte the runtime reads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shopmtl.config import ConfigError
from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.deps import require
from shopmtl.export.runtime import FLOAT32, SEQ_PREFIX, signature
from shopmtl.models.base import MultiTaskModel

EXAMPLE_ROWS = 3  # the example batch traced (not 0 or 1: torch.export would fix those sizes)


class UnsupportedModel(ConfigError):
    """The model cannot be exported yet (content features, a joint model, a name clash)."""


def exportable(schema: Schema) -> None:
    """Refuse, in one line, what the exported signature cannot carry yet."""
    if schema.content_features:
        names = [f.name for f in schema.content_features]
        raise UnsupportedModel(f"export of content features ({', '.join(names)}: text, image, "
                               "vector) is not yet supported")
    clash = sorted({i.name for i in signature(schema)} & set(schema.task_names))
    if clash:
        raise UnsupportedModel(f"task name(s) {clash} clash with the graph's input names")
    if not signature(schema):
        raise UnsupportedModel("the schema has no inputs to export")


class TensorModel(nn.Module):
    """``model`` with plain tensors in (``signature(schema)``, in that order) and a tuple of
    one activated output per task (``schema.task_names`` order) out."""

    def __init__(self, model: MultiTaskModel, schema: Schema) -> None:
        super().__init__()
        self.model = model
        self.inputs = signature(schema)
        self.tasks = schema.task_names
        self.seq_len = max((f.max_len for f in schema.of_kind("sequence")), default=0)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        x = dict(zip((i.name for i in self.inputs), tensors, strict=True))
        b = tensors[0].shape[0]
        cat = x.get("categorical", tensors[0].new_zeros((b, 0), dtype=torch.long))
        num = x.get("numeric", tensors[0].new_zeros((b, 0), dtype=torch.float32))
        seqs = [F.pad(x[i.name], (0, self.seq_len - i.width)) for i in self.inputs
                if i.name.startswith(SEQ_PREFIX)]
        seq = (torch.stack(seqs, 1) if seqs
               else tensors[0].new_zeros((b, 0, 0), dtype=torch.long))
        scenario = x.get("scenario", tensors[0].new_zeros((b,), dtype=torch.long))
        empty = tensors[0].new_zeros((b, 0), dtype=torch.float32)
        batch = Batch(cat, num, seq, scenario, empty, empty.bool())
        probs = self.model.predict(batch)
        return tuple(probs[t] for t in self.tasks)


def example_inputs(schema: Schema, rows: int = EXAMPLE_ROWS) -> tuple[Tensor, ...]:
    """A batch of zeros (the OOV id, the first scenario): valid input of every model."""
    return tuple(torch.zeros((rows, i.width) if i.width else (rows,),
                             dtype=torch.float32 if i.dtype == FLOAT32 else torch.long)
                 for i in signature(schema))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines, warnings and log records (torchvision missing, a
    deprecated pytree call inside torch) are not the user's business: kept out of the output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: MultiTaskModel, schema: Schema, path: Path) -> Path:
    """Write ``model`` as one ONNX file at ``path`` and check it
    (``onnx.checker.check_model(full_check=True)``: the graph, the types and the inferred
    shapes). Returns ``path``."""
    exportable(schema)
    onnx = require("onnx", "export", "shopmtl export")
    require("onnxscript", "export", "shopmtl export")  # torch.onnx's exporter imports it
    wrapper = TensorModel(model.eval(), schema).eval()
    names = [i.name for i in wrapper.inputs]
    batch = torch.export.Dim("batch")
    with _quiet():
        program = torch.onnx.export(
            wrapper, example_inputs(schema), dynamo=True, input_names=names,
            output_names=list(schema.task_names),
            # one entry per parameter of forward: *tensors is one, a tuple of every input's
            dynamic_shapes=(tuple({0: batch} for _ in names),),
            external_data=False, optimize=True, verbose=False, report=False)
    graph = fold_constant_concats(strip_metadata(program.model_proto))
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return path


def strip_metadata(graph):
    """The exporter annotates every node with its PyTorch origin (the FX node, the source
    stack trace, the module path): useful to debug an export, not to run one, and a trace
    names files of the machine that exported it. Dropped: a bundle carries the computation
    only (the quickstart model's file 5 % smaller, its int8 file 14 %)."""
    for node in graph.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return graph


def fold_constant_concats(graph):
    """A ``Concat`` of weights only, computed at every call, replaced by its result stored once.

    ``nn.moe.read_once`` concatenates the experts' first layer and the gates' weights so one
    GEMM reads the input once; exported, that is a ``Concat`` of initializers feeding a
    ``Gemm``, which the exporter's optimiser leaves (too large to fold) and which hides the
    weight from the int8 quantiser (it quantises initializers only): the census MMoE's int8
    file was 0.97x its fp32 one. Folded, the ``Gemm`` reads one initializer; the bytes are the
    same and so is every output."""
    from onnx import numpy_helper

    g = graph.graph
    inits = {i.name: i for i in g.initializer}
    for node in list(g.node):
        if node.op_type != "Concat" or not all(n in inits for n in node.input):
            continue
        axis = next(a.i for a in node.attribute if a.name == "axis")
        value = np.concatenate([numpy_helper.to_array(inits[n]) for n in node.input], axis)
        g.initializer.append(numpy_helper.from_array(value, node.output[0]))
        g.node.remove(node)
    used = {n for node in g.node for n in node.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    names = {i.name for i in g.initializer}
    for info in [v for v in g.value_info if v.name in names]:
        g.value_info.remove(info)
    return graph
