"""The server's rounds, a checkpoint after each, and resuming from the last one.

Flower's ``Strategy.start`` runs rounds 1..N in one call and cannot start at round k+1, so
``run_rounds`` is its loop (configure -> ``grid.send_and_receive`` -> aggregate, the same
for evaluation, then the server's own evaluation) with a first round and a hook after each
round; the strategy's methods are Flower's, untouched.

After each round the server writes ``OUT/checkpoints/ckpt-00-<round>/`` through the training
core's ``train.stages.Checkpointer`` (safetensors, written atomically, a SHA-256 manifest, a
``latest`` pointer replaced last, the run's last two kept): the global arrays, a server
optimiser's moments (FedAdam / FedYogi ``m_t`` / ``v_t``) and the records so far (every
round's per-silo metrics, pooled AUC, dropped clients). ``--resume`` continues after the last
completed round. What is not identical to an uninterrupted run: a client's ``Context.state``
(its unshared pieces, its users' rows by default, and where its stream of batches stands)
lives in the simulation engine and dies with the server, so resumed clients start those
afresh; with ``fraction`` < 1 the resumed rounds sample among new node ids.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shopmtl.config import ConfigError
from shopmtl.train import checkpoint as ck
from shopmtl.train.stages import Checkpointer

MOMENTS = ("m_t", "v_t", "velocity")  # FedOpt's server optimiser state; FedAvgM's velocity


def run_rounds(strategy: Any, grid: Any, arrays: Any, *, first: int, last: int,
               timeout: float, evaluate_fn: Callable[[int, Any], Any],
               after_round: Callable[[int, Any], None], cyclic_seed: int | None = None,
               log: Callable[[str], None] = print) -> Any:
    """Rounds ``first``..``last`` of ``strategy`` (Flower's ``Strategy.start`` loop, from any
    round); returns the final global arrays. A round whose aggregate is None (too few valid
    replies) keeps the arrays it started with. ``cyclic_seed``: the round's training is
    ``cyclic_train``'s (``federated.cyclic``)."""
    from flwr.app import ConfigRecord

    if first == 1:
        evaluate_fn(0, arrays)
    for rnd in range(first, last + 1):
        if cyclic_seed is not None:
            arrays = cyclic_train(strategy, grid, arrays, rnd, timeout, cyclic_seed, log)
        else:
            replies = grid.send_and_receive(
                messages=strategy.configure_train(rnd, arrays, ConfigRecord(), grid),
                timeout=timeout)
            new, _ = strategy.aggregate_train(rnd, replies)
            if new is not None:
                arrays = new
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
            timeout=timeout)
        strategy.aggregate_evaluate(rnd, replies)
        evaluate_fn(rnd, arrays)
        after_round(rnd, arrays)
    return arrays


def cyclic_order(silos: list[str], rnd: int, seed: int) -> list[str]:
    """The order the silos train in round ``rnd`` of a cyclic run: seeded, new each round
    (a fixed order would always leave the same silo's data freshest in the model)."""
    order = sorted(silos)
    random.Random(seed * 100_003 + rnd).shuffle(order)
    return order


def cyclic_train(strategy: Any, grid: Any, arrays: Any, rnd: int, timeout: float,
                 seed: int, log: Callable[[str], None] = print) -> Any:
    """Round ``rnd`` of cyclic weight transfer (``federated.cyclic``): every silo trains in
    turn (``cyclic_order`` of the silos' names), each from the model the one before it
    returned, through the strategy's own messages and reply checks; a dropped reply is
    skipped (the model passes on as it was). One silo's update at a time, so nothing is
    averaged: the model takes every silo's local steps one after another, as centralised
    training takes its batches."""
    from flwr.app import ConfigRecord

    messages = {strategy.name(m.metadata.dst_node_id): m
                for m in strategy.configure_train(rnd, arrays, ConfigRecord(), grid)}
    order = cyclic_order(list(messages), rnd, seed)
    log(f"round {rnd}: cyclic order " + " -> ".join(order))
    for silo in order:
        msg = messages[silo]
        msg.content["arrays"] = arrays  # the model so far, not the round's first
        strategy.expect([msg.metadata.dst_node_id])
        replies = grid.send_and_receive(messages=[msg], timeout=timeout)
        new, _ = strategy.aggregate_train(rnd, replies)
        if new is not None:
            arrays = new
    return arrays


def _inner(strategy: Any) -> Any:
    return getattr(strategy, "inner", strategy)


def strategy_state(strategy: Any) -> dict[str, torch.Tensor]:
    """A server optimiser's moments as flat tensors (none for the averaging strategies)."""
    out = {}
    for attr in MOMENTS:
        for k, v in (getattr(_inner(strategy), attr, None) or {}).items():
            out[f"{attr}.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def restore_strategy(strategy: Any, tensors: dict[str, torch.Tensor]) -> None:
    for attr in MOMENTS:
        vals = {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items()
                if k.startswith(f"{attr}.")}
        if vals:
            setattr(_inner(strategy), attr, vals)


def save_round(checkpointer: Checkpointer, rnd: int, arrays: dict[str, np.ndarray],
               strategy: dict[str, torch.Tensor], records: dict[str, Any],
               config: dict[str, Any], best: dict[str, np.ndarray] | None = None) -> Path:
    """Round ``rnd``'s checkpoint: the global arrays, the strategy's state, the records, and
    ``best``: the best round's global arrays (``federated.select: best``; none otherwise)."""
    tensors = {"arrays": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                          arrays.items()}}
    if strategy:
        tensors["strategy"] = strategy
    if best:
        tensors["best"] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                           best.items()}
    return checkpointer.save(f"00-{rnd:09d}", tensors,
                             {"round": rnd, "records": records, "config": config})


def load_round(checkpointer: Checkpointer, config: dict[str, Any]
               ) -> tuple[int, dict[str, np.ndarray], dict[str, torch.Tensor], dict[str, Any],
                          dict[str, np.ndarray]]:
    """The latest round checkpoint: (round, global arrays, strategy state, records, the best
    round's arrays: empty unless ``select: best`` kept them). A
    missing or corrupt checkpoint is a ``CheckpointError``; one written under another config
    (``rounds`` aside: a run may be resumed with more) is a ``ConfigError`` naming the key."""
    path = checkpointer.latest()
    if path is None or not path.is_dir():
        raise ck.CheckpointError(f"--resume: no round checkpoint in {checkpointer.dir}")
    tensors, meta = checkpointer.load(path)  # checks the manifest: every file's SHA-256
    if "arrays" not in tensors or not isinstance(meta.get("round"), int):
        raise ck.CheckpointError(f"{path}: not a federated round checkpoint")
    differs = first_difference(meta.get("config", {}), config)
    if differs is not None:
        raise ConfigError(f"--resume: {differs} differs from the checkpointed run's "
                          f"({path.name}); resume with the same config")
    arrays = {k: v.numpy() for k, v in tensors["arrays"].items()}
    best = {k: v.numpy() for k, v in tensors.get("best", {}).items()}
    return int(meta["round"]), arrays, tensors.get("strategy", {}), meta["records"], best


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first key (dotted) whose value differs between two JSON-like configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d is not None:
                return d
        return None
    same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return None if same else (where or "the config")


def int_keys(d: dict[str, Any]) -> dict[int, Any]:
    """A JSON object keyed by round numbers back to int keys."""
    return {int(k): v for k, v in d.items()}
