"""Every endpoint of the real server answers what ``shopmtl.load(dir).predict`` answers for
the same request (one scoring path: within 1e-6), with the model version in its header; the
endpoints follow the model (a joint model: one per subsystem; a zoo model: table rows only),
and /openapi.json, /readyz, /livez and /metrics say so."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

import shopmtl
from tests.serve.helpers import close, full_row, post, version_of
from tests.serve.server import Server

JOINT_PATHS = {"/v1/score", "/v1/recommend", "/v1/ads/ctr", "/v1/search", "/v1/support/intent",
               "/v1/reviews/rating", "/v1/demand"}
REC_TASKS = ("click", "conversion", "ad_click")
DEPLOY = Path(__file__).parents[2] / "docs" / "DEPLOY.md"
CURL = re.compile(r"curl -s '?http://127\.0\.0\.1:8000(/v1/[\w/]+)(?:\?([^' ]*))?'?.*?-d '(.*?)'",
                  re.S)
# the rec columns that describe the item (the rest: the user and the scenario)
ITEM_FIELDS = ("item_id", "top_category", "leaf_category", "brand", "position", "price")


def answers(model: shopmtl.Model, body: dict[str, Any], tasks: list[str], **kw: Any
            ) -> dict[str, Any]:
    """The reference: one request of a source answered by ``Model.predict``, task by task."""
    out: dict[str, Any] = {}
    for t in tasks:
        rows = model.predict([body], task=t, **kw).to_pylist()
        if model.contract(t).output(t).type == "ranking":
            out[t] = [{k: v for k, v in r.items() if k != "line"} for r in rows]
        else:
            out.update(rows[0])
    return out


@pytest.mark.parametrize("path, tasks, options", [
    ("/v1/search", ["relevance"], {}),
    ("/v1/support/intent", ["intent", "category"], {"top_k": 3}),
    ("/v1/reviews/rating", ["rating", "recommend"], {}),
    ("/v1/demand", ["demand_1d", "demand_7d"], {}),
])
def test_each_subsystem_answers_as_predict(joint_server: Server, joint_model: shopmtl.Model,
                                           path: str, tasks: list[str], options: dict
                                           ) -> None:
    body = joint_model.contract(tasks[0]).example
    got = post(joint_server, path, body, **options)
    close(got, answers(joint_model, body, tasks, **options))
    if path == "/v1/support/intent":
        assert {"intent_3", "intent_3_p", "category_3_p"} <= set(got)
        assert got["intent"] == "cancel_order"  # the example: "I want to cancel the order..."
    if path == "/v1/search":
        assert [c["rank"] for c in got["relevance"]] == [1, 2, 3]
        assert {c["item_id"] for c in got["relevance"]} == {
            c["item_id"] for c in body["candidates"]}


def test_a_new_utterance_gets_all_its_classes(joint_server: Server,
                                              joint_model: shopmtl.Model) -> None:
    body = {"text": "where is my parcel, it has not arrived"}
    got = post(joint_server, "/v1/support/intent", body, all_classes="true")
    close(got, answers(joint_model, body, ["intent", "category"], all_classes=True))
    labels = joint_model.contract("intent").output("intent").labels
    assert sum(got[f"intent_p_{lab}"] for lab in labels) == pytest.approx(1, abs=1e-5)


def rec_rows(model: shopmtl.Model) -> list[dict[str, Any]]:
    """Three rows: the contract's example, another scenario with unknown ids, a sparse row."""
    ex = dict(model.contract("click").example)
    other = {**ex, "scenario": "ad_slot", "user_id": "no-such-user", "item_id": "no-such-item"}
    sparse = {"price": 12.5, "scenario": "search"}
    return [ex, other, sparse]


def test_score_and_ads_answer_as_predict(joint_server: Server,
                                         joint_model: shopmtl.Model) -> None:
    rows = rec_rows(joint_model)
    fields = [f.name for f in joint_model.contract("click").inputs]
    full = [full_row(fields, r) for r in rows]
    ref = {t: joint_model.predict(full, task=t).column(t).to_pylist() for t in REC_TASKS}
    got = post(joint_server, "/v1/score", {"rows": rows})["predictions"]
    close(got, [{t: ref[t][i] for t in REC_TASKS} for i in range(len(rows))])
    ads = post(joint_server, "/v1/ads/ctr", {"rows": rows})["predictions"]
    close(ads, [{"ad_click": p} for p in ref["ad_click"]])


def recommend_body(model: shopmtl.Model, n: int) -> dict[str, Any]:
    ex = model.contract("click").example
    context = {k: v for k, v in ex.items() if k not in ITEM_FIELDS}
    candidates = [{**{k: ex[k] for k in ITEM_FIELDS}, "item_id": str(1000 + 7 * i),
                   "price": 5.0 + 3 * i} for i in range(n)]
    return {"context": context, "candidates": candidates}


