"""Input/output contracts (#22) without a model: what each field type accepts and refuses (and
that a refusal names the place and the field but never the value), how requests are read, the
answer columns of every output type, ranked candidates, the JSON a model directory stores, and
the contract a zoo model's schema and fitted encoders give."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shopmtl.data.contract import (
    Contract,
    Field,
    Output,
    answer,
    qname,
    rank_answer,
    read_fields,
    table_contract,
)
from shopmtl.data.encoders import Encoders
from shopmtl.data.ingest import BadRowLog, DataError, read_chunks
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec

SECRET = "card 4111 1111 1111 1111 charged twice"
AGE = Field("age", "number", "the reviewer's age", unit="years", ge=0, le=150)
COUNT = Field("count", "integer", "items in the basket", ge=1, le=10)
DAY = Field("day", "date", "the target day")
TEXT = Field("review", "text", "the review's text")
HISTORY = Field("history", "records", "daily sales", min_items=2,
                items=(Field("date", "date", "the trading day"),
                       Field("units", "number", "units sold", unit="units", ge=0)))


def refused(f: Field, value: Any, where: str = "req.jsonl line 3") -> str:
    """The message of ``f``'s refusal of ``value``."""
    with pytest.raises(DataError) as e:
        f.check(value, where)
    return str(e.value)


# -- Field.check: one type at a time ---------------------------------------------------------


def test_text_accepts_a_non_empty_string_as_given() -> None:
    assert TEXT.check("  fits well ", "w") == "  fits well "
    assert TEXT.check(SECRET, "w") == SECRET


@pytest.mark.parametrize("value,kind", [("", "an empty string"), ("  \t\n", "an empty string"),
                                        (None, "nothing"), (3, "a number"),
                                        (True, "a boolean"), (["a", "b"], "a list of 2"),
                                        ({"text": "a"}, "an object")])
def test_text_refuses_empty_whitespace_and_non_strings(value: Any, kind: str) -> None:
    assert refused(TEXT, value) == (f"req.jsonl line 3: field 'review': expected a non-empty "
                                    f"text, got {kind}")


@pytest.mark.parametrize("value,want", [(3.5, 3.5), (0, 0.0), (150, 150.0), ("3.5", 3.5),
                                        (" 42 ", 42.0), ("150", 150.0), ("1e2", 100.0),
                                        (np.float32(2.5), 2.5), (np.int64(7), 7.0)])
def test_number_accepts_numbers_and_csv_cells(value: Any, want: float) -> None:
    got = AGE.check(value, "w")
    assert got == want and type(got) is float


def test_number_range_is_inclusive_at_both_ends() -> None:
    assert AGE.check(0, "w") == 0.0 and AGE.check(150.0, "w") == 150.0
    for outside in (-1e-9, 150.000001, "151", -0.5):
        assert refused(AGE, outside) == ("req.jsonl line 3: field 'age': expected a number "
                                         "(years) in 0..150, got a number outside that range")
    low_only = Field("x", "number", "x", ge=2.5)
    assert low_only.check(2.5, "w") == 2.5 and low_only.check(1e9, "w") == 1e9
    assert "expected a number >= 2.5, got a number outside" in refused(low_only, 2.4)
    high_only = Field("x", "number", "x", le=-1)
    assert high_only.check(-1, "w") == -1.0
    assert "expected a number <= -1, got a number outside" in refused(high_only, 0)


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_number_refuses_booleans(value: Any) -> None:
    msg = refused(AGE, value)
    assert msg.startswith("req.jsonl line 3: field 'age': expected a number (years) in 0..150, "
                          "got ")
    assert "outside" not in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "nan", "inf",
                                   " -Infinity", np.float64("nan")])
def test_number_refuses_non_finite_values(value: Any) -> None:
    assert refused(AGE, value) == ("req.jsonl line 3: field 'age': expected a number (years) "
                                   "in 0..150, got a non-finite number")


@pytest.mark.parametrize("value,kind", [("old", "a string"), ("", "an empty string"),
                                        ([35], "a list of 1"), ({"v": 1}, "an object")])
def test_number_refuses_what_is_no_number(value: Any, kind: str) -> None:
    assert refused(AGE, value) == ("req.jsonl line 3: field 'age': expected a number (years) "
                                   f"in 0..150, got {kind}")


