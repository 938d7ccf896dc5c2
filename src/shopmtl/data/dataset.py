"""Batches for training: a tensor-resident table (the fast path) and a streaming source that
re-reads files chunk by chunk (constant memory, for data larger than RAM).

No per-sample Python runs in the hot loop: a batch is a handful of tensor index operations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from shopmtl.data.encoders import Encoded, Encoders
from shopmtl.data.ingest import BadRowLog, DataError, Parsed, read_chunks
from shopmtl.data.schema import Schema
from shopmtl.data.shards import ShardPlan, epoch_order, plan_shards


@dataclass
class Batch:
    cat: Tensor  # int64 [B, Fc], 0 = OOV
    num: Tensor  # float32 [B, Fn]
    seq: Tensor  # int64 [B, Fs, L], 0 = padding
    scenario: Tensor  # int64 [B]
    labels: Tensor  # float32 [B, T]
    mask: Tensor  # bool [B, T]: which labels exist
    oracle: Tensor | None = None  # float32 [B, T] true probabilities (synthetic data)
    group: Tensor | None = None  # int64 [B] (GAUC grouping)
    content: Tensor | None = None  # int64 [B, Fx]: content rows (0 = no content)

    def __len__(self) -> int:
        return self.scenario.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if self.scenario.device == device:
            return self
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin(self) -> Batch:
        """The batch in pinned (page-locked) host memory: asynchronous copies to a GPU."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        return Batch(**{f.name: None if (t := getattr(self, f.name)) is None else fn(t)
                        for f in dataclasses.fields(self)})


def _seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


class TensorTable:
    """A whole split as tensors; batches are slices of a seeded permutation."""

    def __init__(self, enc: Encoded) -> None:
        self.cat = torch.from_numpy(np.ascontiguousarray(enc.cat))
        self.num = torch.from_numpy(np.ascontiguousarray(enc.num, dtype=np.float32))
        self.seq = torch.from_numpy(np.ascontiguousarray(enc.seq))
        self.scenario = torch.from_numpy(np.ascontiguousarray(enc.scenario))
        self.labels = torch.from_numpy(np.ascontiguousarray(enc.labels, dtype=np.float32))
        self.mask = torch.from_numpy(np.ascontiguousarray(enc.mask))
        self.oracle = None if enc.oracle is None else torch.from_numpy(enc.oracle)
        self.group = torch.from_numpy(np.ascontiguousarray(enc.group))
        n = len(enc)
        # content rows [n, Fx] and slice flags [n, K]: zero-width when none is configured
        content = enc.content if enc.content is not None else np.zeros((n, 0), np.int64)
        slices = enc.slices if enc.slices is not None else np.zeros((n, 0), bool)
        self.content = torch.from_numpy(np.ascontiguousarray(content, dtype=np.int64))
        self.slices = torch.from_numpy(np.ascontiguousarray(slices, dtype=bool))

    def __len__(self) -> int:
        return self.scenario.shape[0]

    def nbytes(self) -> int:
        """The bytes of every column (what a copy to a device takes)."""
        cols = [getattr(self, n) for n in TABLE_COLUMNS]
        return sum(t.numel() * t.element_size() for t in [*cols, self.oracle]
                   if t is not None)

    def to(self, device: torch.device | str) -> TensorTable:
        """The table with every column on ``device`` (itself when it is already there): a GPU
        run's training rows kept on the GPU, so a batch is a gather there and no copy."""
        device = torch.device(device)
        if self.scenario.device == device:
            return self
        out = TensorTable.__new__(TensorTable)
        for name in TABLE_COLUMNS:
            setattr(out, name, getattr(self, name).to(device))
        out.oracle = None if self.oracle is None else self.oracle.to(device)
        return out

    def take(self, idx: Tensor) -> Batch:
        return Batch(
            self.cat[idx],
            self.num[idx],
            self.seq[idx],
            self.scenario[idx],
            self.labels[idx],
            self.mask[idx],
            None if self.oracle is None else self.oracle[idx],
            self.group[idx],
            self.content[idx] if self.content.shape[1] else None,
        )

    def slice(self, start: int, stop: int) -> Batch:
        s = slice(start, stop)
        return Batch(
            self.cat[s],
            self.num[s],
            self.seq[s],
            self.scenario[s],
            self.labels[s],
            self.mask[s],
            None if self.oracle is None else self.oracle[s],
            self.group[s],
            self.content[s] if self.content.shape[1] else None,
        )

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        """Batches of one epoch; with ``world`` processes a last partial batch is kept only
        when every process gets at least one of its rows."""
        full, rest = divmod(len(self), batch_size)
        return full + (1 if rest >= world else 0)

    def batches(
        self, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True, skip: int = 0,
        rank: int = 0, world: int = 1,
    ) -> Iterator[Batch]:
        """Batches of epoch ``epoch`` in a seeded order; ``skip`` resumes mid-epoch. With
        ``world`` processes, process ``rank`` takes every ``world``-th row of each batch (of
        ``batch_size`` rows: the global batch) of the same permutation."""
        n = len(self)
        if shuffle:
            g = torch.Generator().manual_seed(_seed(seed, epoch))
            perm = torch.randperm(n, generator=g)
        elif world > 1:
            perm = torch.arange(n)
        for i in range(skip, self.num_batches(batch_size, world)):
            lo, hi = i * batch_size, min((i + 1) * batch_size, n)
            if world > 1:
                yield self.take(perm[lo:hi][rank::world])
            else:
                yield self.take(perm[lo:hi]) if shuffle else self.slice(lo, hi)

    def split(self, fraction: float, seed: int) -> tuple[TensorTable, TensorTable]:
        """A seeded random split (rest, held-out)."""
        rest, held = split_indices(len(self), fraction, seed)
        return _subset(self, rest), _subset(self, held)


