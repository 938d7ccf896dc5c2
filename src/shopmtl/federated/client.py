"""A silo's side of a federated run: the Flower ``ClientApp`` and the local training it runs.

A client's local training is the project's one training core: ``train.loop.fit(model,
[its silo's TableSource], steps=k, start=its last loop state)`` from the global weights it
was sent; FedProx's term is a regulariser source around it (``federated.proximal``). Between
rounds a client keeps, in its Flower ``Context.state``, what never leaves it: the unshared
pieces of the model (its users' embedding rows by default) and its loop state (where its
stream of batches stands, so local epochs walk through its rows instead of restarting).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shopmtl.config import ExperimentConfig
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import ALL, Schema
from shopmtl.federated.config import FederatedConfig
from shopmtl.federated.dp import UNIT_WEIGHT, client_mods
from shopmtl.federated.faults import fault_for, inject_after, inject_before
from shopmtl.federated.proximal import ProximalSource, anchors_of
from shopmtl.federated.silos import load_silo
from shopmtl.federated.wire import Piece, nbytes, pack, pieces, select, unpack
from shopmtl.models.base import MultiTaskModel
from shopmtl.registry import build_model
from shopmtl.train.loop import FitResult, LoopState, Schedule, fit, state_json
from shopmtl.train.select import MetricSelector
from shopmtl.train.table import TableSource
from shopmtl.weighting import build_weighting


@dataclass(frozen=True)
class Federation:
    """What every client needs to know (plain, picklable: it travels to the engine's
    workers): the experiment, the federation, the schema, the vocabulary sizes, and where
    each silo's rows are (a silo's client reads only its own file)."""

    experiment: ExperimentConfig
    federated: FederatedConfig
    schema: Schema
    vocab_sizes: dict[str, int]
    silo_names: tuple[str, ...]
    silo_files: tuple[str, ...]

    def build(self) -> MultiTaskModel:
        """The model every party starts from: same seed, same initial weights everywhere."""
        torch.manual_seed(self.federated.seed)
        return build_model(self.experiment.model.name, self.experiment.model.args, self.schema,
                           self.vocab_sizes, None)

    def layout(self, model: nn.Module) -> tuple[list[Piece], list[Piece]]:
        """(shared pieces, local pieces) of ``model`` under ``federated.share``."""
        every = pieces(model, self.schema, self.vocab_sizes, self.schema.group)
        shared = select(every, self.federated.share)
        names = {p.name for p in shared}
        return shared, [p for p in every if p.name not in names]


# -- local training: one call of the one loop ----------------------------------------------

def local_steps(fed: FederatedConfig, data: PreparedData, batch_size: int) -> int:
    """A round's local steps: ``local_epochs`` of the silo's training rows."""
    return max(1, round(fed.local_epochs * data.train.num_batches(batch_size)))


def round_lr(exp: ExperimentConfig, epochs_done: float) -> float:
    """The learning rate after ``epochs_done`` epochs: the experiment's per-epoch decay, as
    a one-table run applies it, so a federated run and a centralised one of the same total
    epochs see the same rates."""
    t = exp.train
    return t.batch_lr() * t.lr_decay ** math.floor(epochs_done + 1e-9)


def train_silo(model: nn.Module, data: PreparedData, exp: ExperimentConfig, *, steps: int,
               lr: float, seed: int, start: LoopState | None = None, mu: float = 0.0,
               anchor: list[Piece] | None = None, decay_every: int = 0,
               optimizer_state: dict[int, dict[str, torch.Tensor]] | None = None) -> FitResult:
    """``steps`` more steps of ``model`` on ``data``'s training rows through ``train.loop.fit``
    (``start``: the loop state to continue from; ``mu`` > 0: FedProx's proximal term to the
    current values of the ``anchor`` pieces, the global model just received)."""
    t = exp.train
    source: Any = TableSource(data, t.batch_size, embedding_weight_decay=t.embedding_weight_decay,
                              eval_batch_size=t.eval_batch_size)
    if mu > 0:
        source = ProximalSource(source, mu, anchors_of(model, anchor or []))
    weighting = build_weighting(exp.weighting.name, exp.weighting.args, data.schema.task_names)
    done = start.step if start is not None else 0
    schedule = Schedule(steps=done + steps, lr=lr, grad_clip=t.grad_clip, seed=seed,
                        lr_decay=t.lr_decay if decay_every else 1.0, decay_every=decay_every,
                        divergence_factor=t.divergence_factor)
    # the mean AUC over tasks: a silo may lack a task's validation labels
    selector = MetricSelector("valid.all_tasks.auc", "max", source.name)
    return fit(model, [source], weighting, schedule, selector, start=start, alpha=t.alpha,
               weight_decay=t.weight_decay, optimizer=t.optimizer,
               optimizer_state=optimizer_state)


def optimizer_arrays(state: dict[int, dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """An optimizer's per-parameter state as flat named arrays (``"3/exp_avg"``), to keep in
    the client's Flower ``Context.state`` between rounds."""
    return {f"{i}/{k}": v.detach().cpu().numpy() for i, st in state.items()
            for k, v in st.items()}


