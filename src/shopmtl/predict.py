"""Scoring files with a saved model: evaluation (labels needed) and prediction (labels not)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.data.dataset import TensorTable
from shopmtl.data.encoders import Encoded
from shopmtl.data.ingest import BadRowLog, DataError, is_csv, parse_table, read_chunks
from shopmtl.data.schema import Schema
from shopmtl.train.evaluate import metrics_by_scenario, predict_table
from shopmtl.train.trainer import load_model_dir


def evaluate_file(model_dir: str | Path, path: str | Path) -> dict:
    import dataclasses

    model, cfg, schema, encoders = load_model_dir(model_dir)
    schema = dataclasses.replace(schema, slices=())  # slice columns are not needed here
    # metrics over silently fewer rows would mislead: any bad row stops evaluation
    log = BadRowLog("fail", 0.0)
    parts = [encoders.transform(p) for p in read_chunks(path, schema, cfg.data.chunk_rows, log)]
    if not parts:
        raise DataError(f"{Path(path).name}: no usable rows")
    table = TensorTable(Encoded.concat(parts))
    return metrics_by_scenario(schema, table, predict_table(model, table))


def _read_for_predict(path: Path, schema: Schema) -> tuple[pa.Table, bool]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if is_csv(path):
        header = path.open().readline().strip().split(",")
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True))
        return table, True
    return pq.read_table(path), False


def predict_file(model_dir: str | Path, path: str | Path, out: str | Path,
                 tasks: list[str] | None = None) -> int:
    """Write ``line, <task>...`` probabilities; label columns may be absent. Bad rows fail.
    (A joint model directory is ``shopmtl.joint.predict``'s; ``shopmtl predict`` picks.)"""
    model, _cfg, schema, encoders = load_model_dir(model_dir)
    return predict_rows(model, schema, encoders, path, out, tasks)


def predict_rows(model, schema: Schema, encoders, path: str | Path, out: str | Path,
                 tasks: list[str] | None = None) -> int:
    """``predict_file`` with a loaded model (the zoo model of a joint checkpoint too)."""
    import dataclasses

    path = Path(path)
    wanted = list(tasks or schema.task_names)
    unknown = [t for t in wanted if t not in schema.task_names]
    if unknown:
        raise DataError(f"--task: unknown task(s) {unknown}; this model has "
                        f"{list(schema.task_names)}")
    # labels are optional when predicting: absent columns become nulls, none is required
    loose = dataclasses.replace(schema, slices=(), tasks=tuple(
        dataclasses.replace(t, required=False) for t in schema.tasks))
    table, text = _read_for_predict(path, schema)
    for col in [t.source for t in schema.tasks] + [t.oracle_column for t in schema.tasks
                                                    if t.oracle_column]:
        if col not in table.column_names:
            table = table.append_column(col, pa.nulls(table.num_rows, pa.string()))
    if schema.group and schema.group not in table.column_names:
        table = table.append_column(schema.group, pa.nulls(table.num_rows, pa.string()))
    needed = [c for c in loose.source_columns() if c not in table.column_names]
    if needed:
        raise DataError(f"{path.name}: missing column(s) {needed}")
    first = 2 if text else 1
    lines = np.arange(first, first + table.num_rows, dtype=np.int64)
    parsed, bad = parse_table(table.select(loose.source_columns()), loose, lines, path.name, text)
    if bad:
        raise DataError(f"bad row: {bad[0].describe()} ({len(bad)} bad rows in all)")
    preds = predict_table(model, TensorTable(encoders.transform(parsed)))
    out = Path(out)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["line", *wanted])
        cols = [preds[t] for t in wanted]
        for i, ln in enumerate(parsed.lines):
            w.writerow([int(ln), *(f"{c[i]:.6f}" for c in cols)])
    return parsed.n