def test_integer_takes_whole_numbers_and_refuses_fractions() -> None:
    for value in (3, 3.0, "3", " 3.0 ", np.int32(3)):
        got = COUNT.check(value, "w")
        assert got == 3 and type(got) is int
    assert COUNT.check(1, "w") == 1 and COUNT.check(10, "w") == 10  # inclusive
    assert refused(COUNT, 2.5) == ("req.jsonl line 3: field 'count': expected an integer in "
                                   "1..10, got a number")
    assert refused(COUNT, "2.5") == ("req.jsonl line 3: field 'count': expected an integer in "
                                     "1..10, got a string")
    assert refused(COUNT, 11) == ("req.jsonl line 3: field 'count': expected an integer in "
                                  "1..10, got a number outside that range")
    assert "got a boolean" in refused(COUNT, True)


def test_date_reads_iso_days_and_keeps_date_objects() -> None:
    assert DAY.check("2026-02-28", "w") == dt.date(2026, 2, 28)
    assert DAY.check(" 2024-02-29 ", "w") == dt.date(2024, 2, 29)  # a leap day
    day = dt.date(2026, 3, 1)
    assert DAY.check(day, "w") is day


def test_a_date_stored_as_a_timestamp_at_midnight_is_its_day() -> None:
    """pandas writes a date column to Parquet as a timestamp: it arrives as a ``datetime`` at
    midnight, which is that day (a ``datetime`` kept as is could not be compared with the
    ``date`` objects of the other fields: a TypeError deep in the source's encode)."""
    got = DAY.check(dt.datetime(2026, 3, 1), "w")
    assert got == dt.date(2026, 3, 1) and type(got) is dt.date
    assert refused(DAY, dt.datetime(2026, 3, 1, 14, 30)) == (
        "req.jsonl line 3: field 'day': expected a date YYYY-MM-DD, got a time of day")


@pytest.mark.parametrize("value,kind", [("2026-02-30", "a string"), ("2025-02-29", "a string"),
                                        ("01/03/2026", "a string"), ("", "an empty string"),
                                        (20260301, "a number"), (None, "nothing")])
def test_date_refuses_impossible_days_and_other_shapes(value: Any, kind: str) -> None:
    assert refused(DAY, value) == ("req.jsonl line 3: field 'day': expected a date YYYY-MM-DD, "
                                   f"got {kind}")


def _history(*units: Any) -> list[dict[str, Any]]:
    return [{"date": f"2026-01-{d + 1:02d}", "units": u} for d, u in enumerate(units)]


def test_records_are_checked_item_by_item_and_normalised() -> None:
    got = HISTORY.check(_history(1, "2.5", 0), "w")
    assert got == [{"date": dt.date(2026, 1, 1), "units": 1.0},
                   {"date": dt.date(2026, 1, 2), "units": 2.5},
                   {"date": dt.date(2026, 1, 3), "units": 0.0}]
    assert HISTORY.check(tuple(_history(1, 2)), "w") == HISTORY.check(_history(1, 2), "w")


def test_records_need_at_least_min_items() -> None:
    want = ("req.jsonl line 3: field 'history': expected a list of objects {date, units} "
            "(at least 2), got a list of ")
    assert refused(HISTORY, []) == want + "0"
    assert refused(HISTORY, _history(5)) == want + "1"
    assert HISTORY.check(_history(5, 6), "w")[1]["units"] == 6.0


def test_a_bad_item_is_named_by_its_index_and_inner_field() -> None:
    bad_units = _history(1, 2, -3)
    assert refused(HISTORY, bad_units) == (
        "req.jsonl line 3: field 'history' item 2: field 'units': expected a number (units) "
        ">= 0, got a number outside that range")
    bad_date = _history(1, 2)
    bad_date[1]["date"] = "2026-01-32"
    assert refused(HISTORY, bad_date) == ("req.jsonl line 3: field 'history' item 1: field "
                                          "'date': expected a date YYYY-MM-DD, got a string")
    missing = [*_history(1), {"units": 2}]
    assert refused(HISTORY, missing) == ("req.jsonl line 3: field 'history' item 1: missing "
                                         "field 'date' (a date YYYY-MM-DD)")
    assert refused(HISTORY, [*_history(1), 7]) == (
        "req.jsonl line 3: field 'history' item 1: expected an object {date, units}, got a "
        "number")
    typo = _history(1, 2)
    typo[0]["unit"] = 3
    assert refused(HISTORY, typo) == ("req.jsonl line 3: field 'history' item 0: unknown "
                                      "field(s) ['unit']; the fields are ['date', 'units']")


