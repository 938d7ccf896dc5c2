"""``shopmtl export --scenario S``: a sub-model for a device that serves one scenario.

The sub-model answers only the tasks defined in S (``Schema.availability``) and reads no
scenario: S is a constant inside the graph, so the ``scenario`` input is gone from its
signature (``runtime.signature``: a schema with one scenario has none). Its schema is the
source's with those tasks and a scenario list of S alone, so the reader of ``shopmtl.load`` /
``shopmtl predict`` refuses a row of any other scenario as a bad row ("unknown scenario")
instead of scoring it as S.

The towers of the dropped tasks are not in the graph (the exporter keeps only what the
outputs need). Per-scenario weights (STAR's star-topology FC and partitioned norm) are read
with the constant index, so the graph still holds every scenario's copy: pruning those to S's
is not built.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from shopmtl.config import ConfigError
from shopmtl.data.dataset import Batch
from shopmtl.data.encoders import Encoded
from shopmtl.data.schema import ScenarioSpec, Schema
from shopmtl.models.base import MultiTaskModel


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
    tasks of ``schema`` (``scenario_schema``) answered: the PyTorch twin of the sub-graph, which
    the parity check compares it with."""

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
