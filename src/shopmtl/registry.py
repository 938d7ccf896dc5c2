"""Name -> implementation tables, used only where names come in (CLI, config, serving)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from shopmtl.config import ConfigError, from_dict
from shopmtl.data.schema import Schema
from shopmtl.models.aitm import AITM, AITMConfig
from shopmtl.models.base import MultiTaskModel
from shopmtl.models.esmm import ESMM, ESMMConfig
from shopmtl.models.m2m import M2M, M2MConfig
from shopmtl.models.mmoe import MMoE, MMoEConfig
from shopmtl.models.pepnet import PEPNet, PEPNetConfig
from shopmtl.models.ple import PLE, PLEConfig
from shopmtl.models.shared_bottom import SharedBottom, SharedBottomConfig
from shopmtl.models.star import STAR, STARConfig
from shopmtl.nn.layers import FeatureEmbedding

MODELS: dict[str, tuple[type[MultiTaskModel], type]] = {
    "shared_bottom": (SharedBottom, SharedBottomConfig),
    "mmoe": (MMoE, MMoEConfig),
    "ple": (PLE, PLEConfig),
    "esmm": (ESMM, ESMMConfig),
    "aitm": (AITM, AITMConfig),
    "star": (STAR, STARConfig),
    "pepnet": (PEPNet, PEPNetConfig),
    "m2m": (M2M, M2MConfig),
}


def model_config(name: str, args: dict[str, Any]) -> Any:
    """The Config of model ``name`` from ``args``, checked strictly (names, types, ranges):
    ConfigError naming ``model.name`` or the ``model.args`` key otherwise."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model '{name}'; valid: {sorted(MODELS)}")
    return from_dict(MODELS[name][1], dict(args), "model.args")


def build_model(
    name: str,
    args: dict[str, Any],
    schema: Schema,
    vocab_sizes: dict[str, int],
    content: dict[str, Tensor] | None = None,
) -> MultiTaskModel:
    """``content``: the fitted content matrices (``Encoders.content_tensors()``), copied into
    every ``FeatureEmbedding`` of the model; needed only when the schema has content features."""
    config = model_config(name, args)
    model = MODELS[name][0](schema, vocab_sizes, config)  # type: ignore[call-arg]
    if content is not None:
        for m in model.modules():
            if isinstance(m, FeatureEmbedding):
                m.load_content(content)
    return model
