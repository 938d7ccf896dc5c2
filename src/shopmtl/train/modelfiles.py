"""What a zoo model directory holds besides its weights: the config, schema and encoders.

Its own module, apart from ``train.trainer``, because reading them needs no torch: an exported
ONNX bundle keeps these three files as its source wrote them, and ``shopmtl.load(BUNDLE)``
reads them here, so a server of a bundle never imports the training stack or torch
(``train.trainer.load_model_dir`` adds the PyTorch model on top of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shopmtl.config import ExperimentConfig, from_dict
from shopmtl.data.encoders import Encoders
from shopmtl.data.schema import Schema
from shopmtl.train import checkpoint as ck

if TYPE_CHECKING:
    import torch


def read_model_files(path: Path) -> tuple[ExperimentConfig, Schema, Encoders,
                                          dict[str, torch.Tensor] | None]:
    """The config, schema, encoders and content matrices of a model directory (or of an
    exported bundle, which keeps the first three as its source wrote them), not verified.
    Only a schema with content features reads tensors (and so imports torch)."""
    cfg = from_dict(ExperimentConfig, ck.read_json(path, "config"))
    schema = from_dict(Schema, ck.read_json(path, "schema"))
    content = ck.read_tensors(path, "content") if schema.content_features else None
    return cfg, schema, Encoders.from_json(schema, ck.read_json(path, "encoders"), content), content
