"""Ranking policies: what an arm of an experiment does with a request's candidates.

A policy maps the candidate rows of one request (a ``pyarrow.Table`` in the world's columns:
``user_id``, ``item_id``, ..., ``price``, ``scenario``) to one score per row; the arm shows the
``k`` best (``top_k``). The simulator (``abtest.shop``) and the service's experiments
(``serve``) rank through the same ``Policy``, so an arm behaves the same offline and online.

- ``ModelPolicy``: any saved model (zoo, joint or an exported bundle: ``shopmtl.load``), one
  model for every task or one per task (single-task baselines), combined by task weights:
  ``score = sum_t w_t * log p_t + w_price * log price`` (``{click: 1, conversion: 1, price: 1}``
  ranks by expected GMV, pCTR x pCVR x price). The ``position`` feature is set to 0 for every
  candidate: the model's position bias is a property of the slot, not of the item, and scoring
  all candidates at one position ranks them by their own merit.
- ``PopularityPolicy``: a fixed score per item (``popularity_policy``: its click count in the
  training data).
- ``RandomPolicy``: a seeded random order (the exploration baseline).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

_EPS = 1e-9


class Policy(Protocol):
    name: str

    def scores(self, rows: pa.Table) -> np.ndarray:
        """One float per row, higher is better."""
        ...


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first; ties keep row order (a stable sort)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return order[: max(0, k)]


def _with_position_zero(rows: pa.Table) -> pa.Table:
    if "position" not in rows.column_names:
        return rows
    i = rows.column_names.index("position")
    return rows.set_column(i, "position", pa.array(np.zeros(rows.num_rows, np.int64)))


@dataclass
class ModelPolicy:
    """Scores from saved models: ``models`` maps each weighted task to the model predicting it."""

    name: str
    models: Mapping[str, Any]  # task -> shopmtl.Model
    weights: Mapping[str, float]  # task -> exponent; the key "price" weighs log(price)

    def __post_init__(self) -> None:
        if not self.weights or all(w == 0 for w in self.weights.values()):
            raise ValueError(f"policy '{self.name}': give at least one non-zero task weight")
        for task in self.weights:
            if task == "price":
                continue
            if task not in self.models:
                raise ValueError(f"policy '{self.name}': no model predicts '{task}'")
            if task not in self.models[task].tasks:
                raise ValueError(f"policy '{self.name}': the model at {self.models[task].path} "
                                 f"does not predict '{task}' (it predicts "
                                 f"{', '.join(self.models[task].tasks)})")

    def scores(self, rows: pa.Table) -> np.ndarray:
        rows = _with_position_zero(rows)
        out = np.zeros(rows.num_rows, np.float64)
        by_model: dict[int, list[str]] = {}
        for task, w in self.weights.items():
            if task != "price" and w != 0:
                by_model.setdefault(id(self.models[task]), []).append(task)
        for tasks in by_model.values():
            pred = self.models[tasks[0]].predict(rows, task=tasks)
            for task in tasks:
                p = pred.column(task).to_numpy(zero_copy_only=False).astype(np.float64)
                out += self.weights[task] * np.log(np.clip(p, _EPS, 1.0))
        if self.weights.get("price", 0):
            price = rows.column("price").to_numpy(zero_copy_only=False).astype(np.float64)
            out += self.weights["price"] * np.log(np.maximum(price, _EPS))
        return out


@dataclass
class PopularityPolicy:
    """A fixed score per item id; unknown items score below every known one."""

    name: str
    item_scores: Mapping[str, float]

    def scores(self, rows: pa.Table) -> np.ndarray:
        items = rows.column("item_id").to_pylist()
        return np.array([self.item_scores.get(str(i), -np.inf) for i in items], np.float64)


@dataclass
class RandomPolicy:
    """A random order from a seeded generator (one stream per policy object)."""

    name: str
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def scores(self, rows: pa.Table) -> np.ndarray:
        return self._rng.random(rows.num_rows)


def model_policy(name: str, model: str | Path | Mapping[str, str | Path],
                 weights: Mapping[str, float]) -> ModelPolicy:
    """A ``ModelPolicy`` from paths: one model directory for every task, or task -> directory
    (the same directory is loaded once)."""
    from shopmtl.modeldir import load

    loaded: dict[str, Any] = {}
    if isinstance(model, Mapping):
        paths = {t: Path(p) for t, p in model.items()}
    else:
        paths = {t: Path(model) for t in weights if t != "price"}
    models = {}
    for task, path in paths.items():
        key = str(path.resolve())
        if key not in loaded:
            loaded[key] = load(path)
        models[task] = loaded[key]
    return ModelPolicy(name, models, dict(weights))


def popularity_policy(name: str, train: str | Path, column: str = "click") -> PopularityPolicy:
    """Popularity from a training Parquet file: each item's count of ``column`` (its clicks).
    Items the file never shows score below every known one (``PopularityPolicy``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(train)
    if not path.is_file():
        raise FileNotFoundError(f"popularity policy '{name}': no training file at {path}")
    names = pq.read_schema(path).names
    missing = [c for c in ("item_id", column) if c not in names]
    if missing:
        raise ValueError(f"popularity policy '{name}': {path.name} has no column(s) {missing}")
    t = pq.read_table(path, columns=["item_id", column])
    g = t.group_by("item_id").aggregate([(column, "sum")])
    ids = pc.cast(g.column("item_id"), pa.string()).to_pylist()
    counts = g.column(f"{column}_sum").to_numpy(zero_copy_only=False).astype(np.float64)
    return PopularityPolicy(name, dict(zip(ids, counts.tolist(), strict=True)))