def split_indices(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The rows (in order) of ``TensorTable.split``'s two parts: the rest and the held-out
    ``fraction``. A function of ``n`` and the seed alone, so a split's rows can be named (by
    the line numbers of the rows it was made from)."""
    g = torch.Generator().manual_seed(_seed(seed, -1))
    perm = torch.randperm(n, generator=g)
    n_out = max(1, round(fraction * n))
    return perm[n_out:].sort().values, perm[:n_out].sort().values


TABLE_COLUMNS = ("cat", "num", "seq", "scenario", "labels", "mask", "group", "content", "slices")


def _subset(t: TensorTable, idx: Tensor) -> TensorTable:
    out = TensorTable.__new__(TensorTable)
    for name in TABLE_COLUMNS:
        setattr(out, name, getattr(t, name)[idx])
    out.oracle = None if t.oracle is None else t.oracle[idx]
    return out


class StreamingSource:
    """Re-reads a file each epoch; shuffles within a buffer of chunks. Memory ~ buffer size.

    Rows are encoded with already-fit encoders, so each epoch costs a parse of the file: the
    price of constant memory. Order is a function of (seed, epoch) alone, so resume can skip.

    Under torchrun (``world > 1``) rank ``rank`` reads only its own Parquet row groups
    (``data.shards``: the unit, the assignment, the equal step count and what is left out),
    in a seeded order per (seed, epoch, rank), and takes exactly ``plan(...).steps``
    micro-batches of ``batch_size / world`` rows each epoch.
    """

    def __init__(
        self,
        path: str | Path,
        schema: Schema,
        encoders: Encoders,
        chunk_rows: int,
        buffer_chunks: int,
    ) -> None:
        self.path, self.schema, self.encoders = Path(path), schema, encoders
        self.chunk_rows, self.buffer_chunks = chunk_rows, buffer_chunks
        self.rows = 0  # set by the caller after the fit pass
        # usable rows per Parquet row group, set by the fit pass (None: CSV, or not counted)
        self.group_rows: tuple[int, ...] | None = None

    def plan(self, batch_size: int, world: int) -> ShardPlan:
        """The ranks' shards of a global batch of ``batch_size`` rows; DataError when the file
        cannot be sharded (CSV, or a rank would get less than one micro-batch)."""
        name = self.path.name
        if self.group_rows is None:
            raise DataError(f"{name}: streaming with several processes (torchrun) shards the "
                            "training file by Parquet row groups; convert it to Parquet, or "
                            "use in-memory data (data.streaming: false) or one process")
        plan = plan_shards(self.group_rows, world, batch_size // world)
        if plan.steps == 0:
            raise DataError(
                f"{name}: {len(self.group_rows)} row group(s) cannot give each of {world} "
                f"processes one micro-batch of {plan.micro} rows (rows per process: "
                f"{list(plan.rows)}); rewrite the file with smaller row groups (pyarrow "
                "write_table(..., row_group_size=...)) or lower train.batch_size")
        return plan

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        if world > 1:
            return self.plan(batch_size, world).steps
        return (self.rows + batch_size - 1) // batch_size

    def _read(self, log: BadRowLog, row_groups: list[int] | None = None) -> Iterator[Parsed]:
        # the rows the fit pass kept: values the encoders cannot standardise are bad rows
        return read_chunks(self.path, self.schema, self.chunk_rows, log,
                           bounds=self.encoders.numeric_bounds(), row_groups=row_groups)

    def batches(
        self, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True, skip: int = 0,
        rank: int = 0, world: int = 1,
    ) -> Iterator[Batch]:
        # bad rows were reported in the fit pass; here they are dropped again, quietly
        log = BadRowLog("quarantine", 1.0)
        if world == 1:
            g = torch.Generator().manual_seed(_seed(seed, epoch))
            yield from self._shuffled(self._read(log), batch_size, g, shuffle, skip)
            return
        plan = self.plan(batch_size, world)
        # its own stream per rank: the ranks' buffers are shuffled independently
        g = torch.Generator().manual_seed(_seed(seed, epoch) + 7_919 * (rank + 1))
        groups = list(plan.shards[rank])
        if shuffle:
            groups = epoch_order(groups, g)
        it = self._shuffled(self._read(log, groups), plan.micro, g, shuffle, skip)
        taken = skip
        try:
            while taken < plan.steps:  # the rest of this rank's shard is left out this epoch
                batch = next(it, None)
                if batch is None or len(batch) != plan.micro:
                    break
                taken += 1
                yield batch
        finally:
            it.close()  # stop reading: the row groups after the last step stay unread
        if taken < plan.steps:  # never silently: the other ranks would wait in a collective
            raise DataError(f"{self.path.name}: rank {rank}'s row groups gave {taken} of "
                            f"{plan.steps} micro-batches this epoch (the file changed since "
                            "the run read it?)")

    def _shuffled(self, chunks: Iterator[Parsed], batch_size: int, g: torch.Generator,
                  shuffle: bool, skip: int) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows shuffled within a buffer of ``buffer_chunks`` chunks
        (the remainder carried into the next buffer; a last smaller batch at the end); the
        first ``skip`` are made (the generator advances alike) but not yielded."""
        buffer: list[Encoded] = []
        carry: TensorTable | None = None
        produced = 0

        def drain(parts: list[Encoded], final: bool) -> Iterator[Batch]:
            nonlocal carry, produced
            table = TensorTable(Encoded.concat(parts))
            if carry is not None:
                table = concat_tables([carry, table])
                carry = None
            order = torch.randperm(len(table), generator=g) if shuffle else torch.arange(len(table))
            full = len(table) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                if produced >= skip:
                    yield table.take(order[lo : lo + batch_size])
                produced += 1
            rest = order[full:]
            if len(rest):
                if final:
                    if produced >= skip:
                        yield table.take(rest)
                    produced += 1
                else:
                    carry = _subset(table, rest.sort().values)

        for parsed in chunks:
            buffer.append(self.encoders.transform(parsed))
            if len(buffer) >= self.buffer_chunks:
                yield from drain(buffer, final=False)
                buffer = []
        if buffer or carry is not None:
            yield from drain(buffer or [_empty_like(carry)], final=True)

    def tables(self) -> Iterator[TensorTable]:
        """The file's rows in file order, one encoded chunk at a time (evaluation)."""
        log = BadRowLog("quarantine", 1.0)
        for parsed in self._read(log):
            yield TensorTable(self.encoders.transform(parsed))


