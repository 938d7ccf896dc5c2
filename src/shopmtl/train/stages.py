"""A run as a list of stages over one model, with one checkpoint format for all of them.

A one-table run is one stage (``Loop.run``). A joint run is a joint stage, then one refit
stage per source (a ``Loop`` over that source alone, its head's parameters only), then the
solve stage (``joint.solve``): the same loop with other parameters, not another loop.

Checkpoints (``checkpoints/ckpt-<stage>-<step>/`` and a ``latest`` pointer, the run's last
two kept) are written inside a stage by its loop (weights, optimizer, weighting, RNG, the
loop's state) and at the end of each stage but the last (weights, RNG, every source's stream
position, each finished stage's results and the tensors it hands to later stages). ``resume``
starts from the latest one, so a run killed anywhere ends with the same weights, bit for bit
on CPU, as a run never killed.
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.jsonsafe import json_safe
from shopmtl.train import checkpoint as ck
from shopmtl.train.loop import Loop, NonFiniteError, check_finite, state_json
from shopmtl.train.outdir import new_run_id

KEEP = 2  # checkpoints kept (the newest ones of the run)

_CKPT = re.compile(r"ckpt-(\d+)-(\d+|end)")


def checkpoint_order(name: str) -> tuple[int, float] | None:
    """Where checkpoint ``name`` stands in its run: (stage, step), a stage's ``end`` after
    all of its steps; None for a name not written by ``Checkpointer`` (a user's folder)."""
    m = _CKPT.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), float("inf") if m.group(2) == "end" else int(m.group(2))


def expired(names: list[str], newest: str, keep: int = KEEP) -> list[str]:
    """Of one run's checkpoints ``names`` (all named by ``Checkpointer``), those retention
    deletes: all but ``newest`` (just written) and the ``keep - 1`` latest others."""
    others = sorted((n for n in names if n != newest),
                    key=lambda n: checkpoint_order(n) or (-1, -1.0))
    return others[:max(len(others) - (keep - 1), 0)]


class Checkpointer:
    """``ckpt-*`` directories under ``directory``, written atomically (``train.checkpoint``).

    Each checkpoint carries ``run_id`` (``train.outdir``: the id of the run in the output
    folder); retention deletes only checkpoints of that run, so a user's folder or another
    run's checkpoint in the same directory is never touched. ``run_id`` None: the id of the
    checkpoint a resume loads, else a new one.

    ``write=False``: a torchrun rank other than 0, which reads checkpoints (``--resume``) but
    leaves writing them to rank 0."""

    def __init__(self, directory: Path, write: bool = True, run_id: str | None = None
                 ) -> None:
        self.dir = Path(directory)
        self.write = write
        self.run_id = run_id

    def save(self, tag: str, tensors: dict[str, dict[str, Tensor]], meta: dict[str, Any]
             ) -> Path:
        if not self.write:
            return self.dir / f"ckpt-{tag}"
        if self.run_id is None:
            self.run_id = new_run_id()
        path = ck.write_dir(self.dir / f"ckpt-{tag}", tensors,
                            {"run": json_safe({**meta, "run_id": self.run_id})})
        ck.write_pointer(self.dir, "latest", path.name)
        for name in expired(self.own(), path.name):
            self._discard(self.dir / name)
        return path

    def own(self) -> list[str]:
        """Names of this run's checkpoints in the directory."""
        return [p.name for p in self.dir.iterdir()
                if checkpoint_order(p.name) is not None and p.is_dir() and not p.is_symlink()
                and ck.checkpoint_run_id(p) == self.run_id]

    @staticmethod
    def _discard(path: Path) -> None:
        # renamed aside first: a removal killed midway leaves a ``.<name>.old-*`` folder,
        # which the next run's start removes (train.outdir), never half a checkpoint
        aside = path.with_name(f".{path.name}.old-{secrets.token_hex(6)}")
        path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        return self.dir / pointer.read_text().strip()

    def load(self, path: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        ck.verify_dir(path)
        names = [p.name.removesuffix(".safetensors") for p in path.glob("*.safetensors")]
        meta = ck.read_json(path, "run")
        if self.run_id is None:  # a resume continues the run that wrote the checkpoint
            self.run_id = meta.get("run_id")
        return {n: ck.read_tensors(path, n) for n in names}, meta


@dataclass
class StageContext:
    """What a stage sees: the model, where every source's stream stands, the results and
    tensors of earlier stages, and (on resume) its own loop's saved state."""

    model: nn.Module
    index: int
    name: str
    checkpointer: Checkpointer | None
    positions: dict[str, list[int]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    carry: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    resume: tuple[dict[str, dict[str, Tensor]], dict[str, Any]] | None = None

    def attach(self, loop: Loop) -> Loop:
        """Wire a stage's loop: restore it when this stage is being resumed, else start its
        streams where the previous stage left them; checkpoint it inside the stage."""
        if self.resume is not None:
            tensors, meta = self.resume
            loop.restore(tensors, meta["loop"], meta["optimizer"])
            self.resume = None
        else:
            loop.state.positions = {k: list(v) for k, v in self.positions.items()}
        if self.checkpointer is not None:
            loop.checkpoint = self._save_loop
        return loop

    def _save_loop(self, loop: Loop) -> None:
        check_finite(self.model)
        tensors, optimizer = loop.snapshot()
        tensors.update({f"carry.{k}": v for k, v in self.carry.items()})
        meta = {"stage": self.index, "stage_name": self.name, "results": self.results,
                "positions": self.positions, "loop": state_json(loop.state),
                "optimizer": optimizer}
        assert self.checkpointer is not None
        self.checkpointer.save(f"{self.index:02d}-{loop.state.step:09d}", tensors, meta)

    def finish(self, loop: Loop) -> None:
        """The loop is done: later stages continue its streams."""
        self.positions.update({k: list(v) for k, v in loop.state.positions.items()})


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], Any]  # returns the stage's JSON-able result


