"""The event store of experiments, written by the simulator and by the service, read by
``abtest analyze`` (``read_events``). Two backends behind one interface (``EventStore``), chosen
by where the store is:

- a file path: one SQLite file in WAL mode (the default): the processes of one host
  (``serve --workers N``: one server per worker) write it in turn, each waiting up to
  ``BUSY_TIMEOUT_S`` for the write lock instead of failing with "database is locked";
- a ``postgresql://user@host:port/db`` URL: a PostgreSQL database that several servers write
  into at once (psycopg 3, the ``abtest-pg`` extra). Give the password through ``PGPASSWORD``
  or ``~/.pgpass`` rather than the URL; wherever a URL is shown, its password is ``***``.

Tables (one schema for every writer and both backends: ``TABLES`` below is the one definition;
the SQLite DDL, the PostgreSQL DDL and the Arrow schema are derived from it):

- ``exposures``: one row per answered request: ``request_id`` (unique), ``ts`` (unix seconds),
  ``experiment``, ``period`` ('pre': before the experiment, every unit on the control policy,
  the CUPED covariate; 'test': the experiment), ``arm``, ``unit`` (``assign.unit_of``: a salted
  hash, never the raw user id), ``scenario``, ``shown`` (JSON list of the item ids shown, best
  first), ``latency_ms`` (service time; NULL in a pure simulation), ``status`` (HTTP status; not
  200 is an error for the guardrail).
- ``feedback``: ``request_id``, ``ts``, ``kind`` ('click' | 'conversion'), ``item``,
  ``position`` (0-based within ``shown``), ``value`` (revenue of a conversion: the price; 0 for
  a click).
- ``meta``: key -> JSON value (the experiment's config, the event counts, ...). A server
  writes its counts under its own keys, ``written@SERVER`` and ``dropped@SERVER``, so that
  servers sharing a store never overwrite each other's; ``meta()`` and ``read_events`` show
  their sums as ``written`` and ``dropped`` and each server's under ``servers``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa

# The one definition of the tables: (column, type, constraint). Types are the portable names
# below; each backend's DDL maps them (REAL in SQLite is a float64, as DOUBLE PRECISION is).
TABLES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "exposures": (
        ("request_id", "text", "PRIMARY KEY"),
        ("ts", "real", "NOT NULL"),
        ("experiment", "text", "NOT NULL"),
        ("period", "text", "NOT NULL CHECK (period IN ('pre', 'test'))"),
        ("arm", "text", "NOT NULL"),
        ("unit", "text", "NOT NULL"),
        ("scenario", "text", "NOT NULL"),
        ("shown", "text", "NOT NULL"),
        ("latency_ms", "real", ""),
        ("status", "integer", "NOT NULL DEFAULT 200"),
    ),
    "feedback": (
        ("request_id", "text", "NOT NULL"),
        ("ts", "real", "NOT NULL"),
        ("kind", "text", "NOT NULL CHECK (kind IN ('click', 'conversion'))"),
        ("item", "text", "NOT NULL"),
        ("position", "integer", "NOT NULL CHECK (position >= 0)"),
        ("value", "real", "NOT NULL DEFAULT 0"),
    ),
    "meta": (("key", "text", "PRIMARY KEY"), ("value", "text", "NOT NULL")),
}
INDEXES = ("CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id)",)
SQL_TYPES = {
    "sqlite": {"text": "TEXT", "real": "REAL", "integer": "INTEGER"},
    "postgresql": {"text": "TEXT", "real": "DOUBLE PRECISION", "integer": "BIGINT"},
}
ARROW_TYPES = {"text": pa.string(), "real": pa.float64(), "integer": pa.int64()}
SCHEMES = ("postgresql", "postgres")  # libpq takes both
COUNTS = ("written", "dropped")  # the per-server meta counts (``written@SERVER``)
# pg_advisory_xact_lock's key while a server creates the tables: two servers starting at once
# would otherwise race in CREATE TABLE IF NOT EXISTS (a unique violation in pg_type)
_DDL_LOCK = 0x5EED_E7E5
CONNECT_TIMEOUT_S = 10
# seconds a SQLite writer waits for another process's write transaction (sqlite3's busy
# handler; its default, 5 s, is short when N workers' writers and a reader share one disk)
BUSY_TIMEOUT_S = 30.0


def _open_sqlite(path: Path) -> sqlite3.Connection:
    """A connection to the SQLite store at ``path``, in WAL mode, its tables created. Processes
    that open one fresh file at the same moment (``serve --workers N``) race in the switch to
    WAL, and SQLite answers that race "database is locked" at once, without its busy handler
    (measured: tests/serve/test_workers_experiment.py, 4 processes); so the opening is tried
    again, with a growing pause, for up to ``BUSY_TIMEOUT_S``."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.01
    while True:
        con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.executescript(SCHEMA)
            return con
        except sqlite3.OperationalError as e:
            con.close()
            if "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def ddl(dialect: str) -> list[str]:
    """The statements that create the tables in ``dialect`` (sqlite | postgresql)."""
    types = SQL_TYPES[dialect]
    out = []
    for name, columns in TABLES.items():
        cols = ",\n  ".join(f"{c} {types[t]} {extra}".rstrip() for c, t, extra in columns)
        out.append(f"CREATE TABLE IF NOT EXISTS {name} (\n  {cols}\n)")
    return [*out, *INDEXES]


