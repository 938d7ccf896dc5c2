"""Jacobian-descent aggregators from TorchJD, applied to the shared dense parameters only.

One step of ``JacobianAggregation.backward``:

1. the Jacobian J [T, P] of the task losses w.r.t. ``model.shared_parameters()`` (the shared
   bottom and interaction layers; vmapped backward through towers and bottom, never through the
   embedding tables), with ``torchjd.autojac.backward``;
2. ``sum_i L_i`` (plus ``extra_loss``) is back-propagated to every other parameter: each task
   tower gets its own task's gradient (the other losses do not depend on it) and the embedding
   tables the plain summed gradient - the issue's design constraint, and a dense [T, vocab, D]
   Jacobian of a large table would not fit in memory anyway;
3. ``torchjd.autojac.jac_to_grad`` aggregates J into ``.grad`` of the shared parameters (UPGrad,
   MGDA, ...) and returns the aggregator's task weights.

Only ``shared_parameters()`` is needed from the model (no access to its shared representation),
so the same code serves any architecture, including ones whose shared part is not one tensor
(experts and gates). Scale: UPGrad/MGDA/IMTL-G/Aligned-MTL combine rows with weights summing to
about 1 (a mean), PCGrad with weights about 1 each (a sum), while the non-shared parameters get
sum-scale gradients; with Adam (the trainer's optimizers) a constant per-parameter factor is
immaterial.

TorchJD is imported only when one of these is built. The core install has
``torchjd[quadprog-projector]`` (UPGrad needs the quadprog extra; MGDA, PCGrad, IMTL-G and
Aligned-MTL need only torchjd); ``torchjd[cagrad]`` for CAGrad and ``torchjd[nash-mtl]`` for
Nash-MTL are not installed by shopmtl (both bring cvxpy; ``torchjd[full]`` has all).
A missing one raises ``MissingDependencyError`` naming the pip line when the weighting is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.deps import MissingDependencyError
from shopmtl.keys import key
from shopmtl.weighting.base import GradientWeighting, SharedModel, StepInfo, split_parameters

TORCHJD_PIN = "torchjd==0.18.0"


@dataclass(frozen=True)
class JDConfig:
    # 1: a loop, for models torch.vmap cannot handle
    parallel_chunk_size: int | None = key(None, "Jacobian rows differentiated at once (null: "
                                                "all in one vmapped pass)", ge=1)


@dataclass(frozen=True)
class UPGradConfig(JDConfig):
    norm_eps: float = key(1e-4, "added to gradient norms", ge=0)
    reg_eps: float = key(1e-4, "regularisation of the Gramian", ge=0)


@dataclass(frozen=True)
class MGDAConfig(JDConfig):
    epsilon: float = key(1e-3, "stopping tolerance of the Frank-Wolfe solver", gt=0)
    max_iters: int = key(100, "solver iterations", ge=1)


@dataclass(frozen=True)
class CAGradConfig(JDConfig):
    c: float = key(0.4, "radius of the ball around the mean gradient (paper: 0.4 to 0.5)",
                   ge=0)
    norm_eps: float = key(1e-4, "added to gradient norms", ge=0)


@dataclass(frozen=True)
class NashMTLConfig(JDConfig):
    max_norm: float = key(1.0, "clip of the aggregated gradient's norm (0: off)", ge=0)
    update_weights_every: int = key(1, "steps between solves of the weights", ge=1)
    optim_niter: int = key(20, "iterations of the weight solver", ge=1)


@dataclass(frozen=True)
class AlignedMTLConfig(JDConfig):
    scale_mode: Literal["min", "median", "rmse"] = key("min", "how the aligned gradient is "
                                                              "scaled")


class JacobianAggregation(GradientWeighting):
    """Base of the TorchJD adapters; subclasses say which aggregator and which pip extra."""

    Config: ClassVar[type] = JDConfig
    label: ClassVar[str] = ""  # the registry name, for messages
    extra: ClassVar[str] = ""  # the torchjd extra the aggregator needs ("" = none)

    def __init__(self, task_names: Sequence[str], config: Any = None) -> None:
        super().__init__(task_names)
        config = self.Config() if config is None else config
        chunk = config.parallel_chunk_size
        if chunk is not None and chunk < 1:
            raise ConfigError(f"weighting.args.parallel_chunk_size: must be >= 1, got {chunk}")
        self.parallel_chunk_size = chunk
        try:
            from torchjd import aggregation
        except ImportError:
            raise MissingDependencyError(self._hint("torchjd is not installed")) from None
        try:
            self.aggregator: nn.Module = self._make(aggregation, config)
        except ImportError as e:  # torchjd checks its optional dependencies at construction
            raise MissingDependencyError(self._hint(str(e))) from None
        except ValueError as e:
            raise ConfigError(f"weighting.args: {e}") from None

    def _make(self, agg: Any, config: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hint(self, why: str) -> str:
        pkg = f"torchjd[{self.extra}]==0.18.0" if self.extra else TORCHJD_PIN
        return f"weighting '{self.label}' needs {pkg} ({why}); run: pip install \"{pkg}\""

    def backward(
        self,
        losses: Tensor,
        model: SharedModel,
        info: StepInfo,
        extra_loss: Tensor | None = None,
    ) -> Tensor:
        from torchjd.autojac import backward as jac_backward
        from torchjd.autojac import jac_to_grad

        self._check(losses, info)
        shared, rest = split_parameters(model)
        for p in shared:  # a .jac left by an interrupted step would be added to
            if hasattr(p, "jac"):
                del p.jac
        jac_backward(
            losses, inputs=shared, retain_graph=True, parallel_chunk_size=self.parallel_chunk_size
        )
        if extra_loss is not None and extra_loss.requires_grad:
            # a regulariser is not a task: its gradient is added as is, shared params included
            torch.autograd.backward(extra_loss, inputs=shared + rest, retain_graph=True)
        if rest:
            torch.autograd.backward(losses.sum(), inputs=rest)
        weights = jac_to_grad(shared, self.aggregator)
        if weights is None:  # every registered aggregator is a WeightedAggregator
            weights = torch.full((self.num_tasks,), float("nan"))
        return self._remember(weights)


class UPGradAggregation(JacobianAggregation):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024)."""

    label = "upgrad"
    Config = UPGradConfig
    extra = "quadprog-projector"

    def _make(self, agg: Any, config: UPGradConfig) -> nn.Module:
        from torchjd.linalg import QuadprogProjector

        proj = QuadprogProjector(norm_eps=config.norm_eps, reg_eps=config.reg_eps)
        return agg.UPGrad(projector=proj)


