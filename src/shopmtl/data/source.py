"""A data source of the heterogeneous joint run: its tasks, its splits, its own metrics.

The platform's subsystems do not share an input row. Customer service reads an utterance,
reviews have a text and a rating, demand forecasting reads a product's sales history, search
ranks a list of candidate titles for a query. Each source turns its own files into
``SourceData``: per split, a text per example (embedded by the shared sentence encoder), a
numeric matrix, integer ids and one label array per task. The joint model gives every source
the same shared parts (the text adapter) and its own heads.

A source also owns how its predictions are scored (``metrics``), in the units its users read
(demand in units sold, not in the scaled training target), and its simple baseline
(``baseline``), scored by the same function on the same test split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shopmtl.data.contract import Contract
from shopmtl.data.schema import TaskSpec

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SourceSplit:
    """n examples of one split.

    ``text``: one string per example (utterance, review, product description, query), or None.
    ``numeric``: float32 [n, k], k may be 0; already standardised with training statistics.
    ``ids``: name -> int64 [n] (0 = unknown), e.g. a product id; sizes in ``SourceData.id_sizes``.
    ``labels``: task name -> [n] array: float32 0/1 (binary), int64 class (multiclass), float32
    value (regression, quantile). NaN (float) or -1 (multiclass) marks a missing label.
    Ranking sources: ``text`` is the query of each list, ``cand_text`` the L candidate texts of
    each list ([n][L]), ``cand_ids`` name -> int64 [n, L], and the ranking task's label is a float32
    graded relevance [n, L] (NaN pads a short list).
    ``raw``: each example as its user would send it (the fields of the source's ``Contract``),
    or None; a sequence, possibly lazy (``take(idx)`` if it has one, else indexing). What
    ``shopmtl predict`` is tested with: the raw held-out rows must give the run's predictions.
    """

    text: list[str] | None
    numeric: np.ndarray
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    cand_text: list[list[str]] | None = None
    cand_ids: dict[str, np.ndarray] = field(default_factory=dict)
    raw: Sequence[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.numeric)

    def sample(self, n: int, seed: int = 0) -> SourceSplit:
        """n examples drawn without replacement, kept in their order (a smaller slice of a
        source, e.g. for a quick LoRA run). Sources may store examples sorted by label or by
        product, so the first n would not do."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return SourceSplit(
            None if self.text is None else [self.text[i] for i in idx],
            self.numeric[idx],
            {k: v[idx] for k, v in self.ids.items()},
            {k: v[idx] for k, v in self.labels.items()},
            None if self.cand_text is None else [self.cand_text[i] for i in idx],
            {k: v[idx] for k, v in self.cand_ids.items()},
            take_raw(self.raw, idx),
        )


def take_raw(raw: Sequence[dict[str, Any]] | None, idx: np.ndarray
             ) -> Sequence[dict[str, Any]] | None:
    """The raw examples ``idx`` of a split's ``raw`` (a list, or a lazy sequence with ``take``)."""
    if raw is None:
        return None
    take = getattr(raw, "take", None)
    return take(idx) if callable(take) else [raw[int(i)] for i in idx]


@dataclass(frozen=True)
class SourceData:
    name: str
    tasks: tuple[TaskSpec, ...]
    train: SourceSplit
    valid: SourceSplit
    test: SourceSplit
    id_sizes: dict[str, int] = field(default_factory=dict)  # name -> rows (incl. 0 = unknown)
    meta: dict = field(default_factory=dict)  # JSON-able: class names, scales, provenance
    # name -> the entity key of each id row ("" for row 0), as the rec model's vocabulary
    # writes it (e.g. the item id "17"): what lets an id share the rec model's embedding rows
    # (``model.share_ids``, docs/JOINT.md). Optional; ids without keys keep their own table.
    id_keys: dict[str, list[str]] = field(default_factory=dict)

    def sample(self, n: int, seed: int = 0) -> SourceData:
        """Every split cut to n seeded random examples (``SourceSplit.sample``)."""
        from dataclasses import replace

        return replace(self, train=self.train.sample(n, seed), valid=self.valid.sample(n, seed),
                       test=self.test.sample(n, seed))

    def split(self, name: str) -> SourceSplit:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; known: {list(SPLITS)}")
        return getattr(self, name)


class Source(Protocol):
    """What a source module provides (see ``shopmtl.data.sources``)."""

    name: str

    def load(self) -> SourceData:
        """Read, validate and split the data (deterministic: same files, same splits)."""
        ...

    def metrics(self, data: SourceData, split: str, task: str, pred: np.ndarray
                ) -> dict[str, float]:
        """Score activated predictions of ``task`` on ``split``: probabilities [n] (binary),
        class probabilities [n, C] (multiclass), values [n] (regression; [n, Q] quantile, one
        column per quantile), scores [n, L] (ranking)."""
        ...

    def baseline(self, data: SourceData) -> dict[str, dict[str, float]]:
        """The simple baseline's test metrics per task (same keys as ``metrics``)."""
        ...


class RawSource(Source, Protocol):
    """A source whose tasks answer raw requests (``shopmtl predict --task``, ``shopmtl.load(
    ...).predict``, ``shopmtl describe``): what every built-in source is. A source without
    these methods trains, but its tasks cannot be asked (predict says so).

    - ``contract(data)``: the input fields, the outputs (class labels, the training labels'
      range) and an example request (``data.contract.Contract``); stored in the model directory.
    - ``encode(meta, rows)`` (a staticmethod: it runs from the directory, without the
      dataset): requests already checked by the contract (``Contract.read``) -> the model's
      inputs, by the same code and fitted statistics (``meta``) that built the training
      inputs. Labels are not needed.
    - ``to_user(meta, split, task, pred)`` (a staticmethod, optional): activated predictions of
      ``split`` -> the user's units (demand: the scaled target -> units sold); identity if
      absent.
    """

    def contract(self, data: SourceData) -> Contract: ...

    @staticmethod
    def encode(meta: dict[str, Any], rows: list[dict[str, Any]]) -> SourceSplit: ...


class TaskSource(Protocol):
    """What the one training loop (``train.loop``) trains on: a source of batches with its
    own tasks, losses and evaluation. The zoo's table (``train.table.TableSource``) is one;
    every joint source (``joint.parts``) is one; a federated client's silo or a torchrun
    rank's shard will be one.

    - ``batches(epoch, seed, skip)``: epoch ``epoch``'s training batches in an order that is a
      function of (seed, epoch) alone, from batch ``skip`` on (what makes resume exact).
    - ``losses(model, batch)``: task name -> scalar loss of this batch (only this source's
      tasks; a task without labels in the batch gives 0); keys starting with ``_`` are
      regularisers, added with weight 1 outside the weighting.
    - ``evaluate(model, split)``: task name -> metrics of ``split`` ("valid" or "test"), the
      task type's primary metric (``tasks.TaskType.primary``) at the top level.
    - ``head(model)``: the module that is this source's own (its refit stage trains it alone).
    - Optional ``adversarial_backward(model, batch, weights, epsilon)``: FGM (zoo tables).
    """

    name: str

    @property
    def tasks(self) -> tuple[TaskSpec, ...]: ...

    @property
    def task_names(self) -> tuple[str, ...]: ...

    def num_batches(self) -> int: ...

    def batches(self, epoch: int, seed: int, skip: int = 0) -> Iterator[Any]: ...

    def losses(self, model: Any, batch: Any) -> dict[str, Any]: ...

    def evaluate(self, model: Any, split: str) -> dict[str, dict[str, Any]]: ...

    def head(self, model: Any) -> Any: ...
