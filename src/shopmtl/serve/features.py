"""Features by id: the service fills a request's user and item columns from a feature store.

A snapshot (``shopmtl features DATA --out SNAPSHOT``, ``write_snapshot``) holds, for each user
and each item of a data file of the training table, the latest value of its columns: the last
row per key in file order (or, with ``order_by``, the row with the largest value of that
column, ties in file order). It is a folder: ``user.parquet``, ``item.parquet`` (the key as
text, then the columns as the file has them) and ``manifest.json`` (the keys, the columns, the
sha256 of each file), written into a temporary folder and renamed into place (a reader never
sees half a snapshot).

Stores (``FeatureStore.lookup(kind, keys) -> (rows, missing)``, ``kind`` is ``user`` or
``item``, a key is the id as text; a row is ``{}`` for an id the store lacks):

- ``SnapshotStore``: the snapshot in memory (its hashes checked when loaded); no server.
- ``RedisStore``: one hash per id, ``shopmtl:<kind>:<key>`` (field -> value as text, an empty
  cell absent), read by HGETALL, pipelined (one round trip per kind and request); the spec
  (keys, columns) under ``shopmtl:features``. ``push_snapshot`` loads a snapshot into it;
  features updated online are plain ``HSET``s of those hashes.

``FeatureFill`` is what an endpoint calls: for each row, the user and item columns the request
does not give are looked up by the row's ids and converted to the contract's types (fields
present in the request win); an id the store lacks leaves them empty (the unknown row, a
numeric's fill, as the reader treats an empty cell) and is counted (``on_miss``: the metric
``shopmtl_feature_misses_total{kind}``). No id is ever logged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shopmtl.data.ingest import DataError
from shopmtl.deps import require
from shopmtl.train.checkpoint import sha256_file

KINDS = ("user", "item")
FORMAT = 1
MANIFEST = "manifest.json"
REDIS_PREFIX = "shopmtl"
REDIS_SPEC = f"{REDIS_PREFIX}:features"
PUSH_CHUNK = 1_000  # hashes written per Redis pipeline
# the quickstart world's (data.synthetic.default_schema) user and item columns: the defaults of
# `shopmtl features`; request-time columns (scenario, position) belong to neither
QUICKSTART_USER_COLUMNS = ("segment", "age_bucket", "gender", "hist_leaf")
QUICKSTART_ITEM_COLUMNS = ("top_category", "leaf_category", "brand", "price")


class FeatureStoreError(ConnectionError):
    """The feature store cannot answer (Redis down or timing out): a 503 in the service, a
    runtime error (exit 1, an OSError) of the command line."""


@dataclass(frozen=True)
class Spec:
    """Which columns a store holds: per kind, the key column and the feature columns."""

    keys: Mapping[str, str]  # kind -> key column (user_id, item_id)
    columns: Mapping[str, tuple[str, ...]]  # kind -> feature columns

    def to_json(self) -> dict[str, Any]:
        return {k: {"key": self.keys[k], "columns": list(self.columns[k])} for k in KINDS}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Spec:
        try:
            return cls({k: str(raw[k]["key"]) for k in KINDS},
                       {k: tuple(str(c) for c in raw[k]["columns"]) for k in KINDS})
        except (KeyError, TypeError) as e:
            raise DataError(f"feature store: a bad spec (no {e})") from None


class FeatureStore(Protocol):
    spec: Spec

    def lookup(self, kind: str, keys: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
        """One row per key (``{}`` where the store lacks it) and the number of such keys."""
        ...


# -- the snapshot --------------------------------------------------------------------------------


def _read_table(path: Path, columns: list[str]) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix.lower() == ".csv":
        table = pacsv.read_csv(path)
        lacking = [c for c in columns if c not in table.schema.names]
        if lacking:
            raise DataError(f"{path.name}: no column(s) {lacking}")
        return table.select(columns)
    names = pq.read_schema(path).names
    lacking = [c for c in columns if c not in names]
    if lacking:
        raise DataError(f"{path.name}: no column(s) {lacking}")
    return pq.read_table(path, columns=columns)


def latest_rows(table: Any, key: str, order_by: str | None = None) -> Any:
    """One row per non-empty ``key``: its last in file order (``order_by``: the largest value
    of that column, ties in file order), sorted by key; the key as text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if order_by is not None:
        table = table.take(pc.sort_indices(table, [(order_by, "ascending")]))  # stable
    keys = pc.cast(table.column(key), pa.string())
    table = table.set_column(table.schema.get_field_index(key), key, keys)
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    table = table.filter(pc.is_valid(table.column(key)))
    last = table.group_by(key).aggregate([("__row", "max")]).column("__row_max")
    out = table.take(pc.index_in(last, table.column("__row")))
    return out.drop_columns(["__row"]).sort_by(key)


