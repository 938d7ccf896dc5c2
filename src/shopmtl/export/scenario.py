"""``shopmtl export --scenario S``: a sub-model for a device that serves one scenario.

The sub-model answers only the tasks defined in S (``Schema.availability``) and reads no
scenario: S is a constant inside the graph, so the ``scenario`` input is gone from its
signature (``runtime.signature``: a schema with one scenario has none). Its schema is the
source's with those tasks and a scenario list of S alone, so the reader of ``shopmtl.load`` /
``shopmtl predict`` refuses a row of any other scenario as a bad row ("unknown scenario")
instead of scoring it as S.

The towers of the dropped tasks are not in the graph (the exporter keeps only what the
outputs need). Every per-scenario weight keeps S's copy only (``for_scenario``, on a copy of
the model): each layer that holds one copy per scenario has a ``for_scenario(index)`` method
that returns S's layer, and the walk here puts it in place. STAR's star FC becomes one plain
Linear per layer (W * W_S and b + b_S computed once), its partitioned norm one scale and shift
(S's running moments folded in, evaluation mode), and the scenario embedding of every model a
one-row table read at index 0. The sliced model is checked against the full one on S's rows
(``sliced_parity``, at most ``FP32_TOLERANCE``) before anything is exported, and what was
sliced (per layer, parameters before / after) goes to meta.json.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shopmtl.config import ConfigError
from shopmtl.data.dataset import Batch
from shopmtl.data.encoders import Encoded
from shopmtl.data.schema import ScenarioSpec, Schema
from shopmtl.export.checks import FP32_TOLERANCE, ParityError, max_abs
from shopmtl.models.base import MultiTaskModel
from shopmtl.predict import torch_forward


def scenario_index(schema: Schema, name: str) -> int:
    """S's index in the source's scenario list; an unknown name or the catch-all ``other``
    scenario (its rows are "every other value", not expressible as one value) refused."""
    if schema.scenario is None:
        raise ConfigError(f"--scenario {name}: the model has no scenarios")
    if name not in schema.scenario.values:
        other = schema.scenario.other
        if name == other:
            raise ConfigError(f"--scenario {name}: the catch-all scenario (every value off the "
                              "list) cannot be exported alone yet")
        raise ConfigError(f"--scenario {name}: unknown scenario; known: "
                          f"{list(schema.scenario.values)}")
    return schema.scenario.values.index(name)


def scenario_schema(schema: Schema, name: str) -> Schema:
    """The sub-model's schema: the tasks defined in ``name``, ``name`` the only scenario."""
    scenario_index(schema, name)
    avail = schema.availability()
    tasks = tuple(t for t in schema.task_names if avail[t][name])
    sub = schema.only_tasks(tasks)
    assert schema.scenario is not None
    return dataclasses.replace(sub, scenario=ScenarioSpec(schema.scenario.column, (name,)))


class ScenarioModel(MultiTaskModel):
    """``model`` with its scenario fixed to ``index`` (whatever the batch says) and only the
    tasks of ``schema`` (``scenario_schema``) answered: with the full model, the reference the
    sliced one is checked against; with the sliced one (``sub_model``, index 0), the PyTorch twin
    of the sub-graph, which the parity check compares it with."""

    def __init__(self, model: MultiTaskModel, schema: Schema, index: int) -> None:
        super().__init__(schema)
        self.inner = model
        self.index = index

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        fixed = torch.full_like(batch.scenario, self.index)
        logits = self.inner(dataclasses.replace(batch, scenario=fixed))
        return {t: logits[t] for t in self.task_names}

    def shared_parameters(self) -> list[torch.nn.Parameter]:  # pragma: no cover - not trained
        return self.inner.shared_parameters()


def scenario_rows(enc: Encoded, index: int) -> np.ndarray:
    """The positions of the rows of scenario ``index`` (the source's encoding)."""
    return np.flatnonzero(enc.scenario == index)


def select(enc: Encoded, rows: np.ndarray, source: Schema, sub: Schema | None = None
           ) -> Encoded:
    """``rows`` of ``enc``; with ``sub``, its label columns only and the scenario re-indexed
    into ``sub``'s one-scenario list (0): what the sub-bundle's reader gives for those rows."""
    out = Encoded(**{k: None if (v := getattr(enc, k)) is None else v[rows]
                     for k in Encoded.__dataclass_fields__})
    if sub is None:
        return out
    cols = [source.task_names.index(t) for t in sub.task_names]
    out.labels, out.mask = out.labels[:, cols], out.mask[:, cols]
    if out.oracle is not None:
        out.oracle = out.oracle[:, cols]
    out.scenario = np.zeros_like(out.scenario)
    return out


def _n(tensors: Any) -> int:
    return sum(t.numel() for t in tensors)


def for_scenario(model: MultiTaskModel, index: int) -> tuple[MultiTaskModel, dict[str, Any]]:
    """A copy of ``model`` (in evaluation mode; ``model`` untouched) in which every layer that
    holds one copy of its weights per scenario (it has ``for_scenario``) is replaced by
    scenario ``index``'s layer, which takes the scenario and ignores it: the copy answers for
    ``index`` whatever the batch's scenario is, as long as it lies in range (0 does). Returns
    the copy and what was sliced: per layer (by attribute path) its class and parameter count
    before and after, and the totals of parameters and buffers."""
    out = copy.deepcopy(model).eval()
    layers: dict[str, dict[str, Any]] = {}
    for path, parent in list(out.named_modules()):
        for name, child in list(parent.named_children()):
            fold = getattr(child, "for_scenario", None)
            if not callable(fold):
                continue
            new = fold(index)
            setattr(parent, name, new)
            layers[f"{path}.{name}" if path else name] = {
                "layer": type(child).__name__, "as": type(new).__name__,
                "params_before": _n(child.parameters()), "params_after": _n(new.parameters()),
                "buffers_before": _n(child.buffers()), "buffers_after": _n(new.buffers())}
    report = {
        "params": {"before": _n(model.parameters()), "after": _n(out.parameters())},
        "buffers": {"before": _n(model.buffers()), "after": _n(out.buffers())},
        "layers": layers,
    }
    return out, report


def sub_model(model: MultiTaskModel, schema: Schema, index: int
              ) -> tuple[ScenarioModel, dict[str, Any]]:
    """The sub-model of scenario ``index`` answering ``schema``'s tasks: ``model`` sliced to
    that scenario's weights (``for_scenario``) and read at index 0, and what was sliced."""
    sliced, report = for_scenario(model, index)
    return ScenarioModel(sliced, schema, 0), report


def sliced_parity(full: MultiTaskModel, sliced: MultiTaskModel, enc: Encoded) -> float:
    """The max abs difference of any task's output between the full model fixed to the
    scenario (``ScenarioModel``) and its sliced sub-model on ``enc`` (the scenario's rows);
    a difference over ``FP32_TOLERANCE`` raises ``ParityError``: slicing must not change what
    the model computes, only what it stores."""
    worst = max(max_abs(torch_forward(full)(enc), torch_forward(sliced)(enc)).values(),
                default=0.0)
    if not worst <= FP32_TOLERANCE:
        raise ParityError(f"the sub-model sliced to one scenario's weights differs from the "
                          f"full model on that scenario's rows by {worst:.3g} (max abs, "
                          f"probabilities; at most {FP32_TOLERANCE:g} allowed): nothing written")
    return worst
