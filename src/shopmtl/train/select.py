"""Selectors: which evaluation of a run is its best (``train.loop.Selector``).

- ``MetricSelector``: one named validation metric (the one-table run's early stopping), e.g.
  ``valid.click.all.auc`` or ``valid.all_tasks.logloss`` with mode min.
- ``GainSelector``: the mean relative gain of every task's primary metric over a reference
  evaluation (Delta_m, Maninis et al. 2019), so tasks in AUC, accuracy, RMSE and WAPE count
  alike: the joint run, whose tasks have no common unit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shopmtl.config import ConfigError
from shopmtl.data.source import TaskSource
from shopmtl.tasks import TASK_TYPES


def primary(valid: dict[str, dict[str, Any]], types: dict[str, str]) -> dict[str, float]:
    """task -> its primary metric (``TaskType.primary``) from ``{source: {task: metrics}}``."""
    out = {}
    for per_task in valid.values():
        for task, m in per_task.items():
            key = TASK_TYPES[types[task]].primary[0]
            if key in m:
                out[task] = m[key]
    return out


def valid_score(current: dict[str, float], first: dict[str, float], types: dict[str, str]
                ) -> float:
    """The mean over tasks of the signed relative change of the primary metric from ``first``
    (higher is better whatever the metric's direction)."""
    gains = []
    for task, m in current.items():
        ref = first.get(task)
        if ref is None or m is None or not np.isfinite(m) or ref == 0:
            continue
        sign = 1.0 if TASK_TYPES[types[task]].primary[1] else -1.0
        gains.append(sign * (m - ref) / abs(ref))
    return float(np.mean(gains)) if gains else 0.0


class GainSelector:
    """Score = ``valid_score`` against ``reference`` (default: the run's first evaluation)."""

    def __init__(self, types: dict[str, str], reference: dict[str, float] | None = None) -> None:
        self.types, self.reference = types, reference

    def _ref(self, prim: dict[str, float], history: list[dict[str, Any]]) -> dict[str, float]:
        if self.reference is not None:
            return self.reference
        return history[0]["valid"] if history else prim

    def score(self, valid: dict[str, dict[str, Any]], history: list[dict[str, Any]]
              ) -> tuple[float, dict[str, Any]]:
        prim = primary(valid, self.types)
        return valid_score(prim, self._ref(prim, history), self.types), {"valid": prim}

    def source_score(self, valid: dict[str, dict[str, Any]], source: TaskSource,
                     history: list[dict[str, Any]]) -> float:
        prim = primary({source.name: valid[source.name]}, self.types)
        return valid_score(prim, self._ref(prim, history[:1]), self.types)


class MetricSelector:
    """Score = the metric ``valid.<all_tasks|task>.[<scenario>.]<key>`` of ``source`` (negated
    when ``mode`` is min); the record keeps it and each task's AUC (``report.md``'s curves)."""

    def __init__(self, metric: str, mode: str, source: str) -> None:
        self.metric, self.mode, self.source = metric, mode, source

    def read(self, per_task: dict[str, dict[str, Any]]) -> float:
        parts = self.metric.removeprefix("valid.").split(".")
        try:
            if parts[0] == "all_tasks" and len(parts) == 2:
                vals = [float(m[parts[1]]) for m in per_task.values() if parts[1] in m]
                vals = [v for v in vals if not math.isnan(v)]
                return float(np.mean(vals)) if vals else math.nan
            task, scenario, key = parts
            m = per_task[task]
            return float(m[key] if scenario == "all" else m["by_scenario"][scenario][key])
        except (KeyError, ValueError, IndexError):
            raise ConfigError(
                f"train.early_stopping.metric: '{self.metric}' is not a validation metric; use "
                "valid.all_tasks.<auc|logloss> or valid.<task>.<scenario|all>.<auc|logloss|gauc>"
            ) from None

    def score(self, valid: dict[str, dict[str, Any]], history: list[dict[str, Any]]
              ) -> tuple[float, dict[str, Any]]:
        per_task = valid[self.source]
        m = self.read(per_task)
        auc = {t: v.get("auc", math.nan) for t, v in per_task.items()}
        return (m if self.mode == "max" else -m), {"valid_metric": m, "valid_auc": auc}

    def source_score(self, valid: dict[str, dict[str, Any]], source: TaskSource,
                     history: list[dict[str, Any]]) -> float:
        return self.score(valid, history)[0]

    def prior(self, prior_valid: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
        """(score, metric) of the label prior's validation metrics (``{source: {task: metrics
        or None}}``, None for a task without a prior, e.g. multiclass); None when the metric
        needs a task without one, or the prior's value is not finite (e.g. one class)."""
        per_task = prior_valid.get(self.source)
        if not per_task:
            return None
        parts = self.metric.removeprefix("valid.").split(".")
        needed = per_task.values() if parts[0] == "all_tasks" else [per_task.get(parts[0])]
        if any(m is None for m in needed):
            return None
        try:
            score, record = self.score(
                {self.source: {t: m for t, m in per_task.items() if m is not None}}, [])
        except ConfigError:
            return None
        if not math.isfinite(score):
            return None
        return score, record["valid_metric"]
