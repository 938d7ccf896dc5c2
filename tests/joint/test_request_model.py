"""The contract builds the HTTP service's request models too (``data.contract.request_model``):
every raw held-out request of every source passes, the bad ones ``Contract.read`` refuses are
refused by the same fields, and the JSON schema publishes the fields' meaning and ranges."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

import shopmtl
from shopmtl.data.contract import request_model
from shopmtl.data.ingest import DataError
from shopmtl.joint.parts import build_source

SOURCES = {"search": "relevance", "bitext": "intent", "reviews": "rating", "retail": "demand_1d"}


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_raw_test_request_and_the_example_pass(source: str, run: Path) -> None:
    m = shopmtl.load(run / "joint" / "model")
    contract = m.contract(SOURCES[source])
    model = request_model(contract)
    sc = next(s for s in m.cfg.sources if s.name == source)
    data = build_source(sc).load()
    if sc.max_examples:
        data = data.sample(sc.max_examples, m.cfg.train.seed)
    raw = [dict(r) for r in data.test.raw]
    for r in [*raw, contract.example]:
        model.model_validate_json(json.dumps(r))  # as an HTTP body arrives
    props = model.model_json_schema()["properties"]
    assert list(props) == [f.name for f in contract.inputs]


def test_bad_bodies_are_refused_on_the_field_contract_read_names(run: Path) -> None:
    m = shopmtl.load(run / "joint" / "model")
    contract = m.contract("rating")
    model = request_model(contract)
    schema = model.model_json_schema()
    assert schema["properties"]["age"]["maximum"] == 150
    assert schema["additionalProperties"] is False
    for body, field in [({"review": "fine", "age": 300}, "age"),
                        ({"review": "fine", "age": "35"}, "age"),  # strict: a JSON number
                        ({"review": "fine"}, "age"),
                        ({"review": "fine", "age": 30, "ratng": 5}, "ratng"),
                        ({"review": "x" * 10_001, "age": 30}, "review")]:
        with pytest.raises(pydantic.ValidationError) as info:
            model.model_validate_json(json.dumps(body))
        assert {e["loc"][0] for e in info.value.errors()} == {field}
        if field != "review" and body.get("age") != "35":
            with pytest.raises(DataError, match=f"'{field}'"):
                contract.read(body, "body")
    with pytest.raises(pydantic.ValidationError):  # NaN is not JSON, but Python sends it
        model.model_validate({"review": "fine", "age": float("nan")})
    demand = request_model(m.contract("demand_1d"))
    body = dict(m.contract("demand_1d").example)
    body["history"] = body["history"][:27]
    with pytest.raises(pydantic.ValidationError) as info:
        demand.model_validate_json(json.dumps(body))
    assert info.value.errors()[0]["loc"] == ("history",)
