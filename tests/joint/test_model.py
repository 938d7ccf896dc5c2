"""The joint model's parts: hashed n-grams, the shared text encoder, the wide term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shopmtl.data.schema import TaskSpec
from shopmtl.joint.config import JointModelConfig
from shopmtl.joint.model import SharedText, TableHead
from shopmtl.joint.parts import hash_ngrams

CFG = JointModelConfig(adapter_hidden=8, text_dim=4, hidden=(6,), id_dim=3, ngram_dim=5,
                       dropout=0.0)


def test_hash_ngrams_are_stable_unigrams_and_bigrams():
    ids = hash_ngrams(["Red shoes, red!", "", "red shoes"], n=2, buckets=1000, max_len=8)
    assert ids.shape == (3, 8) and ids.dtype == np.int64
    # "red", "shoes", "red" + "red shoes", "shoes red": 5 n-grams, the rest padding
    assert (ids[0] > 0).sum() == 5 and (ids[1] == 0).all()
    assert ids[0, 0] == ids[0, 2] == ids[2, 0]  # the same word, the same bucket, any text
    assert ((ids >= 0) & (ids <= 1000)).all()
    # crc32, not Python's salted hash: the same ids in every process
    np.testing.assert_array_equal(ids, hash_ngrams(["Red shoes, red!", "", "red shoes"], 2,
                                                   1000, 8))
    assert (hash_ngrams(["a b c d e f"], 2, 1000, 4) > 0).sum() == 4  # cut at max_len


def test_shared_text_adds_ngrams_and_encodes_each_text_once():
    torch.manual_seed(0)
    text = SharedText(width=3, cfg=CFG, ngram_buckets=50)
    bank = torch.randn(4, 3)
    bank[0] = 0
    ngrams = torch.tensor([[0, 0], [1, 2], [3, 0], [1, 2]])
    text.set_bank(bank, None, ngrams)
    out = text.encode(torch.tensor([[1, 3], [1, 0]]))
    assert out.shape == (2, 2, 4)
    # texts 1 and 3 have different vectors but identical n-grams: they still differ
    assert not torch.allclose(out[0, 0], out[0, 1])
    torch.testing.assert_close(out[0, 0], out[1, 0])  # the same text, the same features
    # without n-grams the encoding is the sentence-vector path alone
    torch.testing.assert_close(text.encode(torch.tensor([0]))[0], text(bank[:1])[0])
    flat, offsets, weights = text.ngram_bags(torch.tensor([1, 0, 2]))
    assert flat.tolist() == [1, 2, 3] and offsets.tolist() == [0, 2, 2]
    torch.testing.assert_close(weights, torch.tensor([2 ** -0.5, 2 ** -0.5, 1.0]))
    with pytest.raises(ValueError, match="n-gram ids must be given"):
        text.set_bank(bank, None, None)


def test_wide_term_starts_at_zero_and_learns_a_word():
    torch.manual_seed(0)
    tasks = (TaskSpec("intent", type="multiclass", n_classes=3), TaskSpec("ok"))
    head = TableHead(tasks, text_dim=4, n_numeric=0, id_sizes={}, cfg=CFG, wide_buckets=20)
    x = torch.randn(2, 4)
    bags = (torch.tensor([5, 7, 5]), torch.tensor([0, 2]), torch.ones(3))
    deep = head(x, torch.zeros(2, 0), {})
    both = head(x, torch.zeros(2, 0), {}, bags)
    for t in ("intent", "ok"):  # zero-initialised: the wide term adds nothing at first
        torch.testing.assert_close(deep[t], both[t])
    assert both["intent"].shape == (2, 3) and both["ok"].shape == (2,)
    with torch.no_grad():
        head.wide.weight[5] = torch.tensor([1.0, 0.0, 0.0, 2.0])  # n-gram 5: class 0, ok +2
    moved = head(x, torch.zeros(2, 0), {}, bags)
    torch.testing.assert_close(moved["ok"] - deep["ok"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(moved["intent"][:, 0] - deep["intent"][:, 0],
                               torch.tensor([1.0, 1.0]))


def test_valid_score_is_the_mean_signed_relative_gain():
    from shopmtl.joint.train import valid_score

    types = {"click": "binary", "demand": "quantile", "intent": "multiclass"}
    first = {"click": 0.70, "demand": 0.80, "intent": 0.50}
    # click +10 %, demand WAPE 0.80 -> 0.60 is 25 % better, intent -10 %
    now = {"click": 0.77, "demand": 0.60, "intent": 0.45}
    assert valid_score(now, first, types) == pytest.approx((0.10 + 0.25 - 0.10) / 3)
    assert valid_score(first, first, types) == 0.0


def test_vector_term_is_a_linear_map_of_the_frozen_sentence_vector():
    """``wide_vector``: each task's logit gets a zero-started linear term on the raw bank
    vector; ``run`` feeds it the bank rows of the batch's texts."""
    torch.manual_seed(0)
    tasks = (TaskSpec("intent", type="multiclass", n_classes=3), TaskSpec("ok"))
    text = SharedText(width=3, cfg=CFG, ngram_buckets=50)
    bank = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    text.set_bank(bank, None, torch.tensor([[0, 0], [1, 2], [3, 0]]))
    head = TableHead(tasks, text_dim=4, n_numeric=0, id_sizes={}, cfg=CFG, wide_buckets=50,
                     vector_width=3)
    plain = TableHead(tasks, text_dim=4, n_numeric=0, id_sizes={}, cfg=CFG, wide_buckets=50)
    plain.load_state_dict({k: v for k, v in head.state_dict().items()
                           if not k.startswith("vector.")})
    idx = torch.tensor([1, 2, 0])
    before = head.run(text, idx, torch.zeros(3, 0), {})
    ref = plain.run(text, idx, torch.zeros(3, 0), {})
    for t in ("intent", "ok"):  # zero-initialised: nothing changes at first
        torch.testing.assert_close(before[t], ref[t])
    with torch.no_grad():
        head.vector.weight[3] = torch.tensor([1.0, 0.0, -1.0])  # "ok" += v0 - v2
    after = head.run(text, idx, torch.zeros(3, 0), {})
    torch.testing.assert_close(after["ok"] - ref["ok"], torch.tensor([-2.0, -1.0, 0.0]))
    torch.testing.assert_close(after["intent"], ref["intent"])


