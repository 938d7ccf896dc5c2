"""Every task of a joint checkpoint answers raw named inputs (#22): the held-out rows of each
source, as its users would send them, give through `shopmtl predict` and
`shopmtl.load(...).predict` exactly what the run computed for them on its test split; labels
are the training data's, regression stays in range, quantiles never cross; `shopmtl describe`'s
example for every task runs through predict; docs/PREDICT.md is generated from the contracts."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import shopmtl
from shopmtl.data.contract import answer, rank_answer
from shopmtl.data.ingest import DataError
from shopmtl.joint.config import REC
from shopmtl.joint.parts import RecPart, SourcePart, TextIndex, build_source, text_bank
from shopmtl.joint.predict import Asked
from shopmtl.train.evaluate import predict_split
from tests.helpers import assert_one_error_line, cli

TASKS = {"click": "rec", "conversion": "rec", "ad_click": "rec", "relevance": "search",
         "intent": "bitext", "category": "bitext", "rating": "reviews", "recommend": "reviews",
         "demand_1d": "retail", "demand_7d": "retail"}
DOC = Path(__file__).parents[2] / "docs" / "PREDICT.md"


@pytest.fixture(scope="module")
def model(run: Path) -> Any:
    return shopmtl.load(run / "joint" / "model")


@pytest.fixture(scope="module")
def held_out(model: Any) -> dict[str, tuple[list[dict], dict[str, np.ndarray], Any]]:
    """Per non-rec source: its raw test requests, the run's test predictions (the evaluation
    path: the split's pre-built tensors through ``SourcePart.predict``) and the split."""
    cfg = model.cfg
    texts = TextIndex()
    parts = {}
    for sc in cfg.sources:
        if sc.name == REC:
            continue
        src = build_source(sc)
        data = src.load()
        if sc.max_examples:
            data = data.sample(sc.max_examples, cfg.train.seed)
        parts[sc.name] = SourcePart(sc, src, data, texts, cfg.train.seed)
    bank = text_bank(cfg, texts.texts)
    model.model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    return {name: ([dict(r) for r in p.data.test.raw], p.predict(model.model, "test"),
                   p.data.test) for name, p in parts.items()}


def _expected(model: Any, task: str, held: tuple) -> Any:
    """The run's test predictions of ``task`` in the answer's terms (units, labels)."""
    raw, preds, split = held
    asked = Asked(model.model, model.cfg, model.sources, task)
    pred = preds[task]
    to_user = getattr(asked.cls, "to_user", None)
    if to_user is not None:
        pred = np.asarray(to_user(asked.meta, split, task, pred))
    if asked.output.type == "ranking":
        items = [[c["item_id"] for c in r["candidates"]] for r in raw]
        return rank_answer(asked.output, pred, items)
    return answer(asked.output, pred, all_classes=True)


def _assert_same(task: str, got: list[dict], want: Any, n: int) -> None:
    if isinstance(want, list):  # ranking: one row per candidate
        flat = [c for lst in want for c in lst]
        assert len(got) == len(flat)
        for g, w in zip(got, flat, strict=True):
            assert (g["rank"], g["item_id"]) == (w["rank"], w["item_id"])
            assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        return
    assert len(got) == n
    for col, values in want.items():
        have = [g[col] for g in got]
        if isinstance(values, list) and values and isinstance(values[0], str):
            assert have == values, col  # labels: exactly
        else:
            np.testing.assert_allclose(np.asarray(have, np.float64),
                                       np.asarray(values, np.float64), atol=1e-6, rtol=0,
                                       err_msg=f"{task}: {col}")


@pytest.mark.parametrize("task", [t for t, s in TASKS.items() if s != REC])
def test_raw_held_out_requests_give_the_runs_test_predictions(
        task: str, model: Any, held_out: dict, run: Path, tmp_path: Path) -> None:
    held = held_out[TASKS[task]]
    raw = held[0]
    want = _expected(model, task, held)
    # the CLI, from a JSON-lines file of the raw requests
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in raw))
    out = tmp_path / "answers.jsonl"
    cli("predict", str(run / "joint" / "model"), str(requests), "--task", task, "--out",
        str(out), "--all-classes", check=True)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    _assert_same(task, got, want, len(raw))
    lines = sorted({g["line"] for g in got})
    assert lines == list(range(1, len(raw) + 1))
    # the Python API, from the same requests as dicts
    table = model.predict(raw, task=task, all_classes=True)
    _assert_same(task, table.to_pylist(), want, len(raw))


