"""The search relevance source: data contract, determinism, metrics and baselines."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from shopmtl.data.contract import Contract
from shopmtl.data.ingest import DataError
from shopmtl.data.source import SPLITS, SourceData, SourceSplit
from shopmtl.data.sources.search import (
    BM25,
    SearchSource,
    bm25_scores,
    search_metrics,
    tfidf_scores,
)
from shopmtl.data.synthetic import WorldConfig, build_world, item_titles

SIZES = {"n_train": 400, "n_valid": 150, "n_test": 150}


@pytest.fixture(scope="module")
def source() -> SearchSource:
    return SearchSource(**SIZES)


@pytest.fixture(scope="module")
def data(source: SearchSource) -> SourceData:
    return source.load()


def test_shapes_ids_and_titles(data: SourceData) -> None:
    titles = item_titles(build_world(WorldConfig()))
    assert data.name == "search"
    (task,) = data.tasks
    assert (task.name, task.type, task.k) == ("relevance", "ranking", 10)
    assert SearchSource.task_names == (task.name,)  # declared: checked at config load
    assert data.id_sizes == {"item": 1501}
    for name, n in zip(SPLITS, SIZES.values(), strict=True):
        part = data.split(name)
        assert len(part) == n and part.numeric.shape == (n, 0)
        assert part.text is not None and len(part.text) == n
        assert part.cand_text is not None and all(len(c) == 20 for c in part.cand_text)
        ids = part.cand_ids["item"]
        assert ids.shape == (n, 20) and ids.dtype == np.int64
        assert ids.min() >= 1 and ids.max() <= 1500  # 0 is reserved for unknown
        assert all(len(set(row)) == 20 for row in ids)  # no item twice in a list
        # the candidate text is the title of the candidate id
        assert part.cand_text[0] == [titles[i - 1] for i in ids[0]]
        assert part.labels["relevance"].shape == (n, 20)
        assert part.labels["relevance"].dtype == np.float32


def test_grades_and_relevant_items(data: SourceData) -> None:
    for name in SPLITS:
        y = data.split(name).labels["relevance"]
        assert set(np.unique(y)) <= {0.0, 1.0, 2.0, 3.0}
        assert ((y >= 2).sum(1) >= 1).all()  # every list has a relevant item (MRR is defined)
    y = data.train.labels["relevance"]
    # graded, not binary: every grade is common enough to matter
    assert all(np.mean(y == g) > 0.05 for g in range(4))


def test_queries_distinct_and_splits_disjoint(data: SourceData) -> None:
    texts = [set(data.split(s).text or []) for s in SPLITS]
    assert [len(t) for t in texts] == list(SIZES.values())
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    # every split sees the same mix of query kinds (the draw order is permuted)
    def top_share(split: str) -> float:
        kinds = data.meta["query_kinds"][split]
        return sum(v for k, v in kinds.items() if k.startswith("top+")) / sum(kinds.values())

    assert abs(top_share("train") - top_share("test")) < 0.1


def test_deterministic_and_seeded(data: SourceData) -> None:
    again = SearchSource(**SIZES).load()
    assert again.test.text == data.test.text
    np.testing.assert_array_equal(again.test.cand_ids["item"], data.test.cand_ids["item"])
    np.testing.assert_array_equal(again.test.labels["relevance"], data.test.labels["relevance"])
    other = SearchSource(**SIZES, seed=1).load()
    assert other.test.text != data.test.text
    assert SearchSource(**SIZES, world=WorldConfig(seed=3)).load().test.text != data.test.text


def test_source_metrics(source: SearchSource, data: SourceData) -> None:
    y = np.array([[3, 0, 1, np.nan], [2, 2, 0, 1]], np.float32)
    small = replace(data, test=SourceSplit(
        text=["q1", "q2"], numeric=np.zeros((2, 0), np.float32), labels={"relevance": y}
    ))
    # the shared metrics' tied-list values (tests/train/test_metrics.py, TIED_Y / TIED_S): ties
    # averaged, MRR counting grades >= 2; pessimistic ties would give 0.6766 and 0.5
    s = np.array([[0.2, 0.9, 0.1, 5.0], [1, 1, 1, 0]])
    m = source.metrics(small, "test", "relevance", s)
    assert m == {"ndcg@10": pytest.approx(0.7572185085), "mrr": pytest.approx(2 / 3), "n": 2}
    assert search_metrics(y, s) == m
    assert search_metrics(y, s, k=1)["ndcg@1"] == pytest.approx((0 + 2 / 3) / 2)
    with pytest.raises(KeyError, match="unknown task"):
        source.metrics(small, "test", "click", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        source.metrics(data, "test", "relevance", np.zeros((3, 20)))
    with pytest.raises(ValueError, match="NaN"):
        source.metrics(small, "test", "relevance", np.where(s == 0.9, np.nan, s))


def test_bm25_pinned_on_tiny_corpus() -> None:
    # N = 3 titles, mean length 7/3; "red" and "shoe" are in 2 of them: idf = ln(1 + 1.5/2.5)
    bm = BM25(["red shoe", "blue shoe", "red red hat"])
    idf = math.log(1.6)
    doc1 = idf * 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 3 / (7 / 3)))  # tf 2, length 3
    doc2 = idf * 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2 / (7 / 3)))  # tf 1, length 2
    assert doc1 == pytest.approx(0.5981864372) and doc2 == pytest.approx(0.4991762683)
    docs = ["red red hat", "blue shoe", "green sock"]
    np.testing.assert_allclose(bm.score("red shoe", docs), [doc1, doc2, 0.0])
    # a repeated query word counts once; a word outside every title adds nothing
    np.testing.assert_allclose(bm.score("Red red shoe crimson", docs), [doc1, doc2, 0.0])
    scores = bm25_scores(["red shoe", "blue shoe", "red red hat"], ["red shoe"], [docs])
    assert scores.shape == (1, 3)
    with pytest.raises(ValueError, match="k1"):
        BM25(["a"], b=1.5)
    with pytest.raises(ValueError, match="empty"):
        BM25([])


def test_tfidf_keeps_single_digit_tokens() -> None:
    s = tfidf_scores(["type 1 hat", "type 2 hat"], ["type 1"], [["type 1 hat", "type 2 hat"]])
    assert s[0, 0] > s[0, 1] > 0


def test_baselines_between_random_and_oracle(source: SearchSource, data: SourceData) -> None:
    y = data.test.labels["relevance"]
    oracle = search_metrics(y, y)
    assert oracle["ndcg@10"] == pytest.approx(1.0) and oracle["mrr"] == pytest.approx(1.0)
    rand = search_metrics(y, np.random.default_rng(0).random(y.shape))
    res = source.baselines(data)
    assert res["best"] in ("bm25", "tfidf")
    bm25 = res["bm25"]
    assert isinstance(bm25, dict)
    # word overlap helps a lot but is far from perfect: synonyms, typos, traps, quality, price
    assert rand["ndcg@10"] + 0.2 < bm25["ndcg@10"] < 0.85
    assert rand["mrr"] + 0.2 < bm25["mrr"] < 0.9
    flat = source.baseline(data)["relevance"]
    best = res[str(res["best"])]
    assert isinstance(best, dict)
    assert flat["ndcg@10"] == best["ndcg@10"] and flat["n"] == 150
    assert {"bm25.ndcg@10", "bm25.mrr", "tfidf.ndcg@10", "tfidf.mrr"} <= set(flat)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": 2.5}, "n_test"),
        ({"list_size": 1}, "list_size"),
        ({"list_size": 21, "world": WorldConfig(n_items=20)}, "exceeds"),
        ({"synonym_p": 1.5}, "synonym_p"),
        ({"typo_p": -0.1}, "typo_p"),
        ({"quality_share": 0.5}, "quality_share"),
        ({"seed": -1}, "seed"),
        ({"world": "default"}, "WorldConfig"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchSource(**kwargs)


def test_too_many_queries_for_a_tiny_world() -> None:
    tiny = WorldConfig(n_items=40, n_top_categories=2, leaves_per_top=2, n_brands=4)
    src = SearchSource(n_train=3000, n_valid=10, n_test=10, world=tiny, synonym_p=0.0,
                       price_p=0.0, typo_p=0.0)
    with pytest.raises(ValueError, match="distinct queries"):
        src.load()


# -- raw requests: the contract ------------------------------------------------------------------


def _reread(source: SearchSource, data: SourceData, part: SourceSplit) -> SourceSplit:
    """``part``'s raw requests checked by the contract and encoded from the meta as a model
    directory keeps it (through JSON), as ``shopmtl predict`` does."""
    contract = source.contract(data)
    assert part.raw is not None and len(part.raw) == len(part)
    rows = [contract.read(r, f"request {i}") for i, r in enumerate(part.raw)]
    return SearchSource.encode(json.loads(json.dumps(data.meta)), rows)


def test_raw_requests_rebuild_the_inputs(source: SearchSource, data: SourceData) -> None:
    """Training and prediction share one code path: the test split's raw lists, read and
    encoded, give its inputs exactly (the sampled split's raw lists too)."""
    for part in (data.test, data.sample(40, seed=2).train):
        got = _reread(source, data, part)
        assert got.text == part.text and got.cand_text == part.cand_text
        assert got.numeric.shape == (len(part), 0) and got.numeric.dtype == np.float32
        ids = got.cand_ids["item"]
        assert got.cand_ids.keys() == part.cand_ids.keys() and ids.dtype == np.int64
        np.testing.assert_array_equal(ids, part.cand_ids["item"])
    first = data.test.raw[0]["candidates"][0]  # type: ignore[index]
    assert first["item_id"] == str(int(data.test.cand_ids["item"][0, 0]) - 1)


def test_contract_example_and_json(source: SearchSource, data: SourceData) -> None:
    c = source.contract(data)
    (out,) = c.outputs
    assert (out.task, out.type, out.item) == ("relevance", "ranking", "item_id")
    assert c.example["query"] == data.test.text[0]  # type: ignore[index]
    assert len(c.example["candidates"]) == 3
    got = SearchSource.encode(data.meta, [c.read(c.example, "example")])
    np.testing.assert_array_equal(got.cand_ids["item"], data.test.cand_ids["item"][:1, :3])
    assert got.cand_text == [data.test.cand_text[0][:3]]  # type: ignore[index]
    assert Contract.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_unknown_item_ids_are_id_0(data: SourceData) -> None:
    keys = ["0", "1499", "1500", "-1", "17.0", "abc", "1_7", " 17 "]
    row = {"query": "red dress", "candidates": [{"item_id": k, "title": "t"} for k in keys]}
    got = SearchSource.encode(data.meta, [row])
    np.testing.assert_array_equal(got.cand_ids["item"], [[1, 1500, 0, 0, 0, 0, 0, 18]])


def test_mixed_list_lengths_raise(data: SourceData) -> None:
    def row(n: int) -> dict:
        return {"query": "q", "candidates": [{"item_id": "1", "title": "t"}] * n}

    with pytest.raises(DataError, match=r"same number of candidates.*\[2, 3\]"):
        SearchSource.encode(data.meta, [row(2), row(3)])
    empty = SearchSource.encode(data.meta, [])
    assert empty.cand_ids["item"].shape == (0, 0) and len(empty) == 0


@pytest.mark.parametrize("request_,message", [
    ({"candidates": [{"item_id": "1", "title": "t"}]}, r"missing field 'query'"),
    ({"query": "q", "candidates": []}, r"field 'candidates': .*at least 1"),
    ({"query": "q", "candidates": [{"item_id": "1"}]},
     r"field 'candidates' item 0: missing field 'title'"),
    ({"query": "q", "candidates": [{"item_id": 17, "title": "t"}]},
     r"field 'candidates' item 0: field 'item_id'"),
    ({"query": "q", "candidates": ["t"]}, r"field 'candidates' item 0: expected an object"),
])
def test_bad_requests_name_the_field(source: SearchSource, data: SourceData, request_,
                                     message) -> None:
    with pytest.raises(DataError, match=message):
        source.contract(data).read(request_, "request 0")