def recommend_reference(model: shopmtl.Model, body: dict[str, Any], weights: dict[str, float]
                        ) -> dict[str, Any]:
    """The ranking ``/v1/recommend`` must give, from ``Model.predict`` of the merged rows."""
    rows = [{**body["context"], **c} for c in body["candidates"]]
    tasks = list(REC_TASKS) if model.kind == "joint" else list(model.tasks)
    if model.kind == "joint":
        preds = {t: model.predict(rows, task=t).column(t).to_pylist() for t in tasks}
    else:
        table = model.predict(rows)
        preds = {t: table.column(t).to_pylist() for t in tasks}
    scores = [sum(w * preds[t][i] for t, w in weights.items()) for i in range(len(rows))]
    order = sorted(range(len(rows)), key=lambda i: -scores[i])
    return {"weights": weights, "items": [
        {"rank": r + 1, "candidate": i, "score": scores[i],
         "predictions": {t: preds[t][i] for t in tasks}} for r, i in enumerate(order)]}


def test_recommend_ranks_by_the_weighted_tasks(joint_server: Server,
                                               joint_model: shopmtl.Model) -> None:
    body = recommend_body(joint_model, 20)
    got = post(joint_server, "/v1/recommend", body)
    close(got, recommend_reference(joint_model, body, {"click": 1.0}))  # default weights
    weights = {"click": 1.0, "conversion": 0.5, "ad_click": -2.0}
    got = post(joint_server, "/v1/recommend", {**body, "weights": weights})
    close(got, recommend_reference(joint_model, body, weights))
    assert sorted(i["candidate"] for i in got["items"]) == list(range(20))
    scores = [i["score"] for i in got["items"]]
    assert scores == sorted(scores, reverse=True)


def test_the_joint_service_lists_its_endpoints(joint_server: Server, joint_dir: Path) -> None:
    with joint_server.client() as c:
        spec = c.get("/openapi.json").json()
        ready, live = c.get("/readyz"), c.get("/livez")
        c.post("/v1/support/intent", json={"text": "refund please"})
        metrics = c.get("/metrics")
    assert {p for p in spec["paths"] if p.startswith("/v1/")} == JOINT_PATHS
    assert {"/livez", "/readyz", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["ReviewsRequest"]["properties"]["age"]["maximum"] == 150
    assert schemas["ReviewsRequest"]["additionalProperties"] is False
    assert "HTTPValidationError" not in schemas  # the errors are the service's own shape
    for status in ("413", "422", "429", "503"):
        ref = spec["paths"]["/v1/demand"]["post"]["responses"][status]["content"]
        assert ref["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert ready.status_code == live.status_code == 200
    version = version_of(joint_dir)
    assert ready.json() == {"status": "ready", "model_version": version}
    for r in (ready, live, metrics):
        assert r.headers["x-model-version"] == version
    text = metrics.text
    assert 'shopmtl_http_requests_total{code="200",endpoint="/v1/support/intent"}' in text
    assert 'shopmtl_http_request_duration_seconds_bucket{endpoint="/v1/support/intent"' in text
    assert f'shopmtl_model_info{{kind="joint",version="{version}"}} 1.0' in text
    assert "shopmtl_ready 1.0" in text
    assert "answered the warm-up on 7 endpoints" in joint_server.log_text()


def test_a_zoo_model_gets_the_table_endpoints(zoo_server: Server, zoo_model: shopmtl.Model,
                                              zoo_dir: Path) -> None:
    with zoo_server.client() as c:
        spec = c.get("/openapi.json").json()
        missing = c.post("/v1/search", json={"query": "x", "candidates": []})
    assert {p for p in spec["paths"] if p.startswith("/v1/")} == {
        "/v1/score", "/v1/recommend", "/v1/ads/ctr"}
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert missing.headers["x-model-version"] == version_of(zoo_dir)
    rows = rec_rows(zoo_model)
    fields = [f.name for f in zoo_model.contract("click").inputs]
    table = zoo_model.predict([full_row(fields, r) for r in rows])
    got = post(zoo_server, "/v1/score", {"rows": rows})["predictions"]
    close(got, [{t: table.column(t)[i].as_py() for t in zoo_model.tasks}
                for i in range(len(rows))])
    body = recommend_body(zoo_model, 30)
    weights = {"click": 1.0, "conversion": 1.0}
    close(post(zoo_server, "/v1/recommend", {**body, "weights": weights}),
          recommend_reference(zoo_model, body, weights))


def doc_requests() -> list[tuple[str, dict[str, str], Any]]:
    """(path, query, body) of every curl in docs/DEPLOY.md's service section."""
    section = DEPLOY.read_text().split("## The HTTP service", 1)[1].split("\n## ", 1)[0]
    return [(path, dict(parse_qsl(query)), json.loads(body))
            for path, query, body in CURL.findall(section)]


def test_the_curls_of_the_deploy_doc_work(joint_server: Server, joint_model: shopmtl.Model
                                          ) -> None:
    requests = doc_requests()
    assert sorted(p for p, _, _ in requests) == sorted(JOINT_PATHS)  # one per endpoint
    for path, query, body in requests:
        got = post(joint_server, path, body, **query)
        if path == "/v1/support/intent":
            assert got["intent"] == "cancel_order" and "intent_3" in got
        if path == "/v1/recommend":
            assert len(got["items"]) == len(body["candidates"])