def test_rec_tasks_answer_the_raw_test_rows_as_the_run_scored_them(
        model: Any, run: Path, tmp_path: Path) -> None:
    """The rec tasks read the rows of the training table: the run's own test file, raw, gives
    the predictions its evaluation computed on the encoded test split."""
    cfg = model.cfg
    sc = next(s for s in cfg.sources if s.name == REC)
    part = RecPart(sc, tmp_path / "rebuilt", cfg.text, cfg.train.seed, log=lambda *_: None)
    preds, _ = predict_split(model.model.rec, part.split("test"), 4096)
    test_file = run / "rec" / "data" / "test.parquet"
    n = pq.read_metadata(test_file).num_rows
    for task in ("click", "conversion", "ad_click"):
        out = tmp_path / f"{task}.csv"
        cli("predict", str(run / "joint" / "model"), str(test_file), "--task", task,
            "--out", str(out), check=True)
        rows = list(csv.DictReader(out.open()))
        assert [int(r["line"]) for r in rows] == list(range(1, n + 1))
        np.testing.assert_allclose([float(r[task]) for r in rows], preds[task], atol=1e-6,
                                   rtol=0)
        got = model.predict(pq.read_table(test_file).slice(0, 500), task=task)
        np.testing.assert_allclose(got.column(task).to_numpy(), preds[task][:500], atol=1e-6,
                                   rtol=0)


def test_multiclass_answers_carry_the_training_labels_top_k(model: Any) -> None:
    t = model.predict([{"text": "I want to cancel my order"}], task="intent", top_k=3
                      ).to_pylist()[0]
    labels = model.contract("intent").output("intent").labels
    assert "cancel_order" in labels and len(labels) == 27
    assert {t["intent"], t["intent_2"], t["intent_3"]} <= set(labels)
    assert 1.0 >= t["intent_p"] >= t["intent_2_p"] >= t["intent_3_p"] >= 0.0
    assert "intent_4" not in t and "intent_p_cancel_order" not in t


def test_regression_is_clamped_to_the_training_range_with_a_flag(model: Any) -> None:
    out = model.contract("rating").output("rating")
    assert (out.low, out.high) == (1.0, 5.0)
    extreme = [{"title": "Worst ever", "review": "awful " * 60, "age": 150},
               {"review": "perfect love it " * 40, "age": 0, "class_name": "Dresses"}]
    normal = model.predict(extreme, task="rating").column("rating").to_pylist()
    assert all(1.0 <= v <= 5.0 for v in normal)
    bias = model.model.heads["reviews"].heads["rating"].bias
    trained = bias.detach().clone()
    with torch.no_grad():
        for shift, edge in ((100.0, 5.0), (-100.0, 1.0)):  # a head pushed far out of range
            bias.copy_(trained + shift)
            got = model.predict(extreme, task="rating").to_pylist()
            bias.copy_(trained)
            assert [(g["rating"], g["rating_clamped"]) for g in got] == [(edge, True)] * 2
    got = model.predict(extreme, task="rating").to_pylist()
    assert [g["rating"] for g in got] == pytest.approx(normal, abs=1e-9)


def test_quantiles_are_named_in_units_and_never_cross(model: Any, held_out: dict) -> None:
    raw = held_out["retail"][0][:20]
    head = model.model.heads["retail"].heads["demand_1d"]
    trained = head.bias.detach().clone()
    with torch.no_grad():  # quantile outputs trained the wrong way round: q10 above q90
        head.bias.copy_(trained + torch.tensor([3.0, 0.0, -3.0]))
        got = model.predict(raw, task="demand_1d").to_pylist()
        head.bias.copy_(trained)
    assert set(got[0]) == {"demand_1d_q10", "demand_1d_q50", "demand_1d_q90",
                           "demand_1d_clamped"}
    for g in got:
        assert 0.0 <= g["demand_1d_q10"] <= g["demand_1d_q50"] <= g["demand_1d_q90"]


def test_describe_examples_run_through_predict(model: Any, run: Path, tmp_path: Path) -> None:
    proc = cli("describe", str(run / "joint" / "model"), "--json", check=True)
    infos = {i["task"]: i for i in json.loads(proc.stdout)}
    assert set(infos) == set(TASKS)
    for task, info in infos.items():
        ex = info["example"]
        path = tmp_path / ex["file"]
        path.write_text(ex["content"])
        out = tmp_path / f"{task}.jsonl"
        cli("predict", str(run / "joint" / "model"), str(path), "--task", task, "--out",
            str(out), check=True)
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert got, task
        cols = {c["name"] for c in info["columns"]}
        assert cols <= set(got[0]), (task, cols, got[0])
    text = cli("describe", str(run / "joint" / "model"), "--task", "demand_7d", check=True)
    assert "history[].units" in text.stdout and "units sold" in text.stdout
    assert "task intent" not in text.stdout


