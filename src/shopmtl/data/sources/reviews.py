"""Women's e-commerce clothing reviews: star rating (regression) and recommendation (binary).

``shared/datasets/womens_ecommerce_reviews/womens_clothing_ecommerce_reviews.csv`` (23,486
rows, SOURCE.md). text = ``Title + ". " + Review Text`` (either part alone when the other is
empty); a row with neither has nothing to read and is skipped (counted in ``meta``).

Tasks: ``rating`` is a regression on the 1..5 stars (an ordered target: predicting 4 for a 5 is
a smaller error than predicting 1, which a 5-way softmax ignores); its metrics also report the
accuracy of the rounded prediction. ``recommend`` is ``Recommended IND`` (binary).
Numeric: the reviewer's age, standardised with the training split's mean and std.
Ids: ``class_name`` (20 garment classes; vocabulary from train, 0 = empty or unseen).

Requests (``contract``): ``{"title", "review", "age", "class_name"}`` (title and review
optional, at least one of them); the inputs are built by ``encode``, the code that builds the
training inputs, with the training statistics kept in ``meta``. Answers: the rating clamped
to the training labels' range, the probability of a recommendation.

Split: stratified by rating, 70/15/15, by a seeded random order within each rating.
"""

from __future__ import annotations

import math
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
from shopmtl.metrics import accuracy, auc, logloss

DATASET = "womens_ecommerce_reviews"
FILE_NAME = "womens_clothing_ecommerce_reviews.csv"
TITLE, BODY, AGE, RATING, RECOMMEND, CLASS = (
    "Title", "Review Text", "Age", "Rating", "Recommended IND", "Class Name")
STARS = (1, 5)
INPUTS = (
    Field("title", "text", "the review's title", required=False),
    Field("review", "text", "the review's text", required=False),
    Field("age", "number", "the reviewer's age", unit="years", ge=0, le=150),
    Field("class_name", "string", 'the garment class, e.g. "Dresses" (an unknown or absent '
          "one reads as unknown, as in training)", required=False),
)


