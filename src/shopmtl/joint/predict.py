"""Answer any task of a joint checkpoint: ``shopmtl predict MODEL_DIR FILE --task NAME``.

The recommendation tasks read the same CSV/Parquet rows as a zoo model. Every other task reads
the raw requests its source's contract names (``data.contract``; ``shopmtl describe`` shows
them): JSON lines (one object per line), a CSV file (one column per field; a list field as
JSON text), a Parquet file, or, from Python, dicts, a pyarrow Table or a DataFrame. Each
request is checked by the contract, turned into model inputs by the source's own ``encode``
(the code and the fitted statistics that built the training inputs), scored by the source's
head, brought back to the user's units (``to_user``) and answered in the user's terms
(``contract.answer``: labels top-k, clamped values with a flag, named quantiles, ranked
candidates).

Output rows: ``line`` (JSON/CSV line, Parquet row from 1, in-memory row from 0), the id
columns as text (a JSON number as its JSON text: one type in every row, whatever each request
gave), the answer's columns; a ranking task gives one row per candidate, best first.
A bad request stops the run (``--bad-rows fail``: the first and the count) or is set aside
(``quarantine``: next to OUT, as for zoo rows); messages name the place and the field, never
a text.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shopmtl.config import ConfigError
from shopmtl.data.contract import Contract, answer, rank_answer
from shopmtl.data.ingest import ROWS, BadRow, BadRowLog, DataError
from shopmtl.data.source import SourceSplit
from shopmtl.joint.checkpoint import task_owner
from shopmtl.joint.config import REC
from shopmtl.joint.parts import TextIndex, head_logits, source_class, tensorise, text_bank
from shopmtl.jsonsafe import json_safe
from shopmtl.predict import (
    OptionError,
    RowReport,
    TableWriter,
    _log,
    _report,
    output_format,
    predict_in_memory,
    predict_rows,
    rows_table,
)
from shopmtl.tasks import TASK_TYPES

_FIELD = re.compile(r"field '([^']+)': (.*)", re.S)
BATCH = 1024  # requests scored at a time: bounds the text bank's memory


def owner_of(sources: dict[str, Any], task: str) -> str:
    try:
        return task_owner(sources, task)
    except KeyError as e:
        raise OptionError(f"--task: {e.args[0]}") from None


def contract_of(cfg: Any, sources: dict[str, Any], name: str) -> Contract:
    """Source ``name``'s contract as stored in the directory; a directory written before
    contracts existed gets the one its source class builds from the stored ``meta``."""
    s = sources[name]
    if s.get("contract"):
        return Contract.from_json(s["contract"])
    cls = _class(cfg, name)
    if callable(getattr(cls, "contract", None)):
        try:
            data = SimpleNamespace(name=name, meta=s.get("meta", {}), tasks=s["_tasks"])
            return cls.contract(cls.__new__(cls), data)
        except (KeyError, AttributeError, TypeError):
            pass
    raise OptionError(f"source '{name}' declares no input contract, so its tasks cannot be "
                      "asked: give the source contract() and encode() (data.source.RawSource, "
                      "docs/JOINT.md) and train again")


def _class(cfg: Any, name: str) -> type:
    sc = next(s for s in cfg.sources if s.name == name)
    return source_class(sc)


# -- requests ---------------------------------------------------------------------------------


@dataclass
class Request:
    line: int  # JSON/CSV line, Parquet row from 1, in-memory row from 0
    where: str  # "file line n" / "rows: row i", for messages
    obj: Any  # as given
    raw: str  # for the quarantine file


def read_requests(source: Any) -> Iterator[Request | BadRow]:
    """A file (JSON lines, CSV, Parquet: by extension; JSON lines otherwise) or in-memory rows
    as requests; a line that is not a JSON object is a ``BadRow``."""
    if not isinstance(source, str | Path):
        rows = (list(source) if isinstance(source, list | tuple)
                and all(isinstance(r, dict) for r in source) else rows_table(source).to_pylist())
        for i, r in enumerate(rows):
            yield Request(i, f"{ROWS}: row {i}", r, _dump(r))
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    name, suffix = path.name, path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        for i, r in enumerate(pq.read_table(path).to_pylist(), 1):
            yield Request(i, f"{name} row {i}", r, _dump(r))
    elif suffix == ".csv":
        yield from _csv_requests(path)
    else:
        yield from _jsonl_requests(path)


def _dump(obj: Any) -> str:
    return json.dumps(json_safe(obj), default=str)


def _jsonl_requests(path: Path) -> Iterator[Request | BadRow]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield BadRow(path.name, n, "", f"not valid JSON ({e.msg})", text.rstrip("\n"))
                continue
            yield Request(n, f"{path.name} line {n}", obj, text.rstrip("\n"))


def _csv_requests(path: Path) -> Iterator[Request | BadRow]:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        start = 2
        for row in reader:
            # a short row gets None cells, a long one a None key: both are malformed records
            if None in row or None in row.values():
                yield BadRow(path.name, start, "", "wrong number of fields", _dump(row))
            else:
                yield Request(start, f"{path.name} line {start}", row, _dump(row))
            start = reader.line_num + 1


# -- scoring ----------------------------------------------------------------------------------


@dataclass
class Asked:
    """A loaded joint model's one task, ready to answer requests."""

    model: Any
    cfg: Any
    sources: dict[str, Any]
    task: str

    def __post_init__(self) -> None:
        self.owner = owner_of(self.sources, self.task)
        if self.owner == REC:
            raise ValueError("a rec task reads table rows (predict.predict_rows)")
        self.s = self.sources[self.owner]
        self.contract = contract_of(self.cfg, self.sources, self.owner)
        self.output = self.contract.output(self.task)
        self.cls = _class(self.cfg, self.owner)
        if not callable(getattr(self.cls, "encode", None)):
            raise OptionError(f"source '{self.owner}' has no encode(meta, rows): its tasks "
                              "cannot be asked (data.source.RawSource)")
        self.meta = self.s.get("meta", {})
        self.spec = next(t for t in self.s["_tasks"] if t.name == self.task)
        self.answered = 0  # requests answered (the row accounting's "scored")

    def encode(self, rows: list[dict[str, Any]]) -> SourceSplit:
        return self.cls.encode(self.meta, rows)

    def check(self, req: Request, ids: Sequence[str]) -> dict[str, Any]:
        """The request read by the contract and encoded alone (what a source refuses only in
        ``encode``, e.g. dates out of order, is found here, with its place)."""
        row = self.contract.read(req.obj, req.where, extra=ids)
        try:
            self.encode([row])
        except DataError as e:
            raise DataError(f"{req.where}: {e}") from None
        return row

    @torch.no_grad()
    def scores(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, SourceSplit]:
        """Activated predictions of checked requests, in the user's units (ranking: scores
        [n, L] of requests of one list length)."""
        split = self.encode(rows)
        texts = TextIndex()
        # the model's device, wherever the caller moved it; the answer comes back as CPU numpy
        device = next(self.model.parameters()).device
        st = tensorise(split, texts).to(device)
        bank = text_bank(self.cfg, texts.texts)
        self.model.text.set_bank(*(None if t is None else t.to(device)
                                   for t in (bank.bank, bank.mask, bank.ngrams)))
        logits = head_logits(self.model, self.owner, bool(self.s["ranking"]),
                             bool(self.s["has_text"]), st)[self.task]
        pred = TASK_TYPES[self.spec.type].activate(logits).float().cpu().numpy()
        to_user = getattr(self.cls, "to_user", None)
        if callable(to_user):
            pred = np.asarray(to_user(self.meta, split, self.task, pred))
        return pred, split

    def answer_rows(self, reqs: list[Request], rows: list[dict[str, Any]], ids: Sequence[str],
                    top_k: int, all_classes: bool) -> list[dict[str, Any]]:
        """The output records of checked requests, in request order."""
        out: list[dict[str, Any]] = []
        self.answered += len(reqs)
        if self.output.type == "ranking":
            by_len: dict[int, list[int]] = {}
            for i, r in enumerate(rows):
                by_len.setdefault(len(r["candidates"]), []).append(i)
            ranked: dict[int, list[dict[str, Any]]] = {}
            for idx in by_len.values():
                scores, _ = self.scores([rows[i] for i in idx])
                items = [[c[self.output.item] for c in rows[i]["candidates"]] for i in idx]
                for i, lst in zip(idx, rank_answer(self.output, scores, items), strict=True):
                    ranked[i] = lst
            for i, req in enumerate(reqs):
                head = {"line": req.line, **{c: _id(req.obj.get(c)) for c in ids}}
                out += [{**head, **cand} for cand in ranked[i]]
            return out
        pred, _ = self.scores(rows)
        cols = answer(self.output, pred, top_k=top_k, all_classes=all_classes)
        for i, req in enumerate(reqs):
            rec = {"line": req.line, **{c: _id(req.obj.get(c)) for c in ids}}
            rec.update({k: _cell(v[i]) for k, v in cols.items()})
            out.append(rec)
        return out


