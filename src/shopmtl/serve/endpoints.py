"""The service's endpoints, built from what a loaded model has: its tasks' contracts.

Each ``Endpoint`` is a path, a pydantic body model built from a contract
(``data.contract.request_model``), a valid example body (the contract's own: the warm-up and
the OpenAPI example) and an ``answer`` function whose every number comes from
``Model.predict``, called through the model's ``serve.batch.Scorer`` (one call at a time;
concurrent table rows combined into one call): the service has no scoring code of its own, so
an HTTP answer equals ``shopmtl.load(dir).predict(...)`` on the same request, and any model
kind ``shopmtl.load`` reads can be served.

- Table rows (a zoo model, a joint model's ``rec`` source): ``/v1/score`` (rows -> one
  prediction per task), ``/v1/recommend`` (a context shared by the candidates, up to
  ``MAX_CANDIDATES`` candidates -> ranked by sum of task weight x prediction) and, when the
  model has an ``ad_click`` task, ``/v1/ads/ctr``.
- Every other source of a joint model: one request in its contract's fields -> the answer of
  each of its tasks, the columns ``shopmtl predict --task`` writes (docs/PREDICT.md); a ranking
  task's answer is its candidates, best first, under the task's name. The built-in sources
  have the subsystem's path (``SOURCE_PATHS``); a source of your own ``/v1/sources/<name>``.

Features by id (``serve.features``): given a feature store, the table-row endpoints fill the
user and item columns a row lacks from the store by the row's ids before the required fields
are checked, so a request may carry only ids (and the request-time columns: scenario,
position); ``/v1/score``'s rows then have no required field in their schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from shopmtl.data.contract import Contract, request_model
from shopmtl.data.ingest import DataError
from shopmtl.deps import require
from shopmtl.describe import TABLE_SOURCES
from shopmtl.serve.batch import Scorer

SOURCE_PATHS = {"search": "/v1/search", "bitext": "/v1/support/intent",
                "reviews": "/v1/reviews/rating", "retail": "/v1/demand"}
MAX_ROWS = 1_000  # rows of one /v1/score or /v1/ads/ctr request
MAX_CANDIDATES = 1_000  # candidates of one /v1/recommend request
MAX_WEIGHT = 1e6  # |task weight| of /v1/recommend
AD_TASK = "ad_click"
SCALAR = ("binary", "regression")  # outputs a /v1/recommend weight may multiply

Answer = Callable[..., dict[str, Any]]
Fill = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Endpoint:
    """One POST endpoint: ``answer(body, **options)`` -> the JSON answer. ``max_top_k`` > 0
    adds the ``top_k`` and ``all_classes`` query options (a source with a multiclass task)."""

    path: str
    summary: str
    description: str
    body: type
    example: dict[str, Any]
    answer: Answer
    tasks: tuple[str, ...]
    max_top_k: int = 0


def build_endpoints(scorer: Scorer, features: Any = None) -> list[Endpoint]:
    """Every endpoint ``scorer.model`` can answer, its table-row endpoints first.
    ``features``: a ``serve.features.Features`` (the store and its miss counter) or None."""
    model = scorer.model
    by_source: dict[str, tuple[Contract, list[str]]] = {}
    for task in model.tasks:
        contract = model.contract(task)
        by_source.setdefault(contract.source, (contract, []))[1].append(task)
    out: list[Endpoint] = []
    for source, (contract, tasks) in by_source.items():
        if source in TABLE_SOURCES:
            fill = features.filler(contract).fill if features is not None else None
            out += table_endpoints(scorer, contract, tasks, fill)
    for source, (contract, tasks) in by_source.items():
        if source not in TABLE_SOURCES:
            out.append(source_endpoint(scorer, contract, tasks))
    return out


def _dump(body: Any) -> dict[str, Any]:
    """A validated body as the plain request ``Model.predict`` reads (absent = not given)."""
    return body.model_dump(mode="json", exclude_none=True)


def _row(contract: Contract, given: dict[str, Any]) -> dict[str, Any]:
    """A table row with every column of the contract: an optional field not given is an
    empty cell (the unknown row, a filled number), as in a CSV file that has the column; the
    reader of training wants every column it reads present."""
    return {f.name: given.get(f.name) for f in contract.inputs}


# -- table rows: /v1/score, /v1/ads/ctr, /v1/recommend ----------------------------------------


def _loose(contract: Contract) -> Contract:
    """The contract with no required field (they are checked once a row is complete)."""
    return dataclasses.replace(contract, inputs=tuple(
        dataclasses.replace(f, required=False) for f in contract.inputs))


def _complete(row: dict[str, Any], required: list[str], where: str, give: str,
              fill: Fill | None) -> None:
    """A row has every required field (after the feature store's fill, if any)."""
    missing = [f for f in required if row.get(f) is None]
    if missing:
        store = " (the feature store has none for this row's ids)" if fill is not None else ""
        raise DataError(f"{where}: missing field(s) {missing}: {give}{store}")


def table_endpoints(scorer: Scorer, contract: Contract, tasks: list[str],
                    fill: Fill | None = None) -> list[Endpoint]:
    pd = require("pydantic", "serve", "the HTTP request models")
    row = request_model(_loose(contract) if fill is not None else contract, name="ScoreRow")
    rows = Annotated[list[row], pd.Field(min_length=1, max_length=MAX_ROWS,  # type: ignore[valid-type]
                                         description="rows of the training table's columns")]
    config = pd.ConfigDict(extra="forbid", strict=True)
    score = pd.create_model("ScoreRequest", __config__=config, rows=(rows, ...))
    example = {"rows": [dict(contract.example)]}
    out = [Endpoint("/v1/score", "Predictions of every task for table rows",
                    f"One prediction per task ({', '.join(tasks)}) for each row, in row order. "
                    "A row holds the training table's columns (labels not read); an unknown "
                    "id reads as the unknown row, as in training.", score, example,
                    _score_answer(scorer, contract, tasks, fill), tuple(tasks))]
    if AD_TASK in tasks:
        ads = pd.create_model("AdsRequest", __config__=config, rows=(rows, ...))
        out.append(Endpoint("/v1/ads/ctr", "Ad click-through probability for table rows",
                            "The probability that each row's ad is clicked (task ad_click), "
                            "in row order.", ads, example,
                            _score_answer(scorer, contract, [AD_TASK], fill), (AD_TASK,)))
    scalar = [t for t in tasks if contract.output(t).type in SCALAR]
    if scalar:
        out.append(_recommend(scorer, contract, tasks, scalar, pd, config, fill))
    return out


def _score_answer(scorer: Scorer, contract: Contract, tasks: Sequence[str], fill: Fill | None
                  ) -> Answer:
    required = [f.name for f in contract.inputs if f.required]

    def answer(body: Any) -> dict[str, Any]:
        given = [_dump(r) for r in body.rows]
        if fill is not None:
            given = fill(given)
            for i, r in enumerate(given):
                _complete(r, required, f"rows item {i}", "give them in the row", fill)
        preds = scorer.predict([_row(contract, r) for r in given], tasks)
        n = len(body.rows)
        return {"predictions": [{t: preds[t][i] for t in tasks} for i in range(n)]}

    return answer


def _recommend(scorer: Scorer, contract: Contract, tasks: list[str], scalar: list[str],
               pd: Any, config: Any, fill: Fill | None = None) -> Endpoint:
    """``/v1/recommend``: the context (the user's features, the scenario) and each
    candidate's fields make one row per candidate; required fields may come from either.
    Weights apply to the ``scalar`` tasks (one number per row: a sum needs numbers)."""
    loose = _loose(contract)
    context = request_model(loose, name="RecommendContext")
    candidate = request_model(loose, name="RecommendCandidate")
    weight = Annotated[float | None, pd.Field(None, ge=-MAX_WEIGHT, le=MAX_WEIGHT,
                                              allow_inf_nan=False)]
    weights = pd.create_model("TaskWeights", __config__=config,
                              **{t: (weight, None) for t in scalar})
    cands = Annotated[list[candidate], pd.Field(  # type: ignore[valid-type]
        min_length=1, max_length=MAX_CANDIDATES,
        description="the items to rank: each one's own fields (item id, price, ...)")]
    body = pd.create_model(
        "RecommendRequest", __config__=config,
        context=(context, pd.Field(description="the fields every candidate shares: the "
                                   "user's features and the scenario")),
        candidates=(cands, ...),
        weights=(weights | None, pd.Field(None, description=f"task -> weight of the combined "
                                          f"score (default: {{{scalar[0]!r}: 1}})")))
    # which columns are the user's and which the item's is the caller's to say: the generic
    # example puts all of the contract's example in its one candidate
    example = {"context": {}, "candidates": [dict(contract.example)]}
    return Endpoint("/v1/recommend", "Candidates ranked for a user in a scenario",
                    "Each candidate's predictions of every task and its combined score "
                    "(sum of task weight x prediction); candidates best first, `candidate` "
                    "is its place in the request (from 0).", body, example,
                    _recommend_answer(scorer, contract, tasks, scalar[0], fill), tuple(tasks))


def _recommend_answer(scorer: Scorer, contract: Contract, tasks: list[str], first: str,
                      fill: Fill | None) -> Answer:
    required = [f.name for f in contract.inputs if f.required]

    def answer(body: Any) -> dict[str, Any]:
        shared = _dump(body.context)
        merged = [_merged(shared, _dump(c), i) for i, c in enumerate(body.candidates)]
        if fill is not None:
            merged = fill(merged)
        for i, r in enumerate(merged):
            _complete(r, required, f"candidates item {i}",
                      "give them in the context or in the candidate", fill)
        rows = [_row(contract, r) for r in merged]
        given = _dump(body.weights) if body.weights is not None else {}
        weights = {t: float(w) for t, w in given.items()} or {first: 1.0}
        preds = scorer.predict(rows, tasks)
        # by columns (numpy: the same float64 sums, in the same order, as one row at a time)
        total = np.zeros(len(rows))
        for t, w in weights.items():
            total += w * np.asarray(preds[t], dtype=np.float64)
        order = np.argsort(-total, kind="stable").tolist()  # stable: ties keep their order
        scores = total.tolist()
        per_row = [dict(zip(tasks, v, strict=True))
                   for v in zip(*(preds[t] for t in tasks), strict=True)]
        items = [{"rank": r, "candidate": i, "score": scores[i], "predictions": per_row[i]}
                 for r, i in enumerate(order, 1)]
        return {"weights": weights, "items": items}

    return answer


def _merged(shared: dict[str, Any], own: dict[str, Any], i: int) -> dict[str, Any]:
    both = sorted(set(shared) & set(own))
    if both:
        raise DataError(f"candidates item {i}: field(s) {both} given both in the context and "
                        "in the candidate")
    return {**shared, **own}


# -- one source of a joint model --------------------------------------------------------------


def source_endpoint(scorer: Scorer, contract: Contract, tasks: list[str]) -> Endpoint:
    outputs = [contract.output(t) for t in tasks]
    top = max((len(o.labels) for o in outputs if o.type == "multiclass"), default=0)
    path = SOURCE_PATHS.get(contract.source, f"/v1/sources/{contract.source}")
    cols = ", ".join(f"{o.task} ({o.type})" for o in outputs)
    return Endpoint(path, f"{contract.doc[:1].upper()}{contract.doc[1:]}" or contract.source,
                    f"One request of source `{contract.source}` -> the answer of each of its "
                    f"tasks: {cols}; the columns of `shopmtl predict --task` (docs/PREDICT.md), "
                    "a ranking task's candidates best first under the task's name.",
                    request_model(contract), dict(contract.example),
                    _source_answer(scorer, contract, tasks), tuple(tasks), top)


def _source_answer(scorer: Scorer, contract: Contract, tasks: list[str]) -> Answer:
    def answer(body: Any, top_k: int = 1, all_classes: bool = False) -> dict[str, Any]:
        row = _dump(body)
        out: dict[str, Any] = {}
        for t in tasks:
            recs = scorer.locked(scorer.model.predict, [row], task=t, top_k=top_k,
                                 all_classes=all_classes).to_pylist()
            if contract.output(t).type == "ranking":
                out[t] = [{k: v for k, v in r.items() if k != "line"} for r in recs]
            else:
                out.update(recs[0])
        return out

    return answer
