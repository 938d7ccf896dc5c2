"""Federated training of the joint model: business units as silos, each owning its sources.

A joint federated config (``examples/federated_joint.yaml``) names a joint config and gives
each of its sources to one silo (``federated.silos: {by: source, groups: {silo: [sources]}}``):
the recommendation logs in one business unit, the customer-service dialogues in another, and
so on. No silo sees another's rows. Together they train the one ``JointModel``:

- what crosses the wire is the shared text adapter (``SharedText``: ``text.*`` of the state
  dict; the hashed n-gram table travels as ``text.ngram.weight[rows]`` so that the row-aware
  mean averages each n-gram row over the silos whose texts moved it). Every head (a text
  source's ``TableHead`` / ``RankHead``, the rec source's zoo model) is trained by the one silo
  that owns its source: averaging it would be the identity, sending it would only disclose it,
  so it stays in its silo (``Context.state`` and the silo's state file, as a zoo client's user
  rows do). ``model.share_ids`` applies inside a silo (search borrows the rec model's item rows
  only where one silo owns both).
- a client's round is the joint stage's loop over its own sources (``train.loop.fit``: the one
  core), from the global adapter and its own heads, with FedProx's term on the adapter's dense
  weights (``federated.proximal``; not on the n-gram table: a dense term on every row would,
  under Adam, pull each row back to the global value between two batches that use it).
- the steps: the federation makes ``joint.train.steps`` steps in all, ``rounds`` rounds, each
  silo a share of every round equal to its sources' share of the joint sampler
  (``train.sampling.source_probs`` over every source's batch count, which each silo reports in
  the roll call, a count and no rows), so each source gets the batches a centralised joint run
  of the same steps gives it in expectation. The learning rate follows the joint schedule's
  decay by the federation's progress.
- evaluation: every round each silo scores its own tasks on its own test split (the global
  adapter with its heads); after the last round each silo writes its model directory
  (``OUT/silos/<silo>/model``: the global adapter and its heads, ``shopmtl.load`` reads it).

Not built (refused at config load, ``federated.config.check_joint``): DP, SecAgg+, robust
aggregation, LoRA text; the joint run's ``refit`` and ``solve`` stages are not run (logged).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shopmtl.federated.client import keep_local_state, local_start, restore_client_state
from shopmtl.federated.config import FederatedConfig, JointFederatedRun
from shopmtl.federated.faults import fault_for, inject_after, inject_before
from shopmtl.federated.proximal import ProximalSource, anchors_of
from shopmtl.federated.wire import Piece, nbytes, pack, unpack
from shopmtl.joint.checkpoint import save_joint_dir
from shopmtl.joint.config import JointConfig
from shopmtl.joint.model import JointModel, SharedText
from shopmtl.joint.parts import load_parts, text_bank, text_width
from shopmtl.joint.train import build_joint_model, flushed_denormals
from shopmtl.jsonsafe import json_safe
from shopmtl.train.loop import FitResult, LoopState, Schedule, fit
from shopmtl.train.sampling import source_probs
from shopmtl.train.select import GainSelector, primary
from shopmtl.weighting import build_weighting

NGRAM = "text.ngram.weight"  # the one table of the adapter: averaged row by row


@dataclass(frozen=True)
class JointFederation:
    """What every client needs (plain, picklable: it travels to the engine's workers): the
    joint config, the federation, the silos' sources and where each silo keeps its files."""

    joint: JointConfig
    federated: FederatedConfig
    silo_names: tuple[str, ...]
    silo_sources: tuple[tuple[str, ...], ...]
    out: str

    def silo_config(self, i: int) -> JointConfig:
        """The joint config of silo ``i``: its own sources only."""
        mine = self.silo_sources[i]
        return dataclasses.replace(self.joint, sources=tuple(
            s for s in self.joint.sources if s.name in mine))

    def silo_dir(self, i: int) -> Path:
        return Path(self.out) / "silos" / self.silo_names[i]

    def state_file(self, i: int) -> str:
        """The stem of silo ``i``'s client state files (``client.save_client_state``)."""
        return str(self.silo_dir(i) / "state.safetensors")


def layout(model: nn.Module) -> tuple[list[Piece], list[Piece]]:
    """(shared, local) pieces of a joint model: the text adapter, everything else."""
    shared, local = [], []
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue  # integer buffers (a head's shared-row indices) never travel
        if key.startswith("text."):
            # a name ending in "]": the row-aware strategies average it row by row
            shared.append(Piece(f"{key}[rows]" if key == NGRAM else key, key, None, "text"))
        else:
            local.append(Piece(key, key, None, "heads"))
    return shared, local


def initial_adapter(joint: JointConfig) -> dict[str, np.ndarray]:
    """The global model the server starts from: the adapter every silo builds first from the
    same seed (``joint.train.build_joint_model`` builds the adapter before any head)."""
    torch.manual_seed(joint.train.seed)
    text = SharedText(text_width(joint), joint.model, None, joint.text.ngram_buckets)
    wrapper = nn.Module()
    wrapper.text = text
    shared, _ = layout(wrapper)
    return pack(wrapper, shared)


def plan_steps(joint: JointConfig, rounds: int, sizes: list[dict[str, int]]) -> list[int]:
    """Each silo's local steps per round: ``joint.train.steps / rounds`` times its sources'
    share of the joint sampler (``sizes``: per silo, source -> training batches)."""
    names = [s.name for s in joint.sources]
    flat = {k: v for per in sizes for k, v in per.items()}
    probs = dict(zip(names, source_probs([flat[n] for n in names], joint.sampling.method,
                                         joint.sampling.temperature), strict=True))
    per_round = joint.train.steps / rounds
    return [max(1, round(per_round * sum(probs[n] for n in per))) for per in sizes]


def round_lr(joint: JointConfig, done: float) -> float:
    """The joint schedule's learning rate after ``done`` of its steps (the federation's)."""
    t = joint.train
    if t.decay_every <= 0:
        return t.lr
    return t.lr * t.lr_decay ** math.floor(done / t.decay_every + 1e-9)


# -- a silo: its sources loaded once per worker process ------------------------------------

@dataclass
class Silo:
    parts: list[Any]
    bank: Any  # joint.parts.TextBank
    cfg: JointConfig


_SILOS: dict[str, Silo] = {}


def _quiet(*args: Any, **kwargs: Any) -> None:
    """A client's loaders speak in the engine's workers: not on the run's log."""


def load_silo(fed: JointFederation, i: int) -> Silo:
    """Silo ``i``'s sources (read and split exactly as the centralised joint run reads them,
    ``joint.parts.load_parts``) and its text bank, cached in this process."""
    key = str(fed.silo_dir(i))
    if key not in _SILOS:
        cfg = fed.silo_config(i)
        fed.silo_dir(i).mkdir(parents=True, exist_ok=True)  # its state files, its model
        parts, texts, _ = load_parts(cfg, fed.silo_dir(i), _quiet)
        _SILOS[key] = Silo(parts, text_bank(cfg, texts.texts), cfg)
    return _SILOS[key]


def silo_model(fed: JointFederation, silo: Silo, state: Any,
               global_arrays: dict[str, np.ndarray]) -> tuple[JointModel, list[Piece],
                                                               list[Piece]]:
    """The silo's joint model (its heads only): its heads from ``state`` (the seeded initial
    ones before its first round) under the global adapter."""
    torch.manual_seed(fed.joint.train.seed)
    model = build_joint_model(silo.cfg, silo.parts, text_width(silo.cfg), _quiet)
    model.text.set_bank(silo.bank.bank, silo.bank.mask, silo.bank.ngrams)
    shared, local = layout(model)
    if "local" in state:
        unpack(model, local, {k: v.numpy() for k, v in state["local"].items()})
    unpack(model, shared, global_arrays)
    return model, shared, local


def train_silo(model: JointModel, silo: Silo, *, steps: int, lr: float, seed: int,
               start: LoopState | None = None, mu: float = 0.0,
               anchor: list[Piece] | None = None,
               optimizer_state: dict[int, dict[str, torch.Tensor]] | None = None) -> FitResult:
    """``steps`` more steps of the joint stage's loop over the silo's sources
    (``train.loop.fit``), FedProx's term on the adapter's dense weights when ``mu`` > 0."""
    cfg = silo.cfg
    t = cfg.train
    tasks = [n for p in silo.parts for n in p.task_names]
    types = {s.name: s.type for p in silo.parts for s in p.tasks}
    sources: list[Any] = list(silo.parts)
    if mu > 0:
        dense = [p for p in anchor or [] if p.key != NGRAM]
        anchors = anchors_of(model, dense)
        sources = [ProximalSource(p, mu, anchors) for p in sources]
    weighting = build_weighting(cfg.weighting.name, cfg.weighting.args, tasks)
    done = start.step if start is not None else 0
    schedule = Schedule(steps=done + steps, lr=lr, sampling=cfg.sampling.method,
                        temperature=cfg.sampling.temperature, seed=seed,
                        divergence_factor=t.divergence_factor, precision=t.precision)
    with flushed_denormals():
        return fit(model, sources, weighting, schedule, GainSelector(types), start=start,
                   alpha={k: v for k, v in t.alpha.items() if k in tasks},
                   weight_decay=t.weight_decay, optimizer_state=optimizer_state)


def owner_metrics(silo: Silo, model: JointModel, split: str = "test") -> dict[str, float]:
    """task -> its primary metric on the silo's ``split``."""
    types = {s.name: s.type for p in silo.parts for s in p.tasks}
    return primary({p.name: p.evaluate(model, split) for p in silo.parts}, types)


# -- the ClientApp ---------------------------------------------------------------------------

def _records(**parts: Any) -> Any:
    from flwr.app import RecordDict

    return RecordDict(parts)


def client_train(fed: JointFederation, msg: Any, context: Any) -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

    cfg = fed.federated
    torch.set_num_threads(max(1, fed.joint.train.threads))
    i = int(context.node_config["partition-id"])
    config = msg.content["config"]
    rnd = int(config["server-round"])
    fault = fault_for(cfg.faults, fed.silo_names[i], rnd)  # a test tool (federated.faults)
    inject_before(fault, cfg.faults.delay or cfg.round_timeout + 1)
    silo = load_silo(fed, i)
    restored = restore_client_state(fed.state_file(i), rnd, context.state)
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    model, shared, local = silo_model(fed, silo, context.state, received)
    start, kept = local_start(context.state, cfg.keep_optimizer)
    steps = json.loads(str(config["joint-steps"]))[i]
    done = json.loads(str(config["joint-done"]))
    seed = fed.joint.train.seed * 1009 + i
    # the dropout draws of this silo's round (the model was built from the run's seed)
    torch.manual_seed(seed * 7919 + rnd)
    res = train_silo(model, silo, steps=steps, lr=round_lr(fed.joint, done), seed=seed,
                     start=start,
                     mu=float(config.get("proximal-mu", 0.0)), anchor=shared,
                     optimizer_state=kept)
    keep_local_state(context.state, model, local, res, cfg.keep_optimizer, fed.state_file(i), rnd)
    sent = inject_after(fault, pack(model, shared))
    recent = [r for r in res.state.history if r.get("train_loss")]
    losses = recent[-1]["train_loss"] if recent else {}
    examples = sum(len(p.splits["train"]) if hasattr(p, "splits") else len(p.data.train)
                   for p in silo.parts)
    metrics = {"num-examples": examples, "silo": i, "round": rnd, "steps": steps,
               "bytes-sent": nbytes(sent), "bytes-received": nbytes(received)}
    detail = {"train_loss": {t: float(v) for t, v in losses.items()},
              "steps_by_source": dict(res.state.steps_by_source),
              **({"restored_from": restored} if restored is not None else {})}
    return Message(_records(arrays=ArrayRecord({n: Array(v) for n, v in sent.items()}),
                            metrics=MetricRecord(metrics),
                            detail=ConfigRecord({"json": json.dumps(json_safe(detail))})),
                   reply_to=msg)


def client_evaluate(fed: JointFederation, msg: Any, context: Any) -> Any:
    from flwr.app import ConfigRecord, Message, MetricRecord

    torch.set_num_threads(max(1, fed.joint.train.threads))
    i = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    silo = load_silo(fed, i)
    restore_client_state(fed.state_file(i), rnd + 1, context.state)
    model, _, _ = silo_model(fed, silo, context.state,
                             {k: v.numpy() for k, v in msg.content["arrays"].items()})
    test = owner_metrics(silo, model)
    if rnd == fed.federated.rounds:  # the silo's own deliverable, on its own disk
        save_joint_dir(fed.silo_dir(i) / "model", model, silo.cfg, silo.parts)
    metrics = {"num-examples": sum(len(p.splits["test"]) if hasattr(p, "splits")
                                   else len(p.data.test) for p in silo.parts),
               "silo": i, "round": rnd,
               "steps": json.loads(str(msg.content["config"]["joint-steps"]))[i]}
    return Message(_records(metrics=MetricRecord(metrics),
                            detail=ConfigRecord({"json": json.dumps(json_safe(
                                {"test": test}))})),
                   reply_to=msg)


def client_roll_call(fed: JointFederation, msg: Any, context: Any) -> Any:
    """Which silo this node is and its sources' training batches (counts, no rows), after
    loading them (so the loading is not inside round 1's timeout)."""
    from flwr.app import ConfigRecord, Message, MetricRecord

    i = int(context.node_config["partition-id"])
    silo = load_silo(fed, i)
    sizes = {p.name: int(p.num_batches()) for p in silo.parts}
    return Message(_records(silo=MetricRecord({"silo": i}),
                            sizes=ConfigRecord({"json": json.dumps(sizes)})), reply_to=msg)


def make_client_app(fed: JointFederation) -> Any:
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg: Any, context: Any) -> Any:
        return client_train(fed, msg, context)

    @app.evaluate()
    def _evaluate(msg: Any, context: Any) -> Any:
        return client_evaluate(fed, msg, context)

    @app.query()
    def _query(msg: Any, context: Any) -> Any:
        return client_roll_call(fed, msg, context)

    return app