def labels_only(t: TensorTable) -> TensorTable:
    """The columns that metrics read (labels, mask, scenario, group, oracle, slices), with the
    features zero-width: a streamed split's metrics keep ~50 bytes a row, not its features."""
    out = TensorTable.__new__(TensorTable)
    for name in TABLE_COLUMNS:
        col = getattr(t, name)
        # cloned: a zero-width view would still hold the chunk's whole feature storage
        setattr(out, name, col[:, :0].clone() if name in ("cat", "num", "seq", "content") else col)
    out.oracle = t.oracle
    return out


def concat_tables(parts: list[TensorTable]) -> TensorTable:
    out = TensorTable.__new__(TensorTable)
    for name in TABLE_COLUMNS:
        setattr(out, name, torch.cat([getattr(t, name) for t in parts]))
    out.oracle = None if parts[0].oracle is None else torch.cat([t.oracle for t in parts])
    return out


def _empty_like(t: TensorTable | None) -> Encoded:
    assert t is not None
    z = slice(0, 0)
    return Encoded(
        t.cat[z].numpy(),
        t.num[z].numpy(),
        t.seq[z].numpy(),
        t.scenario[z].numpy(),
        t.labels[z].numpy(),
        t.mask[z].numpy(),
        None if t.oracle is None else t.oracle[z].numpy(),
        t.group[z].numpy(),
        t.content[z].numpy(),
        t.slices[z].numpy(),
    )
