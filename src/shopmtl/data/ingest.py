"""The one reader of tabular data: CSV/TSV (plain or gzip), Parquet and in-memory tables, in
chunks, with row-level validation and a bad-row policy. Training, ``shopmtl evaluate``,
``shopmtl predict`` and ``shopmtl.load(...).predict`` all read through ``read_chunks``.

Parsing rules, the same everywhere: every CSV cell is read as text (``007`` stays ``007``,
``NA`` and ``null`` are categories) and only an empty cell is missing; a UTF-8 byte-order mark
is dropped and quoted header names are unquoted; a CSV row is named by the physical line it
starts on (``csvlines``: blank lines and line breaks inside quoted fields are counted), a
Parquet or in-memory row by its position.

Each chunk is parsed against the schema into plain arrays (``Parsed``). A row that cannot be
parsed (wrong column count, bytes that are not UTF-8, a non-numeric or out-of-range value in a
numeric feature, a missing or invalid label where the task is defined, an unknown scenario,
...) is a bad row: under ``fail`` the first one stops the run with file, line, column and
reason; under ``quarantine`` bad rows go to a quarantine file with per-reason counts, and
nothing is dropped silently. Error messages never echo cell values (they may be personal
data); the quarantine file keeps the raw rows: a CSV record's own bytes, a Parquet or
in-memory row as JSON.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.data.csvlines import MAX_RECORD_BYTES, Records, RecordTooLong, scan_records
from shopmtl.data.schema import Schema, TaskSpec
from shopmtl.jsonsafe import json_safe

ROWS = "rows"  # how errors name in-memory rows: "rows: row 3, column 'price': ..." (from 0)
# a numeric feature's value (after its transform) beyond this is a bad row: the encoder's
# moments (sum of squares, mean**2) must stay finite in float64 (1e308 raised OverflowError)
MAX_NUMERIC = 1e150
OUT_OF_RANGE = "numeric value out of range"


class DataError(ValueError):
    """Input data is unusable; the message says which file, line, column and why."""


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int  # CSV: physical line the row starts on (header = 1); Parquet: row from 1
    column: str
    reason: str
    raw: str = ""  # CSV: the record's bytes as in the file; Parquet and in-memory: JSON

    def describe(self) -> str:
        where = "line" if is_csv(self.file) or is_json_lines(self.file) else "row"
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
    passthrough: dict[str, pa.Array] = field(default_factory=dict)  # columns as read (ids)


@dataclass
class BadRowLog:
    """Collects bad rows of one run; writes the quarantine file and per-reason counts.

    ``policy`` fail: the first chunk holding a bad row raises (``stop_at_first``), or, with
    ``stop_at_first`` off, every bad row is collected and ``raise_if_bad`` names the first and
    the count (prediction: "2 bad rows in all")."""

    policy: str
    max_fraction: float
    rows: list[BadRow] = field(default_factory=list)
    seen: int = 0  # data rows read (bad ones included; blank lines not)
    blank_lines: int = 0  # skipped, not bad: reported in quarantine.json
    stop_at_first: bool = True

    def record(self, bad: list[BadRow], total: int) -> None:
        self.seen += total
        if not bad:
            return
        if self.policy == "fail" and self.stop_at_first:
            first = min(bad, key=lambda b: b.line)
            raise DataError(
                f"bad row: {first.describe()} (policy 'fail'; use 'quarantine' to "
                "set bad rows aside)"
            )
        self.rows.extend(bad)

    def raise_if_bad(self) -> None:
        """Under ``fail``: the first bad row and how many there were."""
        if self.policy == "fail" and self.rows:
            first = min(self.rows, key=lambda b: (b.file, b.line))
            n = len(self.rows)
            raise DataError(f"bad row: {first.describe()} ({n} bad row{'s' * (n != 1)} in all)")

    def check_fraction(self) -> None:
        if self.seen and len(self.rows) / self.seen > self.max_fraction:
            raise DataError(
                f"{len(self.rows)} of {self.seen} rows are bad "
                f"({len(self.rows) / self.seen:.1%} > max_bad_fraction {self.max_fraction:.1%}); "
                f"counts per reason: {dict(self.counts())}"
            )

    def counts(self) -> Counter:
        return Counter(_reason_key(b.reason) for b in self.rows)

    def summary(self) -> dict:
        return {
            "bad_rows": len(self.rows),
            "rows_read": self.seen,
            "blank_lines_skipped": self.blank_lines,
            "per_reason": dict(self.counts()),
        }

    def write(self, out_dir: str | Path) -> Path | None:
        """``out_dir``/quarantine.csv and quarantine.json, when there is a bad row."""
        if not self.rows:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return self.write_files(out / "quarantine.csv", out / "quarantine.json")

    def write_files(self, csv_path: Path, json_path: Path, **extra: object) -> Path:
        """The bad rows (file, line, column, reason, raw) to ``csv_path``, sorted by file and
        line, and the summary (plus ``extra``) to ``json_path``."""
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "line", "column", "reason", "raw"])
            for b in sorted(self.rows, key=lambda b: (b.file, b.line)):
                w.writerow([b.file, b.line, b.column, b.reason, b.raw])
        json_path.write_text(json.dumps({**self.summary(), **extra}, indent=2))
        return csv_path


def _reason_key(reason: str) -> str:
    return reason.split(":")[0]


def is_json_lines(path: str | Path) -> bool:
    return str(path).endswith((".jsonl", ".ndjson", ".json"))


def is_csv(path: str | Path) -> bool:
    return str(path).endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"))


@dataclass
class _Chunk:
    """Rows as read, before validation: the wanted columns (text for CSV), each row's line,
    its raw form (for the quarantine file), and the rows already found bad (structure,
    encoding) with how many data rows the chunk held in all."""

    table: pa.Table
    lines: np.ndarray
    raw: Callable[[int], str]
    bad: list[BadRow]
    total: int


def read_chunks(
    source: str | Path | pa.Table,
    schema: Schema,
    chunk_rows: int,
    log: BadRowLog,
    *,
    nulls: Collection[str] = (),
    passthrough: Sequence[str] = (),
    bounds: Mapping[str, tuple[float, float]] | None = None,
    row_groups: Sequence[int] | None = None,
) -> Iterator[Parsed]:
    """Parse ``source`` (a CSV/TSV/gzip/Parquet path, or an in-memory table named ``rows``)
    chunk by chunk; bad rows go to ``log`` (which may raise).

    ``nulls``: columns of the schema not read (all missing: the labels when predicting);
    ``passthrough``: columns kept as read in ``Parsed.passthrough`` (ids for the output);
    ``bounds``: per numeric feature, the values its fitted encoder can standardise
    (``Encoders.numeric_bounds``); a value outside is a bad row;
    ``row_groups``: a Parquet file's row groups to read, in this order (a torchrun rank's
    shard, ``data.shards``); rows keep their line numbers in the whole file."""
    columns = [c for c in schema.source_columns() if c not in nulls]
    columns += [c for c in passthrough if c not in columns]
    if isinstance(source, pa.Table):
        name, chunks = ROWS, _table_chunks(source, ROWS, columns, chunk_rows, first=0)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        name = path.name
        if row_groups is not None and is_csv(path):
            raise DataError(f"{path.name}: row groups exist only in Parquet files")
        chunks = (_csv_chunks(path, columns, chunk_rows, log) if is_csv(path)
                  else _parquet_chunks(path, columns, chunk_rows, row_groups))
    for chunk in chunks:
        table = chunk.table
        for c in schema.source_columns():
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        parsed, bad = parse_table(table, schema, chunk.lines, name, raw=chunk.raw, bounds=bounds,
                                  passthrough=passthrough)
        log.record(chunk.bad + bad, chunk.total)
        if parsed.n:
            yield parsed


def _missing(name: str, have: Sequence[str], columns: Sequence[str], csv_header: bool) -> None:
    missing = [c for c in columns if c not in have]
    if not missing:
        return
    if csv_header:
        # the first line may be data (a file without a header): never print it
        raise DataError(f"{name}: missing column(s) {missing} in the header (line 1 must name "
                        "the columns)")
    what = "the rows have" if name == ROWS else "the file has"
    raise DataError(f"{name}: missing column(s) {missing}; {what} {list(have)}")


# --- CSV -----------------------------------------------------------------------------------


def _csv_chunks(path: Path, columns: list[str], chunk_rows: int, log: BadRowLog
                ) -> Iterator[_Chunk]:
    delimiter = "\t" if str(path).removesuffix(".gz").endswith(".tsv") else ","
    gz = str(path).endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else path.open("rb")) as f:
            records = scan_records(f.read, delimiter, chunk_rows)
            head = next(records, None)
            if head is None:
                raise DataError(f"{path.name}: empty file (no header line)")
            header = next(csv.reader([head.raw(0)], delimiter=delimiter), [])
            _missing(path.name, header, columns, csv_header=True)
            dupes = [c for c, k in Counter(header).items() if k > 1]
            if dupes:
                raise DataError(f"{path.name}: duplicate column(s) {dupes} in the header")
            for rec in records:
                yield _csv_chunk(rec, header, columns, delimiter, path.name, log)
    except RecordTooLong as e:
        raise DataError(f"{path.name}: line {e.line}: a row runs over "
                        f"{MAX_RECORD_BYTES >> 20} MiB (a quoted field without its closing "
                        "quote?)") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path.name}: not a readable gzip file ({type(e).__name__})") from None


def _csv_chunk(rec: Records, header: list[str], columns: list[str], delimiter: str, name: str,
               log: BadRowLog) -> _Chunk:
    """Blank records counted, malformed ones set aside, the rest parsed by pyarrow as binary
    and checked to be UTF-8 column by column."""
    blank = rec.blank()
    log.blank_lines += int(blank.sum())
    bad: list[BadRow] = []
    structural = ~blank & (rec.fields != len(header))
    if rec.unterminated and not blank[-1]:
        structural[-1] = False
        bad.append(BadRow(name, int(rec.lines[-1]), "", "unterminated quoted field",
                          rec.raw(len(rec) - 1)))
    for i in np.flatnonzero(structural):
        bad.append(BadRow(name, int(rec.lines[i]), "", f"wrong column count: expected "
                          f"{len(header)}, got {int(rec.fields[i])}", rec.raw(int(i))))
    keep = ~blank & ~structural
    if rec.unterminated:
        keep[-1] = False
    wanted = [c for c in columns if c in header]
    table, idx = _parse_records(rec, keep, header, wanted, delimiter, name, bad)
    table, not_utf8 = _utf8(table)
    for r, col in not_utf8.items():
        i = int(idx[r])
        bad.append(BadRow(name, int(rec.lines[i]), col, "invalid UTF-8", rec.raw(i)))
    if not_utf8:
        ok = np.ones(table.num_rows, bool)
        ok[list(not_utf8)] = False
        table, idx = table.filter(pa.array(ok)), idx[ok]
    return _Chunk(table, rec.lines[idx], lambda r, idx=idx: rec.raw(int(idx[r])), bad,
                  int((~blank).sum()))


def _read_csv_bytes(data: bytes, header: list[str], wanted: list[str], delimiter: str
                    ) -> pa.Table:
    # binary, not string: a cell that is not UTF-8 must make its row bad, not the file
    return pacsv.read_csv(
        pa.py_buffer(data),
        read_options=pacsv.ReadOptions(column_names=header, use_threads=False,
                                       block_size=max(1 << 20, len(data) + 1)),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                         ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in wanted},
            strings_can_be_null=True,
            null_values=[""],  # only an empty cell is missing: "NA" may be a real category
            include_columns=wanted,
        ),
    )


def _parse_records(rec: Records, keep: np.ndarray, header: list[str], wanted: list[str],
                   delimiter: str, name: str, bad: list[BadRow]) -> tuple[pa.Table, np.ndarray]:
    """The kept records as a table of ``wanted`` binary columns, one row per record, and the
    records it holds. The scan and pyarrow agree on where records end (tests/data/
    test_ingest.py); should they ever not, the chunk is parsed record by record and a record
    pyarrow refuses is a bad row."""
    idx = np.flatnonzero(keep)
    empty = pa.table({c: pa.array([], pa.binary()) for c in wanted})
    if not len(idx):
        return empty, idx
    try:
        table = _read_csv_bytes(rec.select(keep), header, wanted, delimiter)
        if table.num_rows == len(idx):
            return table, idx
    except pa.ArrowInvalid:
        pass
    parts, ok = [], np.ones(len(idx), bool)
    for k, i in enumerate(idx.tolist()):
        try:
            one = _read_csv_bytes(rec.data[rec.starts[i] : rec.ends[i]] + b"\n", header, wanted,
                                  delimiter)
        except pa.ArrowInvalid:
            one = empty
        if one.num_rows == 1:
            parts.append(one)
        else:
            ok[k] = False
            bad.append(BadRow(name, int(rec.lines[i]), "", "not a CSV row", rec.raw(i)))
    return (pa.concat_tables(parts) if parts else empty), idx[ok]


def _utf8(table: pa.Table) -> tuple[pa.Table, dict[int, str]]:
    """Binary columns as strings, and the rows holding a cell that is not UTF-8 (row -> its
    first such column; the cell becomes null). Cell by cell only for a column that has one."""
    bad: dict[int, str] = {}
    cols = []
    for name in table.column_names:
        col = table.column(name)
        try:
            cols.append(col.cast(pa.string()))
            continue
        except pa.ArrowInvalid:
            pass
        cells: list[str | None] = []
        for r, v in enumerate(col.to_pylist()):
            try:
                cells.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                bad.setdefault(r, name)
                cells.append(None)
        cols.append(pa.array(cells, pa.string()))
    return pa.table(cols, names=table.column_names), bad


# --- Parquet and in-memory tables --------------------------------------------------------------


def _row_json(table: pa.Table) -> Callable[[int], str]:
    """A row as JSON (the raw form of a Parquet or in-memory row in the quarantine file)."""
    return lambda r: json.dumps(json_safe(table.slice(r, 1).to_pylist()[0]), default=str)


def _table_chunks(table: pa.Table, name: str, columns: list[str], chunk_rows: int, first: int
                  ) -> Iterator[_Chunk]:
    _missing(name, table.column_names, columns, csv_header=False)
    table = table.select(columns)
    for start in range(0, table.num_rows, chunk_rows):
        part = table.slice(start, chunk_rows)
        lines = np.arange(first + start, first + start + part.num_rows, dtype=np.int64)
        yield _Chunk(part, lines, _row_json(part), [], part.num_rows)


def parquet_row_groups(path: str | Path) -> list[int]:
    """The row count of each row group of a Parquet file (its footer only)."""
    path = Path(path)
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def _parquet_chunks(path: Path, columns: list[str], chunk_rows: int,
                    row_groups: Sequence[int] | None = None) -> Iterator[_Chunk]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None
    _missing(path.name, pf.schema_arrow.names, columns, csv_header=False)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    first = np.concatenate([[1], 1 + np.cumsum(sizes)]).astype(np.int64)  # line of each start
    groups = range(len(sizes)) if row_groups is None else row_groups
    bad = [g for g in groups if not 0 <= g < len(sizes)]
    if bad:
        raise DataError(f"{path.name}: no row group {bad[0]} (the file has {len(sizes)})")
    try:
        # one row group at a time, sliced into chunks: ParquetFile.iter_batches kept ~35
        # bytes a row alive until the file was done (pyarrow's pool grew 45 -> 280 MB over
        # 8M rows; bench/scaling.py), this holds one row group
        for g in groups:
            group = pf.read_row_group(g, columns=columns)
            yield from _table_chunks(group, path.name, columns, chunk_rows, int(first[g]))
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
    table: pa.Table,
    schema: Schema,
    lines: np.ndarray,
    file: str,
    raw: Callable[[int], str] | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    passthrough: Sequence[str] = (),
) -> tuple[Parsed, list[BadRow]]:
    """Validate and convert one chunk. Returns the good rows and the bad ones.

    ``raw(row)``: a bad row's raw form for the quarantine file (default: the row as JSON);
    ``bounds``: see ``read_chunks``; ``passthrough``: columns kept as they are."""
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
        lo, hi = (bounds or {}).get(f.name, (-math.inf, math.inf))
        flag((np.abs(vals) > MAX_NUMERIC) | (vals < lo) | (vals > hi), f.source, OUT_OF_RANGE)
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
    kept = {c: _combined(table.column(c)) for c in passthrough}

    bad: list[BadRow] = []
    if bad_reason:
        rows = sorted(bad_reason)
        raw = raw or _row_json(table)
        for r in rows:
            column, reason = bad_reason[r]
            bad.append(BadRow(file, int(lines[r]), column, reason, raw(r)))
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
        kept = {k: v.filter(sel) for k, v in kept.items()}
        n = int(keep.sum())
    return Parsed(
        n, categorical, numeric, sequence, scenario, labels, mask, oracle, group, lines, content,
        slices, kept,
    ), bad


def _combined(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def pd_fill(idx: np.ndarray, value: int) -> np.ndarray:
    """index_in returns nulls (NaN in numpy) for values not found."""
    idx = np.asarray(idx, dtype=np.float64)
    return np.where(np.isnan(idx), value, idx)


__all__ = ["ROWS", "BadRow", "BadRowLog", "DataError", "Parsed", "read_chunks"]
