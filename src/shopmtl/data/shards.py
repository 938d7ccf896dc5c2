"""Each torchrun rank's shard of a streamed Parquet training file.

The unit is the Parquet **row group**: the smallest piece of a Parquet file that can be read
without decoding its neighbours (pyarrow reads a row range only by decoding its row group's
pages from the start). A rank opens only its own row groups, every epoch; no rank reads the
whole file while training.

- **Which row groups**: a fixed, balanced assignment, a pure function of the row groups' row
  counts and the world size (``plan_shards``): largest first, each to the rank with the fewest
  rows so far (ties: the lower rank). The rank loads then differ by at most one row group's
  rows. The assignment stays the same every epoch (the global batch still mixes every rank's
  rows); what changes per epoch is the order a rank reads its row groups in
  (``epoch_order``) and the shuffle within its buffer of chunks.
- **How many steps**: every rank must take exactly the same number of micro-batches per epoch,
  or one would wait forever in the next collective. The count is decided before training from
  numbers every rank reads alike, the usable rows per row group counted by the fit pass
  (``data.pipeline``): ``steps = min over ranks of rows // micro``.
- **What is left out**: each epoch, every rank drops what its shard has beyond ``steps *
  micro`` rows: the tail of that epoch's order, so different rows each epoch. In all, at most
  ``(world - 1) * largest row group + world * (micro - 1)`` rows an epoch, since no rank
  exceeds the smallest load by more than one row group (``ShardPlan.dropped``; the run logs
  it). Write the file with row groups far smaller than ``rows / world`` (e.g. pyarrow's
  ``row_group_size`` = ``data.chunk_rows``) and the loss is small. A rank's micro-batch is
  ``batch_size / world`` rows: ``train.batch_size`` stays the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardPlan:
    """Every rank's row groups and the micro-batches each takes per epoch."""

    shards: tuple[tuple[int, ...], ...]  # rank -> its row groups, ascending
    rows: tuple[int, ...]  # rank -> usable rows in its row groups
    micro: int  # rows of one rank's micro-batch (global batch / world)
    steps: int  # micro-batches every rank takes per epoch

    @property
    def world(self) -> int:
        return len(self.shards)

    @property
    def dropped(self) -> int:
        """Rows left out each epoch (over all ranks)."""
        return sum(self.rows) - self.world * self.steps * self.micro

    def describe(self) -> str:
        """One line for the run's log: the assignment, the steps and the rows left out."""
        ranks = ", ".join(f"rank {r} row groups {list(s)}" for r, s in enumerate(self.shards))
        total = sum(self.rows)
        share = 100.0 * self.dropped / max(total, 1)
        return (f"streamed shards: {ranks}; {self.steps} steps per epoch of {self.micro} rows "
                f"per rank; {self.dropped:,} of {total:,} rows ({share:.1f}%) left out each "
                "epoch")


def assign_row_groups(group_rows: Sequence[int], world: int) -> tuple[tuple[int, ...], ...]:
    """Row groups per rank, balanced by rows: largest row group first (ties: lower index) to
    the rank with the fewest rows so far (ties: the lower rank). Disjoint, and together every
    row group, empty ones included."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads = [0] * world
    shards: list[list[int]] = [[] for _ in range(world)]
    for g in sorted(range(len(group_rows)), key=lambda i: (-group_rows[i], i)):
        r = min(range(world), key=lambda k: (loads[k], k))
        shards[r].append(g)
        loads[r] += int(group_rows[g])
    return tuple(tuple(sorted(s)) for s in shards)


def plan_shards(group_rows: Sequence[int], world: int, micro: int) -> ShardPlan:
    """The plan for ``world`` ranks taking micro-batches of ``micro`` rows; ``steps`` is 0
    when some rank has fewer rows than one micro-batch (the caller refuses that)."""
    if micro < 1:
        raise ValueError(f"micro-batch must be >= 1 row, got {micro}")
    shards = assign_row_groups(group_rows, world)
    rows = tuple(sum(int(group_rows[g]) for g in s) for s in shards)
    return ShardPlan(shards, rows, micro, min(rows) // micro)


def shard_of(group_rows: Sequence[int], rank: int, world: int) -> tuple[int, ...]:
    """Rank ``rank``'s row groups (``assign_row_groups``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return assign_row_groups(group_rows, world)[rank]


def epoch_order(groups: Sequence[int], generator: torch.Generator) -> list[int]:
    """``groups`` in the order of a seeded permutation (the rank's generator of the epoch)."""
    perm = torch.randperm(len(groups), generator=generator).tolist()
    return [groups[i] for i in perm]


__all__ = ["ShardPlan", "assign_row_groups", "epoch_order", "plan_shards", "shard_of"]