def write_snapshot(data: str | Path, out: str | Path, spec: Spec,
                   order_by: str | None = None) -> dict[str, Any]:
    """The snapshot of ``data`` (Parquet or CSV) in folder ``out`` (the module docstring),
    replacing a snapshot there; its manifest."""
    import pyarrow.parquet as pq

    data, out = Path(data), Path(out)
    for kind in KINDS:
        cols = spec.columns[kind]
        if not cols:
            raise DataError(f"no {kind} columns given")
        dup = sorted({c for c in cols if list(cols).count(c) > 1} | (
            set(cols) & {spec.keys[kind]}))
        if dup:
            raise DataError(f"{kind} columns: {dup} given twice (or as the key)")
    both = sorted(set(spec.columns["user"]) & set(spec.columns["item"]))
    if both:
        raise DataError(f"column(s) {both} given as user and item columns")
    if out.exists() and not (out / MANIFEST).is_file():
        raise DataError(f"{out}: exists and is not a feature snapshot (no {MANIFEST}); "
                        "choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest: dict[str, Any] = {"format": FORMAT, "source": data.name,
                                    "order_by": order_by, **spec.to_json()}
        for kind in KINDS:
            key = spec.keys[kind]
            cols = [key, *spec.columns[kind]]
            extra = [order_by] if order_by is not None and order_by not in cols else []
            table = latest_rows(_read_table(data, cols + extra), key, order_by)
            name = f"{kind}.parquet"
            pq.write_table(table.select(cols), tmp / name)
            manifest[kind].update(file=name, rows=table.num_rows, sha256=sha256_file(tmp / name))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "snapshot")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(snapshot: str | Path) -> dict[str, Any]:
    path = Path(snapshot) / MANIFEST
    if not path.is_file():
        raise DataError(f"{snapshot}: not a feature snapshot (no {MANIFEST}); write one with "
                        "`shopmtl features DATA --out SNAPSHOT`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{snapshot}: feature snapshot format {manifest.get('format')!r}, "
                        f"this shopmtl reads {FORMAT}")
    return manifest


def snapshot_rows(snapshot: str | Path) -> tuple[Spec, dict[str, list[dict[str, Any]]]]:
    """The snapshot's spec and rows per kind, each file's sha256 checked."""
    import pyarrow.parquet as pq

    snapshot = Path(snapshot)
    manifest = read_manifest(snapshot)
    spec = Spec.from_json(manifest)
    rows = {}
    for kind in KINDS:
        path = snapshot / manifest[kind]["file"]
        if not path.is_file() or sha256_file(path) != manifest[kind]["sha256"]:
            raise DataError(f"{snapshot}: {manifest[kind]['file']} is missing or does not "
                            f"match the sha256 of {MANIFEST}")
        rows[kind] = pq.read_table(path).to_pylist()
    return spec, rows


