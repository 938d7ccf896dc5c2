"""Scoring rows with a saved zoo model: evaluation (labels needed) and prediction (labels not).

Files (``shopmtl predict``/``evaluate``) and in-memory rows (``shopmtl.load(...).predict``) are
read by the reader of training (``data.ingest.read_chunks``: the same parsing rules, line
numbers and bad-row policy), scored chunk by chunk by ``score_chunks`` and, for a file, written
by ``TableWriter`` (CSV, Parquet or JSON lines); ``shopmtl.modeldir`` picks the model kind.

What computes the probabilities is a ``Forward``: encoded rows -> one array per task. A zoo
model's is its PyTorch forward (``torch_forward``, what a ``MultiTaskModel`` passed here
becomes); an exported bundle's is an onnxruntime session (``shopmtl.export.runtime``). Both
go through the same reader and encoders, so an ONNX bundle cannot drift from its source model
in how a row is parsed or encoded, only in the forward, and that is what export measures.

torch is imported only by what needs a PyTorch model or tensors (``torch_forward``, the metrics
of ``evaluate_rows``, ``evaluate_file``'s load): scoring rows with a ``Forward`` that is not
PyTorch (an ONNX bundle's, the service's path) runs in a process that never imports torch.

Row accounting is exact: every data row read is scored or set aside as a bad row (blank lines
are skipped and counted), and ``RowReport`` says how many of each."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.config import ConfigError, DataConfig
from shopmtl.data.encoders import Encoded
from shopmtl.data.ingest import ROWS, BadRowLog, DataError, read_chunks
from shopmtl.data.schema import Schema
from shopmtl.jsonsafe import json_safe

BAD_ROWS = ("fail", "quarantine")
# OUT's extension -> output format; any other extension writes the command's default format
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
           ".ndjson": "jsonl"}
CHUNK_ROWS = DataConfig.chunk_rows  # rows scored at a time where no run config says

__all__ = ["ROWS", "Forward", "RowReport", "TableWriter", "as_forward", "evaluate_file",
           "predict_in_memory", "predict_rows", "quarantine_paths", "read_encoded", "rows_table",
           "score_chunks", "torch_forward"]

# encoded rows -> one float array [n] per task name (probabilities: the task's activation)
Forward = Callable[[Encoded], dict[str, np.ndarray]]


def torch_forward(model, batch_size: int = 4096) -> Forward:
    """A zoo model's forward as a ``Forward``: ``train.evaluate.predict_table`` (eval mode,
    no grad, batches of ``batch_size``)."""
    from shopmtl.data.dataset import TensorTable  # torch: the module docstring
    from shopmtl.train.evaluate import predict_table

    def forward(enc: Encoded) -> dict[str, np.ndarray]:
        return predict_table(model, TensorTable(enc), batch_size)

    return forward


def as_forward(model) -> Forward:
    """``model`` as a ``Forward``: a PyTorch model (an ``nn.Module``) gets ``torch_forward``;
    anything else is already one (an exported bundle's onnxruntime forward)."""
    # an nn.Module exists only once torch is imported: a process without it (an ONNX bundle's
    # server) holds none, and asking must not import torch (None: import blocked)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return torch_forward(model)
    return model


@dataclass
class RowReport:
    """What happened to the rows of one predict/evaluate run: ``rows_read`` data rows (blank
    lines not counted) = ``scored`` + ``bad_rows``."""

    rows_read: int
    scored: int
    bad_rows: int
    blank_lines: int
    per_reason: dict[str, int]
    quarantine: Path | None = None  # the quarantine CSV (policy quarantine)

    def describe(self) -> str:
        """The part of the command's last line after "wrote N rows to OUT"."""
        parts = []
        if self.quarantine is not None:
            parts.append(f"{self.bad_rows} bad rows set aside in {self.quarantine} (counts per "
                         f"reason in {self.quarantine.with_suffix('.json').name})")
        if self.blank_lines:
            parts.append(f"{self.blank_lines} blank lines skipped")
        return "".join(f"; {p}" for p in parts)


def quarantine_paths(out: str | Path) -> tuple[Path, Path]:
    """Where ``--bad-rows quarantine`` puts the bad rows of a run writing ``out``: next to it,
    ``out``'s stem + ``.quarantine.csv`` (the rows) and ``.quarantine.json`` (the counts):
    ``preds.csv`` -> ``preds.quarantine.csv``, ``preds.quarantine.json``."""
    out = Path(out)
    return (out.with_name(f"{out.stem}.quarantine.csv"),
            out.with_name(f"{out.stem}.quarantine.json"))


def _log(bad_rows: str) -> BadRowLog:
    if bad_rows not in BAD_ROWS:
        raise ConfigError(f"bad_rows: {bad_rows!r} is not one of {', '.join(BAD_ROWS)}")
    # under fail every bad row is counted before the run stops ("3 bad rows in all")
    return BadRowLog(bad_rows, 1.0, stop_at_first=False)


def _report(log: BadRowLog, scored: int, out: Path | None, **extra: object) -> RowReport:
    """The run's rows accounted for; under quarantine the bad rows written next to ``out``."""
    log.raise_if_bad()
    if log.seen != scored + len(log.rows):  # a bug, never the data's fault
        raise RuntimeError(f"row accounting: {log.seen} rows read, {scored} scored, "
                           f"{len(log.rows)} bad")
    qfile = None
    if out is not None and log.policy == "quarantine":
        csv_path, json_path = quarantine_paths(out)
        qfile = log.write_files(csv_path, json_path, scored=scored, **extra)
    return RowReport(log.seen, scored, len(log.rows), log.blank_lines, dict(log.counts()), qfile)


# --- evaluation ------------------------------------------------------------------------------


class OptionError(ConfigError, DataError):
    """A command-line option (or the Python argument behind it) asks for what the model cannot
    give, e.g. ``--task`` naming a task it lacks: a usage error like a bad config (ConfigError,
    exit 2), and a DataError still for callers that catch those around scoring."""


def evaluate_file(model_dir: str | Path, path: str | Path) -> dict:
    from shopmtl.train.trainer import load_model_dir  # torch: the module docstring

    return evaluate_rows(*load_model_dir(model_dir), path)[0]


def evaluate_rows(model, cfg, schema: Schema, encoders, path: str | Path, bad_rows: str = "fail",
                  out: str | Path | None = None) -> tuple[dict, RowReport]:
    """``evaluate_file`` with a loaded model: metrics per task x scenario of a labelled file,
    and its rows. Under ``quarantine`` the bad rows go next to ``out`` (``quarantine_paths``)
    and past the run's ``data.max_bad_fraction`` of bad rows it stops: metrics over a small
    remainder would mislead."""
    from shopmtl.data.dataset import TensorTable  # torch: the module docstring
    from shopmtl.train.evaluate import metrics_by_scenario

    schema = dataclasses.replace(schema, slices=())  # slice columns are not needed here
    log = _log(bad_rows)
    enc = read_encoded(schema, encoders, path, log, cfg.data.chunk_rows)
    report = _report(log, 0 if enc is None else len(enc), None if out is None else Path(out),
                     file=Path(path).name)
    if log.policy == "quarantine":
        log.max_fraction = cfg.data.max_bad_fraction
        log.check_fraction()
    if enc is None:
        raise DataError(f"{Path(path).name}: no usable rows")
    preds = as_forward(model)(enc)
    return metrics_by_scenario(schema, TensorTable(enc), preds), report


def read_encoded(schema: Schema, encoders, path: str | Path, log: BadRowLog,
                 chunk_rows: int = CHUNK_ROWS) -> Encoded | None:
    """Every good row of a labelled file, read by the reader of training and encoded with the
    model's encoders, in one ``Encoded``, None if there is none (bad rows to ``log``; under
    ``fail`` the rest of the file is only read to count them). Evaluation and the checks of
    ``shopmtl export`` read this way."""
    schema = dataclasses.replace(schema, slices=())  # slice columns are not needed here
    parts = []
    for p in read_chunks(path, schema, chunk_rows, log, bounds=encoders.numeric_bounds()):
        if not (log.policy == "fail" and log.rows):  # failing: only counting the bad rows
            parts.append(encoders.transform(p))
    return Encoded.concat(parts) if parts else None


# --- prediction ------------------------------------------------------------------------------


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


def _wanted_tasks(schema: Schema, tasks: Sequence[str] | None) -> list[str]:
    wanted = list(tasks or schema.task_names)
    unknown = [t for t in wanted if t not in schema.task_names]
    if unknown:
        raise OptionError(f"--task: unknown task(s) {unknown}; this model has "
                        f"{list(schema.task_names)}")
    return wanted


def _id_columns(id_columns: Sequence[str], wanted: list[str]) -> list[str]:
    ids = [c.strip() for c in id_columns if c.strip()]
    clash = sorted({c for c in ids if c == "line" or c in wanted} | {c for c in ids
                                                                        if ids.count(c) > 1})
    if clash:
        raise ConfigError(f"--id-columns: {clash} would clash with an output column (line, "
                          "the tasks) or appear twice")
    return ids


def _predict_schema(schema: Schema) -> tuple[Schema, list[str]]:
    """The schema a prediction reads (labels optional, no slices, no GAUC group) and the
    columns it does not read at all: the labels, whatever their cells hold."""
    loose = dataclasses.replace(schema, slices=(), extra_columns=(), group=None, tasks=tuple(
        dataclasses.replace(t, required=False, oracle_column=None) for t in schema.tasks))
    reads = {f.source for f in loose.features} | (
        {loose.scenario.column} if loose.scenario else set())
    return loose, [c for c in loose.source_columns() if c not in reads]


def score_chunks(model, schema: Schema, encoders, source: str | Path | pa.Table,
                 log: BadRowLog, tasks: Sequence[str] | None = None,
                 id_columns: Sequence[str] = (), chunk_rows: int = CHUNK_ROWS
                 ) -> Iterator[pa.Table]:
    """The one scoring path of a zoo model and of its exported bundle, for files and in-memory
    rows alike: ``source`` is read by ``read_chunks`` (bad rows to ``log``), each chunk's good
    rows are encoded with the model's encoders and scored by ``model`` (a PyTorch model or a
    ``Forward``: ``as_forward``). Yields per chunk ``line`` (the CSV line, Parquet row from 1,
    in-memory row from 0), the id columns as read, one float32 column per wanted task."""
    forward = as_forward(model)
    wanted = _wanted_tasks(schema, tasks)
    ids = _id_columns(id_columns, wanted)
    loose, labels = _predict_schema(schema)
    for parsed in read_chunks(source, loose, chunk_rows, log, nulls=labels, passthrough=ids,
                              bounds=encoders.numeric_bounds()):
        if log.policy == "fail" and log.rows:
            continue  # the run fails: the rest is read only to count its bad rows
        preds = forward(encoders.transform(parsed))
        yield pa.table({"line": pa.array(parsed.lines, pa.int64()),
                        **{c: parsed.passthrough[c] for c in ids},
                        **{t: pa.array(np.asarray(preds[t]), pa.float32()) for t in wanted}})


def _empty_schema(ids: Sequence[str], tasks: Sequence[str]) -> pa.Schema:
    return pa.schema([("line", pa.int64()), *((c, pa.string()) for c in ids),
                      *((t, pa.float32()) for t in tasks)])


def output_format(out: str | Path, fmt: str | None, default: str = "csv") -> str:
    """``fmt`` (csv, parquet, jsonl), else by ``out``'s extension, else ``default``."""
    if fmt is not None:
        if fmt not in ("csv", "parquet", "jsonl"):
            raise ConfigError(f"--format: {fmt!r} is not one of csv, parquet, jsonl")
        return fmt
    return FORMATS.get(Path(out).suffix.lower(), default)


class TableWriter:
    """Tables written one after another to ``out`` as CSV, Parquet or JSON lines (pyarrow's
    writers for the first two), through a hidden sibling renamed into place when the block
    ends without an error: a failed run leaves no half-written ``out``. A list cell (a joint
    model's class probabilities) is JSON text in a CSV file. ``empty``: the columns written
    when no table comes. An ``out`` that exists and is not a regular file (``/dev/stdout``, a
    pipe, a device) is written in place: renaming over it would replace the device itself."""

    def __init__(self, out: str | Path, fmt: str, empty: pa.Schema) -> None:
        self.out, self.fmt, self.empty = Path(out), fmt, empty
        special = self.out.exists() and not self.out.is_file()
        self.tmp = self.out if special else self.out.with_name(
            f".{self.out.name}.tmp-{os.getpid()}")
        self.rows = 0
        self._w: Any = None

    def __enter__(self) -> TableWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, table: pa.Table) -> None:
        if self.fmt == "csv":
            table = _csv_cells(table)
        if self._w is None:
            self._open(table.schema)
        if self.fmt == "jsonl":
            for row in table.to_pylist():
                self._w.write(json.dumps(json_safe(row)) + "\n")
        else:
            self._w.write_table(table)
        self.rows += table.num_rows

    def _open(self, schema: pa.Schema) -> None:
        if self.fmt == "csv":
            self._w = pacsv.CSVWriter(str(self.tmp), schema)
        elif self.fmt == "parquet":
            self._w = pq.ParquetWriter(str(self.tmp), schema)
        else:
            self._w = self.tmp.open("w")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            if self._w is None:
                self.write(self.empty.empty_table())
            self._w.close()
            if self.tmp != self.out:
                os.replace(self.tmp, self.out)
            return
        if self._w is not None:
            self._w.close()
        if self.tmp != self.out:
            self.tmp.unlink(missing_ok=True)


