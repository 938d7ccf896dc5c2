"""Answer any task of a joint checkpoint: ``shopmtl predict MODEL_DIR FILE --task NAME``.

The recommendation tasks read the same CSV/Parquet rows as a zoo model. The other sources read
JSON lines, one example per line:

- a table source (intent, category, rating, recommend, demand): ``{"text": ..., "numeric":
  [k floats], "<id name>": int}`` with the keys that source was trained with;
- a ranking source (search relevance): ``{"query": ..., "candidates": [L texts],
  "<id name>": [L ints]}``.

Predictions go through the zoo model's writer (``predict.TableWriter``), as JSON lines unless
OUT's extension or ``--format`` says CSV or Parquet: ``{"line": n, "<task>": ...}`` (class
probabilities and the predicted class for multiclass tasks, quantiles for quantile tasks, one
score per candidate for ranking). A bad line stops the run with its line number and what was
wrong; the text itself is never echoed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from shopmtl.config import ConfigError
from shopmtl.data.ingest import DataError
from shopmtl.joint.checkpoint import task_owner
from shopmtl.joint.config import REC
from shopmtl.joint.parts import text_bank
from shopmtl.predict import OptionError, RowReport, TableWriter, output_format, predict_rows
from shopmtl.tasks import TASK_TYPES


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path.name} line {n}: expected a JSON object")
            rows.append({"_line": n, **obj})
    if not rows:
        raise DataError(f"{path.name}: no rows")
    return rows


def _text(row: dict[str, Any], key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string")
    return v


def _int(v: Any, key: str, size: int, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{where}: '{key}' must be an integer id")
    return v if 0 <= v < size else 0  # an unknown id is the OOV row, as in training


def owner_of(sources: dict[str, Any], task: str) -> str:
    try:
        return task_owner(sources, task)
    except KeyError as e:
        raise OptionError(f"--task: {e.args[0]}") from None


def score_joint(model, cfg, sources: dict[str, Any], task: str, rows: list[dict[str, Any]],
                where: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """The one scoring path of a joint model's text and search tasks, for a JSON-lines file and
    in-memory rows alike: each row is checked (a bad one stops it, named by ``where(row)``),
    its texts encoded, the task's head run. Returns one record per row, in row order:
    ``{task: ...}`` plus ``{task}_class`` for a multiclass task (the caller adds ``line``)."""
    owner = owner_of(sources, task)
    s = sources[owner]
    spec = next(t for t in s["_tasks"] if t.name == task)
    texts: list[str] = [""]
    if s["ranking"]:
        q_idx, c_idx, ids = [], [], {k: [] for k in s["id_sizes"]}
        width = None
        for r in rows:
            at = where(r)
            cands = r.get("candidates")
            if not isinstance(cands, list) or not cands:
                raise DataError(f"{at}: 'candidates' must be a non-empty list of texts")
            if width is not None and len(cands) != width:
                raise DataError(f"{at}: every line needs the same number of candidates "
                                f"({width}), got {len(cands)}")
            width = len(cands)
            q_idx.append(len(texts))
            texts.append(_text(r, "query", at))
            c_idx.append(list(range(len(texts), len(texts) + width)))
            texts += [_text({"c": c}, "c", f"{at} candidate {j}") for j, c in enumerate(cands)]
            for k, size in s["id_sizes"].items():
                v = r.get(k, [0] * width)
                if not isinstance(v, list) or len(v) != width:
                    raise DataError(f"{at}: '{k}' must be a list of {width} ids")
                ids[k].append([_int(x, k, size, at) for x in v])
        inputs = (torch.tensor(q_idx), torch.tensor(c_idx),
                  {k: torch.tensor(v) for k, v in ids.items()})
    else:
        t_idx, num, ids = [], [], {k: [] for k in s["id_sizes"]}
        for r in rows:
            at = where(r)
            if s["has_text"]:
                t_idx.append(len(texts))
                texts.append(_text(r, "text", at))
            v = r.get("numeric", [])
            if (not isinstance(v, list) or len(v) != s["numeric"]
                    or not all(isinstance(x, (int, float)) and np.isfinite(x) for x in v)):
                raise DataError(f"{at}: 'numeric' must be a list of {s['numeric']} finite "
                                "numbers")
            num.append([float(x) for x in v])
            for k, size in s["id_sizes"].items():
                ids[k].append(_int(r.get(k, 0), k, size, at))
        inputs = (torch.tensor(t_idx, dtype=torch.long),
                  torch.tensor(num, dtype=torch.float32).reshape(len(rows), s["numeric"]),
                  {k: torch.tensor(v) for k, v in ids.items()})
    bank = text_bank(cfg, texts)
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    head = model.heads[owner]
    with torch.no_grad():
        if s["ranking"]:
            q, c, i = inputs
            logits = head(model.text.encode(q), model.text.encode(c), i)[task]
        else:
            t, x, i = inputs
            logits = head.run(model.text, t if s["has_text"] else None, x, i)[task]
        pred = TASK_TYPES[spec.type].activate(logits).numpy()
    classes = s.get("meta", {}).get("classes", {}).get(task) if spec.type == "multiclass" else None
    records = []
    for p in pred:
        rec: dict[str, Any] = {task: np.round(p, 6).tolist()}
        if spec.type == "multiclass":
            k = int(np.argmax(p))
            rec[f"{task}_class"] = classes[k] if classes else k
        records.append(rec)
    return records


def only_rows(task: str, bad_rows: str, id_columns: Sequence[str]) -> None:
    """A bad-row policy other than fail and id columns are for CSV/Parquet rows (a rec task)."""
    if bad_rows != "fail" or id_columns:
        raise ConfigError(f"--bad-rows quarantine and --id-columns need CSV/Parquet rows (a zoo "
                          f"model or a rec task); task '{task}' reads JSON lines")


def predict_joint_rows(model, cfg, sources: dict[str, Any], path: str | Path, out: str | Path,
                       task: str, *, bad_rows: str = "fail", id_columns: Sequence[str] = (),
                       fmt: str | None = None) -> RowReport:
    """``shopmtl predict --task`` with a loaded joint model: a rec task reads CSV/Parquet rows
    (``predict.predict_rows``), the others JSON lines; predictions go to ``out``."""
    if owner_of(sources, task) == REC:
        s = sources[REC]
        return predict_rows(model.rec, s["_schema"], s["_encoders"], path, out, [task],
                            bad_rows=bad_rows, id_columns=id_columns, fmt=fmt)
    only_rows(task, bad_rows, id_columns)
    rows = _read_jsonl(Path(path))
    name = Path(path).name
    records = score_joint(model, cfg, sources, task, rows, lambda r: f"{name} line {r['_line']}")
    table = pa.Table.from_pylist([{"line": r["_line"], **rec}
                                  for r, rec in zip(rows, records, strict=True)])
    with TableWriter(out, output_format(out, fmt, default="jsonl"), table.schema) as w:
        w.write(table)
    return RowReport(len(rows), len(rows), 0, 0, {})
