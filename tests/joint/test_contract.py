"""Every task of a joint checkpoint answers raw named inputs (#22): the held-out rows of each
source, as its users would send them, give through `shopmtl predict` and
`shopmtl.load(...).predict` exactly what the run computed for them on its test split; labels
are the training data's, regression stays in range, quantiles never cross; `shopmtl describe`'s
example for every task runs through predict; docs/PREDICT.md is generated from the contracts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
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
from tests.helpers import cli

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