def test_predict_md_is_generated_from_the_contracts(run: Path) -> None:
    from shopmtl.describe import PREDICT_TITLE, markdown

    m = shopmtl.load(run / "joint" / "model")
    want = markdown(m, title=PREDICT_TITLE) + "\n"
    assert DOC.read_text() == want, ("docs/PREDICT.md is stale: regenerate it with the "
                                     "commands at its top")


def test_bad_requests_name_the_field_and_never_echo_text(model: Any, run: Path,
                                                          tmp_path: Path) -> None:
    secret = "my card 4111 1111 1111 1111 was charged twice"
    bad = tmp_path / "reviews.jsonl"
    bad.write_text("\n".join([
        json.dumps({"review": secret, "age": 35}),
        json.dumps({"review": secret, "age": 300}),
        json.dumps({"title": secret, "age": "old"}),
        json.dumps({"age": 40}),
        "{not json " + secret,
        json.dumps({"review": secret, "age": 30, "ratng": 5}),
    ]) + "\n")
    proc = cli("predict", str(run / "joint" / "model"), str(bad), "--task", "rating",
               "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 1
    assert ("reviews.jsonl: line 2, column 'age': expected a number (years) in 0..150, got a "
            "number outside that range (5 bad rows in all)") in proc.stderr
    assert secret not in proc.stderr and "4111" not in proc.stderr
    assert not (tmp_path / "p.csv").exists()
    proc = cli("predict", str(run / "joint" / "model"), str(bad), "--task", "rating",
               "--out", str(tmp_path / "p.csv"), "--bad-rows", "quarantine", "--id-columns",
               "ticket", check=True)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["line"] for r in rows] == ["1"]
    quarantine = list(csv.DictReader((tmp_path / "p.quarantine.csv").open()))
    assert [(q["line"], q["column"]) for q in quarantine] == [
        ("2", "age"), ("3", "age"), ("4", ""), ("5", ""), ("6", "")]
    assert "at least one of the fields ['title', 'review']" in quarantine[2]["reason"]
    assert "unknown field(s) ['ratng']" in quarantine[4]["reason"]
    summary = json.loads((tmp_path / "p.quarantine.json").read_text())
    assert (summary["rows_read"], summary["bad_rows"]) == (6, 5)
    with pytest.raises(DataError, match=r"rows: row 0, column 'candidates': expected a list"):
        model.predict([{"query": "red shoes", "candidates": "red shoe"}], task="relevance")


BITEXT = {"sources": [{"name": "bitext", "batch_size": 64}],
          "model": {"adapter_hidden": 32, "text_dim": 16, "hidden": [16]},
          "train": {"steps": 150, "lr": 0.005, "threads": 1, "log_every": 0, "eval_every": 50}}


def test_a_cancel_order_utterance_is_answered_cancel_order(tmp_path: Path) -> None:
    """A model trained on every Bitext utterance answers held-out cancel_order utterances with
    that label (the training data's name), top-k ordered."""
    from shopmtl.data.sources.bitext import BitextSource

    m = shopmtl.train(BITEXT, tmp_path / "bitext", log=lambda *_: None)
    data = BitextSource().load()
    names = data.meta["classes"]["intent"]
    cancel = [r for r, y in zip(data.test.raw, data.test.labels["intent"], strict=True)
              if names[y] == "cancel_order"]
    assert len(cancel) >= 20
    first = m.predict(cancel[:1], task="intent", top_k=3).to_pylist()[0]
    assert first["intent"] == "cancel_order"
    assert first["intent_p"] > first["intent_2_p"] >= first["intent_3_p"]
    top = m.predict(cancel, task="intent").column("intent").to_pylist()
    assert np.mean([t == "cancel_order" for t in top]) >= 0.8
    cat = m.predict(cancel, task="category").column("category").to_pylist()
    assert np.mean([c == "ORDER" for c in cat]) >= 0.8


# -- the same requests from every input format, into every output format -------------------