def optimizer_state(arrays: dict[str, np.ndarray]) -> dict[int, dict[str, torch.Tensor]]:
    """``optimizer_arrays``' inverse."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in arrays.items():
        i, k = name.split("/", 1)
        out.setdefault(int(i), {})[k] = torch.from_numpy(np.array(v))
    return out


def nest_auc(per_task: dict[str, dict[str, Any]], key: str = "auc"
             ) -> dict[str, dict[str, float]]:
    """``TableSource.evaluate``'s metrics as {task: {scope: value}} (``all`` and every
    scenario; finite values only: a task without labels in a scope has none)."""
    out: dict[str, dict[str, float]] = {}
    for task, m in per_task.items():
        scopes = {ALL: m, **m.get("by_scenario", {})}
        for scope, vals in scopes.items():
            v = vals.get(key)
            if v is not None and math.isfinite(float(v)):
                out.setdefault(task, {})[scope] = float(v)
    return out


# -- the ClientApp ---------------------------------------------------------------------------

_SILOS: dict[str, PreparedData] = {}  # a worker process keeps the silos it has loaded


def _silo(fed: Federation, i: int) -> PreparedData:
    path = fed.silo_files[i]
    if path not in _SILOS:
        _SILOS[path] = load_silo(Path(path), fed.schema)
    return _SILOS[path]


def _arrays(record: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# -- what a client keeps, on its own disk --------------------------------------------------
# A client's state (its unshared pieces, its loop state, its optimizer's moments) lives in
# Flower's ``Context.state``, which dies with the process that runs it: with the simulation
# engine, with the server. Each client also writes it beside its silo's file after every
# round it trains, so that a resumed run (``--resume``) continues each silo where it stood.

KEEP_STATES = 2  # a client's latest state files kept (the one a resume needs, and the last)


def _state_files(silo_file: str) -> dict[int, Path]:
    """round -> the client state file written after that round (``NN.client-RRRRRR``)."""
    path = Path(silo_file)
    out = {}
    for f in path.parent.glob(f"{path.stem}.client-*.safetensors"):
        digits = f.name.removesuffix(".safetensors").rsplit("-", 1)[1]
        if digits.isdigit():
            out[int(digits)] = f
    return out


def save_client_state(silo_file: str, rnd: int, state: Any) -> Path:
    """The client's ``Context.state`` after round ``rnd``, atomically (a temporary file
    renamed over), in safetensors; older files beyond ``KEEP_STATES`` are removed."""
    from safetensors.numpy import save_file

    tensors = {f"{part}/{k}": np.ascontiguousarray(v) for part in ("local", "optimizer")
               if part in state for k, v in _arrays(state[part]).items()}
    meta = {"round": str(rnd), "loop": str(state["loop"]["state"]) if "loop" in state else ""}
    path = Path(silo_file)
    dest = path.parent / f"{path.stem}.client-{rnd:06d}.safetensors"
    tmp = dest.with_name(f".{dest.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    files = _state_files(silo_file)
    for r in sorted(files)[:-KEEP_STATES]:
        files[r].unlink(missing_ok=True)
    return dest


def local_start(state: Any, keep_optimizer: bool
                ) -> tuple[LoopState | None, dict[int, dict[str, torch.Tensor]] | None]:
    """Where the client's loop stands (None: its first round) and, with ``keep_optimizer``,
    its optimizer's moments (None: a fresh optimizer), from its ``Context.state``."""
    start = (LoopState(**json.loads(str(state["loop"]["state"]))) if "loop" in state
             else None)
    kept = (optimizer_state(_arrays(state["optimizer"]))
            if keep_optimizer and "optimizer" in state else None)
    return start, kept


