"""Joint optimisation of the task losses: how T task losses become one parameter update.

``build_weighting(name, args, task_names)`` makes one from a config; the one training loop
(``train.loop.Loop.step``) runs it. Loss weightings (equal, static,
uncertainty, dwa, rlw) differentiate ``sum_i w_i L_i``; gradient weightings (gradnorm and the
TorchJD aggregators) look at per-task gradients on ``model.shared_parameters()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shopmtl.config import ConfigError, from_dict
from shopmtl.weighting.aggregators import (
    AlignedMTLAggregation,
    CAGradAggregation,
    IMTLGAggregation,
    JacobianAggregation,
    MGDAAggregation,
    MissingDependencyError,
    NashMTLAggregation,
    PCGradAggregation,
    UPGradAggregation,
)
from shopmtl.weighting.base import (
    GradientWeighting,
    LossWeighting,
    StepInfo,
    Weighting,
    split_parameters,
)
from shopmtl.weighting.diagnostics import gradient_cosine, task_gradient_cosine
from shopmtl.weighting.dwa import DWAWeighting
from shopmtl.weighting.equal import EqualWeighting, StaticWeighting
from shopmtl.weighting.gradnorm import GradNormWeighting
from shopmtl.weighting.rlw import RLWWeighting
from shopmtl.weighting.uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNormWeighting,
    "dwa": DWAWeighting,
    "rlw": RLWWeighting,
    "upgrad": UPGradAggregation,
    "mgda": MGDAAggregation,
    "pcgrad": PCGradAggregation,
    "cagrad": CAGradAggregation,
    "nash_mtl": NashMTLAggregation,
    "imtl_g": IMTLGAggregation,
    "aligned_mtl": AlignedMTLAggregation,
}


def build_weighting(
    name: str, args: Mapping[str, Any] | None, task_names: Sequence[str]
) -> Weighting:
    """The weighting ``name`` with its ``args`` checked strictly (unknown keys and wrong types
    raise ConfigError naming the key). Raises MissingDependencyError (an ImportError) with the
    pip line when an optional package is missing."""
    if name not in WEIGHTINGS:
        raise ConfigError(
            f"weighting.name: unknown weighting '{name}'; valid: {sorted(WEIGHTINGS)}"
        )
    cls = WEIGHTINGS[name]
    config = from_dict(cls.Config, dict(args or {}), "weighting.args")  # type: ignore[attr-defined]
    return cls(task_names, config)  # type: ignore[call-arg]


__all__ = [
    "WEIGHTINGS",
    "GradientWeighting",
    "JacobianAggregation",
    "LossWeighting",
    "MissingDependencyError",
    "StepInfo",
    "Weighting",
    "build_weighting",
    "gradient_cosine",
    "split_parameters",
    "task_gradient_cosine",
]
