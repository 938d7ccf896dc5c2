"""Where the joint model's text tasks lose to TF-IDF: linear probes on the same features.

    .venv/bin/python bench/text_probe.py [--max-tokens 64] [--out bench/results/text_probe.json]

For the review tasks (rating, recommend) and the customer-service tasks (intent, category),
each source's own baseline recipe (TF-IDF word 1-2 grams + ridge / logistic regression, the
same C) is fit on four feature sets: TF-IDF alone (the baseline), the frozen MiniLM sentence
vectors alone (the joint model's shared text input, from the same cache), both side by side,
and the joint model's own lexical input (hashed word 1-2 grams weighted 1/sqrt(n), as its wide
term) beside MiniLM. Scored by each source's ``metrics`` on its test split. If a set with
MiniLM beats TF-IDF, the information is in the features and a joint model that trails the
baseline loses in its head's training, not in its inputs (docs/JOINT.md). Needs
../shared/datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRIMARY = {"rating": ("rmse", False), "recommend": ("auc", True),
           "intent": ("accuracy", True), "category": ("accuracy", True)}


def hashed_bags(texts: list[str], buckets: int = 131072) -> Any:
    """The joint model's own lexical input (examples/joint.yaml): hashed word 1-2 grams, each
    occurrence weighted 1/sqrt(n) as in its wide term (``TableHead``), as a sparse matrix."""
    from scipy import sparse

    from shopmtl.joint.parts import hash_ngrams

    g = hash_ngrams(texts, 2, buckets, 256)
    counts = (g > 0).sum(1)
    rows = np.repeat(np.arange(len(texts)), counts)
    vals = np.repeat(1 / np.sqrt(np.maximum(counts, 1)), counts)
    return sparse.csr_matrix((vals.astype(np.float32), (rows, g[g > 0])),
                             shape=(len(texts), buckets + 1))


def features(train: list[str], test: list[str], max_tokens: int) -> dict[str, tuple[Any, Any]]:
    """name -> (x_train, x_test): tfidf, minilm, tfidf+minilm, and the joint model's hashed
    n-gram bag with MiniLM (hashed+minilm)."""
    from scipy import sparse

    from shopmtl.data.sources._real_common import tfidf
    from shopmtl.data.text import embed_texts

    vec = tfidf()
    t_train, t_test = vec.fit_transform(train), vec.transform(test)
    e_train = embed_texts(train, max_tokens=max_tokens)
    e_test = embed_texts(test, max_tokens=max_tokens)
    return {
        "tfidf": (t_train, t_test),
        "minilm": (e_train, e_test),
        "tfidf+minilm": (sparse.hstack([t_train, sparse.csr_matrix(e_train)]).tocsr(),
                         sparse.hstack([t_test, sparse.csr_matrix(e_test)]).tocsr()),
        "hashed+minilm": (sparse.hstack([hashed_bags(train), sparse.csr_matrix(e_train)]).tocsr(),
                          sparse.hstack([hashed_bags(test), sparse.csr_matrix(e_test)]).tocsr()),
    }


def probe_reviews(max_tokens: int) -> list[dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression, Ridge

    from shopmtl.data.sources._real_common import one_thread
    from shopmtl.data.sources.reviews import STARS, ReviewsSource

    src = ReviewsSource()
    data = src.load()
    assert data.train.text is not None and data.test.text is not None
    rows = []
    for name, (x_tr, x_te) in features(list(data.train.text), list(data.test.text),
                                       max_tokens).items():
        with one_thread():  # the baseline's settings (reviews.py: baseline)
            ridge = Ridge(alpha=1.0).fit(x_tr, data.train.labels["rating"])
            logit = LogisticRegression(C=4.0, max_iter=2000).fit(
                x_tr, data.train.labels["recommend"])
        preds = {"rating": np.clip(ridge.predict(x_te), *STARS),
                 "recommend": logit.predict_proba(x_te)[:, 1]}
        for task, pred in preds.items():
            rows.append({"source": "reviews", "task": task, "features": name,
                         **src.metrics(data, "test", task, pred)})
    return rows


def probe_bitext(max_tokens: int) -> list[dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    from shopmtl.data.sources._real_common import one_thread
    from shopmtl.data.sources.bitext import BitextSource, _texts

    src = BitextSource()
    data = src.load()
    rows = []
    for name, (x_tr, x_te) in features(_texts(data.train), _texts(data.test),
                                       max_tokens).items():
        for spec in data.tasks:
            model = LogisticRegression(C=10.0, max_iter=2000)  # bitext.py: baseline
            with one_thread():
                model.fit(x_tr, data.train.labels[spec.name])
            prob = np.zeros((x_te.shape[0], spec.n_classes))
            prob[:, model.classes_] = model.predict_proba(x_te)
            rows.append({"source": "bitext", "task": spec.name, "features": name,
                         **src.metrics(data, "test", spec.name, prob)})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | task | metric | TF-IDF (baseline) | MiniLM | TF-IDF + MiniLM | "
             "joint's hashed n-grams + MiniLM |", "|---|---|---|---|---|---|---|"]
    for src, task in dict.fromkeys((r["source"], r["task"]) for r in rows):
        key, _ = PRIMARY[task]
        vals = {r["features"]: r[key] for r in rows if r["source"] == src and r["task"] == task}
        lines.append(f"| {src} | {task} | {key} | {vals['tfidf']:.4f} | {vals['minilm']:.4f} | "
                     f"{vals['tfidf+minilm']:.4f} | {vals['hashed+minilm']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64, help="MiniLM truncation (joint.yaml: 64)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "text_probe.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    rows = probe_reviews(args.max_tokens) + probe_bitext(args.max_tokens)
    table = render(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"max_tokens": args.max_tokens, "rows": rows,
                                    "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