def _csv_cells(table: pa.Table) -> pa.Table:
    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            cells = [None if v is None else json.dumps(json_safe(v))
                     for v in table.column(i).to_pylist()]
            table = table.set_column(i, f.name, pa.array(cells, pa.string()))
    return table


def predict_rows(model, schema: Schema, encoders, path: str | Path, out: str | Path,
                 tasks: Sequence[str] | None = None, *, bad_rows: str = "fail",
                 id_columns: Sequence[str] = (), fmt: str | None = None,
                 chunk_rows: int = CHUNK_ROWS) -> RowReport:
    """``shopmtl predict`` of a zoo model (the zoo model of a joint checkpoint too): every
    good row of a CSV/Parquet file scored, written to ``out`` (``line``, the id columns as
    read, one column per task; format by ``fmt`` or ``out``'s extension, CSV otherwise). Label
    columns are not read. ``bad_rows``: fail (the first bad row and the count stop the run,
    nothing is written) or quarantine (bad rows next to ``out``: ``quarantine_paths``)."""
    path, out = Path(path), Path(out)
    log = _log(bad_rows)
    fmt = output_format(out, fmt)
    wanted = _wanted_tasks(schema, tasks)
    ids = _id_columns(id_columns, wanted)
    with TableWriter(out, fmt, _empty_schema(ids, wanted)) as w:
        for table in score_chunks(model, schema, encoders, path, log, wanted, ids, chunk_rows):
            w.write(table)
        log.raise_if_bad()
    return _report(log, w.rows, out, file=path.name, output=out.name)


