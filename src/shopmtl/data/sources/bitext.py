"""Bitext customer-support utterances: intent (27-way) and category (11-way) from the text.

``shared/datasets/bitext_customer_support/bitext_customer_support_tagged_train.csv`` (4,514
rows, SOURCE.md). Each example is one customer utterance (``instruction``); the two tasks are a
two-level hierarchy (every intent belongs to one category), a natural pair of multiclass heads.
No numeric features and no ids: the text is everything (the joint trainer embeds it).

Requests (``contract``): ``{"text": <the customer's message>}``; answers: the intent and the
category labels of the training data, top-k with their probabilities.

Split: stratified by intent, 70/15/15, by a seeded random order within each intent
(``stratified_split``), so every intent is in every split in the same proportion and the same
file always gives the same split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl.data.contract import Contract, Field, Output
from shopmtl.data.ingest import DataError
from shopmtl.data.schema import TaskSpec
from shopmtl.data.source import SPLITS, SourceData, SourceSplit
from shopmtl.data.sources._real_common import (
    Table,
    dataset_file,
    one_thread,
    read_csv,
    stratified_split,
    tfidf,
)
from shopmtl.metrics import accuracy, macro_f1, multiclass_logloss

DATASET = "bitext_customer_support"
FILE_NAME = "bitext_customer_support_tagged_train.csv"
TEXT = "instruction"
TASKS = ("intent", "category")  # task name = column name
INPUTS = (Field("text", "text", "the customer's message, as typed"),)
EXAMPLE = {"text": "I want to cancel the order I placed yesterday"}


class BitextSource:
    """The Bitext source. ``directory``: the dataset folder (default
    ``datasets_dir()/bitext_customer_support``); ``seed``: the split's seed."""

    name = "bitext"
    task_names = TASKS  # what load() returns, known without loading (checked at config load)

    def __init__(self, directory: Path | str | None = None, seed: int = 0) -> None:
        self.directory = directory
        self.seed = seed
        # data-row number (0-based, in file order) of every example per split, set by load():
        # for tracing an example back to the file (and for the split tests)
        self.rows: dict[str, np.ndarray] = {}

    def load(self) -> SourceData:
        path = dataset_file(self.directory, DATASET, FILE_NAME)
        table = read_csv(path, (TEXT, *TASKS))
        for col in (TEXT, *TASKS):
            for i, v in enumerate(table.columns[col]):
                if not v.strip():
                    raise DataError(f"{table.where(i, col)}: empty value")
        rows = stratified_split(table.columns["intent"], self.seed)
        # class names sorted, from the training split; a label only seen in valid/test is bad
        # input (the head would have no row for it), reported with its place
        classes = {t: sorted(set(np.asarray(table.columns[t])[rows["train"]])) for t in TASKS}
        splits = {s: _split(table, rows[s], classes) for s in SPLITS}
        self.rows = rows
        intent_category = dict(zip(table.columns["intent"], table.columns["category"],
                                   strict=True))
        return SourceData(
            name=self.name,
            tasks=tuple(TaskSpec(t, type="multiclass", n_classes=len(classes[t])) for t in TASKS),
            train=splits["train"], valid=splits["valid"], test=splits["test"],
            meta={
                "file": str(path),
                "rows": len(table),
                "text": TEXT,
                "classes": classes,  # task -> class names; label k is classes[task][k]
                "intent_category": dict(sorted(intent_category.items())),
                "split": {"method": "stratified by intent, seeded order within each intent",
                          "seed": self.seed, "sizes": {s: len(rows[s]) for s in SPLITS}},
            },
        )

    def contract(self, data: SourceData) -> Contract:
        classes = data.meta["classes"]
        return Contract(
            self.name, INPUTS,
            (Output("intent", "multiclass", "what the customer wants",
                    labels=tuple(map(str, classes["intent"]))),
             Output("category", "multiclass", "the intent's category",
                    labels=tuple(map(str, classes["category"])))),
            EXAMPLE, doc="customer-service utterances (Bitext)")

    @staticmethod
    def encode(meta: dict[str, Any], rows: list[dict[str, Any]]) -> SourceSplit:
        """Requests -> model inputs: the text is everything (the joint model embeds it)."""
        return SourceSplit(text=[r["text"] for r in rows],
                           numeric=np.zeros((len(rows), 0), np.float32),
                           raw=[{"text": r["text"]} for r in rows])

    def metrics(self, data: SourceData, split: str, task: str, pred: np.ndarray
                ) -> dict[str, float]:
        """accuracy, macro_f1 and logloss of class probabilities ``pred`` [n, C]."""
        return multiclass_metrics(data, split, task, pred)

    def baseline(self, data: SourceData) -> dict[str, dict[str, float]]:
        """TF-IDF (word 1-2 grams) + logistic regression per task, fit on train, on test."""
        vec = tfidf()  # first: it says which extra a missing scikit-learn is in
        from sklearn.linear_model import LogisticRegression

        x_train = vec.fit_transform(_texts(data.train))
        x_test = vec.transform(_texts(data.test))
        out = {}
        for spec in data.tasks:
            # C = 10: the utterances are short and nearly separable; C = 1 underfits (test
            # logloss 0.56 against 0.14)
            model = LogisticRegression(C=10.0, max_iter=2000)
            with one_thread():
                model.fit(x_train, data.train.labels[spec.name])
            prob = np.zeros((len(data.test), spec.n_classes))
            prob[:, model.classes_] = model.predict_proba(x_test)  # its columns are its classes
            out[spec.name] = self.metrics(data, "test", spec.name, prob)
        return out


def multiclass_metrics(data: SourceData, split: str, task: str, pred: np.ndarray
                       ) -> dict[str, float]:
    """accuracy, macro F1, logloss and n of class probabilities [n, C]; label -1 is masked."""
    spec = next((t for t in data.tasks if t.name == task), None)
    if spec is None:
        raise KeyError(f"{data.name}: unknown task {task!r}; known: {[t.name for t in data.tasks]}")
    y = data.split(split).labels[task]
    pred = np.asarray(pred)
    if pred.shape != (len(y), spec.n_classes):
        raise ValueError(
            f"{data.name}/{task}: pred has shape {pred.shape}, expected ({len(y)}, "
            f"{spec.n_classes}) class probabilities"
        )
    keep = y >= 0
    y, pred = y[keep], pred[keep]
    top = pred.argmax(axis=1)
    return {"n": len(y), "accuracy": accuracy(y, top), "macro_f1": macro_f1(y, top),
            "logloss": multiclass_logloss(y, pred)}


def _split(table: Table, rows: np.ndarray, classes: dict[str, list[str]]) -> SourceSplit:
    labels = {}
    for t in TASKS:
        index = {c: k for k, c in enumerate(classes[t])}
        values = table.columns[t]
        out = np.empty(len(rows), np.int64)
        for j, i in enumerate(rows):
            k = index.get(values[i])
            if k is None:
                raise DataError(
                    f"{table.where(int(i), t)}: label not seen in the training split "
                    f"({len(classes[t])} known classes)"
                )
            out[j] = k
        labels[t] = out
    # the inputs are built from the raw requests by the code that serves them (``encode``)
    requests = [{"text": table.columns[TEXT][i]} for i in rows]
    return replace(BitextSource.encode({}, requests), labels=labels)


def _texts(split: SourceSplit) -> list[str]:
    assert split.text is not None
    return split.text