SCHEMA = ";\n".join(ddl("sqlite")) + ";\n"
PG_SCHEMA = ";\n".join(ddl("postgresql")) + ";\n"
ARROW = {name: pa.schema([(c, ARROW_TYPES[t]) for c, t, _ in TABLES[name]])
         for name in ("exposures", "feedback")}


class EventStoreError(OSError):
    """The event store cannot be opened or read: a server unreachable, a login refused, a
    malformed URL. The message names the store with its password hidden."""


def is_url(where: str | Path) -> bool:
    """Whether ``where`` is a database URL (``scheme://...``) rather than a file path."""
    return isinstance(where, str) and "://" in where


def redact(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) as ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a malformed port: keep the scheme only
        return url.split("://", 1)[0] + "://***"
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if "password" in query:
        query = urlencode([(k, "***" if k == "password" else v)
                           for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class StoreURL(str):
    """A database URL whose ``repr`` hides its password: a config holding one can be printed
    or hashed (``repr``) without it. ``str`` is the whole URL, for connecting."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact(str(self)))


def describe(where: str | Path) -> str:
    """How logs and errors name a store: a URL redacted, a path as given."""
    return redact(where) if is_url(where) else str(where)


def _secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    return found + [v for k, v in parse_qsl(parts.query) if k == "password" and v]


def _pg_error(url: str, e: Exception, doing: str) -> EventStoreError:
    """One line naming the store (redacted) and libpq's reason, never the password."""
    reason = " ".join(str(e).split()) or type(e).__name__
    try:
        for secret in _secrets(url):
            reason = reason.replace(secret, "***")
    except ValueError:
        pass
    return EventStoreError(f"{redact(url)}: cannot {doing} the PostgreSQL event store "
                           f"({reason})")


def _pg_connect(url: str, *, doing: str) -> Any:
    from shopmtl.deps import require

    psycopg = require("psycopg", "abtest-pg", "a PostgreSQL event store")
    if urlsplit(url).scheme not in SCHEMES:
        raise EventStoreError(f"{redact(url)}: not a PostgreSQL URL (expected "
                              f"{' or '.join(s + '://' for s in SCHEMES)})")
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="shopmtl-events")
    except (psycopg.Error, ValueError) as e:  # OperationalError, ProgrammingError (a bad URL)
        raise _pg_error(url, e, doing) from None


def _pg(sql: str) -> str:
    """A statement written with SQLite's ``?`` placeholders in psycopg's ``%s`` style (no
    statement here holds a literal '?' or '%')."""
    return sql.replace("?", "%s")


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


def merge_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The meta as readers see it: every server's ``written@SERVER`` / ``dropped@SERVER``
    summed per kind into ``written`` / ``dropped`` (with a plain ``written`` of a store from
    before per-server keys), and each server's own under ``servers``. Without per-server keys
    the meta is returned as it is."""
    servers: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        what, at, server = key.partition("@")
        if at and what in COUNTS:
            servers.setdefault(server, {})[what] = value
        else:
            out[key] = value
    if not servers:
        return out
    for what in COUNTS:
        total = dict(out.get(what) or {})
        for counts in servers.values():
            for kind, n in (counts.get(what) or {}).items():
                total[kind] = total.get(kind, 0) + n
        out[what] = total
    out["servers"] = dict(sorted(servers.items()))
    return out


class EventStore:
    """Appends events to a store (created with the schema when missing): a SQLite file (a
    path) or a PostgreSQL database (a ``postgresql://`` URL).

    One connection per store. SQLite: the writers of one host take turns (a busy timeout,
    ``BUSY_TIMEOUT_S``); WAL mode lets ``read_events`` read while they write. PostgreSQL:
    any number of stores (servers) write into one database at once. Each ``add_*`` call is
    one transaction.
    """

    def __init__(self, where: str | Path) -> None:
        self.where = where
        self.postgres = is_url(where)
        if self.postgres:
            url = str(where)
            self._con = _pg_connect(url, doing="open")
            try:
                with self._con.transaction():
                    self._con.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
                    for statement in ddl("postgresql"):
                        self._con.execute(statement)
            except Exception as e:  # psycopg.Error: no right to create tables, ...
                self._con.close()
                raise _pg_error(url, e, "create the tables of") from None
        else:
            path = Path(where)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._con = _open_sqlite(path)

    @property
    def path(self) -> Path:
        """The SQLite file (a PostgreSQL store has none)."""
        if self.postgres:
            raise AttributeError(f"{describe(self.where)}: a PostgreSQL store has no file")
        return Path(self.where)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A cursor inside one transaction (committed on success, rolled back on error). A
        PostgreSQL connection that broke (the server restarted, the network dropped) failed
        the call that found it broken; the next call connects again."""
        if self.postgres and self._con.broken:
            self._con.close()
            self._con = _pg_connect(str(self.where), doing="reconnect to")
        if self.postgres:
            with self._con.transaction(), self._con.cursor() as cur:
                yield cur
        else:
            with self._con:
                yield self._con.cursor()

    def _sql(self, sql: str) -> str:
        return _pg(sql) if self.postgres else sql

    def _insert(self, table: str, data: list[tuple[Any, ...]]) -> int:
        if data:
            marks = ", ".join("?" * len(TABLES[table]))
            with self._tx() as cur:
                cur.executemany(self._sql(f"INSERT INTO {table} VALUES ({marks})"), data)
        return len(data)

    def add_exposures(self, rows: Iterable[Exposure]) -> int:
        return self._insert("exposures", [astuple(r) for r in rows])

    def add_feedback(self, rows: Iterable[Feedback]) -> int:
        return self._insert("feedback", [astuple(r) for r in rows])

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as cur:
            cur.execute(self._sql("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                                  "SET value = excluded.value"),
                        (key, json.dumps(value, sort_keys=True)))

    def claim_meta(self, values: dict[str, Any]) -> dict[str, Any]:
        """Writes each key of ``values`` the store does not hold yet, in one transaction, and
        returns what the store holds for them: the first writer's values. Two servers starting
        at once on one database agree on one (a concurrent insert of a key waits for the
        other's commit, then does nothing)."""
        with self._tx() as cur:
            cur.executemany(self._sql("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO "
                                      "NOTHING"),
                            [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()])
        raw = self.raw_meta()
        return {k: raw[k] for k in values}

    def raw_meta(self) -> dict[str, Any]:
        """The meta table as stored: key -> value."""
        with self._tx() as cur:
            cur.execute("SELECT key, value FROM meta")
            return {k: json.loads(v) for k, v in cur.fetchall()}

    def meta(self) -> dict[str, Any]:
        """The meta as ``read_events`` shows it (``merge_meta``: counts summed over servers)."""
        return merge_meta(self.raw_meta())

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


def _table(rows: list[tuple[Any, ...]], name: str) -> pa.Table:
    """Rows as an Arrow table, sorted by every column: the same events read from either
    backend are the same table (neither promises an order without ORDER BY, and their text
    collations differ; Arrow compares strings by their bytes)."""
    schema = ARROW[name]
    table = pa.table({c: pa.array([r[i] for r in rows], schema.field(c).type)
                      for i, c in enumerate(schema.names)}, schema=schema)
    return table.sort_by([(c, "ascending") for c in schema.names])


def _select(name: str) -> str:
    return f"SELECT {', '.join(ARROW[name].names)} FROM {name}"  # our table names, never a user's


def read_events(where: str | Path) -> Events:
    """Every table of an event store, a SQLite file or a ``postgresql://`` URL (read-only;
    works while writers append; PostgreSQL: one consistent snapshot of the three tables)."""
    if is_url(where):
        return _read_postgres(str(where))
    p = Path(where)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no event store there")
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            exposures = _table(con.execute(_select("exposures")).fetchall(), "exposures")
            feedback = _table(con.execute(_select("feedback")).fetchall(), "feedback")
            meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{p}: not a shopmtl event store ({e})") from None
    return Events(exposures, feedback, merge_meta(meta))


def _read_postgres(url: str) -> Events:
    con = _pg_connect(url, doing="read")  # first: a missing psycopg is the extra's one line
    import psycopg
    try:
        con.read_only = True
        con.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with con.transaction(), con.cursor() as cur:
            cur.execute(_select("exposures"))
            exposures = _table(cur.fetchall(), "exposures")
            cur.execute(_select("feedback"))
            feedback = _table(cur.fetchall(), "feedback")
            cur.execute("SELECT key, value FROM meta")
            meta = {k: json.loads(v) for k, v in cur.fetchall()}
    except psycopg.errors.UndefinedTable:
        raise ValueError(f"{redact(url)}: not a shopmtl event store (a table of it is "
                         "missing)") from None
    except psycopg.Error as e:
        raise _pg_error(url, e, "read") from None
    finally:
        con.close()
    return Events(exposures, feedback, merge_meta(meta))
