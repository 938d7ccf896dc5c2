"""From a DataConfig to model-ready splits: parse + validate, fit encoders on train, encode."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl.config import DataConfig, ExperimentConfig, SchemaConfig, from_dict, to_dict
from shopmtl.data.dataset import StreamingSource, TensorTable
from shopmtl.data.encoders import Encoded, Encoders
from shopmtl.data.ingest import BadRowLog, DataError, is_csv, parquet_row_groups, read_chunks
from shopmtl.data.schema import Schema
from shopmtl.jsonsafe import json_safe


@dataclass
class PreparedData:
    schema: Schema
    encoders: Encoders
    train: TensorTable | StreamingSource
    valid: TensorTable | StreamingSource
    test: TensorTable | StreamingSource | None
    bad_rows: dict[str, int]  # reason -> count over all splits
    quarantine_file: Path | None

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {
            f.name: self.encoders.vocab_size(f) for f in self.schema.features if f.kind != "numeric"
        }


def _read_all(path: str, schema: Schema, cfg: DataConfig, log: BadRowLog) -> list:
    return list(read_chunks(path, schema, cfg.chunk_rows, log))


def encode_file(
    path: str, schema: Schema, encoders: Encoders, cfg: DataConfig, log: BadRowLog
) -> TensorTable:
    parts = [encoders.transform(p) for p in read_chunks(
        path, schema, cfg.chunk_rows, log, bounds=encoders.numeric_bounds())]
    if not parts:
        raise DataError(f"{Path(path).name}: no usable rows")
    return TensorTable(Encoded.concat(parts))


def stream_file(
    path: str, schema: Schema, encoders: Encoders, cfg: DataConfig, log: BadRowLog
) -> StreamingSource:
    """A split left on disk: one pass now validates its rows (bad rows are logged and
    quarantined here) and counts them; evaluation re-reads it chunk by chunk."""
    rows = sum(p.n for p in read_chunks(path, schema, cfg.chunk_rows, log,
                                        bounds=encoders.numeric_bounds()))
    if rows == 0:
        raise DataError(f"{Path(path).name}: no usable rows")
    stream = StreamingSource(path, schema, encoders, cfg.chunk_rows, cfg.shuffle_buffer_chunks)
    stream.rows = rows
    return stream


def prepare_data(
    cfg: DataConfig,
    schema: Schema,
    out_dir: str | Path | None = None,
    encoders: Encoders | None = None,
) -> PreparedData:
    """Read every split once; fit encoders on train only (unless given, e.g. on resume)."""
    log = BadRowLog(cfg.bad_rows, cfg.max_bad_fraction)
    fit = encoders is None
    enc = encoders if encoders is not None else Encoders(schema)
    train: TensorTable | StreamingSource
    if cfg.streaming:
        if cfg.valid is None:
            raise DataError("data.valid: streaming needs an explicit validation file")
        rows = 0
        # Parquet: the usable rows of each row group, what torchrun ranks shard (data.shards)
        parquet = Path(cfg.train).is_file() and not is_csv(cfg.train)  # else read_chunks says
        ends = np.cumsum(parquet_row_groups(cfg.train)) if parquet else None
        kept = None if ends is None else np.zeros(len(ends), np.int64)
        for p in read_chunks(cfg.train, schema, cfg.chunk_rows, log):
            if fit:
                enc.partial_fit(p)
            rows += p.n
            if kept is not None:  # a Parquet row's line is its index + 1
                kept += np.bincount(np.searchsorted(ends, p.lines - 1, side="right"),
                                    minlength=len(kept))
        if fit:
            enc.finish()
        stream = StreamingSource(cfg.train, schema, enc, cfg.chunk_rows, cfg.shuffle_buffer_chunks)
        stream.rows = rows
        stream.group_rows = None if kept is None else tuple(int(k) for k in kept)
        if rows == 0:
            raise DataError(f"{Path(cfg.train).name}: no usable rows")
        train = stream
    else:
        parsed = _read_all(cfg.train, schema, cfg, log)
        if not parsed:
            raise DataError(f"{Path(cfg.train).name}: no usable rows")
        if fit:
            for p in parsed:
                enc.partial_fit(p)
            enc.finish()
        train = TensorTable(Encoded.concat([enc.transform(p) for p in parsed]))
        del parsed
    # streaming keeps every split on disk: memory stays flat however large the files are
    held = stream_file if cfg.streaming else encode_file
    test: TensorTable | StreamingSource | None = (
        held(cfg.test, schema, enc, cfg, log) if cfg.test else None)
    if test is None and cfg.test_fraction > 0:
        if not isinstance(train, TensorTable):
            raise DataError("data.test: streaming needs an explicit test file (or test_fraction 0)")
        # held out before validation; the encoders were fit on these rows too (vocabularies
        # only, no labels), which matches a model that sees every id at serving time
        train, test = train.split(cfg.test_fraction, cfg.split_seed + 1)
    valid: TensorTable | StreamingSource
    if cfg.valid is not None:
        valid = held(cfg.valid, schema, enc, cfg, log)
    else:
        if not isinstance(train, TensorTable):
            raise DataError("data.valid: streaming needs an explicit validation file")
        share = cfg.valid_fraction / max(1e-9, 1 - (cfg.test_fraction if cfg.test is None else 0))
        train, valid = train.split(share, cfg.split_seed)
    log.check_fraction()
    qfile = log.write(Path(out_dir) / "quarantine") if out_dir is not None else None
    return PreparedData(schema, enc, train, valid, test, dict(log.counts()), qfile)


def resolve_synthetic(cfg: ExperimentConfig, data_dir: Path, log: Any = print
                      ) -> tuple[ExperimentConfig, dict | None]:
    """For ``data.synthetic``: generate the world once into ``data_dir`` (reused when its
    world.json matches) and fill in the schema and file paths."""
    if cfg.data.synthetic is None:
        return cfg, None
    from shopmtl.data.synthetic import WorldConfig, content_schema, generate

    wc = from_dict(WorldConfig, dict(cfg.data.synthetic), "data.synthetic")
    meta = data_dir / "world.json"
    world = None
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("config") == json_safe(to_dict(wc)):
            world = {k: v for k, v in saved.items() if k != "config"}
    if world is None:
        t0 = time.perf_counter()
        world = generate(wc, data_dir)
        log(f"synthetic world: {wc.rows:,} impressions in {time.perf_counter() - t0:.1f}s")
    # the world's schema, its item content features if asked for, the cold-start slice
    schema = content_schema(wc, data_dir / "items.parquet", cfg.data.content)
    data = dataclasses.replace(
        cfg.data,
        schema=SchemaConfig(schema.features, schema.tasks, schema.scenario, schema.group,
                            schema.slices),
        train=str(data_dir / "train.parquet"), valid=str(data_dir / "valid.parquet"),
        test=str(data_dir / "test.parquet"),
    )
    return dataclasses.replace(cfg, data=data), json_safe(world)
