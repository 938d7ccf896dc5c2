"""Reading CSV and Parquet in chunks, with row-level validation and a bad-row policy.

Each chunk is parsed against the schema into plain arrays (``Parsed``). A row that cannot be
parsed (wrong column count, a non-numeric value in a numeric feature, a missing or invalid label
where the task is defined, an unknown scenario, ...) is a bad row: under ``fail`` the first one
stops the run with file, line, column and reason; under ``quarantine`` bad rows go to a
quarantine file with per-reason counts, and nothing is dropped silently. Error messages never
echo cell values (they may be personal data); the quarantine file keeps the raw rows.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.data.schema import Schema, TaskSpec


class DataError(ValueError):
    """Input data is unusable; the message says which file, line, column and why."""


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int  # 1-based line in a CSV file (header = line 1); 1-based row in a Parquet file
    column: str
    reason: str
    raw: str = ""

    def describe(self) -> str:
        where = "line" if is_csv(self.file) else "row"
        col = f", column '{self.column}'" if self.column else ""
        return f"{self.file}: {where} {self.line}{col}: {self.reason}"


@dataclass
class Parsed:
    """A validated chunk: raw categorical strings, floats, lists, label arrays. No encoding yet."""

    n: int
    categorical: dict[str, pa.Array]  # feature -> string array (nulls allowed: OOV)
    numeric: dict[str, np.ndarray]  # feature -> float64 after transform, fill applied
    sequence: dict[str, pa.ListArray]  # feature -> list<string>
    scenario: np.ndarray  # int64 scenario ids
    labels: np.ndarray  # float32 [n, T] (0 where masked)
    mask: np.ndarray  # bool [n, T]
    oracle: np.ndarray | None  # float32 [n, T] (NaN where absent)
    group: pa.Array | None
    lines: np.ndarray  # source line/row numbers of the kept rows
    content: dict[str, pa.Array] = field(default_factory=dict)  # content feature -> key strings
    slices: np.ndarray | None = None  # bool [n, K]: the rows in each evaluation slice


@dataclass
class BadRowLog:
    """Collects bad rows of one run; writes the quarantine file and per-reason counts."""

    policy: str
    max_fraction: float
    rows: list[BadRow] = field(default_factory=list)
    seen: int = 0
    blank_lines: int = 0  # skipped, not bad: reported in quarantine.json

    def record(self, bad: list[BadRow], total: int) -> None:
        self.seen += total
        if not bad:
            return
        if self.policy == "fail":
            first = min(bad, key=lambda b: b.line)
            raise DataError(
                f"bad row: {first.describe()} (policy 'fail'; use 'quarantine' to "
                "set bad rows aside)"
            )
        self.rows.extend(bad)

    def check_fraction(self) -> None:
        if self.seen and len(self.rows) / self.seen > self.max_fraction:
            raise DataError(
                f"{len(self.rows)} of {self.seen} rows are bad "
                f"({len(self.rows) / self.seen:.1%} > max_bad_fraction {self.max_fraction:.1%}); "
                f"counts per reason: {dict(self.counts())}"
            )

    def counts(self) -> Counter:
        return Counter(_reason_key(b.reason) for b in self.rows)

    def write(self, out_dir: str | Path) -> Path | None:
        if not self.rows:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "quarantine.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "line", "column", "reason", "raw"])
            for b in sorted(self.rows, key=lambda b: (b.file, b.line)):
                w.writerow([b.file, b.line, b.column, b.reason, b.raw])
        summary = {
            "bad_rows": len(self.rows),
            "rows_read": self.seen,
            "blank_lines_skipped": self.blank_lines,
            "per_reason": dict(self.counts()),
        }
        (out / "quarantine.json").write_text(json.dumps(summary, indent=2))
        return path


def _reason_key(reason: str) -> str:
    return reason.split(":")[0]


def is_csv(path: str | Path) -> bool:
    return str(path).endswith((".csv", ".tsv", ".txt", ".csv.gz"))


def read_chunks(
    path: str | Path, schema: Schema, chunk_rows: int, log: BadRowLog
) -> Iterator[Parsed]:
    """Parse ``path`` chunk by chunk; bad rows go to ``log`` (which may raise)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    columns = schema.source_columns()
    if is_csv(path):
        yield from _csv_chunks(path, schema, columns, chunk_rows, log)
    else:
        yield from _parquet_chunks(path, schema, columns, chunk_rows, log)