def _read_back(path: Path) -> list[dict[str, Any]]:
    """The rows of an answers file as written: JSON lines, CSV (every cell text, through the
    csv module) or Parquet (through pyarrow), by the file's first bytes, not its name."""
    head = path.read_bytes()[:4]
    if head == b"PAR1":
        return pq.read_table(path).to_pylist()
    if head.startswith(b"{"):
        return [json.loads(line) for line in path.read_text().splitlines()]
    return list(csv.DictReader(path.open(newline="")))


def _values(rows: list[dict[str, Any]], cols: list[str]) -> list[tuple]:
    """Each row's answer columns as Python values (a CSV cell parsed: 'true' -> True)."""
    def cell(v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if v in ("true", "false"):
            return v == "true"
        return float(v) if v else None
    return [tuple(cell(r[c]) for c in cols) for r in rows]


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> list[int]:
    """Flat requests as a CSV file (an absent field is an empty cell); the line each request
    starts on (a quoted cell's line breaks count: reviews hold some)."""
    text = io.StringIO()
    w = csv.DictWriter(text, header, lineterminator="\n")
    w.writeheader()
    starts = []
    for r in rows:
        starts.append(len(re.findall(r"\r\n|\r|\n", text.getvalue())) + 1)
        w.writerow({k: "" if r.get(k) is None else r[k] for k in header})
    path.write_text(text.getvalue(), newline="")
    return starts


REVIEW_FIELDS = ["title", "review", "age", "class_name"]
# explicit: pyarrow's from_pylist takes its columns from the first row alone
REVIEWS_SCHEMA = pa.schema([("title", pa.string()), ("review", pa.string()),
                            ("age", pa.float64()), ("class_name", pa.string())])


def _reviews(held_out: dict) -> list[dict[str, Any]]:
    """The held-out reviews requests, a few without a class name (all have an age; some have
    no title), as their users would send them: an absent field left out."""
    raw = [dict(r) for r in held_out["reviews"][0]]
    for r in raw[:3]:
        del r["class_name"]
    assert any("title" not in r for r in raw) and all(set(r) <= set(REVIEW_FIELDS) for r in raw)
    return raw


@pytest.mark.parametrize("task", ["rating", "recommend"])
def test_reviews_from_json_lines_csv_and_parquet_answer_alike(
        task: str, model: Any, held_out: dict, run: Path, tmp_path: Path) -> None:
    """JSON lines, a CSV file (one column per field, an empty optional cell is the field
    absent) and a Parquet file of the same requests give the same answers, written as JSON
    lines, as CSV (``--format csv``, whatever OUT's extension) and as Parquet."""
    raw = _reviews(held_out)
    n = len(raw)
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in raw))
    table = tmp_path / "requests.csv"
    starts = _write_csv(table, REVIEW_FIELDS, raw)
    assert starts[:2] == [2, 3] and starts[-1] > n + 1  # some reviews span lines
    assert sum(",," in line or line.endswith(",") for line in table.read_text().splitlines()
               ) >= 3  # empty cells: the absent titles and class names
    parquet = tmp_path / "requests.parquet"
    pq.write_table(pa.Table.from_pylist(raw, schema=REVIEWS_SCHEMA), parquet)
    runs = {  # input -> (output, extra options, the line of request i)
        jsonl: (tmp_path / "a.jsonl", [], lambda i: i + 1),
        table: (tmp_path / "b.txt", ["--format", "csv"], lambda i: starts[i]),
        parquet: (tmp_path / "c.parquet", [], lambda i: i + 1),
    }
    cols = [c for c, _ in model.contract(task).output(task).columns()]
    answers = []
    for path, (out, opts, line) in runs.items():
        proc = cli("predict", str(run / "joint" / "model"), str(path), "--task", task,
                   "--out", str(out), *opts, check=True)
        assert proc.stdout.strip() == f"wrote {n} rows to {out}"
        rows = _read_back(out)
        assert list(rows[0]) == ["line", *cols]
        assert [int(r["line"]) for r in rows] == [line(i) for i in range(n)]
        answers.append(_values(rows, cols))
    assert _read_back(tmp_path / "b.txt")[0]["line"] == "2"  # CSV, as asked
    assert answers[0] == answers[1] == answers[2]
    # and what the Python API answers for the same requests as dicts
    want = model.predict(raw, task=task).to_pylist()
    assert answers[0] == [tuple(w[c] for c in cols) for w in want]
    if task == "rating":
        assert all(1.0 <= a[0] <= 5.0 for a in answers[0])
    else:
        assert all(0.0 <= a[0] <= 1.0 for a in answers[0])