# -- the server ------------------------------------------------------------------------------

class Planned:
    """The strategy (behind ``faults.Guard``) with the round's step plan in its train
    config (``joint-steps``: each silo's steps, ``joint-done``: the federation's steps so
    far, for the learning rate), and a record of the array names each silo's reply carried
    (``sent_keys``: what crossed the wire, seen by the server)."""

    def __init__(self, inner: Any, steps: list[int], per_round: float) -> None:
        self.inner, self.steps, self.per_round = inner, steps, per_round
        self.sent_keys: dict[int, dict[str, list[str]]] = {}

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
        config["joint-steps"] = json.dumps(self.steps)
        config["joint-done"] = json.dumps(self.per_round * (server_round - 1))
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        self.sent_keys[server_round] = {
            self.inner.name(m.metadata.src_node_id): sorted(m.content["arrays"].keys())
            for m in replies if not m.has_error() and "arrays" in m.content}
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any
                           ) -> Any:
        config["joint-steps"] = json.dumps(self.steps)  # the weight key every reply carries
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        return self.inner.aggregate_evaluate(server_round, replies)


def roll_call(grid: Any, names: tuple[str, ...], timeout: float = 600.0
              ) -> tuple[dict[int, int], list[dict[str, int]]]:
    """Node id -> silo index, and each silo's batches per source (every silo must answer:
    the step plan needs every source's size)."""
    from flwr.app import Message, RecordDict

    n = len(names)
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < n and time.monotonic() < deadline:  # the engine registers its nodes
        time.sleep(0.1)
        nodes = list(grid.get_node_ids())
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=k, message_type="query") for k in nodes],
        timeout=max(1.0, deadline - time.monotonic()))
    from shopmtl.federated.faults import error_reason

    index: dict[int, int] = {}
    sizes: dict[int, dict[str, int]] = {}
    failed = []
    for m in replies:
        if m.has_error():  # a silo that cannot load its sources: the type, never the text
            failed.append(error_reason(m))
            continue
        i = int(m.content["silo"]["silo"])
        index[m.metadata.src_node_id] = i
        sizes[i] = json.loads(str(m.content["sizes"]["json"]))
    if len(sizes) < n:
        missing = [name for i, name in enumerate(names) if i not in sizes]
        why = "; ".join(failed) or "timed out"
        raise RuntimeError(f"roll call: silos {missing} did not answer ({why}); the step plan "
                           "needs every source's size")
    return index, [sizes[i] for i in range(n)]