def _csv_chunks(
    path: Path, schema: Schema, columns: list[str], chunk_rows: int, log: BadRowLog
) -> Iterator[Parsed]:
    delimiter = "\t" if str(path).endswith(".tsv") else ","
    # the header as pyarrow will see it: gzip decompressed, a UTF-8 byte-order mark dropped
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader([f.readline()], delimiter=delimiter), [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {missing}; the file has {header}")
    dupes = [c for c, k in Counter(header).items() if k > 1]
    if dupes:
        raise DataError(f"{path.name}: duplicate column(s) {dupes} in the header")
    structural: list[BadRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        structural.append(
            BadRow(
                path.name,
                int(row.number or 0),
                "",
                f"wrong column count: expected {row.expected_columns}, got {row.actual_columns}",
                row.text,
            )
        )
        return "skip"

    # Everything is read as text, then converted column by column, so a bad cell is a bad row
    # (with its line) instead of a failed file. Threads off: pyarrow then reports line numbers.
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=max(1 << 20, chunk_rows * 64), use_threads=False),
        # blank lines are kept as all-null rows (then dropped below) so line numbers stay true
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header},
            strings_can_be_null=True,
            null_values=[""],  # only an empty cell is missing: "NA" may be a real category
            include_columns=columns,
        ),
    )
    next_line = 2
    reported = 0
    try:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            bad_lines = {b.line for b in structural}
            lines = []
            while len(lines) < table.num_rows:
                if next_line not in bad_lines:
                    lines.append(next_line)
                next_line += 1
            blank = np.ones(table.num_rows, bool)
            for col in table.columns:
                blank &= col.is_null().to_numpy(zero_copy_only=False)
            if blank.any():  # blank lines (or rows of empty cells): no data, counted
                log.blank_lines += int(blank.sum())
                table = table.filter(pa.array(~blank))
                lines = [ln for ln, b in zip(lines, blank, strict=True) if not b]
            new_struct = structural[reported:]
            reported = len(structural)
            for start in range(0, table.num_rows, chunk_rows):
                part = table.slice(start, chunk_rows)
                ln = np.asarray(lines[start : start + part.num_rows], dtype=np.int64)
                parsed, bad = parse_table(part, schema, ln, path.name, text=True)
                log.record(new_struct + bad, part.num_rows + len(new_struct))
                new_struct = []
                if parsed.n:
                    yield parsed
        if structural[reported:]:
            log.record(structural[reported:], len(structural[reported:]))
    except pa.ArrowInvalid as e:
        raise DataError(f"{path.name}: cannot be read as CSV ({e})") from None


def _parquet_chunks(
    path: Path, schema: Schema, columns: list[str], chunk_rows: int, log: BadRowLog
) -> Iterator[Parsed]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {missing}; the file has {names}")
    start = 1
    try:
        # one row group at a time, sliced into chunks: ParquetFile.iter_batches kept ~35
        # bytes a row alive until the file was done (pyarrow's pool grew 45 -> 280 MB over
        # 8M rows; bench/scaling.py), this holds one row group
        for g in range(pf.metadata.num_row_groups):
            group = pf.read_row_group(g, columns=columns)
            for batch in group.to_batches(max_chunksize=chunk_rows):
                table = pa.Table.from_batches([batch])
                lines = np.arange(start, start + table.num_rows, dtype=np.int64)
                start += table.num_rows
                parsed, bad = parse_table(table, schema, lines, path.name, text=False)
                log.record(bad, table.num_rows)
                if parsed.n:
                    yield parsed
            del group
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path.name}: corrupt or truncated Parquet data ({e})") from None