class MGDAAggregation(JacobianAggregation):
    """MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018), Frank-Wolfe min-norm solver."""

    label = "mgda"
    Config = MGDAConfig

    def _make(self, agg: Any, config: MGDAConfig) -> nn.Module:
        return agg.MGDA(epsilon=config.epsilon, max_iters=config.max_iters)


class PCGradAggregation(JacobianAggregation):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020). Projection
    order is drawn from torch's global RNG (which the trainer's checkpoints carry)."""

    label = "pcgrad"
    Config = JDConfig

    def _make(self, agg: Any, config: JDConfig) -> nn.Module:
        return agg.PCGrad()


class CAGradAggregation(JacobianAggregation):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for MTL", NeurIPS 2021)."""

    label = "cagrad"
    Config = CAGradConfig
    extra = "cagrad"

    def _make(self, agg: Any, config: CAGradConfig) -> nn.Module:
        return agg.CAGrad(c=config.c, norm_eps=config.norm_eps)


class NashMTLAggregation(JacobianAggregation):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).
    Stateful (previous weights): its state is not in ``state_dict``, so a resumed run restarts
    it."""

    label = "nash_mtl"
    Config = NashMTLConfig
    extra = "nash-mtl"

    def _make(self, agg: Any, config: NashMTLConfig) -> nn.Module:
        return agg.NashMTL(
            n_tasks=self.num_tasks,
            max_norm=config.max_norm,
            update_weights_every=config.update_weights_every,
            optim_niter=config.optim_niter,
        )


class IMTLGAggregation(JacobianAggregation):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), gradient part."""

    label = "imtl_g"
    Config = JDConfig

    def _make(self, agg: Any, config: JDConfig) -> nn.Module:
        return agg.IMTLG()


class AlignedMTLAggregation(JacobianAggregation):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for MTL", CVPR 2023)."""

    label = "aligned_mtl"
    Config = AlignedMTLConfig

    def _make(self, agg: Any, config: AlignedMTLConfig) -> nn.Module:
        return agg.AlignedMTL(scale_mode=config.scale_mode)