def serve(fed: JointFederation, grid: Any, log: Callable[[str], None] = print,
          checkpointer: Any = None, resume: bool = False) -> dict[str, Any]:
    """The server's rounds on ``grid``: the roll call (silos and their sizes), the step plan,
    FedAvg / FedProx (row-aware on the n-gram table, behind the reply checks), a checkpoint
    after every round (``federated.resume``). Returns the records."""
    from flwr.app import Array, ArrayRecord

    from shopmtl.federated.faults import Guard
    from shopmtl.federated.resume import (
        int_keys,
        load_round,
        restore_strategy,
        run_rounds,
        save_round,
        strategy_state,
    )
    from shopmtl.federated.server import Recorder, make_strategy

    cfg = fed.federated
    n = len(fed.silo_names)
    recorder = Recorder(fed.silo_names)
    config = run_config(fed)
    first, start, moments, keys = 1, initial_adapter(fed.joint), {}, {}
    if resume:
        done, start, moments, records, _ = load_round(checkpointer, config)
        recorder.train, recorder.eval = int_keys(records["train"]), int_keys(records["eval"])
        recorder.dropped, keys = int_keys(records["dropped"]), int_keys(records["sent_keys"])
        first = done + 1
        log(f"resuming after round {done} (checkpoint {checkpointer.latest()})")
    # a silo's update weighs by its steps this round, not its rows: each step is one update
    # of the adapter, as in the centralised joint run (by rows, the 24,000 impressions of the
    # rec silo would outweigh 150 dialogues 160 to 1 whatever the sampler gave each)
    inner = make_strategy(cfg, n, recorder.on_train, recorder.on_eval, weighted_by="steps")
    guard = Guard(inner, min(cfg.min_clients, n), cfg.round_timeout, log)
    guard.dropped = recorder.dropped
    restore_strategy(guard, moments)
    index, sizes = roll_call(grid, fed.silo_names)
    guard.names = {node: fed.silo_names[i] for node, i in index.items()}
    steps = plan_steps(fed.joint, cfg.rounds, sizes)
    per_round = fed.joint.train.steps / cfg.rounds
    log("step plan per round: " + ", ".join(
        f"{name} {k}" for name, k in zip(fed.silo_names, steps, strict=True)))
    strategy = Planned(guard, steps, per_round)
    strategy.sent_keys = keys
    t0 = time.perf_counter()

    def evaluate_fn(rnd: int, arrays: Any) -> None:
        if rnd == 0:
            return
        got = recorder.eval.get(rnd, {})
        log(f"round {rnd}/{cfg.rounds}: owner-silo test " + ", ".join(
            f"{t} {v:.4f}" for m in got.values() for t, v in m["test"].items()))

    def after_round(rnd: int, arrays: Any) -> None:
        if checkpointer is not None:
            records = {"train": recorder.train, "eval": recorder.eval,
                       "dropped": recorder.dropped, "sent_keys": strategy.sent_keys}
            save_round(checkpointer, rnd, {k: v.numpy() for k, v in arrays.items()},
                       strategy_state(guard), records, config)

    initial = ArrayRecord({k: Array(v) for k, v in start.items()})
    final = run_rounds(strategy, grid, initial, first=first, last=cfg.rounds,
                       timeout=cfg.round_timeout, evaluate_fn=evaluate_fn,
                       after_round=after_round)
    return {"recorder": recorder, "sent_keys": strategy.sent_keys, "steps": steps,
            "sizes": sizes, "seconds": time.perf_counter() - t0,
            "shared_bytes": nbytes({k: v.numpy() for k, v in final.items()})}


