"""Bad requests to the real server: every one is a 4xx JSON error with a stable code, names the
place of the problem, and never repeats the request's values (a secret put in each body is in
no answer and, at the end, in no line of the server's log)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

import shopmtl
from tests.serve.helpers import raw_post, version_of
from tests.serve.server import Server
from tests.serve.test_answers import recommend_body

SECRET = "zq-SECRET-4471"


def rec_row(model: shopmtl.Model, **change: Any) -> dict[str, Any]:
    return {**model.contract("click").example, **change}


def demand_out_of_order(model: shopmtl.Model) -> dict[str, Any]:
    """Dates going backwards: refused by the source's encode (a DataError), not by pydantic."""
    body = dict(model.contract("demand_1d").example)
    body["history"] = list(reversed(body["history"]))
    return {**body, "description": SECRET, "date": "2012-01-05"}


def cases(m: shopmtl.Model) -> list[tuple[str, str, Any, int, str, str]]:
    """(name, path, body (bytes: sent raw), status, code, a field path the answer names)."""
    search = m.contract("relevance").example
    many = [{"item_id": str(i), "title": SECRET} for i in range(1_001)]
    rec = recommend_body(m, 3)
    return [
        ("wrong type", "/v1/reviews/rating", {"review": SECRET, "age": "35"}, 422,
         "invalid_request", "body.age"),
        ("NaN literal", "/v1/reviews/rating",
         b'{"review": "' + SECRET.encode() + b'", "age": NaN}', 422, "invalid_request",
         "body.age"),
        ("Infinity literal", "/v1/score",
         json.dumps({"rows": [rec_row(m, user_id=SECRET)]}).replace("57.3034", "Infinity")
         .encode(), 422, "invalid_request", "body.rows.0.price"),
        ("unknown field", "/v1/support/intent", {"text": SECRET, "txt": SECRET}, 422,
         "invalid_request", "body.txt"),
        ("a text too long", "/v1/support/intent", {"text": SECRET * 800}, 422,
         "invalid_request", "body.text"),
        ("neither title nor review", "/v1/reviews/rating", {"age": 30, "class_name": SECRET},
         422, "invalid_request", ""),
        ("unknown scenario", "/v1/score", {"rows": [rec_row(m, scenario=SECRET)]}, 422,
         "invalid_request", "scenario"),
        ("a number as text", "/v1/ads/ctr", {"rows": [rec_row(m, price=SECRET)]}, 422,
         "invalid_request", "body.rows.0.price"),
        ("an id as a number", "/v1/score", {"rows": [rec_row(m, user_id=4471)]}, 422,
         "invalid_request", "body.rows.0.user_id"),
        ("too many search candidates", "/v1/search", {**search, "candidates": many}, 422,
         "invalid_request", "body.candidates"),
        ("too many recommend candidates", "/v1/recommend",
         {**rec, "candidates": rec["candidates"] * 334}, 422, "invalid_request",
         "body.candidates"),
        ("too many rows", "/v1/score", {"rows": [rec_row(m, user_id=SECRET)] * 1_001}, 422,
         "invalid_request", "body.rows"),
        ("no candidates", "/v1/recommend", {**rec, "candidates": []}, 422, "invalid_request",
         "body.candidates"),
        ("a field in context and candidate", "/v1/recommend",
         {**rec, "context": {**rec["context"], "price": 3.0}}, 422, "invalid_request", ""),
        ("an unknown task weight", "/v1/recommend", {**rec, "weights": {"clik": 1.0}}, 422,
         "invalid_request", "body.weights.clik"),
        ("a NaN weight", "/v1/recommend",
         json.dumps({**rec, "weights": {"click": 1.0}}).replace('"click": 1.0', '"click": NaN')
         .encode(), 422, "invalid_request", "body.weights.click"),
        ("history out of order", "/v1/demand", demand_out_of_order(m), 422, "invalid_request",
         ""),
        ("history too short", "/v1/demand",
         {**m.contract("demand_1d").example, "product": SECRET, "history": []}, 422,
         "invalid_request", "body.history"),
        ("a bad date", "/v1/demand", {**m.contract("demand_1d").example, "date": SECRET}, 422,
         "invalid_request", "body.date"),
        ("truncated JSON", "/v1/support/intent", b'{"text": "' + SECRET.encode(), 422,
         "invalid_request", ""),
        ("a list for an object", "/v1/support/intent", [SECRET], 422, "invalid_request",
         "body"),
        ("a body over 1 MiB", "/v1/support/intent",
         json.dumps({"text": SECRET * 80_000}).encode(), 413, "body_too_large", ""),
    ]


def send(server: Server, path: str, body: Any, **params: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return raw_post(server, path, body, **params)
    with server.client() as c:
        return c.post(path, json=body, params=params)


def check_error(r: httpx.Response, status: int, code: str, field: str, version: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-model-version"] == version
    assert SECRET not in r.text and "4471" not in r.text
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"code", "message", "fields"}
    assert err["code"] == code and err["message"]
    if field:
        assert field in err["fields"], err
    return err


def test_every_bad_request_is_a_json_error_without_its_values(
        joint_server: Server, joint_model: shopmtl.Model, joint_dir) -> None:
    version = version_of(joint_dir)
    for name, path, body, status, code, field in cases(joint_model):
        r = send(joint_server, path, body)
        try:
            check_error(r, status, code, field, version)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_the_messages_say_what_is_wrong(joint_server: Server,
                                        joint_model: shopmtl.Model) -> None:
    r = send(joint_server, "/v1/score", {"rows": [rec_row(joint_model, scenario=SECRET)]})
    assert "unknown scenario" in r.json()["error"]["message"]
    r = send(joint_server, "/v1/reviews/rating", {"age": 30})
    assert "give at least one of the fields ['title', 'review']" in r.text
    r = send(joint_server, "/v1/recommend", {"context": {"scenario": "home_feed"},
                                             "candidates": [{"item_id": "12"}]})
    assert "candidates item 0: missing field(s) ['price']" in r.text  # required: nowhere
    r = send(joint_server, "/v1/support/intent", {"text": "hi"}, top_k=28)  # 27 labels
    assert r.status_code == 422 and r.json()["error"]["fields"] == ["query.top_k"]


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v1/nothing-here", 404, "not_found"),
    ("GET", "/v1/search", 405, "method_not_allowed"),
])
def test_unknown_paths_and_methods(joint_server: Server, method: str, path: str, status: int,
                                   code: str) -> None:
    with joint_server.client() as c:
        r = c.request(method, path)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_a_chunked_body_over_the_bound_is_413(joint_server: Server, joint_dir) -> None:
    """No Content-Length to believe: the gate counts the chunks and stops at the bound."""
    def chunks():
        piece = json.dumps({"text": SECRET * 5_000}).encode()  # ~70 KB each
        for _ in range(30):
            yield piece

    with joint_server.client() as c:
        r = c.post("/v1/support/intent", content=chunks(),
                   headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    check_error(r, 413, "body_too_large", "", version_of(joint_dir))


def test_the_log_holds_no_request_value(joint_server: Server) -> None:
    """Last in this module: every request above logged a line, none with its values."""
    with joint_server.client() as c:
        c.post("/v1/support/intent", json={"text": SECRET})
        c.get(f"/v1/{SECRET}", params={"q": SECRET})
    log = joint_server.log_text()
    assert "POST /v1/support/intent 200" in log and "GET other 404" in log
    assert SECRET not in log and "4471" not in log
