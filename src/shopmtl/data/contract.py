"""A task's input/output contract: the named raw fields it reads and the answer it gives.

Each data source declares one ``Contract`` (``Source.contract(data)``), stored in the model
directory beside the weights. The same object

- checks a request (``Contract.read``: a JSON line, a CSV/Parquet row, a Python dict, later
  an HTTP body) and names what is wrong in the user's terms (field, place, what was
  expected), never echoing a value (utterances and queries are customer text);
- turns the model's activated output into the user's answer (``answer``): a probability, the
  top-k class labels with their probabilities, a value clamped to the training range with a
  flag, named non-crossing quantiles, candidates ranked with their scores;
- describes itself (``shopmtl describe``, docs/PREDICT.md): fields, types, units, ranges, the
  output columns and a ready example line.

Raw fields go through the source's own transforms (``Source.encode``: the code that built the
training inputs, with the statistics fitted on the training split, kept in the directory), so
nobody standardises an age or rebuilds 25 demand features by hand.

This module imports nothing from shopmtl above layer 2.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shopmtl.data.ingest import DataError

FIELD_TYPES = ("text", "string", "number", "integer", "date", "records")
OUTPUT_TYPES = ("binary", "multiclass", "regression", "quantile", "ranking")


@dataclass(frozen=True)
class Field:
    """One named input field.

    ``type``: ``text`` (a non-empty string of customer or catalog text; never echoed),
    ``string`` (an identifier or category, e.g. a stock code; an unknown one is the model's
    "unknown" row, as in training), ``number`` / ``integer`` (finite, within ``ge``..``le``;
    ``unit`` says in what), ``date`` (``YYYY-MM-DD``), ``records`` (a list of objects, each with
    the fields ``items``; at least ``min_items``).
    """

    name: str
    type: str
    doc: str
    unit: str = ""
    required: bool = True
    ge: float | None = None
    le: float | None = None
    min_items: int = 0
    items: tuple[Field, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise ValueError(f"field {self.name!r}: type {self.type!r} is not one of "
                             f"{', '.join(FIELD_TYPES)}")
        if self.type == "records" and not self.items:
            raise ValueError(f"field {self.name!r}: a records field needs its items' fields")

    def expects(self) -> str:
        """What a valid value is, in words: 'a number (years) in 0..150'."""
        unit = f" ({self.unit})" if self.unit else ""
        if self.type in ("number", "integer"):
            kind = "a number" if self.type == "number" else "an integer"
            if self.ge is not None and self.le is not None:
                rng = f" in {_g(self.ge)}..{_g(self.le)}"
            elif self.ge is not None:
                rng = f" >= {_g(self.ge)}"
            elif self.le is not None:
                rng = f" <= {_g(self.le)}"
            else:
                rng = ""
            return f"{kind}{unit}{rng}"
        if self.type == "text":
            return "a non-empty text"
        if self.type == "string":
            return f"a non-empty string{unit}"
        if self.type == "date":
            return "a date YYYY-MM-DD"
        names = ", ".join(f.name for f in self.items)
        least = f" (at least {self.min_items})" if self.min_items else ""
        return f"a list of objects {{{names}}}{least}"

    def check(self, value: Any, where: str) -> Any:
        """The value, normalised (a number as float, an integer as int, a date as
        ``datetime.date``, records as a list of checked dicts); a bad one raises DataError
        naming the field and what was expected (not the value)."""
        bad = DataError(f"{where}: field '{self.name}': expected {self.expects()}, got "
                        f"{_kind(value)}")
        if self.type in ("text", "string"):
            if not isinstance(value, str) or not value.strip():
                raise bad
            return value
        if self.type in ("number", "integer"):
            if isinstance(value, str):  # a CSV cell: numbers arrive as text
                try:
                    value = float(value.strip())
                except ValueError:
                    raise bad from None
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise bad
            x = float(value)
            if not math.isfinite(x):
                raise DataError(f"{where}: field '{self.name}': expected {self.expects()}, "
                                "got a non-finite number")
            if self.type == "integer" and x != int(x):
                raise bad
            if (self.ge is not None and x < self.ge) or (self.le is not None and x > self.le):
                raise DataError(f"{where}: field '{self.name}': expected {self.expects()}, "
                                "got a number outside that range")
            return int(x) if self.type == "integer" else x
        if self.type == "date":
            if isinstance(value, dt.datetime):  # a date column pandas wrote as a timestamp
                if value.time() != dt.time():
                    raise DataError(f"{where}: field '{self.name}': expected "
                                    f"{self.expects()}, got a time of day")
                return value.date()
            if isinstance(value, dt.date):
                return value
            if isinstance(value, str):
                try:
                    return dt.date.fromisoformat(value.strip())
                except ValueError:
                    pass
            raise bad
        if isinstance(value, str):  # a CSV cell holds the list as JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad from None
        if not isinstance(value, list | tuple) or len(value) < self.min_items:
            raise DataError(f"{where}: field '{self.name}': expected {self.expects()}, got "
                            f"{_kind(value)}")
        out = []
        for j, item in enumerate(value):
            at = f"{where}: field '{self.name}' item {j}"
            if not isinstance(item, Mapping):
                raise DataError(f"{at}: expected an object {{"
                                f"{', '.join(f.name for f in self.items)}}}, got {_kind(item)}")
            out.append(read_fields(self.items, item, at))
        return out

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "doc": self.doc}
        for k in ("unit", "ge", "le"):
            if getattr(self, k) not in ("", None):
                d[k] = getattr(self, k)
        if not self.required:
            d["required"] = False
        if self.type == "records":
            d["min_items"] = self.min_items
            d["items"] = [f.to_json() for f in self.items]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Field:
        return cls(d["name"], d["type"], d.get("doc", ""), d.get("unit", ""),
                   d.get("required", True), d.get("ge"), d.get("le"), d.get("min_items", 0),
                   tuple(cls.from_json(x) for x in d.get("items", ())))


def _g(x: float) -> str:
    return f"{x:g}"


def _kind(value: Any) -> str:
    """A value's kind in words, never the value (it may be customer text)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, int | float | np.number):
        return "a number"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return type(value).__name__