def run_config(fed: JointFederation) -> dict[str, Any]:
    """The config a round checkpoint must be resumed with, as JSON: ``rounds`` included (a
    zoo run may be resumed with more rounds; a joint round is ``steps / rounds`` steps, so
    more rounds would change the rounds already run)."""
    from shopmtl.config import to_dict

    return json.loads(json.dumps(json_safe({"joint": to_dict(fed.joint),
                                            "federated": to_dict(fed.federated)})))


def simulate(fed: JointFederation, log: Callable[[str], None] = print,
             checkpointer: Any = None, resume: bool = False) -> dict[str, Any]:
    """The federation on Flower's simulation engine (one virtual SuperNode per silo)."""
    from shopmtl.federated.server import run_on_engine

    return run_on_engine(lambda grid: serve(fed, grid, log, checkpointer, resume),
                         make_client_app(fed), len(fed.silo_names), fed.federated)


def summarise(fed: JointFederation, result: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: per round, every task's test metric on its owner silo, what each silo
    sent (bytes, array names), its steps and training losses; the final round's table."""
    rec = result["recorder"]
    last = rec.eval.get(max(rec.eval), {}) if rec.eval else {}
    owner = {t: s for s, m in last.items() for t in m["test"]}
    rounds = []
    for r in sorted(set(rec.train) | set(rec.eval)):
        train = rec.train.get(r, {})
        tasks = {t: {"silo": s, "test": v} for s, m in rec.eval.get(r, {}).items()
                 for t, v in m["test"].items()}
        rounds.append({
            "round": r, "tasks": tasks, "clients": sorted(train),
            "steps": {s: int(m["steps"]) for s, m in train.items()},
            # cumulative: each silo's loop state (and its streams) carries over the rounds
            "steps_by_source_total": {s: m["steps_by_source"] for s, m in train.items()},
            "bytes_sent": {s: int(m["bytes-sent"]) for s, m in train.items()},
            "sent_keys": result["sent_keys"].get(r, {}),
            "train_loss": {s: m["train_loss"] for s, m in train.items()},
            "dropped": rec.dropped.get(r, {}),
            # a resumed run's clients: the round whose own state each one read back
            **({"restored": {s: m["restored_from"] for s, m in train.items()
                             if "restored_from" in m}}
               if any("restored_from" in m for m in train.values()) else {}),
        })
    skipped = [s for s, on in (("refit", fed.joint.train.refit_steps > 0),
                               ("solve", fed.joint.train.solve_heads)) if on]
    return json_safe({
        "kind": "joint", "federated": run_config(fed)["federated"],
        "silos": {n: list(s) for n, s in zip(fed.silo_names, fed.silo_sources, strict=True)},
        "owner": owner, "steps_per_round": dict(zip(fed.silo_names, result["steps"],
                                                    strict=True)),
        "source_batches": {k: v for per in result["sizes"] for k, v in per.items()},
        "total_steps": fed.joint.train.steps, "skipped_stages": skipped,
        "shared_bytes_per_client": result["shared_bytes"], "rounds": rounds,
        "final": rounds[-1] if rounds else {}, "seconds": result["seconds"],
        "models": {n: f"silos/{n}/model" for n in fed.silo_names},
    })


def write_report(out: Path, metrics: dict[str, Any]) -> None:
    """report.md: the owner-silo test metric of every task by round."""
    rounds = metrics["rounds"]
    tasks = sorted({t for r in rounds for t in r["tasks"]})
    lines = ["# Federated joint run", "",
             "Each task's primary test metric on the silo that owns its source, by round.", "",
             "| round | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in rounds:
        cells = [f"{r['tasks'][t]['test']:.4f}" if t in r["tasks"] else "-" for t in tasks]
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    lines += ["", "Silos: " + "; ".join(f"{k}: {', '.join(v)}"
                                        for k, v in metrics["silos"].items()),
              f"Shared bytes per client per round: {metrics['shared_bytes_per_client']:,}"]
    if metrics["skipped_stages"]:
        lines.append(f"Not run (joint stages not federated): {metrics['skipped_stages']}")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def check_sources(joint: JointConfig) -> None:
    """Every source's name and arguments, checked here (a ConfigError naming the source)
    rather than in a silo's worker: the sources are built, none reads its data."""
    from shopmtl.config import ConfigError
    from shopmtl.joint.config import REC
    from shopmtl.joint.parts import RecPart, build_source

    for sc in joint.sources:
        if sc.name != REC:
            build_source(sc)
            continue
        unknown = sorted(set(sc.args) - set(RecPart.DEFAULTS))
        if unknown:
            raise ConfigError(f"source 'rec': unknown args {unknown}; known: "
                              f"{sorted(RecPart.DEFAULTS)}")


def run_joint_federated(run: JointFederatedRun, out: str | Path,
                        log: Callable[[str], None] = print, *, resume: bool = False,
                        run_id: str | None = None) -> dict[str, Any]:
    """``shopmtl federate`` on a joint config: the rounds on the simulation engine, each
    silo's model directory (``OUT/silos/<silo>/model``), ``metrics.json`` and ``report.md``;
    a checkpoint after every round in ``OUT/checkpoints`` (``resume``: continue after the
    latest one)."""
    from shopmtl.train.stages import Checkpointer

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(run.silos)
    fed = JointFederation(run.joint, run.federated, names,
                          tuple(run.silos[n] for n in names), str(out))
    if not resume:  # a fresh run: no client continues from an earlier run's state
        for f in (out / "silos").glob("*/state.client-*.safetensors"):
            f.unlink()
    t = run.joint.train
    if t.refit_steps or t.solve_heads:
        log("joint.train.refit_steps / solve_heads: not run in a federation (the joint stage "
            "only, docs/FEDERATED.md)")
    log(f"{len(names)} silos: " + "; ".join(f"{n} ({', '.join(run.silos[n])})" for n in names))
    text_width(run.joint)  # the text extra and the encoder: one line here, not in the engine
    check_sources(run.joint)
    checkpointer = Checkpointer(out / "checkpoints", run_id=run_id)
    if resume:  # a missing checkpoint or another config: refused before the engine starts
        from shopmtl.federated.resume import load_round

        load_round(checkpointer, run_config(fed))
    result = simulate(fed, log, checkpointer, resume)
    metrics = summarise(fed, result)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    write_report(out, metrics)
    return metrics