def run_stages(model: nn.Module, stages: Sequence[Stage], checkpointer: Checkpointer | None,
               resume: bool = False, carry: dict[str, dict[str, Tensor]] | None = None
               ) -> dict[str, Any]:
    """Run ``stages`` in order (from the latest checkpoint when ``resume``); returns each
    stage's result by name. ``carry``: tensors handed to the first stage."""
    start, results, positions = 0, {}, {}
    carry = dict(carry or {})
    inside = None
    if resume:
        path = checkpointer.latest() if checkpointer is not None else None
        if path is None:
            where = checkpointer.dir if checkpointer is not None else "this run"
            raise ck.CheckpointError(f"--resume: no checkpoint in {where}")
        tensors, meta = checkpointer.load(path)  # type: ignore[union-attr]
        start, results, positions = meta["stage"], meta["results"], meta["positions"]
        carry = {k.removeprefix("carry."): v for k, v in tensors.items()
                 if k.startswith("carry.")}
        if meta.get("loop") is None:  # written at a stage's end: the next stage starts fresh
            model.load_state_dict(tensors["weights"])
            torch.set_rng_state(tensors["rng"]["torch"])
        else:
            inside = (tensors, meta)
    for i in range(start, len(stages)):
        stage = stages[i]
        ctx = StageContext(model, i, stage.name, checkpointer, positions, results, carry, inside)
        inside = None
        results[stage.name] = stage.run(ctx)
        # no boundary after the last stage: a resumed finished run re-enters its last loop at
        # its end, so it can go on for more steps (a one-table run given more epochs)
        if checkpointer is not None and i < len(stages) - 1:
            check_finite(model)
            tensors = {"weights": model.state_dict(), "rng": {"torch": torch.get_rng_state()}}
            tensors.update({f"carry.{k}": v for k, v in ctx.carry.items()})
            checkpointer.save(f"{i:02d}-end", tensors, {
                "stage": i + 1, "results": results, "positions": ctx.positions, "loop": None})
        positions, carry = ctx.positions, ctx.carry
    return results


__all__ = ["Checkpointer", "NonFiniteError", "Stage", "StageContext", "run_stages"]