def _retail_schema(date: pa.DataType, history_date: pa.DataType) -> pa.Schema:
    return pa.schema([("product", pa.string()), ("date", date),
                      ("history", pa.list_(pa.struct([("date", history_date),
                                                      ("units", pa.float64())])))])


def test_retail_history_from_parquet_answers_as_from_json_lines(
        model: Any, held_out: dict, run: Path, tmp_path: Path) -> None:
    """Retail requests with their nested sales ``history`` (a list of {date, units}) from a
    Parquet file, dates as text or typed (the history's as dates, the target's as a
    timestamp, as pandas writes a datetime column), answer as the JSON lines of the same
    requests; written as CSV and as Parquet."""
    raw = [dict(r) for r in held_out["retail"][0][:40]]
    assert all(set(r) == {"product", "date", "history"} and len(r["history"]) >= 28 for r in raw)
    for r in raw[::2]:
        del r["date"]  # the target day defaults to the next trading day
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in raw))
    as_text = tmp_path / "text.parquet"
    pq.write_table(pa.Table.from_pylist(raw, schema=_retail_schema(pa.string(), pa.string())),
                   as_text)
    typed = [{**r, "history": [{"date": dt.date.fromisoformat(h["date"]), "units": h["units"]}
                               for h in r["history"]]} for r in raw]
    for r in typed:
        if "date" in r:
            r["date"] = dt.datetime.fromisoformat(r["date"])
    typed_table = pa.Table.from_pylist(typed, schema=_retail_schema(pa.timestamp("us"),
                                                                     pa.date32()))
    assert typed_table.column("date").null_count == len(raw) // 2
    as_typed = tmp_path / "typed.parquet"
    pq.write_table(typed_table, as_typed)
    cols = [c for c, _ in model.contract("demand_7d").output("demand_7d").columns()]
    assert cols == ["demand_7d_q10", "demand_7d_q50", "demand_7d_q90", "demand_7d_clamped"]
    answers = []
    for path, out, opts in ((jsonl, tmp_path / "a.jsonl", []),
                            (as_text, tmp_path / "b.csv", []),
                            (as_typed, tmp_path / "c.out", ["--format", "parquet"])):
        cli("predict", str(run / "joint" / "model"), str(path), "--task", "demand_7d",
            "--out", str(out), *opts, check=True)
        rows = _read_back(out)
        assert [int(r["line"]) for r in rows] == list(range(1, len(raw) + 1))
        answers.append(_values(rows, cols))
    assert (tmp_path / "c.out").read_bytes()[:4] == b"PAR1"
    assert answers[0] == answers[1] == answers[2]
    for q10, q50, q90, _ in answers[0]:
        assert 0.0 <= q10 <= q50 <= q90


def test_id_columns_carry_a_request_id_and_may_not_clash(
        model: Any, held_out: dict, run: Path, tmp_path: Path) -> None:
    raw = _reviews(held_out)[:12]
    tickets = [f"{i:05d}" for i in range(len(raw))]  # text that looks like a number
    with_ids = [{"ticket": t, **r} for t, r in zip(tickets, raw, strict=True)]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in with_ids))
    table = tmp_path / "requests.csv"
    _write_csv(table, ["ticket", *REVIEW_FIELDS], with_ids)
    mdl = str(run / "joint" / "model")
    want = model.predict(raw, task="rating").to_pylist()
    for path, out in ((jsonl, tmp_path / "a.csv"), (table, tmp_path / "b.parquet"),
                      (table, tmp_path / "c.jsonl")):
        cli("predict", mdl, str(path), "--task", "rating", "--out", str(out), "--id-columns",
            "ticket", check=True)
        rows = _read_back(out)
        assert list(rows[0]) == ["line", "ticket", "rating", "rating_clamped"]
        assert [r["ticket"] for r in rows] == tickets  # as given, the CSV's text kept
        assert _values(rows, ["rating", "rating_clamped"]) == [
            (w["rating"], w["rating_clamped"]) for w in want]
    # without --id-columns the ticket is an unknown field: every request is refused
    proc = cli("predict", mdl, str(jsonl), "--task", "rating", "--out", str(tmp_path / "x.csv"))
    assert_one_error_line(proc, "requests.jsonl: line 1: unknown field(s) ['ticket']",
                          f"({len(raw)} bad rows in all)", code=1)
    # an id column may not be an input field, an output column, `line`, or named twice
    for ids in ("age", "ticket,rating_clamped", "line", "ticket,ticket"):
        out = tmp_path / "clash.csv"
        proc = cli("predict", mdl, str(jsonl), "--task", "rating", "--out", str(out),
                   "--id-columns", ids)
        clash = {"age": "['age']", "ticket,rating_clamped": "['rating_clamped']",
                 "line": "['line']", "ticket,ticket": "['ticket']"}[ids]
        assert_one_error_line(proc, f"error: --id-columns: {clash} would clash with an output "
                              "column or an input field, or appear twice", code=2)
        assert not out.exists()