def read_fields(fields: Sequence[Field], row: Mapping[str, Any], where: str,
                extra: Sequence[str] = ()) -> dict[str, Any]:
    """``row`` checked against ``fields``: every field's normalised value (None for an absent
    optional one). A missing required field, or a key that is no field (a typo would otherwise
    be ignored in silence) and not in ``extra`` (columns carried through, e.g. ids), raises."""
    names = [f.name for f in fields]
    unknown = [k for k in row if k not in names and k not in extra]
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(map(str, unknown))}; the fields are "
                        f"{names}")
    out: dict[str, Any] = {}
    for f in fields:
        v = row.get(f.name)
        if v is None or (isinstance(v, str) and not v.strip() and not f.required):
            if f.required:
                raise DataError(f"{where}: missing field '{f.name}' ({f.expects()})")
            out[f.name] = None
            continue
        out[f.name] = f.check(v, where)
    return out


@dataclass(frozen=True)
class Output:
    """What one task answers, in its user's terms.

    ``binary``: ``<task>`` = probability. ``multiclass``: ``<task>`` = the top label,
    ``<task>_p`` its probability, then ``<task>_2``, ``<task>_2_p``, ... up to ``top_k``;
    ``all_classes`` adds ``<task>_p_<label>`` for every label. ``regression``: ``<task>`` =
    the value clamped to ``low``..``high`` (the training labels' range) and ``<task>_clamped``.
    ``quantile``: ``<task>_q10`` ... (non-crossing: sorted), each clamped, and
    ``<task>_clamped``. ``ranking``: one row per candidate, best first: ``rank``, the
    candidate's ``item`` field, ``score``.
    """

    task: str
    type: str
    doc: str
    unit: str = ""
    labels: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    quantiles: tuple[float, ...] = ()
    item: str = ""  # ranking: the candidate field that names the item in the answer

    def __post_init__(self) -> None:
        if self.type not in OUTPUT_TYPES:
            raise ValueError(f"output {self.task!r}: type {self.type!r} is not one of "
                             f"{', '.join(OUTPUT_TYPES)}")

    def columns(self, top_k: int = 1, all_classes: bool = False) -> list[tuple[str, str]]:
        """The answer's columns: (name, meaning)."""
        t, unit = self.task, f" ({self.unit})" if self.unit else ""
        if self.type == "binary":
            return [(t, f"probability that {self.doc}")]
        if self.type == "multiclass":
            cols = [(t, f"the most likely label ({self.doc})"), (f"{t}_p", "its probability")]
            for k in range(2, min(top_k, len(self.labels) or top_k) + 1):
                cols += [(f"{t}_{k}", f"label ranked {k}"), (f"{t}_{k}_p", "its probability")]
            if all_classes:
                cols += [(f"{t}_p_{lab}", f"probability of '{lab}'") for lab in self.labels]
            return cols
        if self.type == "regression":
            return [(t, f"{self.doc}{unit}, clamped to {self.range_text()}"),
                    (f"{t}_clamped", "true where the model's value lay outside that range")]
        if self.type == "quantile":
            return [*((f"{t}_{qname(q)}", f"{q:g} quantile of {self.doc}{unit}")
                      for q in self.quantiles),
                    (f"{t}_clamped", f"true where a quantile lay outside {self.range_text()}")]
        return [("rank", "1 = best"), (self.item, "the candidate's item"),
                ("score", f"{self.doc} (higher = ranked first)")]

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else _g(self.low)
        hi = "inf" if self.high is None else _g(self.high)
        return f"{lo}..{hi}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.task, "type": self.type, "doc": self.doc}
        for k in ("unit", "low", "high", "item"):
            if getattr(self, k) not in ("", None):
                d[k] = getattr(self, k)
        if self.labels:
            d["labels"] = list(self.labels)
        if self.quantiles:
            d["quantiles"] = list(self.quantiles)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Output:
        return cls(d["task"], d["type"], d.get("doc", ""), d.get("unit", ""),
                   tuple(d.get("labels", ())), d.get("low"), d.get("high"),
                   tuple(d.get("quantiles", ())), d.get("item", ""))