class ReviewsSource:
    """The reviews source. ``directory``: the dataset folder (default
    ``datasets_dir()/womens_ecommerce_reviews``); ``seed``: the split's seed."""

    name = "reviews"
    task_names = ("rating", "recommend")  # what load() returns (checked at config load)

    def __init__(self, directory: Path | str | None = None, seed: int = 0) -> None:
        self.directory = directory
        self.seed = seed
        # data-row number (0-based, in file order) of every example per split, set by load()
        self.rows: dict[str, np.ndarray] = {}

    def load(self) -> SourceData:
        path = dataset_file(self.directory, DATASET, FILE_NAME)
        table = read_csv(path, (TITLE, BODY, AGE, RATING, RECOMMEND, CLASS))
        text = [_text(t, b) for t, b in zip(table.columns[TITLE], table.columns[BODY],
                                            strict=True)]
        kept = np.asarray([i for i, t in enumerate(text) if t], np.int64)
        # labels and age are checked on every row, kept or not: a bad file is bad anywhere
        rating = _integers(table, RATING, *STARS)
        recommend = _integers(table, RECOMMEND, 0, 1)
        age = _integers(table, AGE, 0, 150).astype(np.float64)
        local = stratified_split([table.columns[RATING][i] for i in kept], self.seed)
        rows = {s: kept[local[s]] for s in SPLITS}
        mean, std = float(age[rows["train"]].mean()), float(age[rows["train"]].std())
        std = std if std > 0 else 1.0
        names = table.columns[CLASS]
        vocab = sorted({names[i] for i in rows["train"] if names[i].strip()})
        meta = {
            "file": str(path),
            "rows": len(table),
            "skipped_no_text": len(table) - len(kept),
            "text": f'{TITLE} + ". " + {BODY}',
            "numeric": ["age"],
            "age_mean": mean,
            "age_std": std,
            "class_name": ["<unknown>", *vocab],  # id -> name; 0 = empty or unseen
            "rating_range": list(STARS),
            "split": {"method": "stratified by rating, seeded order within each rating",
                      "seed": self.seed, "sizes": {s: len(rows[s]) for s in SPLITS}},
        }
        splits = {}
        for s, r in rows.items():
            # the inputs are built from the raw requests by the code that serves them
            requests = [_request(table, int(i), float(age[i])) for i in r]
            splits[s] = replace(self.encode(meta, requests),
                                labels={"rating": rating[r].astype(np.float32),
                                        "recommend": recommend[r].astype(np.float32)})
        self.rows = rows
        return SourceData(
            name=self.name,
            tasks=(TaskSpec("rating", type="regression"), TaskSpec("recommend", type="binary")),
            train=splits["train"], valid=splits["valid"], test=splits["test"],
            id_sizes={"class_name": len(vocab) + 1}, meta=meta,
        )

    def contract(self, data: SourceData) -> Contract:
        """The review's fields; the rating is clamped to the training labels' range."""
        y = data.train.labels["rating"]
        vocab = data.meta["class_name"][1:]
        example: dict[str, Any] = {
            "title": "Lovely summer dress",
            "review": "The fabric is soft and it fits true to size; I ordered my usual small.",
            "age": 35,
        }
        if vocab:
            example["class_name"] = "Dresses" if "Dresses" in vocab else vocab[0]
        return Contract(
            self.name, INPUTS,
            (Output("rating", "regression", "the star rating", unit="stars",
                    low=float(y.min()), high=float(y.max())),
             Output("recommend", "binary", "the reviewer recommends the product")),
            example, doc="women's clothing reviews (e-commerce)",
            one_of=(("title", "review"),))

    @staticmethod
    def encode(meta: dict[str, Any], rows: list[dict[str, Any]]) -> SourceSplit:
        """Requests (checked by the contract: age a float, absent fields None) -> the text,
        the age standardised with the training mean and std, and the class id (0: absent or
        not in the training vocabulary). ``raw``: the requests' fields, absent ones left out
        (as a user leaves them out); keys passed by ``Contract.read``'s ``extra`` are no
        fields and are dropped."""
        index = {c: k for k, c in enumerate(meta["class_name"]) if k > 0}
        age = np.asarray([r["age"] for r in rows], np.float64)
        return SourceSplit(
            text=[_text(r["title"] or "", r["review"] or "") for r in rows],
            numeric=((age - meta["age_mean"]) / meta["age_std"]).astype(np.float32)[:, None],
            ids={"class_name": np.asarray([index.get(r["class_name"], 0) for r in rows],
                                          np.int64)},
            raw=[{f.name: r[f.name] for f in INPUTS if r.get(f.name) is not None}
                 for r in rows],
        )

    def metrics(self, data: SourceData, split: str, task: str, pred: np.ndarray
                ) -> dict[str, float]:
        """rating: rmse, mae and the accuracy of the prediction rounded to a star (clipped to
        1..5); recommend: auc, logloss of the probability. NaN labels are masked."""
        y = data.split(split).labels.get(task)
        if y is None:
            raise KeyError(f"{self.name}: unknown task {task!r}; known: ['rating', 'recommend']")
        pred = np.asarray(pred, np.float64)
        if pred.shape != y.shape:
            raise ValueError(f"{self.name}/{task}: pred has shape {pred.shape}, expected "
                             f"{y.shape}")
        keep = np.isfinite(y)
        y, pred = y[keep].astype(np.float64), pred[keep]
        if task == "recommend":
            return {"n": len(y), "auc": auc(y, pred), "logloss": logloss(y, pred)}
        if len(y) == 0:
            return {"n": 0, "rmse": math.nan, "mae": math.nan, "accuracy": math.nan}
        err = pred - y
        stars = np.clip(np.rint(pred), *STARS)
        return {"n": len(y), "rmse": float(np.sqrt(np.mean(err**2))),
                "mae": float(np.mean(np.abs(err))), "accuracy": accuracy(y, stars)}

    def baseline(self, data: SourceData) -> dict[str, dict[str, float]]:
        """TF-IDF (word 1-2 grams) + ridge for rating (clipped to 1..5), + logistic regression
        for recommend; fit on train, scored on test. Text only (no age, no class)."""
        vec = tfidf()  # first: it says which extra a missing scikit-learn is in
        from sklearn.linear_model import LogisticRegression, Ridge

        assert data.train.text is not None and data.test.text is not None
        x_train = vec.fit_transform(data.train.text)
        x_test = vec.transform(data.test.text)
        with one_thread():
            ridge = Ridge(alpha=1.0).fit(x_train, data.train.labels["rating"])
            logit = LogisticRegression(C=4.0, max_iter=2000).fit(
                x_train, data.train.labels["recommend"])
        return {
            "rating": self.metrics(data, "test", "rating", np.clip(ridge.predict(x_test), *STARS)),
            "recommend": self.metrics(data, "test", "recommend",
                                      logit.predict_proba(x_test)[:, 1]),
        }


def _request(table: Table, i: int, age: float) -> dict[str, Any]:
    """Data row ``i`` as a checked request (``Contract.read``'s form: empty fields None)."""
    title, body, name = (table.columns[c][i] for c in (TITLE, BODY, CLASS))
    return {"title": title if title.strip() else None, "review": body if body.strip() else None,
            "age": age, "class_name": name if name.strip() else None}


def _text(title: str, body: str) -> str:
    title, body = title.strip(), body.strip()
    return f"{title}. {body}" if title and body else title or body


def _integers(table: Table, column: str, low: int, high: int) -> np.ndarray:
    """The column as int64; an empty, non-integer or out-of-range cell raises with its place."""
    out = np.empty(len(table), np.int64)
    for i, v in enumerate(table.columns[column]):
        try:
            out[i] = int(v)
        except ValueError:
            raise DataError(f"{table.where(i, column)}: not an integer") from None
        if not low <= out[i] <= high:
            raise DataError(f"{table.where(i, column)}: outside {low}..{high}")
    return out
