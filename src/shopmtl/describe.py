"""``shopmtl describe MODEL_DIR [--task T]``: each task's input fields, output columns and a
ready example, read from the contracts stored in the model directory (``data.contract``).

The same rendering, as Markdown, is docs/PREDICT.md (``python -m shopmtl.describe MODEL_DIR
--markdown``; tests/joint/test_contract.py keeps it current), so the reference and the tool
cannot disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shopmtl.data.contract import Contract, Field

TABLE_SOURCES = ("table", "rec")  # contracts whose rows are read by the zoo reader (CSV/Parquet)


def example_file(contract: Contract) -> tuple[str, str]:
    """(file name, content) of a one-request input file for ``shopmtl predict``: a CSV
    header and row for table rows, a JSON line otherwise."""
    if contract.source in TABLE_SOURCES:
        cols = list(contract.example)
        return "request.csv", ",".join(cols) + "\n" + ",".join(
            _csv_cell(contract.example[c]) for c in cols) + "\n"
    return "request.jsonl", json.dumps(contract.example) + "\n"


def _csv_cell(v: Any) -> str:
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s


def command(model_dir: str, task: str, contract: Contract, kind: str) -> str:
    name, _ = example_file(contract)
    flag = f" --task {task}" if kind == "joint" else ""
    out = "answers.csv" if contract.source in TABLE_SOURCES else "answers.jsonl"
    return f"shopmtl predict {model_dir} {name}{flag} --out {out}"


def task_info(model: Any, task: str, top_k: int = 1) -> dict[str, Any]:
    """One task's contract as JSON: source, inputs, output columns, example, command."""
    c = model.contract(task)
    out = c.output(task)
    name, content = example_file(c)
    return {"task": task, "source": c.source, "doc": c.doc, "type": out.type,
            "inputs": [f.to_json() for f in c.inputs], "one_of": [list(g) for g in c.one_of],
            "output": out.to_json(),
            "columns": [{"name": n, "doc": d} for n, d in out.columns(top_k)],
            "example": {"file": name, "content": content,
                        "command": command(str(model.path), task, c, model.kind)}}


def _field_rows(fields: tuple[Field, ...] | list[Field], prefix: str = "") -> list[list[str]]:
    rows = []
    for f in fields:
        rows.append([f"{prefix}{f.name}", f.type, "yes" if f.required else "no",
                     f.expects(), f.doc])
        if f.items:
            rows += _field_rows(f.items, prefix=f"{prefix}{f.name}[].")
    return rows


def _columns(out: Any) -> list[list[str]]:
    return [[n, d] for n, d in out.columns(top_k=2)]


def markdown(model: Any, tasks: list[str] | None = None, title: str = "") -> str:
    """Every task (or ``tasks``) of a model as Markdown: fields, output columns, example."""
    lines = [title] if title else []
    seen: dict[str, list[str]] = {}
    for t in tasks or list(model.tasks):
        seen.setdefault(model.contract(t).source, []).append(t)
    for source, names in seen.items():
        c = model.contract(names[0])
        lines += [f"## {', '.join(names)} (source `{source}`)", "", c.doc + ".", ""]
        lines += ["| field | type | required | expected | meaning |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_md(x) for x in r) + " |" for r in _field_rows(c.inputs)]
        if c.one_of:
            lines += ["", "At least one of: " + "; ".join(", ".join(f"`{x}`" for x in g)
                                                         for g in c.one_of) + "."]
        for t in names:
            out = c.output(t)
            lines += ["", f"**{t}** ({out.type}) answers:", "", "| column | meaning |",
                      "|---|---|"]
            lines += [f"| `{n}` | {_md(d)} |" for n, d in _columns(out)]
            if out.labels:
                shown = ", ".join(f"`{x}`" for x in out.labels[:12])
                more = f" and {len(out.labels) - 12} more" if len(out.labels) > 12 else ""
                lines += ["", f"Labels ({len(out.labels)}): {shown}{more}. `--top-k K` adds "
                          "ranks 2..K, `--all-classes` one probability column per label."]
        name, content = example_file(c)
        lines += ["", f"Example (`{name}`):", "", "```", content.rstrip("\n"), "```", "",
                  "```", command("MODEL_DIR", names[0], c, model.kind), "```", ""]
    return "\n".join(lines)


def _md(s: str) -> str:
    return str(s).replace("|", "\\|")


def text(model: Any, tasks: list[str] | None = None) -> str:
    """The terminal rendering of ``shopmtl describe``."""
    lines = [f"{model.path}: {model.kind} model, tasks {', '.join(model.tasks)}"]
    for t in tasks or list(model.tasks):
        info = task_info(model, t)
        lines += ["", f"task {t} ({info['type']}; source {info['source']}: {info['doc']})",
                  "  input fields:"]
        rows = _field_rows([Field.from_json(f) for f in info["inputs"]])
        width = max(len(r[0]) for r in rows)
        lines += [f"    {r[0]:<{width}}  {'required' if r[2] == 'yes' else 'optional'}  "
                  f"{r[3]}: {r[4]}" for r in rows]
        if info["one_of"]:
            lines.append("    at least one of: " + "; ".join(", ".join(g)
                                                            for g in info["one_of"]))
        lines.append("  output columns:")
        lines += [f"    {c['name']}: {c['doc']}" for c in info["columns"]]
        labels = info["output"].get("labels")
        if labels:
            lines.append(f"  labels ({len(labels)}): {', '.join(labels)}")
        ex = info["example"]
        lines += [f"  example ({ex['file']}):"]
        lines += [f"    {x}" for x in ex["content"].rstrip("\n").splitlines()]
        lines += [f"    {ex['command']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m shopmtl.describe MODEL_DIR --markdown``: docs/PREDICT.md."""
    from shopmtl.modeldir import load

    args = list(sys.argv[1:] if argv is None else argv)
    md = "--markdown" in args
    args = [a for a in args if a != "--markdown"]
    if len(args) != 1:
        print("usage: python -m shopmtl.describe MODEL_DIR [--markdown]", file=sys.stderr)
        return 2
    model = load(Path(args[0]))
    print(markdown(model, title=PREDICT_TITLE) if md else text(model))
    return 0


PREDICT_TITLE = """# Asking a trained model: one contract per task

Generated from the contracts stored in a model directory (`data/contract.py`), by:

```
shopmtl train examples/joint_tiny.yaml --out runs/tiny
python -m shopmtl.describe runs/tiny/joint/model --markdown > docs/PREDICT.md
```

(`shopmtl describe MODEL_DIR [--task T]` prints the same for any model directory.) Every task
reads raw named fields and runs the transforms of training (vocabularies, standardisation,
n-gram hashing, demand features from the raw sales history: stored in the directory). Inputs:
JSON lines, CSV (a list field as JSON text) or Parquet; the rec tasks read the rows of the
training table (CSV or Parquet). Outputs follow OUT's extension (`.csv`, `.jsonl`,
`.parquet`) or `--format`; each row starts with `line` (the request's line) and the
`--id-columns` given. A bad request stops the run with its line and field
(`--bad-rows quarantine` sets it aside next to OUT instead); a text is never echoed.
Regression values are clamped to the training labels' range (`<task>_clamped` says where),
quantiles are sorted (they never cross), ranking answers one row per candidate, best first.
"""


if __name__ == "__main__":
    raise SystemExit(main())