def qname(q: float) -> str:
    """0.1 -> 'q10', 0.5 -> 'q50', 0.975 -> 'q97.5'."""
    return f"q{100 * q:g}"


def answer(out: Output, pred: np.ndarray, *, top_k: int = 1, all_classes: bool = False
           ) -> dict[str, Any]:
    """The answer columns (``Output.columns``) of activated predictions already in the user's
    units: [n] (binary, regression), [n, C] (multiclass), [n, Q] (quantile). Ranking answers
    are rows, not columns: ``rank_answer``."""
    pred = np.asarray(pred, np.float64)
    t = out.task
    if out.type == "binary":
        return {t: pred}
    if out.type == "multiclass":
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        labels = np.asarray(out.labels or [str(k) for k in range(pred.shape[1])], object)
        order = np.argsort(-pred, axis=1, kind="stable")[:, :top_k]
        cols: dict[str, Any] = {}
        for k in range(order.shape[1]):
            name = t if k == 0 else f"{t}_{k + 1}"
            cols[name] = labels[order[:, k]].tolist()
            cols[f"{name}_p"] = np.take_along_axis(pred, order[:, k:k + 1], axis=1)[:, 0]
        if all_classes:
            for j, lab in enumerate(labels):
                cols[f"{t}_p_{lab}"] = pred[:, j]
        return cols
    lo = -np.inf if out.low is None else out.low
    hi = np.inf if out.high is None else out.high
    if out.type == "regression":
        v = np.clip(pred, lo, hi)
        return {t: v, f"{t}_clamped": v != pred}
    if out.type == "quantile":
        ordered = np.sort(pred, axis=1)  # monotone rearrangement: quantiles never cross
        v = np.clip(ordered, lo, hi)
        cols = {f"{t}_{qname(q)}": v[:, j] for j, q in enumerate(out.quantiles)}
        cols[f"{t}_clamped"] = (v != ordered).any(axis=1)
        return cols
    raise ValueError(f"output {t!r}: a ranking answer is rows (rank_answer)")


