"""Search relevance on the synthetic world: rank L candidate item titles for a query.

The third subsystem of the joint run, after recommendation and ads. It lives in the same
world (``synthetic.build_world``; pass the joint run's ``WorldConfig``), so its items, titles
and item ids are those of the recommendation tasks.

Queries. Each query is drawn from an *intent* around an anchor item: a category (its leaf,
written ``item type <leaf>`` as in the titles, or its top category word), optionally an
attribute of the anchor (colour, material or brand) and optionally a price tier::

    leaf + colour      "red item type 12", "electronics type 12 crimson"
    leaf + material    "steel item type 3", "cheap metal kitchen type 3"
    leaf + brand       "brand 37 item type 14"
    leaf only          "home item type 7"
    top + colour       "navy fashion", "dark blue apparel"
    top + material     "ceramic kitchen", "premium porcelain cookware"
    top + brand        "brand 37 fashion"

The words are the vocabulary of ``item_titles`` with noise, so that word overlap is not a perfect
ranker: a category or attribute word is replaced by a synonym the titles never use with
probability ``synonym_p`` (``SYNONYMS``; close in a sentence encoder's space, invisible to BM25;
"dark blue" even matches the wrong colour word) and gets a typo with probability ``typo_p``
(a dropped or swapped letter: a subword encoder still sees most of the word); the word
``item`` or the top category word is often left out, the word order varies, and the numbers of
``type <leaf>`` and ``brand <b>`` share one token space (``type 12`` and ``brand 12`` collide).
With probability ``price_p`` (for anchors in the low or high price tier) the query starts
with a price word (``PRICE_WORDS``: "cheap", "budget" / "premium", "luxury"); the tier (the
tercile of the item's log price minus its category's mean) is in no title.

Graded relevance (0..3), from the ground truth, never from the title text::

    base  = [same top category]
          + [same leaf]                        (queries that name a leaf)
          + [same attribute and top category]  (queries that name an attribute)
    adj   = +1 high-quality item, -1 low-quality item
            -1 if the query names a price tier and the item is in another tier
    grade = clip(base + adj, 0, 3) if base >= 2 else base

Quality is the world's item bias ``b_i`` (the item's click propensity in the recommendation
tasks): the top ``quality_share`` of items are high quality, the bottom ``quality_share`` low.
Quality and price tier decide which of the matching items are best, are in no title, and are
learnable per item id (each item is a candidate in ~50 training lists; quality is also what
the recommendation tasks' click labels reveal). A grade >= 2 is "relevant" (MRR); every list
has at least one relevant item: the anchor (never a low-quality item, and in the query's tier).

Candidates (``list_size`` = L per query, shuffled): the anchor and 0-3 other exact matches, for
leaf queries 0-3 other items of the leaf, 5 other items of the top category, 4 word-overlap
traps outside the top category (the query's colour / material, items whose brand number is the
query's leaf number or whose leaf number is the query's brand; those sharing the most query
words first) and random items for the rest.

Splits are by query string: the train, valid and test queries are disjoint (every list has a
distinct query); an intent may recur with another wording, as reformulated head queries do in
a real search log. Everything is seeded by ``(WorldConfig.seed, seed)``.

Requests (``contract``): ``{"query": ..., "candidates": [{"item_id": "17", "title": ...},
...]}``; ``item_id`` is the world item id as the recommendation model's ``item_id`` vocabulary
writes it (an unknown one reads as the unknown item, id 0). ``encode`` builds the inputs of
training and of prediction alike. The answer: the candidates ranked, best first, with scores.

Metrics: NDCG@k (gain ``2**rel - 1``, discount ``1 / log2(rank + 1)``) and MRR of the first
candidate with grade >= 2, those of ``shopmtl.metrics`` with ``ties="average"`` and
``min_grade=2``. Tied scores count with their expected value over all orders of the tie, not
pessimistically (that module's default): BM25 gives many candidates exactly the same score
(same matched words), and breaking those ties against it would cut its NDCG@10 from 0.75 to
0.62 on the default test split, a baseline weaker than BM25 really is. For scores without ties
(a model's) both give the same numbers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shopmtl.data.contract import Contract, Field, Output
from shopmtl.data.ingest import DataError
from shopmtl.data.schema import TaskSpec
from shopmtl.data.source import SPLITS, SourceData, SourceSplit
from shopmtl.data.synthetic import (
    COLORS,
    MATERIALS,
    TOP_NAMES,
    World,
    WorldConfig,
    build_world,
    item_titles,
)
from shopmtl.metrics import ranking_metrics

TASK = "relevance"
RELEVANT = 2  # the smallest grade MRR counts as relevant
MAX_GRADE = 3
DEFAULT_K = 10

# synonyms that no title uses; a sentence encoder puts most of them near the title word
SYNONYMS: dict[str, tuple[str, ...]] = {
    "fashion": ("apparel", "clothing"),
    "home": ("household",),
    "electronics": ("gadgets",),
    "beauty": ("cosmetics",),
    "sports": ("fitness",),
    "toys": ("games",),
    "garden": ("outdoor",),
    "kitchen": ("cookware",),
    "grey": ("gray",),
    "beige": ("tan",),
    "purple": ("violet",),
    "red": ("crimson",),
    "navy": ("dark blue",),
    "wooden": ("wood",),
    "steel": ("metal",),
    "ceramic": ("porcelain",),
    "wool": ("knitted",),
    "plastic": ("acrylic",),
}

# intent kinds: (category level, attribute) and their share of the queries
KINDS: tuple[tuple[str, str | None], ...] = (
    ("leaf", "color"),
    ("leaf", "material"),
    ("leaf", "brand"),
    ("leaf", None),
    ("top", "color"),
    ("top", "material"),
    ("top", "brand"),
)
KIND_P = (0.22, 0.18, 0.1, 0.1, 0.16, 0.14, 0.1)

# query words for the low and the high price tier (tier 1, the middle, has none)
PRICE_WORDS: dict[int, tuple[str, str]] = {0: ("cheap", "budget"), 2: ("premium", "luxury")}

_TOKEN = re.compile(r"\w+")
_ITEM_ID = re.compile(r"[0-9]+")  # a world item id as the rec vocabulary writes it

INPUTS = (
    Field("query", "text", "the search query, as typed"),
    Field("candidates", "records", "the items to rank for the query", min_items=1, items=(
        Field("item_id", "string", 'the item id as the recommendation data writes it, e.g. '
              '"17" (an unknown one reads as an unknown item)'),
        Field("title", "text", "the item's title"),
    )),
)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (single characters kept: leaf and brand numbers 0-9 count)."""
    return _TOKEN.findall(text.lower())