# -- a zoo model directory: describe, then predict its example --------------------------------

ZOO = Path(__file__).parents[1] / "fixtures" / "format1" / "zoo_model"


def test_describe_a_zoo_model_and_predict_its_example(tmp_path: Path) -> None:
    tasks = json.loads((ZOO / "meta.json").read_text())["tasks"]
    assert tasks == ["click", "conversion", "ad_click"]
    proc = cli("describe", str(ZOO), "--json", check=True)
    infos = json.loads(proc.stdout)
    assert [i["task"] for i in infos] == tasks
    schema = json.loads((ZOO / "schema.json").read_text())
    columns = [f.get("column") or f["name"] for f in schema["features"]]
    for info in infos:
        assert (info["source"], info["type"]) == ("table", "binary")
        assert [f["name"] for f in info["inputs"]] == [*columns, "scenario"]
        assert info["columns"] == [{"name": info["task"],
                                    "doc": f"probability that {info['task']} = 1"}]
        assert info["example"]["file"] == "request.csv"
        assert info["example"]["command"] == (f"shopmtl predict {ZOO} request.csv --out "
                                              "answers.csv")
    example = infos[0]["example"]["content"]
    assert all(i["example"]["content"] == example for i in infos)  # one table, one example
    header, row = list(csv.reader(example.splitlines()))
    assert header == [*columns, "scenario"]
    scenario = row[header.index("scenario")]
    assert scenario in schema["scenario"]["values"]
    path = tmp_path / "request.csv"
    path.write_text(example)
    out = tmp_path / "answers.csv"
    proc = cli("predict", str(ZOO), str(path), "--out", str(out), check=True)
    assert proc.stdout.strip() == f"wrote 1 rows to {out}"
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 1 and list(rows[0]) == ["line", *tasks]
    assert rows[0]["line"] == "2"
    assert all(0.0 < float(rows[0][t]) < 1.0 for t in tasks)
    text = cli("describe", str(ZOO), "--task", "conversion", check=True).stdout
    assert text.splitlines()[0] == f"{ZOO}: zoo model, tasks click, conversion, ad_click"
    assert "task conversion (binary; source table" in text and "task click" not in text


def test_id_columns_are_text_of_one_type_in_every_batch(model: Any, run: Path,
                                                        tmp_path: Path) -> None:
    """Requests give an id as a number in one row, a string in another, or not at all, and
    are answered ``BATCH`` at a time: the id column is text in every row and every batch (a
    first batch without any id, then a number and a string, used to stop a Parquet or CSV
    output with an internal error, and a number beside a string the Python API)."""
    from shopmtl.joint.predict import BATCH

    req = {"review": "Fits well, lovely colour", "age": 30}
    rows = [req] * BATCH + [{**req, "ticket": 42}, {**req, "ticket": "T-7"},
                            {**req, "ticket": 2.5}]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for out in (tmp_path / "a.parquet", tmp_path / "b.csv", tmp_path / "c.jsonl"):
        cli("predict", str(run / "joint" / "model"), str(jsonl), "--task", "rating", "--out",
            str(out), "--id-columns", "ticket", check=True)
        got = _read_back(out)
        assert len(got) == BATCH + 3
        empty = "" if out.suffix == ".csv" else None
        assert [g["ticket"] for g in got[BATCH - 1:]] == [empty, "42", "T-7", "2.5"]
        # one request, asked BATCH + 3 times: one answer (to float32 rounding: the last call
        # holds 3 rows, the first BATCH, and a BLAS kernel may sum in another order by shape)
        ratings = [float(g["rating"]) for g in got]  # CSV reads back text
        assert max(ratings) - min(ratings) <= 1e-5
    assert pq.read_schema(tmp_path / "a.parquet").field("ticket").type == pa.string()
    table = model.predict([{**req, "ticket": 42}, {**req, "ticket": "T-7"}, req],
                          task="rating", id_columns=["ticket"])
    assert table.column_names == ["ticket", "rating", "rating_clamped"]
    assert table.column("ticket").to_pylist() == ["42", "T-7", None]