def test_shared_ids_add_the_rec_row_and_train_it():
    """An id shared with the rec model (``model.share_ids``) is its own row plus the rec
    table's row of the same entity; -1 (not in the rec vocabulary) leaves the own row alone,
    and the loss reaches the borrowed rows, which are not in the head's state dict."""
    from shopmtl.joint.model import RankHead

    torch.manual_seed(0)
    head = RankHead(TaskSpec("relevance", type="ranking"), 4, {"item": 4}, CFG)
    table = torch.nn.Embedding(10, CFG.id_dim)
    head.share({"item": torch.tensor([-1, 7, -1, 2])})
    head.bind(table)
    ids = torch.tensor([[1, 2], [3, 0]])
    v = head.id_vectors({"item": ids})[0]
    own = head.ids["item"].weight
    torch.testing.assert_close(v[0, 0], own[1] + table.weight[7])
    torch.testing.assert_close(v[0, 1], own[2])  # -1: its own row only
    torch.testing.assert_close(v[1, 0], own[3] + table.weight[2])
    v.sum().backward()
    touched = (table.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == [2, 7]
    assert "shared_rows_item" in head.state_dict()
    assert not any(k.startswith("_table") for k in head.state_dict())
    with pytest.raises(ValueError, match="rows"):
        head.share({"item": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="id_dim"):
        head.bind(torch.nn.Embedding(10, CFG.id_dim + 1))