def _to_float(arr: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Cast to float64; returns (values, unparsable) with unparsable rows marked (value NaN)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            vals = pc.cast(arr, pa.float64())
            return vals.to_numpy(zero_copy_only=False).astype(np.float64), np.zeros(len(arr), bool)
        except pa.ArrowInvalid:
            # slow path only for chunks that hold a bad cell
            out = np.full(len(arr), np.nan)
            bad = np.zeros(len(arr), bool)
            for i, v in enumerate(arr.to_pylist()):
                if v is None:
                    continue
                try:
                    out[i] = float(v)
                except ValueError:
                    bad[i] = True
            return out, bad
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    vals = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(vals, np.float64), np.zeros(len(arr), bool)


def _as_string(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_floating(arr.type):
        # 3.0 and 3 must be the same category
        vals = arr.to_numpy(zero_copy_only=False)
        as_int = np.where(np.isfinite(vals) & (vals == np.round(vals)), vals, np.nan)
        if np.array_equal(np.isnan(as_int), np.isnan(vals)):
            arr = pa.array(as_int, mask=np.isnan(as_int)).cast(pa.int64())
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr


def _label_values(arr: pa.ChunkedArray | pa.Array, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """A label column as float64 (NaN = missing) and its unparsable rows.

    ``task.positive``: 1 where the stripped cell is one of those strings, else 0 (empty = missing).
    ``task.threshold``: 1 where the number is >= threshold, else 0 (empty = missing).
    """
    if task.positive:
        cells = pc.utf8_trim_whitespace(_as_string(arr))
        empty = pc.fill_null(pc.equal(cells, ""), True).to_numpy(zero_copy_only=False)
        wanted = pa.array([p.strip() for p in task.positive], pa.string())
        hit = pc.fill_null(pc.is_in(cells, value_set=wanted), False)
        hit = hit.to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(empty, np.nan, hit), np.zeros(len(cells), bool)
    vals, unparsable = _to_float(arr)
    if task.threshold is not None:
        vals = np.where(np.isnan(vals), np.nan, (vals >= task.threshold).astype(np.float64))
    return vals, unparsable


def _split_sequence(col: pa.Array, sep: str) -> pa.ListArray:
    """'a|b' -> [a, b]. An empty cell is an empty list and empty items ('a||b') are dropped, so
    an empty history is all padding instead of a token "" (which would get a vocabulary id)."""
    lists = pc.split_pattern(pc.fill_null(col, ""), sep)
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(flat, "")
    if pc.all(keep).as_py() is not False:
        return lists
    parents = pc.list_parent_indices(lists).filter(keep).to_numpy(zero_copy_only=False)
    offsets = np.searchsorted(parents, np.arange(len(lists) + 1), side="left")
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat.filter(keep))


def parse_table(
    table: pa.Table, schema: Schema, lines: np.ndarray, file: str, text: bool
) -> tuple[Parsed, list[BadRow]]:
    """Validate and convert one chunk. Returns the good rows and the bad ones."""
    n = table.num_rows
    bad_reason: dict[int, tuple[str, str]] = {}  # row -> (column, reason); first reason wins

    def flag(rows: np.ndarray, column: str, reason: str) -> None:
        for r in np.flatnonzero(rows):
            bad_reason.setdefault(int(r), (column, reason))

    # scenario
    if schema.scenario is not None:
        col = _as_string(table.column(schema.scenario.column))
        values = pa.array(list(schema.scenario.values), pa.string())
        idx = pc.index_in(col, value_set=values).to_numpy(zero_copy_only=False)
        idx = np.asarray(pd_fill(idx, -1), np.int64)
        if schema.scenario.other is None:
            flag(idx < 0, schema.scenario.column, "unknown scenario")
        else:  # opt-in: every value off the list (an empty cell too) is the `other` scenario
            idx = np.where(idx < 0, len(schema.scenario.values), idx)
        scenario = np.maximum(idx, 0)
    else:
        scenario = np.zeros(n, np.int64)

    categorical = {
        f.name: _as_string(table.column(f.source)) for f in schema.of_kind("categorical")
    }
    numeric: dict[str, np.ndarray] = {}
    for f in schema.of_kind("numeric"):
        vals, unparsable = _to_float(table.column(f.source))
        flag(unparsable, f.source, "non-numeric value in a numeric feature")
        flag(np.isinf(vals), f.source, "infinite value in a numeric feature")
        missing = np.isnan(vals) & ~unparsable
        if f.fill is None:
            flag(missing, f.source, "missing value in a numeric feature (no fill set)")
        vals = np.where(missing, f.fill if f.fill is not None else 0.0, vals)
        if f.transform == "log1p":
            flag(vals <= -1, f.source, "value <= -1 cannot take log1p")
            vals = np.log1p(np.maximum(vals, -1 + 1e-9))
        numeric[f.name] = np.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0)
    sequence: dict[str, pa.ListArray] = {}
    for f in schema.of_kind("sequence"):
        sequence[f.name] = _split_sequence(_as_string(table.column(f.source)), f.sep)
    content = {f.name: _as_string(table.column(f.source)) for f in schema.content_features}
    slices = np.zeros((n, len(schema.slices)), bool)
    for k, col in enumerate(schema.slices):
        vals, unparsable = _to_float(table.column(col))
        flag(unparsable | ~np.isin(np.nan_to_num(vals, nan=0.0), (0.0, 1.0)), col,
             "slice column not 0 or 1")
        slices[:, k] = vals == 1.0

    # labels and the availability mask
    t_count = len(schema.tasks)
    labels = np.zeros((n, t_count), np.float32)
    mask = np.zeros((n, t_count), bool)
    oracle = None
    scen_names = np.asarray(schema.scenario_names)
    for j, t in enumerate(schema.tasks):
        vals, unparsable = _label_values(table.column(t.source), t)
        flag(unparsable, t.source, "non-numeric label")
        present = ~np.isnan(vals)
        defined = np.ones(n, bool)
        if t.scenarios:
            defined &= np.isin(scen_names[scenario], t.scenarios)
        if t.type == "binary":
            flag(present & ~np.isin(vals, (0.0, 1.0)), t.source, "binary label not 0 or 1")
        labels[:, j] = np.where(present, vals, 0.0)
        mask[:, j] = defined & present
        if t.required:
            need = defined.copy()
            if t.given is not None:
                g = schema.task_names.index(t.given)
                gv, _ = _label_values(table.column(schema.tasks[g].source), schema.tasks[g])
                need &= gv == 1.0
            flag(need & ~present & ~unparsable, t.source, "missing or NaN label")
        if t.oracle_column:
            if oracle is None:
                oracle = np.full((n, t_count), np.nan, np.float32)
            ov, _ = _to_float(table.column(t.oracle_column))
            oracle[:, j] = ov
    for j, t in enumerate(schema.tasks):
        if t.given is not None:
            g = schema.task_names.index(t.given)
            mask[:, j] &= mask[:, g] & (labels[:, g] == 1.0)
    labels = np.where(mask, labels, 0.0).astype(np.float32)  # a masked label is never a value

    group = _as_string(table.column(schema.group)) if schema.group else None

    bad: list[BadRow] = []
    if bad_reason:
        rows = sorted(bad_reason)
        raw_cols = table.column_names
        pydict = table.take(pa.array(rows)).to_pydict() if text else None
        for k, r in enumerate(rows):
            column, reason = bad_reason[r]
            raw = ""
            if pydict is not None:
                raw = ",".join("" if pydict[c][k] is None else str(pydict[c][k]) for c in raw_cols)
            bad.append(BadRow(file, int(lines[r]), column, reason, raw))
        keep = np.ones(n, bool)
        keep[rows] = False
        sel = pa.array(keep)
        categorical = {k: v.filter(sel) for k, v in categorical.items()}
        numeric = {k: v[keep] for k, v in numeric.items()}
        sequence = {k: v.filter(sel) for k, v in sequence.items()}
        content = {k: v.filter(sel) for k, v in content.items()}
        slices = slices[keep]
        scenario, labels, mask, lines = scenario[keep], labels[keep], mask[keep], lines[keep]
        oracle = oracle[keep] if oracle is not None else None
        group = group.filter(sel) if group is not None else None
        n = int(keep.sum())
    return Parsed(
        n, categorical, numeric, sequence, scenario, labels, mask, oracle, group, lines, content,
        slices,
    ), bad


def pd_fill(idx: np.ndarray, value: int) -> np.ndarray:
    """index_in returns nulls (NaN in numpy) for values not found."""
    idx = np.asarray(idx, dtype=np.float64)
    return np.where(np.isnan(idx), value, idx)


__all__ = ["BadRow", "BadRowLog", "DataError", "Parsed", "math", "read_chunks"]