def test_records_from_a_csv_cell_are_json_text() -> None:
    cell = json.dumps(_history(1, "2"))
    assert HISTORY.check(cell, "w") == [{"date": dt.date(2026, 1, 1), "units": 1.0},
                                        {"date": dt.date(2026, 1, 2), "units": 2.0}]
    want = ("req.csv line 2: field 'history': expected a list of objects {date, units} "
            "(at least 2), got ")
    assert refused(HISTORY, "[{not json", "req.csv line 2") == want + "a string"
    assert refused(HISTORY, '{"date": "2026-01-01"}', "req.csv line 2") == want + "an object"
    assert "field 'history' item 1: field 'units'" in refused(
        HISTORY, json.dumps(_history(1, -2)), "req.csv line 2")


def test_no_message_holds_the_value() -> None:
    """Utterances, reviews and queries are customer text: a refusal says what was expected,
    where, and what kind of value came, never the value itself."""
    cases: list[tuple[Field, Any]] = [
        (TEXT, [SECRET]), (AGE, SECRET), (AGE, f"{SECRET} 35"), (COUNT, SECRET),
        (DAY, SECRET), (DAY, "2026-02-30 " + SECRET), (HISTORY, SECRET),
        (HISTORY, [{"date": SECRET, "units": 1}, {"date": "2026-01-02", "units": 1}]),
        (HISTORY, [{"date": "2026-01-01", "units": SECRET}] * 2), (HISTORY, [SECRET, SECRET]),
        (HISTORY, json.dumps([{"date": SECRET, "units": 1}] * 2)),
        (HISTORY, "[" + SECRET), (Field("code", "string", "a stock code"), [SECRET]),
    ]
    for f, value in cases:
        msg = refused(f, value)
        assert f"field '{f.name}'" in msg
        assert SECRET not in msg and "4111" not in msg, msg
    contract = Contract("reviews", (TEXT, AGE), (), {})
    for row in ({"review": SECRET, "age": SECRET}, {"title": SECRET, "age": 30}, SECRET):
        with pytest.raises(DataError) as e:
            contract.read(row, "rows: row 0")
        assert "4111" not in str(e.value), str(e.value)


# -- reading a request ------------------------------------------------------------------------

FIELDS = (TEXT, AGE, Field("class_name", "string", "the garment class", required=False),
          Field("title", "text", "the title", required=False))


def test_read_fields_normalises_and_leaves_absent_optionals_none() -> None:
    got = read_fields(FIELDS, {"review": "nice", "age": "35"}, "w")
    assert got == {"review": "nice", "age": 35.0, "class_name": None, "title": None}
    # a CSV row: every column is there, an empty optional cell is absent
    got = read_fields(FIELDS, {"review": "nice", "age": "35", "class_name": "", "title": " "},
                      "w")
    assert got == {"review": "nice", "age": 35.0, "class_name": None, "title": None}
    got = read_fields(FIELDS, {"review": "nice", "age": 35, "class_name": None,
                               "title": "Lovely"}, "w")
    assert got["title"] == "Lovely" and got["class_name"] is None


def test_read_fields_names_a_missing_required_field() -> None:
    with pytest.raises(DataError) as e:
        read_fields(FIELDS, {"age": 35}, "req.jsonl line 4")
    assert str(e.value) == "req.jsonl line 4: missing field 'review' (a non-empty text)"
    with pytest.raises(DataError) as e:
        read_fields(FIELDS, {"review": "ok", "age": None}, "req.jsonl line 5")
    assert str(e.value) == ("req.jsonl line 5: missing field 'age' (a number (years) in "
                            "0..150)")
    # an empty cell of a required field is a value of the wrong kind, not an absence
    with pytest.raises(DataError, match=r"field 'age': expected .*got an empty string$"):
        read_fields(FIELDS, {"review": "ok", "age": ""}, "req.csv line 2")


