"""Answer any task of a joint checkpoint: ``shopmtl predict MODEL_DIR FILE --task NAME``.

The recommendation tasks read the same CSV/Parquet rows as a zoo model. The other sources read
JSON lines, one example per line:

- a table source (intent, category, rating, recommend, demand): ``{"text": ..., "numeric":
  [k floats], "<id name>": int}`` with the keys that source was trained with;
- a ranking source (search relevance): ``{"query": ..., "candidates": [L texts],
  "<id name>": [L ints]}``.

Predictions go to a JSON-lines file: ``{"line": n, "<task>": ...}`` (class probabilities and
the predicted class for multiclass tasks, quantiles for quantile tasks, one score per candidate
for ranking). A bad line stops the run with its line number and what was wrong; the text
itself is never echoed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shopmtl.data.ingest import DataError
from shopmtl.joint.checkpoint import load_joint_dir, task_owner
from shopmtl.joint.config import REC
from shopmtl.joint.parts import text_bank
from shopmtl.predict import predict_rows
from shopmtl.tasks import TASK_TYPES


def is_joint_dir(path: str | Path) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("kind") == "joint"
    except (OSError, json.JSONDecodeError):
        return False


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


def predict_joint(model_dir: str | Path, path: str | Path, out: str | Path, task: str) -> int:
    model, cfg, sources = load_joint_dir(model_dir)
    try:
        owner = task_owner(sources, task)
    except KeyError as e:
        raise DataError(f"--task: {e.args[0]}") from None
    if owner == REC:
        s = sources[REC]
        return predict_rows(model.rec, s["_schema"], s["_encoders"], path, out, [task])
    s = sources[owner]
    spec = next(t for t in s["_tasks"] if t.name == task)
    rows = _read_jsonl(Path(path))
    name = Path(path).name
    texts: list[str] = [""]
    if s["ranking"]:
        q_idx, c_idx, ids = [], [], {k: [] for k in s["id_sizes"]}
        width = None
        for r in rows:
            where = f"{name} line {r['_line']}"
            cands = r.get("candidates")
            if not isinstance(cands, list) or not cands:
                raise DataError(f"{where}: 'candidates' must be a non-empty list of texts")
            if width is not None and len(cands) != width:
                raise DataError(f"{where}: every line needs the same number of candidates "
                                f"({width}), got {len(cands)}")
            width = len(cands)
            q_idx.append(len(texts))
            texts.append(_text(r, "query", where))
            c_idx.append(list(range(len(texts), len(texts) + width)))
            texts += [_text({"c": c}, "c", f"{where} candidate {j}") for j, c in enumerate(cands)]
            for k, size in s["id_sizes"].items():
                v = r.get(k, [0] * width)
                if not isinstance(v, list) or len(v) != width:
                    raise DataError(f"{where}: '{k}' must be a list of {width} ids")
                ids[k].append([_int(x, k, size, where) for x in v])
        inputs = (torch.tensor(q_idx), torch.tensor(c_idx),
                  {k: torch.tensor(v) for k, v in ids.items()})
    else:
        t_idx, num, ids = [], [], {k: [] for k in s["id_sizes"]}
        for r in rows:
            where = f"{name} line {r['_line']}"
            if s["has_text"]:
                t_idx.append(len(texts))
                texts.append(_text(r, "text", where))
            v = r.get("numeric", [])
            if (not isinstance(v, list) or len(v) != s["numeric"]
                    or not all(isinstance(x, (int, float)) and np.isfinite(x) for x in v)):
                raise DataError(f"{where}: 'numeric' must be a list of {s['numeric']} finite "
                                "numbers")
            num.append([float(x) for x in v])
            for k, size in s["id_sizes"].items():
                ids[k].append(_int(r.get(k, 0), k, size, where))
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
    with Path(out).open("w") as f:
        for r, p in zip(rows, pred, strict=True):
            rec: dict[str, Any] = {"line": r["_line"], task: np.round(p, 6).tolist()}
            if spec.type == "multiclass":
                k = int(np.argmax(p))
                rec[f"{task}_class"] = classes[k] if classes else k
            f.write(json.dumps(rec) + "\n")
    return len(rows)
