"""What the real-data sources of the joint run share: where the datasets are, a strict CSV
reader, a deterministic stratified split and the settings of the text baselines (their metrics
are ``shopmtl.metrics``).

Error messages name the file, the data row and the CSV line, the column and the reason, never a
cell's value: utterances and reviews are customer text (the convention of ``ingest.py``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shopmtl.data.ingest import DataError
from shopmtl.deps import require

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import TfidfVectorizer

REPO_ROOT = Path(__file__).resolve().parents[4]
ENV_DATASETS = "SHOPMTL_DATASETS"
FRACTIONS = (0.7, 0.15, 0.15)  # train, valid, test


def datasets_dir() -> Path:
    """The folder holding one sub-folder per dataset: ``$SHOPMTL_DATASETS`` if set, else
    ``shared/datasets`` beside the repository (where CI checks them out)."""
    env = os.environ.get(ENV_DATASETS, "").strip()
    return Path(env) if env else REPO_ROOT.parent / "shared" / "datasets"


def dataset_file(directory: Path | str | None, dataset: str, file_name: str) -> Path:
    """``directory/file_name`` (``directory`` defaults to ``datasets_dir()/dataset``); a missing
    file raises FileNotFoundError naming the expected path and how to point elsewhere."""
    folder = Path(directory) if directory is not None else datasets_dir() / dataset
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: expected file {path} not found; pass the dataset directory to the "
            f"source or set {ENV_DATASETS} to the folder that holds '{dataset}/'"
        )
    return path


@dataclass(frozen=True)
class Table:
    """A CSV read as strings, column-wise. ``lines[i]``: the CSV line where data row i starts
    (header = line 1; a quoted newline makes a record span several lines)."""

    path: Path
    columns: dict[str, list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, row: int, column: str | None = None) -> str:
        """'file, row r (line l), column c': the place of a bad cell, for error messages."""
        col = f", column '{column}'" if column is not None else ""
        return f"{self.path}: data row {row + 1} (line {self.lines[row]}){col}"


def read_csv(path: Path, required: Sequence[str]) -> Table:
    """Every row of ``path`` (UTF-8, header row) as strings; only ``required`` columns kept.

    The csv module, not a line split: quoted cells may hold newlines (Bitext responses).
    A missing column, or a row with the wrong number of fields, raises DataError.
    """
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; the header has {header}"
            )
        pos = [header.index(c) for c in required]
        cols: list[list[str]] = [[] for _ in required]
        lines: list[int] = []
        start = reader.line_num + 1
        for record in reader:
            if len(record) != len(header):
                raise DataError(
                    f"{path}: data row {len(lines) + 1} (line {start}) has {len(record)} "
                    f"fields, the header has {len(header)}"
                )
            for out, p in zip(cols, pos, strict=True):
                out.append(record[p])
            lines.append(start)
            start = reader.line_num + 1
    return Table(path, dict(zip(required, cols, strict=True)), lines)


def stratified_split(strata: Sequence[str], seed: int = 0,
                     fractions: tuple[float, float, float] = FRACTIONS
                     ) -> dict[str, np.ndarray]:
    """Row indices (sorted) of train / valid / test, stratified by ``strata``.

    Within each stratum the rows are ordered by a seeded random key (a function of the row
    index and the seed only, so the same file gives the same split) and cut at the fractions.
    Every stratum with at least one row has one in train, so a label seen in valid or test is
    seen in train (a rare class cannot vanish from training the way an unstratified cut can).
    """
    n = len(strata)
    key = np.random.default_rng(seed).random(n)
    by: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        by.setdefault(s, []).append(i)
    out: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for s in sorted(by):
        idx = np.asarray(by[s])
        idx = idx[np.argsort(key[idx], kind="stable")]
        n_train = max(1, round(fractions[0] * len(idx)))
        n_valid = round(fractions[1] * len(idx))
        out["train"] += idx[:n_train].tolist()
        out["valid"] += idx[n_train:n_train + n_valid].tolist()
        out["test"] += idx[n_train + n_valid:].tolist()
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def one_thread() -> AbstractContextManager:
    """BLAS / OpenMP limited to one thread for the baseline fits: these models are small, and
    lbfgs on a busy 2-core machine ran 10x slower with two contending threads than with one."""
    # a scikit-learn dependency
    return require("threadpoolctl", "text", "the text baselines").threadpool_limits(1)


def tfidf() -> TfidfVectorizer:
    """The text features of the text baselines: word 1-2 grams, sublinear tf (sklearn is
    imported here, only when a baseline runs)."""
    require("sklearn", "text", "the text baselines")
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
