"""Content features from a catalog: key -> content row, and the content matrix of each feature.

A ``ContentEncoder`` reads its feature's side table (Parquet or CSV) once, when the encoders are
fit, and keeps a key -> row map plus one matrix whose row 0 is the "no content" row (a zero vector,
a blank image): a key that is not in the catalog, or a catalog row with an empty cell, maps
there, never to an error. Batches carry only the row index (int64 [B, Fx]); the model holds the
matrices (``nn.content``) and gathers from them, so 4M training rows never mean 4M x 384 floats.

A malformed catalog (missing column, empty or duplicate key, a NaN in a vector, an image of the
wrong size) raises a ``DataError`` naming the file, the column and the row; cell values are never
echoed (titles and ids may be sensitive). Saved with the model as JSON (the keys) plus
safetensors (the matrices), never pickle.

torch is imported only where a matrix becomes a tensor (``tensors``): reading and applying an
encoder is numpy and pyarrow, so a torch-free process (an ONNX bundle's server) imports this.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.data.ingest import DataError, _as_string, is_csv
from shopmtl.data.schema import FeatureSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _where(path: Path, row: int) -> str:
    # rows are 1-based; a CSV line counts the header as line 1 (as bad-row messages do)
    return f"line {row + 2}" if is_csv(path) else f"row {row + 1}"


def read_catalog(spec: FeatureSpec) -> tuple[Path, list[str], pa.Array]:
    """(path, keys, content column) of a feature's catalog, keys validated (present, unique)."""
    path = Path(spec.table or "")
    what = f"catalog of {spec.kind} feature '{spec.name}'"
    if not path.is_file():
        raise DataError(f"{what}: file not found: {path}")
    key, col = spec.key or spec.name, spec.content_column
    try:
        if is_csv(path):
            with path.open(encoding="utf-8-sig") as f:
                names = next(csv.reader([f.readline()]), [])
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in names}, strings_can_be_null=True,
                null_values=[""], include_columns=[c for c in (key, col) if c in names]))
        else:
            names = pq.ParquetFile(path).schema_arrow.names
            table = pq.read_table(path, columns=[c for c in (key, col) if c in names])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path.name}: the {what} cannot be read ({type(e).__name__})") from None
    missing = [c for c in (key, col) if c not in names]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {missing} ({what}); the file has {names}")
    keys = _as_string(table.column(key))
    nulls = np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))
    if len(nulls):
        raise DataError(f"{path.name}: {_where(path, int(nulls[0]))}, column '{key}': empty key "
                        f"({what})")
    key_list = keys.to_pylist()
    first: dict[str, int] = {}
    for i, k in enumerate(key_list):
        j = first.setdefault(k, i)
        if j != i:
            raise DataError(f"{path.name}: {_where(path, i)}, column '{key}': duplicate key (first "
                            f"at {_where(path, j)}) ({what})")
    column = table.column(col).combine_chunks()
    return path, key_list, column


def _image_matrix(spec: FeatureSpec, path: Path, column: pa.Array) -> np.ndarray:
    h, w = spec.image_size
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
            or pa.types.is_fixed_size_binary(column.type)):
        raise DataError(f"{path.name}: column '{spec.content_column}' must hold raw image bytes "
                        f"(binary), not {column.type} (image feature '{spec.name}')")
    out = np.zeros((len(column) + 1, 3, h, w), np.uint8)
    for i, cell in enumerate(column.to_pylist()):
        if cell is None:
            continue  # no image: the blank row
        if len(cell) != h * w * 3:
            raise DataError(
                f"{path.name}: {_where(path, i)}, column '{spec.content_column}': image of "
                f"{len(cell)} bytes, expected {h}x{w}x3 = {h * w * 3} (image_size {[h, w]})")
        out[i + 1] = np.frombuffer(cell, np.uint8).reshape(h, w, 3).transpose(2, 0, 1)
    return out