class BM25:
    """Okapi BM25 with corpus statistics (document frequencies, mean length) of ``corpus``.

    ``score(q, d) = sum over distinct query terms t of
    idf(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl))``
    with ``idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))`` (the non-negative idf of Lucene:
    Robertson's ``ln((N - n_t + 0.5) / (n_t + 0.5))`` is negative for words in more than half the
    titles, such as "item" and "type", and would reward titles for *missing* them). A query
    term repeated in the query counts once. The scored documents need not be in the corpus.
    """

    def __init__(self, corpus: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        if not corpus:
            raise ValueError("BM25: the corpus is empty")
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25: need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        docs = [tokenize(d) for d in corpus]
        self.k1, self.b = k1, b
        self.n_docs = len(docs)
        self.avgdl = sum(len(d) for d in docs) / len(docs)
        self.df: Counter[str] = Counter(t for d in docs for t in set(d))

    def idf(self, term: str) -> float:
        n_t = self.df.get(term, 0)
        return math.log(1.0 + (self.n_docs - n_t + 0.5) / (n_t + 0.5))

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        """float64 [len(docs)]: the BM25 score of each document for ``query``."""
        terms = set(tokenize(query))
        out = np.zeros(len(docs))
        for j, doc in enumerate(docs):
            toks = tokenize(doc)
            tf = Counter(toks)
            norm = self.k1 * (1.0 - self.b + self.b * len(toks) / max(self.avgdl, 1e-12))
            out[j] = sum(
                self.idf(t) * tf[t] * (self.k1 + 1.0) / (tf[t] + norm) for t in terms if t in tf
            )
        return out


def bm25_scores(corpus: Sequence[str], queries: Sequence[str],
                cand_text: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75
                ) -> np.ndarray:
    """float64 [n, L]: BM25 (statistics of ``corpus``) of every list's candidates."""
    model = BM25(corpus, k1, b)
    return np.stack([model.score(q, c) for q, c in zip(queries, cand_text, strict=True)])


def tfidf_scores(corpus: Sequence[str], queries: Sequence[str],
                 cand_text: Sequence[Sequence[str]]) -> np.ndarray:
    """float64 [n, L]: cosine of TF-IDF vectors (vocabulary and idf fitted on ``corpus``)."""
    from shopmtl.deps import require

    require("sklearn", "text", "the TF-IDF search baseline")
    from sklearn.feature_extraction.text import TfidfVectorizer

    # the default token pattern drops one-character tokens, i.e. the numbers 0-9 of
    # "type 7" / "brand 7"; keep them so that the baseline sees every title word
    vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit(list(corpus))
    q = vec.transform(list(queries))  # rows are l2-normalised: a dot product is the cosine
    n, width = len(cand_text), len(cand_text[0]) if cand_text else 0
    d = vec.transform([t for c in cand_text for t in c])
    sims = np.asarray(d.multiply(q[np.repeat(np.arange(n), width)]).sum(1)).ravel()
    return sims.reshape(n, width)


def search_metrics(labels: np.ndarray, scores: np.ndarray, k: int = DEFAULT_K
                   ) -> dict[str, float]:
    """``ndcg@k``, ``mrr`` and ``n`` (the number of lists) of one split: the shared ranking
    metrics with ties averaged and MRR's relevant grade ``RELEVANT`` (module docstring)."""
    return ranking_metrics(labels, scores, k, ties="average", min_grade=RELEVANT)


class SearchSource:
    """The search relevance source (see the module docstring).

    ``n_train`` / ``n_valid`` / ``n_test``: queries (lists) per split; ``list_size``: candidates
    per list (L); ``world``: the world's config (the joint run's, so that item ids and titles
    are those of the recommendation tasks; default ``WorldConfig()``); ``seed``: the query and
    candidate sampling (the world has its own ``world.seed``); ``synonym_p``: the chance that a
    category or attribute word with a synonym is written as the synonym; ``quality_share``:
    the share of items that are high (and as many low) quality; ``price_p``: the chance that a
    query whose anchor is cheap or expensive names its price tier; ``typo_p``: the chance of a
    typo in a category or attribute word of 5 letters or more.
    """

    name = "search"
    task_names = (TASK,)  # what load() returns, known without loading (checked at config load)

    def __init__(self, n_train: int = 4000, n_valid: int = 1000, n_test: int = 1000,
                 list_size: int = 20, world: WorldConfig | None = None, seed: int = 0,
                 synonym_p: float = 0.5, quality_share: float = 0.2, price_p: float = 0.3,
                 typo_p: float = 0.1) -> None:
        self.world_config = world if world is not None else WorldConfig()
        if not isinstance(self.world_config, WorldConfig):
            raise ValueError(f"search: world must be a WorldConfig, got {type(world).__name__}")
        for key, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"search: {key} must be an int >= 1, got {v!r}")
        n_items = self.world_config.n_items
        if isinstance(list_size, bool) or not isinstance(list_size, int) or list_size < 2:
            raise ValueError(f"search: list_size must be an int >= 2, got {list_size!r}")
        if list_size > n_items:
            raise ValueError(f"search: list_size {list_size} exceeds the world's {n_items} items")
        for key, p in (("synonym_p", synonym_p), ("price_p", price_p), ("typo_p", typo_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"search: {key} must lie in [0, 1], got {p}")
        if not 0.0 <= quality_share < 0.5:
            raise ValueError(f"search: quality_share must lie in [0, 0.5), got {quality_share}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"search: seed must be an int >= 0, got {seed!r}")
        self.sizes = {"train": n_train, "valid": n_valid, "test": n_test}
        self.list_size = list_size
        self.seed = seed
        self.synonym_p = synonym_p
        self.quality_share = quality_share
        self.price_p = price_p
        self.typo_p = typo_p
        self.task = TaskSpec(TASK, type="ranking", k=DEFAULT_K)

    # ------------------------------------------------------------------ data
    def load(self) -> SourceData:
        world = build_world(self.world_config)
        titles = item_titles(world)
        lists = _Generator(world, self.list_size, self.synonym_p, self.quality_share,
                           self.price_p, self.typo_p,
                           np.random.default_rng([self.world_config.seed, 31, self.seed]))
        total = sum(self.sizes.values())
        queries, cands, grades, kinds = lists.draw(total)
        # the draw exhausts the small intent kinds (top + colour) first: a random permutation
        # gives every split the same mix of kinds
        perm = np.random.default_rng([self.world_config.seed, 32, self.seed]).permutation(total)
        queries = [queries[i] for i in perm]
        cands, grades, kinds = cands[perm], grades[perm], kinds[perm]
        g = grades[: self.sizes["train"]]
        meta: dict[str, Any] = {
            "world_seed": self.world_config.seed,
            "seed": self.seed,
            "n_items": self.world_config.n_items,
            "list_size": self.list_size,
            "k": _task_k(self.task),
            "relevant_grade": RELEVANT,
            "grades": "base = [same top] + [same leaf, leaf queries] + [same attribute and top, "
                      "attribute queries]; if base >= 2: +1 high / -1 low quality (item bias "
                      "b_i), -1 wrong price tier (price queries); clipped to 0..3",
            "synonym_p": self.synonym_p,
            "quality_share": self.quality_share,
            "price_p": self.price_p,
            "typo_p": self.typo_p,
            "query_kinds": {},
            "train_grade_share": {str(v): float(np.mean(g == v)) for v in range(MAX_GRADE + 1)},
            "id_note": "cand_ids['item'] = world item id + 1 (0 = unknown)",
        }
        splits: dict[str, SourceSplit] = {}
        start = 0
        for name in SPLITS:
            sl = slice(start, start + self.sizes[name])
            start = sl.stop
            # the inputs are built from the raw requests by the code that serves them
            requests = [_request(q, c, titles) for q, c in zip(queries[sl], cands[sl],
                                                                 strict=True)]
            splits[name] = replace(self.encode(meta, requests),
                                   labels={TASK: grades[sl].astype(np.float32)})
            meta["query_kinds"][name] = {str(k): v
                                         for k, v in sorted(Counter(kinds[sl]).items())}
        return SourceData(
            name=self.name, tasks=(self.task,), train=splits["train"], valid=splits["valid"],
            test=splits["test"], id_sizes={"item": self.world_config.n_items + 1}, meta=meta,
            # the rec model's item_id vocabulary holds the world ids as strings
            id_keys={"item": ["", *map(str, range(self.world_config.n_items))]},
        )

    # -------------------------------------------------------------- requests
    def contract(self, data: SourceData) -> Contract:
        """A query and its candidates; the example is the first test list's first three
        candidates (real world titles and ids)."""
        part = data.test
        assert part.text is not None and part.cand_text is not None
        ids = part.cand_ids["item"][0]
        example = {"query": part.text[0],
                   "candidates": [{"item_id": str(int(i) - 1), "title": t}
                                  for i, t in zip(ids[:3], part.cand_text[0][:3], strict=True)]}
        return Contract(
            self.name, INPUTS,
            (Output(TASK, "ranking", "graded relevance of the candidate to the query",
                    item="item_id"),),
            example, doc="search relevance: rank candidate items for a query (synthetic world)")

    @staticmethod
    def encode(meta: dict[str, Any], rows: list[dict[str, Any]]) -> SourceSplit:
        """Requests (checked by the contract) -> the query text, the candidates' titles and
        item ids (world id + 1; 0 for an id outside the world's ``meta["n_items"]``). One call
        encodes lists of one length L (the model's inputs are [n, L]): the caller groups
        requests by their number of candidates; mixed lengths raise."""
        lengths = sorted({len(r["candidates"]) for r in rows})
        if len(lengths) > 1:
            raise DataError(f"search: the requests of one batch must have the same number of "
                            f"candidates, got lists of {lengths}; group them by length")
        n_items = int(meta["n_items"])
        ids = np.asarray([[_item_row(c["item_id"], n_items) for c in r["candidates"]]
                          for r in rows], np.int64).reshape(len(rows), lengths[0] if rows else 0)
        return SourceSplit(
            text=[r["query"] for r in rows],
            numeric=np.zeros((len(rows), 0), np.float32),
            cand_text=[[c["title"] for c in r["candidates"]] for r in rows],
            cand_ids={"item": ids},
            raw=[{"query": r["query"], "candidates": [{"item_id": c["item_id"],
                                                       "title": c["title"]}
                                                      for c in r["candidates"]]}
                 for r in rows],
        )

    # --------------------------------------------------------------- scoring
    def metrics(self, data: SourceData, split: str, task: str, pred: np.ndarray
                ) -> dict[str, float]:
        """``ndcg@k`` (k of the task spec, default 10), ``mrr`` (first grade >= 2) and ``n``
        for scores [n, L] (higher = ranked first; any monotone scale)."""
        spec = _ranking_task(data, task)
        labels = data.split(split).labels[task]
        return search_metrics(labels, np.asarray(pred), _task_k(spec))

    def _baseline_runs(self, data: SourceData, task: str
                       ) -> tuple[dict[str, dict[str, float]], str]:
        """Test metrics of BM25 and of TF-IDF cosine, and the name of the better one by valid
        NDCG (so that the test split does not choose the baseline)."""
        k = _task_k(_ranking_task(data, task))
        # corpus statistics (idf, mean length): the distinct titles of the train candidates
        corpus = sorted({t for c in (data.train.cand_text or []) for t in c})
        test: dict[str, dict[str, float]] = {}
        valid_ndcg: dict[str, float] = {}
        for name, fn in (("bm25", bm25_scores), ("tfidf", tfidf_scores)):
            for split in ("valid", "test"):
                part = data.split(split)
                scores = fn(corpus, part.text or [], part.cand_text or [])
                m = search_metrics(part.labels[task], scores, k)
                if split == "valid":
                    valid_ndcg[name] = m[f"ndcg@{k}"]
                else:
                    test[name] = m
        return test, max(valid_ndcg, key=lambda n: valid_ndcg[n])

    def baselines(self, data: SourceData, task: str = TASK
                  ) -> dict[str, dict[str, float] | str]:
        """``{"bm25": test metrics, "tfidf": test metrics, "best": "bm25" or "tfidf"}``."""
        test, best = self._baseline_runs(data, task)
        return {**test, "best": best}

    def baseline(self, data: SourceData) -> dict[str, dict[str, float]]:
        """The better baseline's test metrics (same keys as ``metrics``), plus both baselines'
        as ``bm25.<metric>`` / ``tfidf.<metric>`` and ``best_is_bm25`` (1.0 or 0.0)."""
        test, best = self._baseline_runs(data, TASK)
        flat = dict(test[best])
        for name, m in test.items():
            flat.update({f"{name}.{key}": v for key, v in m.items() if key != "n"})
        flat["best_is_bm25"] = float(best == "bm25")
        return {TASK: flat}


def _request(query: str, cands: np.ndarray, titles: Sequence[str]) -> dict[str, Any]:
    """One generated list as its user would send it: world ids as the rec vocabulary's keys."""
    return {"query": query,
            "candidates": [{"item_id": str(int(i)), "title": titles[i]} for i in cands]}


def _item_row(item_id: str, n_items: int) -> int:
    """The embedding row of a world item id ("17" -> 18); 0 for an unknown one. Only the
    plain decimal form the rec vocabulary writes counts (no sign, no "_", no "17.0")."""
    key = item_id.strip()
    if _ITEM_ID.fullmatch(key) is None:
        return 0
    k = int(key)
    return k + 1 if k < n_items else 0


def _ranking_task(data: SourceData, task: str) -> TaskSpec:
    for t in data.tasks:
        if t.name == task:
            if t.type != "ranking":
                raise ValueError(f"search: task {task!r} is not a ranking task")
            return t
    raise KeyError(f"search: unknown task {task!r}; known: {[t.name for t in data.tasks]}")


def _task_k(spec: TaskSpec) -> int:
    return int(spec.k)


class _Generator:
    """Draws (query, candidates, grades) lists from one world with one random stream."""

    def __init__(self, world: World, list_size: int, synonym_p: float, quality_share: float,
                 price_p: float, typo_p: float, rng: np.random.Generator) -> None:
        self.w, self.L, self.rng = world, list_size, rng
        self.syn_p, self.price_p, self.typo_p = synonym_p, price_p, typo_p
        cfg = world.cfg
        self.n = cfg.n_items
        self.leaf_top = np.asarray(world.leaf_top)
        q = np.asarray(world.b_i)
        if quality_share > 0:
            lo, hi = np.quantile(q, [quality_share, 1.0 - quality_share])
            self.quality = (q >= hi).astype(int) - (q <= lo).astype(int)
        else:
            self.quality = np.zeros(self.n, int)
        self.anchors = np.flatnonzero(self.quality >= 0)  # a low-quality anchor is not relevant
        # price tier within the top category (terciles of log price - category mean): 0 low,
        # 1 mid, 2 high; "cheap" / "premium" queries ask for a tier that no title shows
        rel_price = np.asarray(world.log_price) - np.asarray(world.cat_price)[world.top]
        self.tier = np.searchsorted(np.quantile(rel_price, [1 / 3, 2 / 3]), rel_price)
        self.attr = {"color": np.asarray(world.color), "material": np.asarray(world.material),
                     "brand": np.asarray(world.brand)}

    def _word(self, word: str) -> str:
        syn = SYNONYMS.get(word)
        if syn and self.rng.random() < self.syn_p:
            word = str(syn[self.rng.integers(len(syn))])
        if len(word) >= 5 and self.rng.random() < self.typo_p:
            # one typo inside the word (first and last letter kept): a dropped letter or two
            # swapped neighbours; subword encoders still see most of the word, BM25 nothing
            j = int(self.rng.integers(1, len(word) - 2))
            if self.rng.random() < 0.5:
                word = word[:j] + word[j + 1:]
            else:
                word = word[:j] + word[j + 1] + word[j] + word[j + 2:]
        return word

    def _query(self, it: _Intent) -> str:
        w, rng, item = self.w, self.rng, it.item
        top_word = self._word(TOP_NAMES[int(w.top[item]) % len(TOP_NAMES)])
        if it.level == "leaf":
            leaf = f"{'item type' if rng.random() < 0.6 else 'type'} {int(w.leaf[item])}"
            # the top word is redundant beside the leaf: written half of the time
            cat = f"{top_word} {leaf}" if rng.random() < 0.5 else leaf
        else:
            cat = top_word
        words = [cat]
        if it.attr == "color":
            words.append(self._word(COLORS[int(w.color[item])]))
        elif it.attr == "material":
            words.append(self._word(MATERIALS[int(w.material[item])]))
        elif it.attr == "brand":
            words.append(f"brand {int(w.brand[item])}")
        if rng.random() < 0.6:
            words.reverse()  # the attribute first, as people mostly type it
        if it.tier is not None:
            words.insert(0, PRICE_WORDS[it.tier][int(rng.integers(2))])
        return " ".join(words)

    def _grades(self, it: _Intent) -> np.ndarray:
        w, item = self.w, it.item
        top = np.asarray(w.top) == w.top[item]
        base = top.astype(int)
        if it.level == "leaf":
            base += np.asarray(w.leaf) == w.leaf[item]
        if it.attr is not None:
            base += top & (self.attr[it.attr] == self.attr[it.attr][item])
        adj = self.quality.copy()
        if it.tier is not None:
            adj -= self.tier != it.tier  # a matching item in the wrong price tier
        return np.clip(base + np.where(base >= 2, adj, 0), 0, MAX_GRADE)

    def _traps(self, it: _Intent, top: np.ndarray) -> np.ndarray:
        """Items outside the top category that share query words: the colour or material,
        a number (their brand number is the query's leaf number or the other way round);
        those that share the most words first."""
        w, item = self.w, it.item
        hit = np.zeros(self.n, int)
        if it.attr in ("color", "material"):
            hit += self.attr[it.attr] == self.attr[it.attr][item]
        if it.level == "leaf":
            hit += np.asarray(w.brand) == w.leaf[item]
        if it.attr == "brand":
            hit += np.asarray(w.leaf) == w.brand[item]
        hit[top] = 0
        pool = np.flatnonzero(hit > 0)
        order = np.lexsort((self.rng.random(len(pool)), -hit[pool]))
        return pool[order]

    def _pick(self, pool: np.ndarray, k: int, taken: np.ndarray, first: bool = False
              ) -> np.ndarray:
        """k untaken items of pool: random ones, or the first ones (``first``)."""
        pool = pool[~taken[pool]]
        k = min(k, len(pool))
        got = pool[:k] if first else self.rng.choice(pool, k, replace=False)
        taken[got] = True
        return got

    def _candidates(self, it: _Intent) -> np.ndarray:
        w, rng, item = self.w, self.rng, it.item
        top = np.asarray(w.top) == w.top[item]
        exact = top.copy()
        if it.level == "leaf":
            exact &= np.asarray(w.leaf) == w.leaf[item]
        if it.attr is not None:
            exact &= self.attr[it.attr] == self.attr[it.attr][item]
        taken = np.zeros(self.n, bool)
        taken[item] = True
        parts = [np.array([item]), self._pick(np.flatnonzero(exact), int(rng.integers(0, 4)),
                                              taken)]
        if it.level == "leaf":
            same_leaf = np.flatnonzero(np.asarray(w.leaf) == w.leaf[item])
            parts.append(self._pick(same_leaf, int(rng.integers(0, 4)), taken))
        parts.append(self._pick(np.flatnonzero(top), 5, taken))
        parts.append(self._pick(self._traps(it, top), 4, taken, first=True))
        chosen = np.concatenate(parts)[: self.L]
        rest = self._pick(np.arange(self.n), self.L - len(chosen), taken)
        out = np.concatenate([chosen, rest])
        rng.shuffle(out)
        return out

    def _intent(self) -> _Intent:
        rng = self.rng
        level, attr = KINDS[int(rng.choice(len(KINDS), p=KIND_P))]
        item = int(self.anchors[rng.integers(len(self.anchors))])
        tier = int(self.tier[item])
        # a price word only for an anchor at the low or high end, so that the anchor fits it
        want = tier != 1 and rng.random() < self.price_p
        return _Intent(level, attr, item, tier if want else None)

    def draw(self, total: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """``total`` lists with distinct query strings; raises if the world runs out of them."""
        seen: set[str] = set()
        queries: list[str] = []
        cands = np.empty((total, self.L), np.int64)
        grades = np.empty((total, self.L), np.int64)
        kinds: list[str] = []
        misses = 0  # draws in a row that gave a query string already taken
        while len(queries) < total:
            if misses > 5000:
                raise ValueError(
                    f"search: could only draw {len(queries)} distinct queries of {total} from "
                    "this world; ask for fewer queries (n_train + n_valid + n_test)"
                )
            it = self._intent()
            q = self._query(it)
            if q in seen:
                misses += 1
                continue
            misses = 0
            g_all = self._grades(it)
            c = self._candidates(it)
            seen.add(q)
            i = len(queries)
            queries.append(q)
            cands[i], grades[i] = c, g_all[c]
            price = "" if it.tier is None else "+price"
            kinds.append(f"{it.level}+{it.attr or 'none'}{price}")
        return queries, cands, grades, np.asarray(kinds)


@dataclass(frozen=True)
class _Intent:
    """What a query asks for: a category level ("leaf" or "top") around the anchor item, an
    attribute of the anchor (or None) and a price tier (0 low, 2 high; None: any price)."""

    level: str
    attr: str | None
    item: int
    tier: int | None
