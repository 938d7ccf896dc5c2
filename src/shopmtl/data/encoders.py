"""Feature encoders, fit on the training split only (scikit-learn style: learned attributes end in
``_``), saved as JSON with the checkpoint (never pickle).

Id 0 of every categorical vocabulary is the OOV bucket: unseen, rare (below ``min_count``) and
missing values all map there, so serving never fails on a new category.

Encoding is numpy and pyarrow: ``Encoded`` holds numpy arrays, made tensors by the training and
PyTorch paths (``data.dataset.TensorTable``). torch is imported only to write content matrices
(``content_tensors``, ``save``), so a torch-free process (an ONNX bundle's server) imports this.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shopmtl.data.content import ContentEncoder
from shopmtl.data.ingest import Parsed
from shopmtl.data.schema import CONTENT_KINDS, FeatureSpec, Schema

if TYPE_CHECKING:
    import torch


class CategoricalEncoder:
    """String values -> ids 1..V by training frequency; 0 = OOV. ``buckets`` > 0 hashes instead."""

    def __init__(self, min_count: int = 1, buckets: int = 0) -> None:
        self.min_count = min_count
        self.buckets = buckets
        self._counts: Counter = Counter()

    def partial_fit(self, values: pa.Array) -> CategoricalEncoder:
        if self.buckets:
            return self
        vc = pc.value_counts(values.drop_null())
        self._counts.update(
            dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))
        )
        return self

    def finish(self) -> CategoricalEncoder:
        if not self.buckets:
            kept = [(v, c) for v, c in self._counts.items() if c >= self.min_count]
            kept.sort(key=lambda vc: (-vc[1], vc[0]))  # most frequent first: stable, readable
            self.vocabulary_ = [v for v, _ in kept]
            self._lookup = pa.array(self.vocabulary_, pa.string())
        self._counts = Counter()
        return self

    @property
    def size(self) -> int:
        """Rows needed in an embedding table (including the OOV row 0)."""
        return self.buckets + 1 if self.buckets else len(self.vocabulary_) + 1

    def transform(self, values: pa.Array) -> np.ndarray:
        if self.buckets:
            uniq = pc.unique(values.drop_null())
            ids = [_stable_hash(v, self.buckets) + 1 for v in uniq.to_pylist()]
            pos = pc.index_in(values, value_set=uniq).to_numpy(zero_copy_only=False)
            pos = np.nan_to_num(np.asarray(pos, np.float64), nan=-1).astype(np.int64)
            table = np.asarray([0, *ids], np.int64)
            return table[pos + 1]
        idx = pc.index_in(values, value_set=self._lookup).to_numpy(zero_copy_only=False)
        return np.nan_to_num(np.asarray(idx, np.float64), nan=-1).astype(np.int64) + 1

    def to_json(self) -> dict:
        d: dict = {"type": "categorical", "min_count": self.min_count, "buckets": self.buckets}
        if not self.buckets:
            d["vocabulary"] = self.vocabulary_
        return d

    @classmethod
    def from_json(cls, d: dict) -> CategoricalEncoder:
        enc = cls(d["min_count"], d["buckets"])
        if not enc.buckets:
            enc.vocabulary_ = list(d["vocabulary"])
            enc._lookup = pa.array(enc.vocabulary_, pa.string())
        return enc


def _stable_hash(value: str, buckets: int) -> int:
    # Python's hash() is salted per process; blake2b is stable across runs and machines
    return (
        int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % buckets
    )


F32_REACH = float(np.finfo(np.float32).max) / 2


class NumericEncoder:
    """Standardises to zero mean, unit variance with moments from the training split."""

    def __init__(self) -> None:
        self._n = 0
        self._sum = 0.0
        self._sumsq = 0.0

    def partial_fit(self, x: np.ndarray) -> NumericEncoder:
        self._n += len(x)
        self._sum += float(np.sum(x))
        self._sumsq += float(np.sum(np.square(x)))
        return self

    def finish(self) -> NumericEncoder:
        n = max(self._n, 1)
        self.mean_ = self._sum / n
        var = max(self._sumsq / n - self.mean_**2, 0.0)
        self.std_ = float(np.sqrt(var)) if var > 1e-12 else 1.0
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean_) / self.std_).astype(np.float32)

    def bounds(self) -> tuple[float, float]:
        """The values whose standardised value is a finite float32 (half the float32 range:
        room for rounding); the reader makes a value outside a bad row."""
        reach = self.std_ * F32_REACH
        return self.mean_ - reach, self.mean_ + reach

    def to_json(self) -> dict:
        return {"type": "numeric", "mean": self.mean_, "std": self.std_}

    @classmethod
    def from_json(cls, d: dict) -> NumericEncoder:
        enc = cls()
        enc.mean_, enc.std_ = float(d["mean"]), float(d["std"])
        return enc


def pad_sequences(ids_flat: np.ndarray, offsets: np.ndarray, max_len: int) -> np.ndarray:
    """Ragged ids (flat + offsets) -> [n, max_len], keeping the most recent (last) items."""
    lengths = np.diff(offsets)
    take = np.minimum(lengths, max_len)
    start = offsets[:-1] + lengths - take
    pos = np.arange(max_len)
    idx = start[:, None] + pos[None, :]
    valid = pos[None, :] < take[:, None]
    if len(ids_flat) == 0:
        return np.zeros((len(lengths), max_len), np.int64)
    out = ids_flat[np.minimum(idx, len(ids_flat) - 1)]
    return np.where(valid, out, 0).astype(np.int64)


@dataclass
class Encoded:
    """Model-ready arrays for a chunk or a whole split."""

    cat: np.ndarray  # int64 [n, Fc]
    num: np.ndarray  # float32 [n, Fn]
    seq: np.ndarray  # int64 [n, Fs, L]
    scenario: np.ndarray  # int64 [n]
    labels: np.ndarray  # float32 [n, T]
    mask: np.ndarray  # bool [n, T]
    oracle: np.ndarray | None  # float32 [n, T]
    group: np.ndarray  # int64 [n]
    content: np.ndarray | None = None  # int64 [n, Fx]: content rows (0 = no content)
    slices: np.ndarray | None = None  # bool [n, K]: evaluation slice membership

    def __len__(self) -> int:
        return len(self.scenario)

    @staticmethod
    def concat(parts: list[Encoded]) -> Encoded:
        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return Encoded(**{k: cat(k) for k in Encoded.__dataclass_fields__})


class Encoders:
    """One encoder per feature of a schema; fit on parsed training chunks, then frozen."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.categorical: dict[str, CategoricalEncoder] = {}
        self.numeric: dict[str, NumericEncoder] = {}
        self.sequence_vocab: dict[str, CategoricalEncoder] = {}  # own vocab of a sequence
        # content features read their catalog when fit (not the training rows)
        self.content = {f.name: ContentEncoder(f) for f in schema.content_features}
        self._groups: dict[str, int] = {}

        def buckets(f: FeatureSpec) -> int:  # `buckets` alone never switches hashing on
            return f.buckets if f.vocab == "hash" else 0

        for f in schema.of_kind("categorical"):
            self.categorical[f.name] = CategoricalEncoder(f.min_count, buckets(f))
        for f in schema.of_kind("numeric"):
            self.numeric[f.name] = NumericEncoder()
        for f in schema.of_kind("sequence"):
            if f.vocab_from is None:
                self.sequence_vocab[f.name] = CategoricalEncoder(f.min_count, buckets(f))

    def partial_fit(self, p: Parsed) -> Encoders:
        for name, enc in self.categorical.items():
            enc.partial_fit(p.categorical[name])
        for name, enc in self.numeric.items():
            enc.partial_fit(p.numeric[name])
        for name, enc in self.sequence_vocab.items():
            enc.partial_fit(pc.list_flatten(p.sequence[name]))
        return self

    def finish(self) -> Encoders:
        for enc in [*self.categorical.values(), *self.sequence_vocab.values()]:
            enc.finish()
        for enc in self.numeric.values():
            enc.finish()
        for content in self.content.values():
            content.fit()
        return self

    def numeric_bounds(self) -> dict[str, tuple[float, float]]:
        """Per numeric feature, the values its encoder can standardise (``read_chunks``'s
        ``bounds``): a file read with these encoders makes a value outside a bad row."""
        return {name: enc.bounds() for name, enc in self.numeric.items()}

    def vocab_size(self, f: FeatureSpec) -> int:
        if f.kind == "categorical":
            return self.categorical[f.name].size
        if f.kind == "sequence":
            return self._seq_encoder(f).size
        if f.kind in CONTENT_KINDS:
            return self.content[f.name].rows  # rows of the content matrices
        raise ValueError(f"feature '{f.name}' has no vocabulary")

    def _seq_encoder(self, f: FeatureSpec) -> CategoricalEncoder:
        return self.categorical[f.vocab_from] if f.vocab_from else self.sequence_vocab[f.name]

    def transform(self, p: Parsed) -> Encoded:
        s = self.schema
        n = p.n
        cats = [
            self.categorical[f.name].transform(p.categorical[f.name])
            for f in s.of_kind("categorical")
        ]
        nums = [self.numeric[f.name].transform(p.numeric[f.name]) for f in s.of_kind("numeric")]
        seqs = []
        for f in s.of_kind("sequence"):
            lists = p.sequence[f.name]
            flat = self._seq_encoder(f).transform(pc.list_flatten(lists))
            offsets = np.asarray(lists.offsets.to_numpy(), np.int64)
            offsets = offsets - offsets[0]
            seqs.append(pad_sequences(flat, offsets, f.max_len))
        max_len = max((f.max_len for f in s.of_kind("sequence")), default=0)
        seq = np.zeros((n, len(seqs), max_len), np.int64)
        for j, a in enumerate(seqs):
            seq[:, j, : a.shape[1]] = a
        rows = [self.content[f.name].transform(p.content[f.name]) for f in s.content_features]
        return Encoded(
            content=np.stack(rows, 1) if rows else np.zeros((n, 0), np.int64),
            slices=p.slices if p.slices is not None else np.zeros((n, 0), bool),
            cat=np.stack(cats, 1) if cats else np.zeros((n, 0), np.int64),
            num=np.stack(nums, 1) if nums else np.zeros((n, 0), np.float32),
            seq=seq,
            scenario=p.scenario,
            labels=p.labels,
            mask=p.mask,
            oracle=p.oracle,
            group=self._group_ids(p.group, n),
        )

    def _group_ids(self, group: pa.Array | None, n: int) -> np.ndarray:
        """Stable integer ids for the GAUC group (not a model input; never saved)."""
        if group is None:
            return np.zeros(n, np.int64)
        uniq = pc.unique(group.drop_null())
        ids = []
        for v in uniq.to_pylist():
            ids.append(self._groups.setdefault(v, len(self._groups) + 1))
        pos = pc.index_in(group, value_set=uniq).to_numpy(zero_copy_only=False)
        pos = np.nan_to_num(np.asarray(pos, np.float64), nan=-1).astype(np.int64)
        return np.asarray([0, *ids], np.int64)[pos + 1]

    def to_json(self) -> dict:
        return {
            "categorical": {k: e.to_json() for k, e in self.categorical.items()},
            "numeric": {k: e.to_json() for k, e in self.numeric.items()},
            "sequence_vocab": {k: e.to_json() for k, e in self.sequence_vocab.items()},
            "content": {k: e.to_json() for k, e in self.content.items()},
        }

    def content_tensors(self) -> dict[str, torch.Tensor]:
        """Every content matrix as ``<feature>.<array>`` -> tensor (saved as safetensors)."""
        return {f"{name}.{k}": t for name, e in self.content.items()
                for k, t in e.tensors().items()}

    def save(self, path: str | Path) -> None:
        """JSON at ``path``; content matrices (if any) in ``<stem>.content.safetensors``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        if self.content:
            from safetensors.torch import save_file

            save_file(self.content_tensors(), str(_content_path(path)))

    @classmethod
    def from_json(
        cls, schema: Schema, d: dict, content: dict[str, torch.Tensor] | None = None
    ) -> Encoders:
        """``content``: the tensors of ``content_tensors`` (needed when the schema has content
        features)."""
        enc = cls(schema)
        try:
            enc.categorical = {
                k: CategoricalEncoder.from_json(v) for k, v in d["categorical"].items()
            }
            enc.numeric = {k: NumericEncoder.from_json(v) for k, v in d["numeric"].items()}
            enc.sequence_vocab = {
                k: CategoricalEncoder.from_json(v) for k, v in d["sequence_vocab"].items()
            }
            saved = d.get("content", {})
            if set(saved) != set(enc.content):
                raise ValueError("encoders: the content features do not match the schema's")
            for f in schema.content_features:
                prefix = f"{f.name}."
                mine = {k.removeprefix(prefix): v for k, v in (content or {}).items()
                        if k.startswith(prefix)}
                enc.content[f.name] = ContentEncoder.from_json(f, saved[f.name], mine)
        except (KeyError, TypeError) as e:
            raise ValueError(f"encoders: malformed encoder file (missing {e})") from None
        expected = {f.name for f in schema.of_kind("categorical")}
        if set(enc.categorical) != expected:
            raise ValueError("encoders: the encoder file does not match the schema's features")
        return enc

    @classmethod
    def load(cls, schema: Schema, path: str | Path) -> Encoders:
        path = Path(path)
        content = None
        if schema.content_features:
            from safetensors.torch import load_file

            content = load_file(str(_content_path(path)))
        return cls.from_json(schema, json.loads(path.read_text()), content)


def _content_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.content.safetensors")