def test_read_fields_refuses_unknown_keys_unless_extra() -> None:
    row = {"review": "ok", "age": 30, "ratng": 5, "ticket": "T-1"}
    with pytest.raises(DataError) as e:
        read_fields(FIELDS, row, "req.jsonl line 2")
    assert str(e.value) == ("req.jsonl line 2: unknown field(s) ['ratng', 'ticket']; the "
                            "fields are ['review', 'age', 'class_name', 'title']")
    with pytest.raises(DataError, match=r"unknown field\(s\) \['ratng'\];"):
        read_fields(FIELDS, row, "req.jsonl line 2", extra=("ticket",))
    got = read_fields(FIELDS, row, "w", extra=("ticket", "ratng"))
    assert got == {"review": "ok", "age": 30.0, "class_name": None, "title": None}


def test_contract_read_needs_one_of_each_group_and_an_object() -> None:
    c = Contract("reviews", (*FIELDS[1:], Field("review", "text", "r", required=False)),
                 (), {}, one_of=(("title", "review"),))
    assert c.read({"title": "Great", "age": 30}, "w")["title"] == "Great"
    assert c.read({"review": "Great", "age": 30}, "w")["review"] == "Great"
    for row in ({"age": 30}, {"age": 30, "title": "", "review": "  "}):
        with pytest.raises(DataError) as e:
            c.read(row, "req.jsonl line 7")
        assert str(e.value) == ("req.jsonl line 7: give at least one of the fields ['title', "
                                "'review']")
    with pytest.raises(DataError) as e:
        c.read([1, 2], "rows: row 3")
    assert str(e.value) == ("rows: row 3: expected an object with fields ['age', "
                            "'class_name', 'title', 'review'], got a list of 2")
    assert c.read({"title": "t", "age": 1, "id": 9}, "w", extra=("id",))["age"] == 1.0


# -- output columns and answers ---------------------------------------------------------------

INTENT = Output("intent", "multiclass", "the customer's intent", labels=("cancel", "refund",
                                                                         "track"))
RATING = Output("rating", "regression", "the rating", unit="stars", low=1.0, high=5.0)
DEMAND = Output("demand", "quantile", "units sold tomorrow", unit="units", low=0.0, high=100.0,
                quantiles=(0.1, 0.5, 0.9))
RELEVANCE = Output("relevance", "ranking", "relevance to the query", item="item_id")


def names(cols: list[tuple[str, str]]) -> list[str]:
    return [n for n, _ in cols]


def test_columns_of_each_output_type() -> None:
    assert Output("click", "binary", "the user clicks").columns() == [
        ("click", "probability that the user clicks")]
    assert names(INTENT.columns()) == ["intent", "intent_p"]
    assert names(INTENT.columns(top_k=2)) == ["intent", "intent_p", "intent_2", "intent_2_p"]
    # top_k past the number of labels gives every label once
    assert names(INTENT.columns(top_k=9, all_classes=True)) == [
        "intent", "intent_p", "intent_2", "intent_2_p", "intent_3", "intent_3_p",
        "intent_p_cancel", "intent_p_refund", "intent_p_track"]
    assert RATING.columns() == [
        ("rating", "the rating (stars), clamped to 1..5"),
        ("rating_clamped", "true where the model's value lay outside that range")]
    assert names(Output("r", "regression", "r", low=0.0).columns()) == ["r", "r_clamped"]
    assert Output("r", "regression", "r", low=0.0).range_text() == "0..inf"
    assert DEMAND.columns() == [
        ("demand_q10", "0.1 quantile of units sold tomorrow (units)"),
        ("demand_q50", "0.5 quantile of units sold tomorrow (units)"),
        ("demand_q90", "0.9 quantile of units sold tomorrow (units)"),
        ("demand_clamped", "true where a quantile lay outside 0..100")]
    assert RELEVANCE.columns() == [("rank", "1 = best"), ("item_id", "the candidate's item"),
                                   ("score", "relevance to the query (higher = ranked first)")]


def test_qname() -> None:
    assert qname(0.1) == "q10" and qname(0.5) == "q50" and qname(0.9) == "q90"
    assert qname(0.975) == "q97.5" and qname(0.025) == "q2.5" and qname(0.05) == "q5"


def test_binary_answer_passes_probabilities_through() -> None:
    p = np.array([0.0, 0.25, 0.999, 1.0], np.float32)
    got = answer(Output("click", "binary", "c"), p)
    assert list(got) == ["click"]
    np.testing.assert_array_equal(got["click"], p.astype(np.float64))


