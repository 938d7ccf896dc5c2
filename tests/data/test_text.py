"""The real offline MiniLM (no mocks): local path only, normalised vectors that mean something,
and an on-disk cache that makes the second call embed nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shopmtl.data import text

TITLES = ["red cotton shirt", "crimson cotton t-shirt", "steel kitchen knife", "red cotton shirt"]


def test_minilm_embeds_and_the_cache_serves_the_second_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = text.embed_texts(TITLES, cache_dir=tmp_path)
    assert first.shape == (4, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first[0], first[3])  # one text, one vector
    sim = first @ first.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # shirts are closer to each other than to a knife
    enc_id = text.encoder_id("minilm", 32)
    files = text.TextCache(tmp_path, enc_id).files
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert b"cotton" not in files[0].read_bytes()  # digests and vectors, never the text

    def no_model(*args: object) -> np.ndarray:
        raise AssertionError("the cache should have served every text")

    monkeypatch.setattr(text, "_embed", no_model)
    second = text.embed_texts(list(reversed(TITLES)), cache_dir=tmp_path)
    np.testing.assert_array_equal(second, first[::-1])


def test_only_local_encoders_are_accepted(tmp_path: Path) -> None:
    assert (text.encoder_path("minilm") / "config.json").is_file()
    assert text.encoder_width("minilm") == 384
    with pytest.raises(ValueError, match="not a local model directory"):
        text.encoder_path("sentence-transformers/all-MiniLM-L6-v2")  # a hub id is refused
    with pytest.raises(ValueError, match="not a local model directory"):
        text.encoder_path(str(tmp_path))


def test_tokenize_pads_to_max_tokens() -> None:
    ids, mask = text.tokenize(["red cotton shirt", "a much longer title " * 10], "minilm", 8)
    assert ids.shape == mask.shape == (2, 8)
    assert mask[0].sum() < 8 and mask[1].sum() == 8


def test_the_cache_index_sees_new_parts_and_survives_a_cleared_cache(tmp_path: Path) -> None:
    """Lookups read only the rows they need through a per-process index of the parts: a part
    written later (by another process or cache object) is found, vectors come back exactly,
    and a cache folder emptied under a running process gives misses, not an error."""
    import shutil

    import numpy as np

    a, b = text.TextCache(tmp_path, "enc"), text.TextCache(tmp_path, "enc")
    keys = [bytes([i]) * 32 for i in range(5)]
    vecs = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    a.add(keys[:3], vecs[:3])
    assert set(b.lookup(keys)) == set(keys[:3])  # indexed now
    b.add(keys[3:], vecs[3:])  # a new part, after the index was built
    found = a.lookup(keys)
    assert set(found) == set(keys)
    for k, v in zip(keys, vecs, strict=True):
        np.testing.assert_array_equal(found[k], v)
    shutil.rmtree(a.dir)
    assert a.lookup(keys) == {}
    a.add(keys[:1], vecs[:1])  # and a cache rebuilt after it is read again
    np.testing.assert_array_equal(b.lookup(keys)[keys[0]], vecs[0])
