"""The event store of experiments: one SQLite file in WAL mode (``EventStore``), written by the
simulator and by the service, read by ``abtest analyze`` (``read_events``).

Tables (one schema for every writer):

- ``exposures``: one row per answered request: ``request_id`` (unique), ``ts`` (unix seconds),
  ``experiment``, ``period`` ('pre': before the experiment, every unit on the control policy,
  the CUPED covariate; 'test': the experiment), ``arm``, ``unit`` (``assign.unit_of``: a salted
  hash, never the raw user id), ``scenario``, ``shown`` (JSON list of the item ids shown, best
  first), ``latency_ms`` (service time; NULL in a pure simulation), ``status`` (HTTP status; not
  200 is an error for the guardrail).
- ``feedback``: ``request_id``, ``ts``, ``kind`` ('click' | 'conversion'), ``item``,
  ``position`` (0-based within ``shown``), ``value`` (revenue of a conversion: the price; 0 for
  a click).
- ``meta``: key -> JSON value (the experiment's config, the dropped-event counts, ...).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA = """
CREATE TABLE IF NOT EXISTS exposures (
  request_id TEXT PRIMARY KEY,
  ts REAL NOT NULL,
  experiment TEXT NOT NULL,
  period TEXT NOT NULL CHECK (period IN ('pre', 'test')),
  arm TEXT NOT NULL,
  unit TEXT NOT NULL,
  scenario TEXT NOT NULL,
  shown TEXT NOT NULL,
  latency_ms REAL,
  status INTEGER NOT NULL DEFAULT 200
);
CREATE TABLE IF NOT EXISTS feedback (
  request_id TEXT NOT NULL,
  ts REAL NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('click', 'conversion')),
  item TEXT NOT NULL,
  position INTEGER NOT NULL CHECK (position >= 0),
  value REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Exposure:
    request_id: str
    ts: float
    experiment: str
    period: str
    arm: str
    unit: str
    scenario: str
    shown: str  # JSON list of item ids
    latency_ms: float | None = None
    status: int = 200


@dataclass(frozen=True, slots=True)
class Feedback:
    request_id: str
    ts: float
    kind: str
    item: str
    position: int
    value: float = 0.0


class EventStore:
    """Appends events to one SQLite file (created with the schema when missing).

    One connection, one writer: the service's writer thread (``serve``) or the simulator. WAL
    mode lets ``read_events`` read while it writes. Each ``add_*`` call is one transaction.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.path, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.executescript(SCHEMA)

    def add_exposures(self, rows: Iterable[Exposure]) -> int:
        data = [astuple(r) for r in rows]
        with self._con:
            self._con.executemany(
                "INSERT INTO exposures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", data)
        return len(data)

    def add_feedback(self, rows: Iterable[Feedback]) -> int:
        data = [astuple(r) for r in rows]
        with self._con:
            self._con.executemany("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?)", data)
        return len(data)

    def set_meta(self, key: str, value: Any) -> None:
        with self._con:
            self._con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              (key, json.dumps(value, sort_keys=True)))

    def meta(self) -> dict[str, Any]:
        """The meta table as key -> value (what an earlier run of this store wrote)."""
        return {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM meta")}

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Events:
    exposures: pa.Table
    feedback: pa.Table
    meta: dict[str, Any]


ARROW = {
    "exposures": pa.schema([("request_id", pa.string()), ("ts", pa.float64()),
                            ("experiment", pa.string()), ("period", pa.string()),
                            ("arm", pa.string()), ("unit", pa.string()),
                            ("scenario", pa.string()), ("shown", pa.string()),
                            ("latency_ms", pa.float64()), ("status", pa.int64())]),
    "feedback": pa.schema([("request_id", pa.string()), ("ts", pa.float64()),
                           ("kind", pa.string()), ("item", pa.string()),
                           ("position", pa.int64()), ("value", pa.float64())]),
}


def _table(con: sqlite3.Connection, name: str) -> pa.Table:
    schema = ARROW[name]  # the table name is one of ours, never a user's
    rows = con.execute(f"SELECT {', '.join(schema.names)} FROM {name}").fetchall()
    return pa.table({c: pa.array([r[i] for r in rows], schema.field(c).type)
                     for i, c in enumerate(schema.names)}, schema=schema)


def read_events(path: str | Path) -> Events:
    """Every table of an event store (read-only; works while a writer appends)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no event store there")
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            exposures = _table(con, "exposures")
            feedback = _table(con, "feedback")
            meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{p}: not a shopmtl event store ({e})") from None
    return Events(exposures, feedback, meta)