def test_multiclass_answer_is_the_top_k_labels_by_probability() -> None:
    p = np.array([[0.2, 0.5, 0.3],
                  [0.4, 0.2, 0.4],  # a tie: the label listed first ranks first
                  [0.1, 0.1, 0.8]])
    got = answer(INTENT, p, top_k=2)
    assert list(got) == names(INTENT.columns(top_k=2))
    assert got["intent"] == ["refund", "cancel", "track"]
    assert got["intent_2"] == ["track", "track", "cancel"]
    np.testing.assert_array_equal(got["intent_p"], [0.5, 0.4, 0.8])
    np.testing.assert_array_equal(got["intent_2_p"], [0.3, 0.4, 0.1])
    every = answer(INTENT, p, top_k=5, all_classes=True)
    assert list(every) == names(INTENT.columns(top_k=5, all_classes=True))
    assert every["intent_3"] == ["cancel", "refund", "refund"]
    np.testing.assert_array_equal(every["intent_p_refund"], p[:, 1])
    np.testing.assert_array_equal(every["intent_p_track"], p[:, 2])
    assert answer(INTENT, p)["intent"] == ["refund", "cancel", "track"]
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        answer(INTENT, p, top_k=0)


def test_regression_answer_is_clamped_and_flagged_only_outside() -> None:
    got = answer(RATING, np.array([0.5, 1.0, 3.25, 5.0, 7.0, 0.999999]))
    assert list(got) == ["rating", "rating_clamped"]
    np.testing.assert_array_equal(got["rating"], [1.0, 1.0, 3.25, 5.0, 5.0, 1.0])
    # a value on a bound is inside the range: not flagged
    assert got["rating_clamped"].tolist() == [True, False, False, False, True, True]
    open_top = answer(Output("r", "regression", "r", low=0.0), np.array([-2.0, 1e9]))
    np.testing.assert_array_equal(open_top["r"], [0.0, 1e9])
    assert open_top["r_clamped"].tolist() == [True, False]


def test_quantile_answer_sorts_crossing_quantiles_then_clamps() -> None:
    pred = np.array([[3.0, 1.0, 2.0],     # crossed: sorted, inside the range
                     [0.0, 5.0, 100.0],   # on the bounds: not flagged
                     [-1.0, 2.0, 3.0],    # q10 below 0
                     [150.0, 2.0, 1.0]])  # crossed and the top past 100
    got = answer(DEMAND, pred)
    assert list(got) == names(DEMAND.columns())
    np.testing.assert_array_equal(got["demand_q10"], [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(got["demand_q50"], [2.0, 5.0, 2.0, 2.0])
    np.testing.assert_array_equal(got["demand_q90"], [3.0, 100.0, 3.0, 100.0])
    assert got["demand_clamped"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="a ranking answer is rows"):
        answer(RELEVANCE, np.zeros((1, 3)))


def test_rank_answer_orders_best_first_and_keeps_request_order_on_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.9, 0.5],
                       [3.0, 2.0, 1.0, 5.0]])
    got = rank_answer(RELEVANCE, scores, [["a", "b", "c"], ["w", "x", "y", "z"]])
    assert got == [
        [{"rank": 1, "item_id": "b", "score": 0.9}, {"rank": 2, "item_id": "c", "score": 0.9},
         {"rank": 3, "item_id": "a", "score": 0.1}],  # the padded 4th score is not a candidate
        [{"rank": 1, "item_id": "z", "score": 5.0}, {"rank": 2, "item_id": "w", "score": 3.0},
         {"rank": 3, "item_id": "x", "score": 2.0}, {"rank": 4, "item_id": "y", "score": 1.0}]]
    assert all(type(c["score"]) is float for lst in got for c in lst)
    with pytest.raises(ValueError):
        rank_answer(RELEVANCE, scores, [["a", "b"]])  # one list of items for two requests


# -- the JSON a model directory stores --------------------------------------------------------


def _json_round_trip(obj: Any) -> Any:
    return type(obj).from_json(json.loads(json.dumps(obj.to_json())))


