"""A config key's one-line meaning and its allowed range, declared next to its dataclass field.

``x: int = key(3, "epochs over the training data", ge=1)`` is a ``dataclasses.field`` whose
metadata holds both. The loader (``config.from_dict``) checks every value it reads against the
range and names the key in the user's terms (``train.epochs: must be >= 1, got 0``), and
``configdoc`` prints the same metadata as docs/CONFIG.md: one declaration drives the check and
the reference, so they cannot drift apart.

This module imports nothing from shopmtl, so every layer (data, models, weighting, joint) may
declare its keys with it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DOC = "doc"
RANGE = "range"


@dataclass(frozen=True)
class Range:
    """Numbers from ``lo`` to ``hi`` (None: unbounded), each end open or closed. Every bound
    also means finite: a NaN or an infinity never passes (an ``.inf`` learning rate is not a
    choice anyone makes on purpose)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "finite"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def key(default: Any = dataclasses.MISSING, doc: str = "", *,
        factory: Any = dataclasses.MISSING, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, finite: bool = False) -> Any:
    """A dataclass field with its meaning (``doc``) and, for a number (or the numbers of a list
    or mapping), its range: ``ge``/``gt`` the lower bound, ``le``/``lt`` the upper one;
    ``finite`` alone: any finite number."""
    rng = None
    if any(b is not None for b in (ge, gt, le, lt)) or finite:
        rng = Range(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                    lo_open=gt is not None, hi_open=lt is not None)
    metadata = {DOC: doc, RANGE: rng}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def doc_of(f: dataclasses.Field) -> str:
    return f.metadata.get(DOC, "")


def range_of(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(RANGE)


def _numbers(value: Any, path: str) -> list[tuple[str, float]]:
    """The numbers a value holds, each with its key path: itself, a list's items (``a[0]``),
    a mapping's values (``a.click``). Booleans and None are no numbers here (types are checked
    before ranges)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _numbers(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _numbers(v, f"{path}.{k}")]
    return []


def range_problem(f: dataclasses.Field, value: Any, path: str) -> str | None:
    """``"path: must be >= 1, got 0"`` for the first number of ``value`` outside the range of
    field ``f``; None when every one is inside (or the field has no range)."""
    rng = range_of(f)
    if rng is None:
        return None
    for where, v in _numbers(value, path):
        if not rng.holds(v):
            return f"{where}: must be {rng}, got {v!r}"
    return None


def check_fields(obj: Any) -> None:
    """ValueError naming the first field of dataclass ``obj`` outside its range: the check of a
    config built in Python (``TrainConfig(batch_size=-5)``), as the loader checks a file's."""
    for f in dataclasses.fields(obj):
        problem = range_problem(f, getattr(obj, f.name), f.name)
        if problem:
            raise ValueError(problem)
