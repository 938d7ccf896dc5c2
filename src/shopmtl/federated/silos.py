"""Silos from the data: which rows each silo holds, which tasks it has labels for, and its
availability matrix (task x scenario: does the silo have a labelled row there).

The split is a pure function of the encoded rows and the config: by scenario (one silo per
scenario, or per named group of scenarios), by the values of a categorical column (a market, a
merchant), or by a hash of the user id (an IID control, users never straddle two silos). Every
split (train, valid, test) is cut the same way, so a silo's test rows are its own.

The vocabularies are fitted on the pooled training rows before the split (the silos agree an
id space up front, as a hashed vocabulary would give them); no labels or rows are pooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from shopmtl.config import ConfigError
from shopmtl.data.dataset import TABLE_COLUMNS, TensorTable, _subset
from shopmtl.data.encoders import Encoders
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import Schema
from shopmtl.federated.config import SiloConfig

SPLITS = ("train", "valid", "test")
# a multiplicative (Knuth) hash of the encoded user id: silos of nearly equal size whatever
# the id order (ids are assigned by frequency, so ``id % n`` would too, but a seed reshuffles)
_HASH = 2654435761


@dataclass(frozen=True)
class Silo:
    """One silo: its name, its rows of each split, the tasks it has labels for."""

    name: str
    index: int
    rows: dict[str, Tensor]  # split -> row indices into the pooled split
    tasks: tuple[str, ...]


def user_column(schema: Schema) -> int:
    """The position of the user id among the categorical columns (the schema's group)."""
    cats = [f.name for f in schema.of_kind("categorical")]
    if schema.group is None or schema.group not in cats:
        raise ConfigError("federated: the schema needs its user id as data.schema.group (a "
                          "categorical feature) to keep users' embeddings local or hash users")
    return cats.index(schema.group)


def _assign(table: TensorTable, cfg: SiloConfig, schema: Schema, encoders: Encoders,
            seed: int) -> tuple[list[str], Tensor]:
    """(silo names, the silo index of every row of ``table``; -1: in no silo)."""
    n = len(table)
    if cfg.by == "user_hash":
        users = table.cat[:, user_column(schema)].long()
        h = (users * _HASH + seed * 97) % (2**32)
        return [f"users_{k}" for k in range(cfg.count)], (h % cfg.count).long()
    if cfg.by == "scenario":
        names = list(schema.scenario_names)
        groups = cfg.groups or {s: (s,) for s in names}
        unknown = sorted({s for g in groups.values() for s in g} - set(names))
        if unknown:
            raise ConfigError(f"federated.silos.groups: {unknown} are not scenarios; the "
                              f"scenarios: {names}")
        codes = {s: names.index(s) for s in names}
        column = table.scenario.long()
        value_ids = {silo: [codes[s] for s in vals] for silo, vals in groups.items()}
    else:
        cats = [f.name for f in schema.of_kind("categorical")]
        if cfg.column not in cats:
            raise ConfigError(f"federated.silos.column: '{cfg.column}' is not a categorical "
                              f"feature; categorical: {cats}")
        column = table.cat[:, cats.index(cfg.column)].long()
        enc = encoders.categorical[cfg.column]
        value_ids = {}
        for silo, vals in cfg.groups.items():
            ids = enc.transform(pa.array([str(v) for v in vals], pa.string()))
            if (ids == 0).any():  # never echo the values: say how many and where
                raise ConfigError(f"federated.silos.groups.{silo}: {int((ids == 0).sum())} of "
                                  f"its values are not in column '{cfg.column}'s vocabulary")
            value_ids[silo] = [int(i) for i in ids]
    seen: dict[int, str] = {}
    for silo, ids in value_ids.items():
        for i in ids:
            if i in seen:
                raise ConfigError(f"federated.silos.groups: silos '{seen[i]}' and '{silo}' "
                                  "share a value; each row belongs to one silo")
            seen[i] = silo
    out = torch.full((n,), -1, dtype=torch.long)
    for k, ids in enumerate(value_ids.values()):
        out[torch.isin(column, torch.tensor(ids, dtype=torch.long))] = k
    return list(value_ids), out


def split_silos(data: PreparedData, cfg: SiloConfig, seed: int = 0) -> list[Silo]:
    """The silos of ``data`` (in-memory splits), each with its rows of every split."""
    tables = {s: _split(data, s) for s in SPLITS}
    if not all(isinstance(t, TensorTable) for t in tables.values()):
        raise ConfigError("federated: silos need in-memory data (data.streaming: false)")
    assigned = {s: _assign(t, cfg, data.schema, data.encoders, seed) for s, t in tables.items()}
    names = assigned["train"][0]
    tasks = data.schema.task_names
    unknown = {s: sorted(set(ts) - set(tasks)) for s, ts in cfg.tasks.items()}
    bad = [s for s in cfg.tasks if s not in names] + [s for s, u in unknown.items() if u]
    if bad:
        raise ConfigError(f"federated.silos.tasks: unknown silo or task under {sorted(bad)}; "
                          f"silos: {names}, tasks: {list(tasks)}")
    silos = []
    for k, name in enumerate(names):
        rows = {s: (assigned[s][1] == k).nonzero().squeeze(1) for s in SPLITS}
        if len(rows["train"]) == 0:
            raise ConfigError(f"federated.silos: silo '{name}' has no training rows")
        silos.append(Silo(name, k, rows, tuple(cfg.tasks.get(name, tasks))))
    return silos


def _split(data: PreparedData, split: str) -> TensorTable:
    t = getattr(data, split)
    return data.valid if t is None else t


def silo_table(table: TensorTable, rows: Tensor, keep: list[int]) -> TensorTable:
    """The silo's rows of ``table``; the labels of tasks outside ``keep`` (columns) are
    dropped (mask False): the silo never logged them."""
    out = _subset(table, rows)
    drop = [j for j in range(out.mask.shape[1]) if j not in keep]
    if drop:
        out.mask = out.mask.clone()
        out.mask[:, drop] = False
    return out


def silo_data(data: PreparedData, silo: Silo) -> PreparedData:
    """``data`` cut down to the silo's rows and tasks (the same schema and encoders)."""
    keep = [data.schema.task_names.index(t) for t in silo.tasks]
    parts = {s: silo_table(_split(data, s), silo.rows[s], keep) for s in SPLITS}
    return PreparedData(data.schema, data.encoders, parts["train"], parts["valid"],
                        parts["test"], {}, None)


def availability(schema: Schema, table: TensorTable) -> dict[str, dict[str, bool]]:
    """task -> scenario -> whether ``table`` has a labelled row there."""
    mask, scen = table.mask.numpy(), table.scenario.numpy()
    return {t: {s: bool((mask[:, j] & (scen == k)).any())
                for k, s in enumerate(schema.scenario_names)}
            for j, t in enumerate(schema.task_names)}


def check_tasks_covered(schema: Schema, matrices: dict[str, dict[str, dict[str, bool]]]
                        ) -> None:
    """Refuse a task no silo has a training label for: nothing could learn it."""
    orphans = [t for t in schema.task_names
               if not any(any(m[t].values()) for m in matrices.values())]
    if orphans:
        raise ConfigError(f"federated: no silo has training labels for task(s) {orphans}; "
                          "drop them from the schema or give a silo their labels "
                          "(federated.silos.tasks)")


# -- a silo's data on disk: what its client process loads ---------------------------------

def save_silo(path: Path, data: PreparedData) -> None:
    """The silo's three splits as one safetensors file (written atomically)."""
    tensors: dict[str, Tensor] = {}
    for s in SPLITS:
        t = getattr(data, s)
        for name in TABLE_COLUMNS:
            tensors[f"{s}.{name}"] = getattr(t, name).contiguous()
        if t.oracle is not None:
            tensors[f"{s}.oracle"] = t.oracle.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_silo(path: Path, schema: Schema) -> PreparedData:
    """A silo's splits as ``save_silo`` wrote them. No encoders: a client only trains and
    scores encoded rows."""
    tensors = load_file(str(path))
    parts = {}
    for s in SPLITS:
        t = TensorTable.__new__(TensorTable)
        for name in TABLE_COLUMNS:
            setattr(t, name, tensors[f"{s}.{name}"])
        t.oracle = tensors.get(f"{s}.oracle")
        parts[s] = t
    return PreparedData(schema, None, parts["train"], parts["valid"],  # type: ignore[arg-type]
                        parts["test"], {}, None)


def silo_sizes(silos: list[Silo]) -> dict[str, dict[str, int]]:
    return {s.name: {k: len(v) for k, v in s.rows.items()} for s in silos}