class SnapshotStore:
    """A snapshot held in memory: id -> its non-empty cells."""

    def __init__(self, snapshot: str | Path) -> None:
        self.spec, rows = snapshot_rows(snapshot)
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}
        for kind in KINDS:
            key = self.spec.keys[kind]
            self.tables[kind] = {r[key]: {c: v for c, v in r.items()
                                          if c != key and v is not None} for r in rows[kind]}

    def lookup(self, kind: str, keys: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
        table = self.tables[kind]
        rows = [table.get(k) for k in keys]
        return [r if r is not None else {} for r in rows], sum(r is None for r in rows)

    def __repr__(self) -> str:
        return (f"<SnapshotStore {len(self.tables['user'])} users, "
                f"{len(self.tables['item'])} items>")


# -- Redis ---------------------------------------------------------------------------------------


def redis_key(kind: str, key: str) -> str:
    return f"{REDIS_PREFIX}:{kind}:{key}"


def _redis(url: str) -> Any:
    redis = require("redis", "serve", "the Redis feature store")
    try:
        return redis.Redis.from_url(url, decode_responses=True, socket_timeout=2,
                                    socket_connect_timeout=2)
    except ValueError as e:  # not a redis:// URL (the message names the scheme, not a secret)
        raise DataError(f"--features-redis / --to-redis: {e}") from None


def _down(e: BaseException) -> FeatureStoreError:
    return FeatureStoreError(f"the Redis feature store does not answer ({type(e).__name__})")


def push_snapshot(snapshot: str | Path, url: str) -> dict[str, int]:
    """Load a snapshot into Redis (the module docstring): each id's hash replaced, then the
    spec; ids Redis holds that the snapshot lacks are left as they are. Ids written per kind."""
    redis = require("redis", "serve", "the Redis feature store")
    spec, rows = snapshot_rows(snapshot)
    client = _redis(url)
    try:
        return _push(client, spec, rows)
    except redis.exceptions.RedisError as e:
        raise _down(e) from None


def _push(client: Any, spec: Spec, rows: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    counts = {}
    for kind in KINDS:
        key = spec.keys[kind]
        for start in range(0, len(rows[kind]), PUSH_CHUNK):
            pipe = client.pipeline(transaction=False)
            for r in rows[kind][start:start + PUSH_CHUNK]:
                name = redis_key(kind, r[key])
                pipe.delete(name)
                # the key itself is a field: an id whose cells are all empty still exists
                pipe.hset(name, mapping={c: _text(v) for c, v in r.items() if v is not None})
            pipe.execute()
        counts[kind] = len(rows[kind])
    client.set(REDIS_SPEC, json.dumps(spec.to_json()))
    return counts


def _text(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


class RedisStore:
    """Features in Redis, read per request (the module docstring). The spec is read once, at
    startup: a server is restarted to serve other columns."""

    def __init__(self, url: str) -> None:
        redis = require("redis", "serve", "the Redis feature store")
        self._errors = (redis.exceptions.RedisError,)  # down, timing out, a wrong key type
        self.client = _redis(url)
        try:
            raw = self.client.get(REDIS_SPEC)
        except self._errors as e:
            raise _down(e) from None
        if raw is None:
            raise DataError(f"the Redis feature store holds no {REDIS_SPEC}: load a snapshot "
                            "first (`shopmtl features SNAPSHOT --to-redis URL`)")
        self.spec = Spec.from_json(json.loads(raw))

    def lookup(self, kind: str, keys: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
        if not keys:
            return [], 0
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(redis_key(kind, k))
        try:
            rows = pipe.execute()
        except self._errors as e:
            raise _down(e) from None
        key = self.spec.keys[kind]
        return ([{c: v for c, v in r.items() if c != key} for r in rows],
                sum(not r for r in rows))

    def __repr__(self) -> str:
        return "<RedisStore>"


def open_store(snapshot: str | Path | None = None, redis_url: str | None = None
               ) -> FeatureStore | None:
    """``shopmtl serve --features`` / ``--features-redis``: the store, or None (neither)."""
    if snapshot is not None and redis_url is not None:
        raise ValueError("give --features or --features-redis, not both")
    if snapshot is not None:
        return SnapshotStore(snapshot)
    if redis_url is not None:
        return RedisStore(redis_url)
    return None


# -- filling a request ---------------------------------------------------------------------------


def _coerce(kind: str, value: Any) -> Any:
    """A stored value as the contract's field type wants it (Redis keeps text; a snapshot
    keeps the data file's types: an integer id column is a categorical's text)."""
    if kind in ("string", "text"):
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return value if isinstance(value, str) else _text(value)
    if kind == "number":
        return float(value)
    if kind == "integer":
        return int(float(value)) if isinstance(value, str) else int(value)
    if kind == "date":
        return str(value)
    return value


class FeatureFill:
    """Fills rows from a store for a contract (the module docstring). ``on_miss(kind, n)``:
    ``n`` ids of ``kind`` the store lacked (each distinct id of a request counts once)."""

    def __init__(self, store: FeatureStore, contract: Any,
                 on_miss: Callable[[str, int], None] | None = None) -> None:
        types = {f.name: f.type for f in contract.inputs}
        spec = store.spec
        for kind in KINDS:
            unknown = [c for c in (spec.keys[kind], *spec.columns[kind]) if c not in types]
            if unknown:
                raise DataError(f"the feature store's {kind} column(s) {unknown} are not "
                                f"inputs of the model (its fields: {sorted(types)})")
        self.store, self.spec, self.types = store, spec, types
        self.on_miss = on_miss

    def fill(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [dict(r) for r in rows]
        for kind in KINDS:
            key, cols = self.spec.keys[kind], self.spec.columns[kind]
            wanted = [i for i, r in enumerate(rows)
                      if r.get(key) is not None and any(r.get(c) is None for c in cols)]
            if not wanted:
                continue
            ids = list(dict.fromkeys(str(rows[i][key]) for i in wanted))
            found, missing = self.store.lookup(kind, ids)
            if missing and self.on_miss is not None:
                self.on_miss(kind, missing)
            by_id = dict(zip(ids, found, strict=True))
            for i in wanted:
                row, got = rows[i], by_id[str(rows[i][key])]
                for c in cols:
                    if row.get(c) is None and got.get(c) is not None:
                        row[c] = _coerce(self.types[c], got[c])
        return rows


class Features:
    """The service's store and its miss counter: ``filler(contract)`` for each table source
    (built again on a hot reload: the new model's contract); ``on_miss(kind, n)`` is set by
    the app once its metrics exist."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.on_miss: Callable[[str, int], None] | None = None

    def filler(self, contract: Any) -> FeatureFill:
        return FeatureFill(self.store, contract, self._miss)

    def _miss(self, kind: str, n: int) -> None:
        if self.on_miss is not None:
            self.on_miss(kind, n)
