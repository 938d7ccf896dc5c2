"""Women's e-commerce clothing reviews: star rating (regression) and recommendation (binary).

``shared/datasets/womens_ecommerce_reviews/womens_clothing_ecommerce_reviews.csv`` (23,486
rows, SOURCE.md). text = ``Title + ". " + Review Text`` (either part alone when the other is
empty); a row with neither has nothing to read and is skipped (counted in ``meta``).

Tasks: ``rating`` is a regression on the 1..5 stars (an ordered target: predicting 4 for a 5 is
a smaller error than predicting 1, which a 5-way softmax ignores); its metrics also report the
accuracy of the rounded prediction. ``recommend`` is ``Recommended IND`` (binary).
Numeric: the reviewer's age, standardised with the training split's mean and std.
Ids: ``class_name`` (20 garment classes; vocabulary from train, 0 = empty or unseen).

Split: stratified by rating, 70/15/15, by a seeded random order within each rating.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

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
        vocab = sorted({names[i] for i in rows["train"] if names[i]})
        index = {c: k + 1 for k, c in enumerate(vocab)}  # 0 = empty or unseen
        splits = {
            s: SourceSplit(
                text=[text[i] for i in r],
                numeric=((age[r] - mean) / std).astype(np.float32)[:, None],
                ids={"class_name": np.asarray([index.get(names[i], 0) for i in r], np.int64)},
                labels={"rating": rating[r].astype(np.float32),
                        "recommend": recommend[r].astype(np.float32)},
            )
            for s, r in rows.items()
        }
        self.rows = rows
        return SourceData(
            name=self.name,
            tasks=(TaskSpec("rating", type="regression"), TaskSpec("recommend", type="binary")),
            train=splits["train"], valid=splits["valid"], test=splits["test"],
            id_sizes={"class_name": len(vocab) + 1},
            meta={
                "file": str(path),
                "rows": len(table),
                "skipped_no_text": len(table) - len(kept),
                "text": f'{TITLE} + ". " + {BODY}',
                "numeric": ["age"],
                "age_mean": mean,
                "age_std": std,
                "class_name": ["<unknown>", *vocab],  # id -> name
                "rating_range": list(STARS),
                "split": {"method": "stratified by rating, seeded order within each rating",
                          "seed": self.seed, "sizes": {s: len(rows[s]) for s in SPLITS}},
            },
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