def _id(v: Any) -> str | None:
    """An id cell as text: requests may give an id as a number in one row and a string (or
    nothing) in another, and the output's column has one type."""
    return v if v is None or isinstance(v, str) else _dump(v)


def _cell(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def check_ids(ids: Sequence[str], asked: Asked, top_k: int, all_classes: bool) -> list[str]:
    ids = [c.strip() for c in ids if c.strip()]
    outputs = {"line", *(c for c, _ in asked.output.columns(top_k, all_classes))}
    fields = {f.name for f in asked.contract.inputs}
    clash = sorted({c for c in ids if c in outputs or c in fields}
                   | {c for c in ids if ids.count(c) > 1})
    if clash:
        raise ConfigError(f"--id-columns: {clash} would clash with an output column or an "
                          "input field, or appear twice")
    return ids


def answer_requests(asked: Asked, source: Any, log: BadRowLog, ids: Sequence[str] = (),
                    top_k: int = 1, all_classes: bool = False, file: str = ROWS
                    ) -> Iterator[list[dict[str, Any]]]:
    """The one path of a joint model's non-rec tasks, for files and in-memory rows: requests
    read (``read_requests``), checked (bad ones to ``log``), answered ``BATCH`` at a time."""
    if top_k < 1:
        raise OptionError(f"--top-k: must be >= 1, got {top_k}")
    reqs: list[Request] = []
    rows: list[dict[str, Any]] = []
    for item in read_requests(source):
        if isinstance(item, BadRow):
            log.record([item], 1)
            continue
        try:
            row = asked.check(item, ids)
        except DataError as e:
            reason = str(e).removeprefix(f"{item.where}: ")
            field = ""
            m = _FIELD.match(reason)
            if m:  # the field named once, as the bad row's column
                field, reason = m.group(1), m.group(2)
            log.record([BadRow(file, item.line, field, reason, item.raw)], 1)
            continue
        log.record([], 1)
        if log.policy == "fail" and log.rows:
            continue  # the run fails: the rest is read only to count its bad rows
        reqs.append(item)
        rows.append(row)
        if len(rows) >= BATCH:
            yield asked.answer_rows(reqs, rows, ids, top_k, all_classes)
            reqs, rows = [], []
    if rows and not (log.policy == "fail" and log.rows):
        yield asked.answer_rows(reqs, rows, ids, top_k, all_classes)


def _table(records: list[dict[str, Any]], ids: Sequence[str] = ()) -> pa.Table:
    """Answer records as a table; the id columns typed text even where a batch gives none (a
    null column would not match the first batch's schema in the writer)."""
    table = pa.Table.from_pylist(records)
    for c in ids:
        table = table.set_column(table.schema.get_field_index(c), c,
                                 pa.array([r[c] for r in records], pa.string()))
    return table


def predict_joint_rows(model, cfg, sources: dict[str, Any], path: str | Path, out: str | Path,
                       task: str, *, bad_rows: str = "fail", id_columns: Sequence[str] = (),
                       fmt: str | None = None, top_k: int = 1, all_classes: bool = False
                       ) -> RowReport:
    """``shopmtl predict --task`` with a loaded joint model: a rec task reads CSV/Parquet rows
    (``predict.predict_rows``), the others their contract's requests; answers go to ``out``
    (JSON lines unless its extension or ``fmt`` says CSV or Parquet)."""
    if owner_of(sources, task) == REC:
        s = sources[REC]
        return predict_rows(model.rec, s["_schema"], s["_encoders"], path, out, [task],
                            bad_rows=bad_rows, id_columns=id_columns, fmt=fmt)
    asked = Asked(model, cfg, sources, task)
    ids = check_ids(id_columns, asked, top_k, all_classes)
    path, out = Path(path), Path(out)
    log = _log(bad_rows)
    empty = pa.schema([("line", pa.int64())])
    with TableWriter(out, output_format(out, fmt, default="jsonl"), empty) as w:
        for records in answer_requests(asked, path, log, ids, top_k, all_classes, path.name):
            w.write(_table(records, ids))
        log.raise_if_bad()
    return _report(log, asked.answered, out, file=path.name, output=out.name)


def predict_joint_memory(model, cfg, sources: dict[str, Any], rows: Any, task: str, *,
                         bad_rows: str = "fail", id_columns: Sequence[str] = (),
                         top_k: int = 1, all_classes: bool = False) -> pa.Table:
    """``shopmtl.load(joint dir).predict(rows, task=...)``: the rows of ``predict_joint_rows``
    as a table (without ``line`` under ``fail``, except for a ranking task, whose rows are
    candidates and ``line`` says which request; under ``quarantine`` the bad rows are in the
    schema metadata ``shopmtl.bad_rows``, as for zoo rows)."""
    if owner_of(sources, task) == REC:
        s = sources[REC]
        return predict_in_memory(model.rec, s["_schema"], s["_encoders"], rows, [task],
                                 bad_rows, id_columns)
    asked = Asked(model, cfg, sources, task)
    ids = check_ids(id_columns, asked, top_k, all_classes)
    log = _log(bad_rows)
    file = str(rows) if isinstance(rows, str | Path) else ROWS
    records = [r for part in answer_requests(asked, rows, log, ids, top_k, all_classes, file)
               for r in part]
    _report(log, asked.answered, None)
    if not records and log.seen == 0:
        raise DataError(f"{file}: no rows")
    table = _table(records, ids) if records else pa.table({"line": pa.array([], pa.int64())})
    if log.policy == "fail":
        return table if asked.output.type == "ranking" else table.drop_columns(["line"])
    bad = [{"line": b.line, "column": b.column, "reason": b.reason} for b in log.rows]
    return table.replace_schema_metadata(
        {"shopmtl.bad_rows": json.dumps({**log.summary(), "rows": bad})})