def rank_answer(out: Output, scores: np.ndarray, items: Sequence[Sequence[Any]]
                ) -> list[dict[str, Any]]:
    """One list per request: its candidates best first, ``{"rank", <item>, "score"}`` (ties
    keep the request's order)."""
    res = []
    for s, its in zip(np.asarray(scores, np.float64), items, strict=True):
        order = np.argsort(-s[:len(its)], kind="stable")
        res.append([{"rank": r + 1, out.item: its[j], "score": float(s[j])}
                    for r, j in enumerate(order)])
    return res


@dataclass(frozen=True)
class Contract:
    """A source's contract: its tasks read ``inputs`` (at least one of each ``one_of`` group
    present) and answer ``outputs``; ``example`` is a valid request."""

    source: str
    inputs: tuple[Field, ...]
    outputs: tuple[Output, ...]
    example: dict[str, Any]
    doc: str = ""
    one_of: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def output(self, task: str) -> Output:
        for o in self.outputs:
            if o.task == task:
                return o
        raise KeyError(f"source {self.source!r} has no task {task!r}")

    def read(self, row: Any, where: str, extra: Sequence[str] = ()) -> dict[str, Any]:
        """One request checked (``read_fields``) and normalised; ``extra`` keys pass."""
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with fields "
                            f"{[f.name for f in self.inputs]}, got {_kind(row)}")
        out = read_fields(self.inputs, row, where, extra)
        for group in self.one_of:
            if all(out.get(k) is None for k in group):
                raise DataError(f"{where}: give at least one of the fields {list(group)}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "doc": self.doc,
                "inputs": [f.to_json() for f in self.inputs],
                "one_of": [list(g) for g in self.one_of],
                "outputs": [o.to_json() for o in self.outputs], "example": self.example}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Contract:
        return cls(d["source"], tuple(Field.from_json(f) for f in d["inputs"]),
                   tuple(Output.from_json(o) for o in d["outputs"]), dict(d["example"]),
                   d.get("doc", ""), tuple(tuple(g) for g in d.get("one_of", ())))


def table_contract(name: str, schema: Any, encoders: Any) -> Contract:
    """The contract of a zoo model (or a joint run's rec source): one field per column the
    schema reads, the scenario column, one probability per task. Its rows are read by the
    reader of training (``data.ingest.read_chunks``), not by ``Contract.read``: this contract
    describes them (``shopmtl describe``) with a ready example built from the fitted
    vocabularies and means."""
    fields: list[Field] = []
    example: dict[str, Any] = {}
    for f in schema.features:
        col = f.source
        if f.kind == "numeric":
            enc = encoders.numeric[f.name]
            mean = float(enc.mean_)
            fields.append(Field(col, "number", f"numeric feature {f.name}"
                                + (" (log1p applied)" if f.transform == "log1p" else "")
                                + ("; empty: filled" if f.fill is not None else ""),
                                required=f.fill is None))
            example[col] = round(math.expm1(mean) if f.transform == "log1p" else mean, 4)
        elif f.kind == "sequence":
            vocab = _vocabulary(encoders, f.vocab_from or f.name)
            fields.append(Field(col, "string", f"sequence feature {f.name}: items joined by "
                                f"'{f.sep}', the last {f.max_len} kept", required=False))
            example[col] = f.sep.join(vocab[:2])
        elif col not in example:  # categorical, or a content feature's key
            vocab = _vocabulary(encoders, f.name)
            what = ("the key of a catalog row" if f.kind not in ("categorical",)
                    else "categorical feature")
            fields.append(Field(col, "string", f"{what} {f.name} (unknown or empty: the "
                                "unknown row)", required=False))
            example[col] = vocab[0] if vocab else "x"
    if schema.scenario is not None:
        sc = schema.scenario
        other = f"; any other value: '{sc.other}'" if sc.other is not None else ""
        fields.append(Field(sc.column, "string", f"where the request comes from: one of "
                            f"{list(sc.values)}{other}", required=sc.other is None))
        example[sc.column] = sc.values[0]
    outputs = tuple(Output(t.name, t.type if t.type in OUTPUT_TYPES else "regression",
                           f"{t.name} = 1" if t.type == "binary" else t.name,
                           quantiles=tuple(getattr(t, "quantiles", ()) or ()))
                    for t in schema.tasks)
    return Contract(name, tuple(fields), outputs, example,
                    doc="rows of the training table's columns (CSV, Parquet or records); "
                        "label columns are not read")