def predict_in_memory(model, schema: Schema, encoders, rows: Any,
                      tasks: Sequence[str] | None = None, bad_rows: str = "fail",
                      id_columns: Sequence[str] = ()) -> pa.Table:
    """``shopmtl.load(...).predict`` of zoo rows: a file path is read as ``shopmtl predict``
    reads it, in-memory rows (``rows_table``) as a Parquet file; the same ``score_chunks``
    either way. The id columns as read, then one float column per task, in row order. Under
    ``quarantine`` bad rows are left out: the table starts with ``line`` (CSV line, Parquet
    row from 1, in-memory row from 0) and its schema metadata ``shopmtl.bad_rows`` holds the
    bad rows (line, column, reason) and the counts as JSON."""
    source = Path(rows) if isinstance(rows, str | Path) else rows_table(rows)
    log = _log(bad_rows)
    wanted = _wanted_tasks(schema, tasks)
    ids = _id_columns(id_columns, wanted)
    parts = list(score_chunks(model, schema, encoders, source, log, wanted, ids))
    table = pa.concat_tables(parts) if parts else _empty_schema(ids, wanted).empty_table()
    _report(log, table.num_rows, None)
    for t in wanted:  # float64, as numpy and pandas users expect
        table = table.set_column(table.schema.get_field_index(t), t,
                                 table.column(t).cast(pa.float64()))
    if log.policy == "fail":
        return table.drop_columns(["line"])
    bad = [{"line": b.line, "column": b.column, "reason": b.reason} for b in log.rows]
    meta = json.dumps({**log.summary(), "rows": bad})
    return table.replace_schema_metadata({"shopmtl.bad_rows": meta})
