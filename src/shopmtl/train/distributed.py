"""Device and several processes (torchrun, PyTorch DDP) for the one loop.

``resolve_device`` turns ``train.device`` into a ``torch.device``; ``pin_memory`` says whether
host batches are worth pinning (only for a CUDA device). ``setup`` starts the process group
when torchrun set ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA) and hands back a ``Dist``:
this process's rank, the world size and the collectives the loop needs.

How a step stays one step of the whole world (``Loop.step``):

- every rank takes every ``world``-th row of each global batch of the epoch's seeded
  permutation (``TensorTable.batches(rank=, world=)``): the union over ranks is the batch a
  single process would take, ``train.batch_size`` is the global batch; a streamed file
  (``data.streaming``) is sharded by Parquet row groups instead, each rank reading only its
  own and taking the same number of ``batch_size / world`` micro-batches (``data.shards``);
- the task-loss values are combined over ranks before the weighting sees them
  (``Dist.global_values``: the global value, the local gradient path), weighted by each
  rank's labelled rows per task (``source.loss_counts``), so the averaged gradient is the one
  of the whole batch's masked-mean loss and a weighting that reads loss values (DWA,
  uncertainty, ...) makes the same decision on every rank;
- after ``weighting.backward`` (and FGM) the gradients of every optimised parameter are
  averaged over ranks (``Dist.average_gradients``, one flat all-reduce), so every rank's
  optimizer makes the same update from the same (broadcast) initial weights;
- rank 0 scores validation and broadcasts the metrics: the best/stop decision is identical
  on every rank; only rank 0 writes checkpoints, ``model/``, history, metrics and the report.

A rank that dies ends the job: the others fail in their next collective after
``train.dist_timeout`` seconds instead of hanging, and torchrun stops the rest.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError

DEFAULT_TIMEOUT = 300.0


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use train.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: unknown device '{name}'; known: auto, cpu, cuda")
    return torch.device(name)


def pin_memory(device: torch.device) -> bool:
    """Pin host batches (page-locked, for asynchronous copies) only for a CUDA device."""
    return device.type == "cuda"


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun set them; (0, 0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, local, world


@dataclass(frozen=True)
class Dist:
    """This process in a torchrun job of ``world`` processes."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def global_values(self, vec: Tensor, counts: Tensor | None = None) -> Tensor:
        """The world's task losses: the value every rank sees is the global one, the gradient
        path is this rank's own.

        ``counts`` [T]: the labelled rows behind each of this rank's (masked-mean) losses.
        Then the value is the mean over the world's labelled rows, ``sum_r c_r L_r / sum_r
        c_r``, and this rank's loss is scaled by ``world * c_r / sum_r c_r`` so that the
        averaged gradients are those of that global mean: one process's step on the whole
        batch. Without counts: the plain mean over ranks."""
        if counts is None:
            counts = torch.ones_like(vec)
        counts = counts.to(device=vec.device, dtype=vec.dtype)
        sums = torch.cat([counts, counts * vec.detach()])
        torch.distributed.all_reduce(sums)
        total, weighted = sums.chunk(2)
        seen = total > 0
        value = torch.where(seen, weighted / total.clamp(min=1e-12), torch.zeros_like(total))
        scale = torch.where(seen, self.world * counts / total.clamp(min=1e-12),
                            torch.zeros_like(total))
        local = vec * scale
        return local + (value - local.detach())

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks in one flat all-reduce. A parameter
        no rank touched keeps ``grad=None`` (the optimizer skips it, as in one process)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        dev = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                           device=dev)
        torch.distributed.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        if not live:
            return
        flat = torch.cat([p.grad.reshape(-1).float() for p in live])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        at = 0
        for p in live:
            n = p.grad.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (validation metrics: JSON values, NaN allowed) on every rank, rank
        0 included, as JSON (no pickle between processes): identical on every rank."""
        dev = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        data = json.dumps(obj, default=_plain).encode() if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        torch.distributed.broadcast(size, src=0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if self.main
               else torch.empty(int(size.item()), dtype=torch.uint8, device=dev))
        torch.distributed.broadcast(buf, src=0)
        return json.loads(buf.cpu().numpy().tobytes().decode())

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's weights and buffers on every rank."""
        with torch.no_grad():
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, src=0)


def _plain(o: Any) -> Any:
    """A numpy scalar (or anything with ``item``) as its Python value."""
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON: {type(o).__name__}")


_CURRENT: Dist | None = None


def current() -> Dist | None:
    """The job this process belongs to (``setup`` started it); None for one process."""
    return _CURRENT


def is_main() -> bool:
    return _CURRENT is None or _CURRENT.main


def setup(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Dist | None:
    """Join the torchrun job when ``WORLD_SIZE > 1`` (once; later calls return it)."""
    global _CURRENT
    _, local, world = env_world()
    if world <= 1:
        return None
    if _CURRENT is not None:
        return _CURRENT
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout))
    _CURRENT = Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)
    return _CURRENT


def shutdown() -> None:
    """Wait for every rank (rank 0 writes the results meanwhile), then leave the job."""
    global _CURRENT
    if _CURRENT is None:
        return
    try:
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
        _CURRENT = None


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ConfigError(f"train.batch_size: {batch_size} is the global batch and must be "
                          f"divisible by the number of processes ({world})")


__all__: Sequence[str] = ["DEFAULT_TIMEOUT", "Dist", "check_batch_size", "current",
                          "env_world", "is_main", "pin_memory", "resolve_device", "setup",
                          "shutdown"]