def _vector_matrix(spec: FeatureSpec, path: Path, column: pa.Array) -> np.ndarray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.split_pattern(column, spec.sep)  # CSV: "0.1|0.2|..."
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise DataError(f"{path.name}: column '{spec.content_column}' must hold lists of floats, "
                        f"not {column.type} (vector feature '{spec.name}')")
    out = np.zeros((len(column) + 1, spec.dim), np.float32)
    for i, cell in enumerate(column.to_pylist()):
        if cell is None:
            continue
        where = f"{path.name}: {_where(path, i)}, column '{spec.content_column}'"
        if len(cell) != spec.dim:
            raise DataError(f"{where}: vector of length {len(cell)}, expected dim {spec.dim}")
        try:
            vec = np.asarray([np.nan if v is None else float(v) for v in cell], np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: a vector value is not a number") from None
        if not np.isfinite(vec).all():
            raise DataError(f"{where}: NaN, empty or infinite value in a vector")
        out[i + 1] = vec
    return out


class ContentEncoder:
    """One content feature: catalog keys -> rows 1..n (0 = no content) and its matrices.

    Learned attributes (set by ``fit``): ``keys_`` and ``arrays_`` (name -> matrix with n + 1
    rows): ``values`` for frozen text (float32 [n+1, H]), vectors (float32 [n+1, dim]) and
    images (uint8 [n+1, 3, H, W]); ``tokens`` and ``token_mask`` (int64 [n+1, max_tokens]) for
    text fine-tuned with LoRA.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec

    def fit(self, cache_dir: str | Path | None = None) -> ContentEncoder:
        spec = self.spec
        path, keys, column = read_catalog(spec)
        if spec.kind == "image":
            arrays = {"values": _image_matrix(spec, path, column)}
        elif spec.kind == "vector":
            arrays = {"values": _vector_matrix(spec, path, column)}
        else:
            arrays = self._text(path, column, cache_dir)
        self.keys_ = keys
        self.arrays_ = arrays
        self._lookup = pa.array(keys, pa.string())
        log.info("content feature '%s': %d catalog rows", spec.name, len(keys))
        return self

    def _text(self, path: Path, column: pa.Array, cache_dir: str | Path | None
              ) -> dict[str, np.ndarray]:
        from shopmtl.data import text

        spec = self.spec
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{path.name}: column '{spec.content_column}' must hold text, not "
                            f"{column.type} (text feature '{spec.name}')")
        width = text.encoder_width(spec.encoder)
        if spec.dim and spec.dim != width:
            raise DataError(f"text feature '{spec.name}': the encoder gives {width}-dim vectors "
                            f"but dim is {spec.dim}; set dim: {width} (or 0)")
        cells = column.to_pylist()
        present = [i for i, t in enumerate(cells) if t]  # an empty title: the zero row
        texts = [cells[i] for i in present]
        rows = np.asarray(present, np.int64) + 1
        if spec.mode == "lora":
            tokens = np.zeros((len(cells) + 1, spec.max_tokens), np.int64)
            mask = np.zeros_like(tokens)
            if texts:
                tokens[rows], mask[rows] = text.tokenize(texts, spec.encoder, spec.max_tokens)
            return {"tokens": tokens, "token_mask": mask}
        values = np.zeros((len(cells) + 1, width), np.float32)
        if texts:
            values[rows] = text.embed_texts(texts, spec.encoder, spec.max_tokens, cache_dir)
        return {"values": values}

    @property
    def rows(self) -> int:
        """Rows of the content matrices (the catalog plus the no-content row 0)."""
        return len(self.keys_) + 1

    def transform(self, keys: pa.Array) -> np.ndarray:
        """Key strings -> content rows int64 [n]; a key not in the catalog (or null) -> 0."""
        idx = pc.index_in(keys, value_set=self._lookup).to_numpy(zero_copy_only=False)
        return np.nan_to_num(np.asarray(idx, np.float64), nan=-1).astype(np.int64) + 1

    def to_json(self) -> dict:
        return {"type": self.spec.kind, "keys": self.keys_, "arrays": sorted(self.arrays_)}

    def tensors(self) -> dict[str, torch.Tensor]:
        import torch  # the model's copy of the matrices (module docstring: why here)

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays_.items()}

    @classmethod
    def from_json(cls, spec: FeatureSpec, d: dict, tensors: dict[str, torch.Tensor]
                  ) -> ContentEncoder:
        enc = cls(spec)
        missing = [k for k in d["arrays"] if k not in tensors]
        if d.get("type") != spec.kind or missing:
            raise ValueError(f"encoders: content of feature '{spec.name}' does not match the "
                             f"schema (missing arrays {missing})")
        enc.keys_ = list(d["keys"])
        enc.arrays_ = {k: tensors[k].numpy() for k in d["arrays"]}
        enc._lookup = pa.array(enc.keys_, pa.string())
        for k, v in enc.arrays_.items():
            if v.shape[0] != enc.rows:
                raise ValueError(f"encoders: content array '{spec.name}.{k}' has {v.shape[0]} "
                                 f"rows, the catalog {enc.rows}")
        return enc
