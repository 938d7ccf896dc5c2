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