def _vocabulary(encoders: Any, feature: str) -> list[str]:
    enc = (getattr(encoders, "categorical", {}).get(feature)
           or getattr(encoders, "sequence_vocab", {}).get(feature))
    return [str(v) for v in getattr(enc, "vocabulary_", []) or []]


MAX_TEXT = 10_000  # characters of one text field a request may carry (an HTTP body bound)
MAX_ITEMS = 1_000  # items of one records field (candidates, history days)


def request_model(contract: Contract, name: str | None = None) -> Any:
    """The contract as a pydantic model (the HTTP service's request body): the same fields,
    types, ranges and required-ness as ``Contract.read``, strict (a number is a JSON number, a
    text a JSON string), no NaN or infinity, unknown keys refused, texts and lists bounded.
    ``Contract.read`` stays the checker of record (``one_of`` and what ``encode`` refuses are
    checked there); this model is what OpenAPI publishes and what rejects a malformed body
    before it reaches the model. ``name``: the model's (and its OpenAPI schema's) name, when one
    contract gives several bodies (default ``<Source>Request``)."""
    from shopmtl.deps import require

    pd = require("pydantic", "serve", "the HTTP request models")
    return _model(pd, name or f"{contract.source.title()}Request", contract.inputs,
                  contract.doc)


def _model(pd: Any, name: str, fields: Sequence[Field], doc: str) -> Any:
    from typing import Annotated

    specs: dict[str, Any] = {}
    for f in fields:
        kind: Any
        if f.type in ("text", "string"):
            kind = Annotated[str, pd.StringConstraints(
                min_length=1, max_length=MAX_TEXT, strip_whitespace=False)]
        elif f.type == "number":
            kind = Annotated[float, pd.Field(ge=f.ge, le=f.le, allow_inf_nan=False)]
        elif f.type == "integer":
            kind = Annotated[int, pd.Field(ge=f.ge, le=f.le)]
        elif f.type == "date":
            kind = dt.date
        else:
            item = _model(pd, f"{name}{f.name.title()}Item", f.items, f.doc)
            kind = Annotated[list[item], pd.Field(min_length=f.min_items,  # type: ignore[valid-type]
                                                  max_length=MAX_ITEMS)]
        info = pd.Field(description=f"{f.doc} ({f.expects()})")
        specs[f.name] = (kind, info) if f.required else (kind | None, pd.Field(
            None, description=f"{f.doc} ({f.expects()}; optional)"))
    # strict: no "35" for a number; dates stay ISO strings in JSON (a str -> date conversion
    # is the one lax rule kept, field by field)
    config = pd.ConfigDict(extra="forbid", strict=True, title=name)
    model = pd.create_model(name, __config__=config, __doc__=doc or None, **specs)
    for f in fields:
        if f.type == "date":
            model.model_fields[f.name].metadata.append(pd.Strict(False))
    model.model_rebuild(force=True)
    return model
