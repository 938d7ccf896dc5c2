"""Scoring rows with a saved zoo model: evaluation (labels needed) and prediction (labels not).

Files (``shopmtl predict``/``evaluate``) and in-memory rows (``shopmtl.load(...).predict``) go
through the same reader rules and the same ``score_rows``; ``shopmtl.modeldir`` picks the model
kind."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.config import ConfigError
from shopmtl.data.dataset import TensorTable
from shopmtl.data.encoders import Encoded
from shopmtl.data.ingest import BadRowLog, DataError, is_csv, parse_table, read_chunks
from shopmtl.data.schema import Schema
from shopmtl.train.evaluate import metrics_by_scenario, predict_table
from shopmtl.train.trainer import load_model_dir


class OptionError(ConfigError, DataError):
    """A command-line option (or the Python argument behind it) asks for what the model cannot
    give, e.g. ``--task`` naming a task it lacks: a usage error like a bad config (ConfigError,
    exit 2), and a DataError still for callers that catch those around scoring."""


def evaluate_file(model_dir: str | Path, path: str | Path) -> dict:
    return evaluate_rows(*load_model_dir(model_dir), path)


def evaluate_rows(model, cfg, schema: Schema, encoders, path: str | Path) -> dict:
    """``evaluate_file`` with a loaded model: metrics per task x scenario of a labelled file."""
    import dataclasses

    schema = dataclasses.replace(schema, slices=())  # slice columns are not needed here
    # metrics over silently fewer rows would mislead: any bad row stops evaluation
    log = BadRowLog("fail", 0.0)
    parts = [encoders.transform(p) for p in read_chunks(path, schema, cfg.data.chunk_rows, log)]
    if not parts:
        raise DataError(f"{Path(path).name}: no usable rows")
    table = TensorTable(Encoded.concat(parts))
    return metrics_by_scenario(schema, table, predict_table(model, table))


def read_for_predict(path: str | Path) -> tuple[pa.Table, bool]:
    """A data file as ``shopmtl predict`` reads it: a CSV with every column as text (parsed
    by the ingest rules, as in training), a Parquet file as typed columns. Returns the table and
    whether it is text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if is_csv(path):
        header = path.open().readline().strip().split(",")
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True))
        return table, True
    return pq.read_table(path), False


ROWS = "rows"  # how errors name in-memory rows: "rows: row 3, column 'price': ..." (from 0)


def rows_table(rows: Any) -> pa.Table:
    """In-memory rows as the Arrow table a Parquet file would give: a ``pyarrow.Table``, a
    pandas DataFrame (duck-typed: pandas is not a dependency) or a list of dicts (one per row,
    a missing key is a null)."""
    if isinstance(rows, pa.Table):
        return rows
    try:
        if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
            return pa.Table.from_pandas(rows, preserve_index=False)
        if hasattr(rows, "to_arrow"):  # a polars DataFrame, a pyarrow-backed frame
            return rows.to_arrow()
        if isinstance(rows, list | tuple) and all(isinstance(r, dict) for r in rows):
            return _dicts_table(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{ROWS}: a column holds values of different types ({e})") from None
    raise DataError(f"{ROWS}: expected a pyarrow Table, a pandas DataFrame, a list of dicts or "
                    f"a file path, got {type(rows).__name__}")


def _dicts_table(rows: list[dict] | tuple[dict, ...]) -> pa.Table:
    """One column per key; a column mixing types (``"cheap"`` among prices) is kept as text, so
    the ingest rules name the bad cell's row and column as they do in a CSV file."""
    columns = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(key) for r in rows]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[key] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def score_rows(model, schema: Schema, encoders, table: pa.Table, text: bool, name: str,
               first: int, tasks: list[str] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The one scoring path of a zoo model, for files and in-memory rows alike: ``table`` is
    checked and parsed by the ingest rules (``text``: every cell is text, as in a CSV file),
    any bad row stops it (named ``name`` and its line or row, numbered from ``first``), the
    rows are encoded with the model's encoders and scored. Returns each row's line number and
    the wanted tasks' probabilities in row order."""
    import dataclasses

    wanted = list(tasks or schema.task_names)
    unknown = [t for t in wanted if t not in schema.task_names]
    if unknown:
        raise OptionError(f"--task: unknown task(s) {unknown}; this model has "
                        f"{list(schema.task_names)}")
    # labels are optional when predicting: absent columns become nulls, none is required
    loose = dataclasses.replace(schema, slices=(), tasks=tuple(
        dataclasses.replace(t, required=False) for t in schema.tasks))
    for col in [t.source for t in schema.tasks] + [t.oracle_column for t in schema.tasks
                                                    if t.oracle_column]:
        if col not in table.column_names:
            table = table.append_column(col, pa.nulls(table.num_rows, pa.string()))
    if schema.group and schema.group not in table.column_names:
        table = table.append_column(schema.group, pa.nulls(table.num_rows, pa.string()))
    needed = [c for c in loose.source_columns() if c not in table.column_names]
    if needed:
        raise DataError(f"{name}: missing column(s) {needed}")
    lines = np.arange(first, first + table.num_rows, dtype=np.int64)
    parsed, bad = parse_table(table.select(loose.source_columns()), loose, lines, name, text)
    if bad:
        raise DataError(f"bad row: {bad[0].describe()} ({len(bad)} bad rows in all)")
    preds = predict_table(model, TensorTable(encoders.transform(parsed)))
    return parsed.lines, {t: np.asarray(preds[t]) for t in wanted}


def predict_rows(model, schema: Schema, encoders, path: str | Path, out: str | Path,
                 tasks: list[str] | None = None) -> int:
    """``shopmtl predict`` of a zoo model (the zoo model of a joint checkpoint too): write
    ``line, <task>...`` probabilities of every row of a CSV/Parquet file; label columns may be
    absent, a bad row fails. Returns the number of rows."""
    path = Path(path)
    table, text = read_for_predict(path)
    lines, preds = score_rows(model, schema, encoders, table, text, path.name,
                              2 if text else 1, tasks)
    out = Path(out)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["line", *preds])
        cols = list(preds.values())
        for i, ln in enumerate(lines):
            w.writerow([int(ln), *(f"{c[i]:.6f}" for c in cols)])
    return len(lines)


def predict_in_memory(model, schema: Schema, encoders, rows: Any,
                      tasks: list[str] | None = None) -> pa.Table:
    """``shopmtl.load(...).predict`` of zoo rows: a file path is read as ``shopmtl predict``
    reads it, in-memory rows (``rows_table``) as a Parquet file; the same ``score_rows``
    either way. One float column per task, in row order."""
    if isinstance(rows, str | Path):
        table, text = read_for_predict(rows)
        name, first = Path(rows).name, (2 if text else 1)
    else:
        table, text, name, first = rows_table(rows), False, ROWS, 0
    _lines, preds = score_rows(model, schema, encoders, table, text, name, first, tasks)
    return pa.table({t: pa.array(p, pa.float64()) for t, p in preds.items()})