@pytest.mark.parametrize("obj", [
    AGE, COUNT, DAY, TEXT, HISTORY,
    Field("title", "text", "t", required=False),
    Field("x", "number", "x", ge=0.0),  # a zero bound is kept
    Field("lines", "records", "l", items=(HISTORY, AGE)),  # records in records
    INTENT, RATING, DEMAND, RELEVANCE, Output("click", "binary", "c"),
    Output("r", "regression", "r", low=0.0),
], ids=lambda o: getattr(o, "name", getattr(o, "task", "")))
def test_fields_and_outputs_round_trip_through_json(obj: Any) -> None:
    assert _json_round_trip(obj) == obj


def test_a_contract_round_trips_through_json() -> None:
    c = Contract("retail", (HISTORY, AGE, Field("title", "text", "t", required=False), TEXT),
                 (DEMAND, INTENT, RELEVANCE, RATING),
                 {"product": "85123A", "history": _history(1, 2), "age": 30},
                 doc="one request per product", one_of=(("title", "review"), ("age",)))
    back = _json_round_trip(c)
    assert back == c
    assert back.output("demand").quantiles == (0.1, 0.5, 0.9)
    assert back.inputs[0].items[1].ge == 0
    with pytest.raises(KeyError, match="source 'retail' has no task 'demand_7d'"):
        back.output("demand_7d")


# -- a zoo model's contract -------------------------------------------------------------------


def _fitted(schema: Schema, path: Path) -> Encoders:
    enc = Encoders(schema)
    for part in read_chunks(path, schema, 10_000, BadRowLog("fail", 0.0)):
        enc.partial_fit(part)
    return enc.finish()


def test_table_contract_of_a_schema_and_its_fitted_encoders(schema: Schema,
                                                            ecom_csv: Path) -> None:
    enc = _fitted(schema, ecom_csv)
    c = table_contract("table", schema, enc)
    assert c.source == "table"
    # one field per source column, then the scenario
    assert [(f.name, f.type, f.required) for f in c.inputs] == [
        ("user_id", "string", False), ("item_id", "string", False), ("price", "number", True),
        ("hist", "string", False), ("scenario", "string", True)]
    scenario = c.inputs[-1]
    assert scenario.doc == "where the request comes from: one of ['home', 'search', 'ad']"
    assert c.inputs[3].doc == "sequence feature hist: items joined by '|', the last 3 kept"
    assert [(o.task, o.type, o.doc) for o in c.outputs] == [
        ("click", "binary", "click = 1"), ("conversion", "binary", "conversion = 1"),
        ("ad_click", "binary", "ad_click = 1")]
    # the example: the most frequent training values, the training mean of a number
    item_vocab = enc.categorical["item_id"].vocabulary_
    assert c.example == {"user_id": enc.categorical["user_id"].vocabulary_[0],
                         "item_id": item_vocab[0], "price": 3.625,
                         "hist": "|".join(item_vocab[:2]), "scenario": "home"}
    assert c.example["user_id"] == "u0" and re.fullmatch(r"i\d+\|i\d+", c.example["hist"])
    assert list(c.example) == [f.name for f in c.inputs]
    assert _json_round_trip(c) == c


def test_table_contract_of_filled_log_numbers_and_an_open_scenario(ecom_csv: Path) -> None:
    schema = Schema(
        features=(FeatureSpec("item_id", "categorical"),
                  FeatureSpec("price", "numeric", transform="log1p", fill=0.0)),
        tasks=(TaskSpec("click"),),
        scenario=ScenarioSpec("scenario", ("home", "search"), other="rest"))
    enc = _fitted(schema, ecom_csv)
    c = table_contract("table", schema, enc)
    price, scenario = c.inputs[1], c.inputs[2]
    assert (price.name, price.type, price.required) == ("price", "number", False)
    assert price.doc == "numeric feature price (log1p applied); empty: filled"
    # the example is in the column's own units: the mean of log1p(price), back through expm1
    mean = float(np.mean(np.log1p([(i % 6) * 1.25 + 0.5 for i in range(30)])))
    assert c.example["price"] == pytest.approx(round(float(np.expm1(mean)), 4), abs=1e-9)
    assert (scenario.name, scenario.required) == ("scenario", False)
    assert scenario.doc == ("where the request comes from: one of ['home', 'search']; any "
                            "other value: 'rest'")
    assert c.example["scenario"] == "home"