def keep_local_state(state: Any, model: nn.Module, local: list[Piece], res: FitResult,
                     keep_optimizer: bool, silo_file: str, rnd: int) -> None:
    """After round ``rnd``'s local training: the unshared pieces, the optimizer's moments
    (with ``keep_optimizer``) and the loop state into ``Context.state`` (never sent), and
    the state onto the client's disk (``save_client_state``)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    state["local"] = ArrayRecord({k: Array(v) for k, v in pack(model, local).items()})
    if keep_optimizer:
        state["optimizer"] = ArrayRecord(
            {k: Array(v) for k, v in optimizer_arrays(res.optimizer).items()})
    state["loop"] = ConfigRecord({"state": json.dumps(state_json(res.state))})
    save_client_state(silo_file, rnd, state)


def restore_client_state(silo_file: str, rnd: int, state: Any) -> int | None:
    """Fill an empty ``Context.state`` (a resumed run's fresh client) from the latest state
    file written before round ``rnd``; the round it came from, or None (nothing to do)."""
    if "loop" in state:
        return None
    files = {r: f for r, f in _state_files(silo_file).items() if r < rnd}
    if not files:
        return None
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from safetensors import safe_open

    last = max(files)
    with safe_open(str(files[last]), "numpy") as f:
        meta = f.metadata() or {}
        parts: dict[str, dict[str, np.ndarray]] = {}
        names = f.keys()  # (a safe_open handle is not iterable)
        for k in names:
            part, name = k.split("/", 1)
            parts.setdefault(part, {})[name] = f.get_tensor(k)
    for part, arrays in parts.items():
        state[part] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if meta.get("loop"):
        state["loop"] = ConfigRecord({"state": meta["loop"]})
    return last


def _model(fed: Federation, state: Any, global_arrays: dict[str, np.ndarray]
           ) -> tuple[MultiTaskModel, list[Piece], list[Piece]]:
    """The silo's model: its own pieces (kept in ``state``; the initial ones before its
    first round) under the global shared ones."""
    model = fed.build()
    shared, local = fed.layout(model)
    if "local" in state:
        unpack(model, local, _arrays(state["local"]))
    unpack(model, shared, global_arrays)
    return model, shared, local


def client_train(fed: Federation, msg: Any, context: Any) -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    exp, cfg = fed.experiment, fed.federated
    torch.set_num_threads(max(1, exp.train.threads))
    i = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    # federated.faults, a test tool: this silo crashes or is late on purpose this round
    fault = fault_for(cfg.faults, fed.silo_names[i], rnd)
    inject_before(fault, cfg.faults.delay or cfg.round_timeout + 1)
    data = _silo(fed, i)
    restored = restore_client_state(fed.silo_files[i], rnd, context.state)
    received = _arrays(msg.content["arrays"])
    model, shared, local = _model(fed, context.state, received)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    start, kept = local_start(context.state, cfg.keep_optimizer)
    k = local_steps(cfg, data, exp.train.batch_size)
    res = train_silo(model, data, exp, steps=k, lr=round_lr(exp, (rnd - 1) * cfg.local_epochs),
                     seed=cfg.seed * 1009 + i, start=start, mu=mu, anchor=shared,
                     optimizer_state=kept)
    keep_local_state(context.state, model, local, res, cfg.keep_optimizer, fed.silo_files[i], rnd)
    sent = pack(model, shared)
    if fed.silo_names[i] in cfg.attack.silos:  # the harness: a sign-flipped, scaled update
        sent = {n: received[n] - cfg.attack.scale * (v - received[n]) for n, v in sent.items()}
    sent = inject_after(fault, sent)  # federated.faults: NaNs, a wrong shape, too many bytes
    losses = res.state.history[-1]["train_loss"] if res.state.history else {}
    # the weighting key and the ids in the MetricRecord (Flower wants the same keys from
    # every client); what differs by silo (its tasks) travels as JSON beside it
    metrics = {"num-examples": len(data.train), "silo": i, "round": rnd,
               "bytes-sent": nbytes(sent), "bytes-received": nbytes(received), "steps": k,
               **({UNIT_WEIGHT: 1} if cfg.dp.mode != "none" else {})}  # DP: a uniform mean
    detail = {"train_loss": {t: float(v) for t, v in losses.items()},
              **({"restored_from": restored} if restored is not None else {})}
    return Message(RecordDict({"arrays": ArrayRecord({n: Array(v) for n, v in sent.items()}),
                               "metrics": MetricRecord(metrics),
                               "detail": ConfigRecord({"json": json.dumps(detail)})}),
                   reply_to=msg)


def client_evaluate(fed: Federation, msg: Any, context: Any) -> Any:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(max(1, fed.experiment.train.threads))
    i = int(context.node_config["partition-id"])
    data = _silo(fed, i)
    restore_client_state(fed.silo_files[i], int(msg.content["config"]["server-round"]),
                         context.state)
    model, _, _ = _model(fed, context.state, _arrays(msg.content["arrays"]))
    source = TableSource(data, fed.experiment.train.batch_size,
                         eval_batch_size=fed.experiment.train.eval_batch_size)
    per_task = source.evaluate(model, "test")
    # the validation rows too: what the server ranks rounds by (federated.select: best)
    valid = nest_auc(source.evaluate(model, "valid")) if len(data.valid) else {}
    metrics = {"num-examples": len(data.test), "num-valid": len(data.valid), "silo": i,
               "round": int(msg.content["config"]["server-round"]),
               **({UNIT_WEIGHT: 1} if fed.federated.dp.mode != "none" else {})}
    detail = {"auc": nest_auc(per_task), "valid_auc": valid}
    return Message(RecordDict({"metrics": MetricRecord(metrics),
                               "detail": ConfigRecord({"json": json.dumps(detail)})}),
                   reply_to=msg)


def make_client_app(fed: Federation | Callable[[Any], Federation]) -> Any:
    """The ``ClientApp``: node ``partition-id`` k is silo k. ``fed``: the federation, or a
    function of the node's ``Context`` returning it (a SuperNode reads it from its node
    config: ``federated.deploy``). SecAgg+ messages pass through ``secure.secagg_mod``."""
    from flwr.clientapp import ClientApp

    from shopmtl.federated.secure import secagg_mod

    resolve = fed if callable(fed) else (lambda context: fed)
    app = ClientApp()

    # DP's clipping mod (mode client) is chosen here, from a federation known up front: a
    # deployed SuperNode's (resolved per message) runs without DP (refused at start)
    mods = [secagg_mod] if callable(fed) else [*client_mods(fed.federated.dp), secagg_mod]

    @app.train(mods=mods)
    def _train(msg: Any, context: Any) -> Any:
        return client_train(resolve(context), msg, context)

    @app.evaluate()
    def _evaluate(msg: Any, context: Any) -> Any:
        return client_evaluate(resolve(context), msg, context)

    @app.query()
    def _query(msg: Any, context: Any) -> Any:
        return client_roll_call(resolve(context), msg, context)

    return app


def client_roll_call(fed: Federation, msg: Any, context: Any) -> Any:
    """The answer to the server's roll call before round 1: which silo this node is (so a
    client dropped later is named by its silo), after loading its rows (so the engine's
    start and the imports are not counted in round 1's timeout)."""
    from flwr.app import Message, MetricRecord, RecordDict

    i = int(context.node_config["partition-id"])
    _silo(fed, i)
    return Message(RecordDict({"silo": MetricRecord({"silo": i})}), reply_to=msg)
