"""Your own task with its own data source, for a joint run (docs/JOINT.md walks through it).

A CSV of support tickets with a free-text ``message``, a ``priority`` (low / normal / urgent)
and the ``hours`` it took to resolve. Two tasks: priority (multiclass) and hours (regression).
The class implements ``shopmtl.data.source.Source``: ``load`` (read, validate, split),
``metrics`` (score predictions in the user's units) and ``baseline`` (the simple model to beat);
and ``data.source.RawSource``, which lets ``shopmtl predict --task priority`` answer raw
requests: ``contract`` (the request's fields, the answers, an example), ``encode`` (requests ->
model inputs: the same function ``load`` builds its splits with) and ``to_user`` (the model's
log-hours -> hours).

Use it from a joint config, with this folder on PYTHONPATH:

    sources:
      - {name: tickets, cls: "ticket_source:TicketSource", args: {path: tickets.csv}}
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl import metrics as M
from shopmtl.data.contract import Contract, Field, Output
from shopmtl.data.ingest import DataError
from shopmtl.data.schema import TaskSpec
from shopmtl.data.source import SourceData, SourceSplit

PRIORITIES = ("low", "normal", "urgent")


class TicketSource:
    name = "tickets"
    task_names = ("priority", "hours")  # optional: lets train.alpha be checked at config load

    def __init__(self, path: str, seed: int = 0) -> None:
        self.path = Path(path)
        self.seed = seed

    def load(self) -> SourceData:
        if not self.path.is_file():
            raise FileNotFoundError(f"tickets: no file at {self.path}")
        texts, prio, hours = [], [], []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"message", "priority", "hours"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{self.path.name}: missing column(s) {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                if row["priority"] not in PRIORITIES:
                    raise DataError(f"{self.path.name} line {line}: priority must be one of "
                                    f"{list(PRIORITIES)}")
                try:
                    h = float(row["hours"])
                except ValueError:
                    raise DataError(f"{self.path.name} line {line}: hours is not a number"
                                    ) from None
                if not np.isfinite(h) or h < 0:
                    raise DataError(f"{self.path.name} line {line}: hours must be >= 0")
                texts.append(row["message"])
                prio.append(PRIORITIES.index(row["priority"]))
                hours.append(h)
        # a seeded 70 / 15 / 15 split
        order = np.random.default_rng(self.seed).permutation(len(texts))
        cut = [int(0.7 * len(texts)), int(0.85 * len(texts))]
        splits = np.split(order, cut)

        def split(idx: np.ndarray) -> SourceSplit:
            # the inputs come from the raw requests through encode, as at prediction time
            inputs = self.encode({}, [{"message": texts[i]} for i in idx])
            # hours span 1 to 100s: the model fits log1p(hours) (a loss on the raw scale
            # would be dominated by the slowest tickets); metrics and answers are in hours
            return replace(inputs, labels={
                "priority": np.asarray(prio, np.int64)[idx],
                "hours": np.log1p(np.asarray(hours, np.float32)[idx])})

        return SourceData(
            name=self.name,
            tasks=(TaskSpec("priority", type="multiclass", n_classes=len(PRIORITIES)),
                   TaskSpec("hours", type="regression")),
            train=split(splits[0]), valid=split(splits[1]), test=split(splits[2]),
            meta={"classes": {"priority": list(PRIORITIES)},
                  "hours_range": [float(min(hours[i] for i in splits[0])),
                                  float(max(hours[i] for i in splits[0]))]},
        )

    def contract(self, data: SourceData) -> Contract:
        """A request is one ticket's message; the answers are its priority (the labels above)
        and the hours it will take, within the training tickets' range."""
        low, high = data.meta["hours_range"]
        return Contract(
            self.name, (Field("message", "text", "the ticket's text, as the customer wrote it"),),
            (Output("priority", "multiclass", "the ticket's priority", labels=PRIORITIES),
             Output("hours", "regression", "the time to resolve it", unit="hours", low=low,
                    high=high)),
            example={"message": "I was charged twice for my order, please refund"},
            doc="support tickets")

    @staticmethod
    def encode(meta: dict[str, Any], rows: list[dict[str, Any]]) -> SourceSplit:
        """Requests (checked by the contract) -> the model's inputs: the text alone."""
        return SourceSplit(text=[r["message"] for r in rows],
                           numeric=np.zeros((len(rows), 0), np.float32),
                           raw=[{"message": r["message"]} for r in rows])

    @staticmethod
    def to_user(meta: dict[str, Any], split: SourceSplit, task: str, pred: np.ndarray
                ) -> np.ndarray:
        """hours: the model predicts log1p(hours)."""
        return np.expm1(pred) if task == "hours" else pred

    def metrics(self, data: SourceData, split: str, task: str, pred: np.ndarray
                ) -> dict[str, float]:
        y = data.split(split).labels[task]
        if task == "priority":  # pred: class probabilities [n, 3]
            label = pred.argmax(1)
            return {"accuracy": M.accuracy(y, label), "macro_f1": M.macro_f1(y, label),
                    "n": float(len(y))}
        err = np.expm1(pred) - np.expm1(y)  # in hours
        return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
                "n": float(len(y))}

    def baseline(self, data: SourceData) -> dict[str, dict[str, float]]:
        """The majority class and the training mean: what any model must beat."""
        train = data.train.labels
        n = len(data.test)
        counts = np.bincount(train["priority"], minlength=len(PRIORITIES))
        prior = np.tile(counts / counts.sum(), (n, 1))
        mean = np.full(n, float(np.mean(train["hours"])), np.float32)
        return {"priority": self.metrics(data, "test", "priority", prior),
                "hours": self.metrics(data, "test", "hours", mean)}
