"""The server's side and the run: silos written, Flower's strategy started on its simulation
engine (``flwr.simulation.run_simulation``: the ``ServerApp`` in this process, one virtual
SuperNode per silo, ClientApps in the engine's Ray workers), evaluation every round, and
``metrics.json`` + ``report.md`` (+ ``auc_rounds.png`` with the viz extra) written at the end.

Evaluation per round: every silo scores the global shared weights with its own local pieces
on its own test rows (AUC per task x scenario x silo, ``client_evaluate``), and the server
scores the global model on the pooled test split (``evaluate_fn``; unshared pieces are zero
there: the server never sees a silo's users, so it scores every user as unknown).

Which round's model is written (``federated.select``): the last, or, as the one-table run
keeps its best epoch, the round with the best validation score: the silos' own validation
AUC (``validation_score``), the only view of held-out rows a server that sees no rows has.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shopmtl.config import ConfigError, to_dict
from shopmtl.data.pipeline import PreparedData, prepare_data, resolve_synthetic
from shopmtl.deps import require
from shopmtl.federated import dp as fdp
from shopmtl.federated.client import Federation, make_client_app, nest_auc
from shopmtl.federated.config import FederatedConfig, FederatedRun
from shopmtl.federated.faults import Guard
from shopmtl.federated.resume import (
    int_keys,
    load_round,
    restore_strategy,
    run_rounds,
    save_round,
    strategy_state,
)
from shopmtl.federated.silos import (
    availability,
    check_tasks_covered,
    save_silo,
    silo_data,
    silo_sizes,
    split_silos,
    user_column,
)
from shopmtl.federated.wire import nbytes, pack, unpack
from shopmtl.jsonsafe import json_safe
from shopmtl.train.stages import Checkpointer
from shopmtl.train.table import TableSource
from shopmtl.train.trainer import label_priors, save_model_dir

ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
       # the engine's workers: one torch thread each (the engine runs engine_cpus at once)
       "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def make_strategy(fed: FederatedConfig, n_clients: int, on_train: Callable, on_eval: Callable,
                  weighted_by: str = "num-examples") -> Any:
    """Flower's strategy for ``fed.strategy``; ``on_train`` / ``on_eval`` receive every
    round's client replies (the per-silo record) and return the aggregated metrics;
    ``weighted_by``: the reply metric a client's update weighs by (the joint model's silos:
    their steps)."""
    from flwr.serverapp import strategy as st

    common = dict(fraction_train=fed.fraction, fraction_evaluate=1.0,
                  min_train_nodes=min(fed.min_clients, n_clients),
                  min_evaluate_nodes=n_clients, min_available_nodes=n_clients,
                  train_metrics_aggr_fn=on_train, evaluate_metrics_aggr_fn=on_eval,
                  # DP: a uniform mean (every client weighs 1), what the accountant assumes
                  weighted_by_key=fdp.UNIT_WEIGHT if fed.dp.mode != "none" else weighted_by)
    if fed.strategy in ("fedavg", "fedprox"):
        base = st.FedAvg if fed.strategy == "fedavg" else st.FedProx
        if fed.row_aware:
            base = row_aware(base)
        if fed.server_step != 1.0 or fed.server_momentum > 0:
            base = server_stepped(base, fed.server_step, fed.server_momentum)
        return base(**common, **({"proximal_mu": fed.mu} if fed.strategy == "fedprox" else {}))
    if fed.strategy == "fedadam":
        return st.FedAdam(**common, eta=fed.server_lr)
    if fed.strategy == "fedyogi":  # Adam whose second moment moves additively (Reddi et al.)
        return st.FedYogi(**common, eta=fed.server_lr)
    if fed.strategy == "trimmed_mean":
        return st.FedTrimmedAvg(**common, beta=fed.trim)
    if fed.strategy == "median":
        return st.FedMedian(**common)
    if fed.strategy == "krum":
        return st.Krum(**common, num_malicious_nodes=fed.malicious)
    if fed.strategy == "multikrum":
        return st.MultiKrum(**common, num_malicious_nodes=fed.malicious,
                            num_nodes_to_select=max(1, n_clients - fed.malicious))
    raise ConfigError(f"federated.strategy: unknown '{fed.strategy}'")


def row_mean(sent: np.ndarray, updates: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Each embedding row's weighted mean over the clients that changed it (the rows nobody
    touched keep the value sent). A plain mean over all clients would shrink a row's update
    by the share of clients that never saw its id: a user or item in one silo of four moves
    a quarter as far as it would alone."""
    num = np.zeros(sent.shape, np.float64)
    den = np.zeros(sent.shape[0], np.float64)
    for x, w in updates:
        changed = (x != sent).reshape(len(x), -1).any(axis=1)
        num[changed] += w * x[changed]
        den[changed] += w
    out = sent.astype(np.float64).copy()
    hit = den > 0
    out[hit] = num[hit] / den[hit, None]
    return out.astype(sent.dtype)


def row_aware(base: type) -> type:
    """``base`` (FedAvg or FedProx) whose embedding-table pieces (``wire``: names ending in
    ``]``) are averaged row by row over the clients that updated the row (``row_mean``); the
    other arrays are the strategy's own weighted mean."""

    class RowAware(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any
                            ) -> Any:
            self._sent = {k: v.numpy() for k, v in arrays.items() if k.endswith("]")}
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            from flwr.app import Array

            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is None:
                return arrays, metrics
            ok = [m.content for m in replies if not m.has_error()]
            for key, sent in getattr(self, "_sent", {}).items():  # {}: configured elsewhere
                updates = [(c["arrays"][key].numpy(),
                            float(c["metrics"][self.weighted_by_key])) for c in ok]
                arrays[key] = Array(row_mean(sent, updates))
            return arrays, metrics

    RowAware.__name__ = RowAware.__qualname__ = f"RowAware{base.__name__}"
    return RowAware


def server_stepped(base: type, step: float, momentum: float = 0.0) -> type:
    """``base`` (FedAvg or FedProx, row-aware or not) with a server learning rate: the new
    global array is ``sent + step * (aggregate - sent)`` (FedAvg with server learning rate,
    Reddi et al. 2021, "Adaptive Federated Optimization"). Averaging K clients' updates keeps
    about 1/K of the progress their local steps make one after another, which is what a
    centralised epoch over the same rows does; ``step`` > 1 gives it back. Applied to the
    mean, so it is post-processing of whatever DP noise or secure aggregation produced.
    ``momentum`` > 0: FedAvgM's server momentum (Hsu et al. 2019), ``v = momentum * v +
    (aggregate - sent)`` and the step is taken along ``v`` (``v`` is checkpointed with the
    round: ``resume.MOMENTS``)."""

    class Stepped(base):  # type: ignore[misc, valid-type]
        velocity: dict[str, np.ndarray] | None = None

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any
                            ) -> Any:
            self._start = {k: v.numpy().copy() for k, v in arrays.items()}
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            from flwr.app import Array

            arrays, metrics = super().aggregate_train(server_round, replies)
            start = getattr(self, "_start", None)
            if arrays is None or start is None:
                return arrays, metrics
            if momentum > 0 and self.velocity is None:
                self.velocity = {}
            for key in list(arrays.keys()):
                if key in start:
                    mean = arrays[key].numpy()
                    delta = mean - start[key]
                    if momentum > 0:
                        v = self.velocity.get(key)
                        delta = delta if v is None else momentum * v + delta
                        self.velocity[key] = delta
                    arrays[key] = Array((start[key] + step * delta).astype(mean.dtype))
            return arrays, metrics

    Stepped.__name__ = Stepped.__qualname__ = f"Stepped{base.__name__}"
    return Stepped


def validation_score(silos: dict[str, dict[str, Any]], names: tuple[str, ...]
                     ) -> float | None:
    """A round's validation score: each silo's mean AUC over its tasks on its own validation
    rows, averaged over the silos weighted by those rows. None unless every silo in ``names``
    reported (a round missing a silo's evaluation is scored on other rows: not comparable)."""
    if set(names) - set(silos):
        return None
    total = weight = 0.0
    for m in silos.values():
        aucs = [v["all"] for v in m.get("valid_auc", {}).values() if "all" in v]
        n = float(m.get("num-valid", 0))
        if aucs and n > 0:
            total += n * float(np.mean(aucs))
            weight += n
    return total / weight if weight > 0 else None


class Recorder:
    """Every round's per-client replies (train and evaluate), by round and silo, the clients
    dropped from each round with the reason (``faults.Guard``), and the rounds' validation
    scores with the best round so far (``federated.select``)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.train: dict[int, dict[str, dict[str, float]]] = {}
        self.eval: dict[int, dict[str, dict[str, float]]] = {}
        self.valid: dict[int, float] = {}  # round -> validation_score (rounds scored)
        self.best: dict[str, Any] = {}  # {"round", "score"} of the best scored round
        self.dp: dict[str, Any] = {}  # the DP settings (federated.dp), empty when none
        self.privacy: dict[int, dict[str, float]] = {}  # round -> (epsilon, delta) spent
        self.dropped: dict[int, dict[str, str]] = {}

    def _record(self, into: dict, replies: list[Any]) -> Any:
        from flwr.app import MetricRecord

        losses: list[float] = []
        for r in replies:
            m = dict(next(iter(r.metric_records.values())))
            silo = self.names[int(m.pop("silo"))]
            detail = json.loads(str(r.config_records["detail"]["json"]))
            into.setdefault(int(m.pop("round")), {})[silo] = {**m, **detail}
            losses += [float(v) for v in detail.get("train_loss", {}).values()]
        return MetricRecord({"clients": len(replies),
                             **({"mean-loss": float(np.mean(losses))} if losses else {})})

    def on_train(self, replies: list[Any], weighted_by: str) -> Any:
        return self._record(self.train, replies)

    def on_eval(self, replies: list[Any], weighted_by: str) -> Any:
        return self._record(self.eval, replies)

    def score(self, rnd: int) -> bool:
        """Score round ``rnd`` from its evaluation replies; True when it is the best so far
        (ties keep the earlier round)."""
        score = validation_score(self.eval.get(rnd, {}), self.names)
        if score is None:
            return False
        self.valid[rnd] = score
        if self.best and score <= self.best["score"]:
            return False
        self.best = {"round": rnd, "score": score}
        return True


def prepare(run: FederatedRun, out: Path, log: Callable[[str], None] = print
            ) -> tuple[PreparedData, Federation, dict[str, Any]]:
    """Read the pooled data once, cut it into silos, write each silo's file, check that every
    task has a silo and that the attackers exist. Returns the data, the federation and the
    silos' description (sizes, availability)."""
    exp, fed = run.experiment, run.federated
    exp, world = resolve_synthetic(exp, out / "data", log)
    schema = exp.data.schema.build()
    if "users" not in fed.share or fed.silos.by == "user_hash":
        user_column(schema)
    data = prepare_data(exp.data, schema, out)
    silos = split_silos(data, fed.silos, fed.seed)
    names = tuple(s.name for s in silos)
    unknown = sorted(set(fed.attack.silos) - set(names))
    if unknown:
        raise ConfigError(f"federated.attack.silos: {unknown} are not silos; silos: "
                          f"{list(names)}")
    unknown = sorted(set(fed.faults.silos) - set(names))
    if unknown:
        raise ConfigError(f"federated.faults.silos: {unknown} are not silos; silos: "
                          f"{list(names)}")
    parts = [silo_data(data, s) for s in silos]
    matrices = {s.name: availability(schema, p.train) for s, p in zip(silos, parts, strict=True)}
    check_tasks_covered(schema, matrices)
    files = []
    for s, p in zip(silos, parts, strict=True):
        path = out / "silos" / f"{s.index:02d}.safetensors"  # a name of ours, not the data's
        save_silo(path, p)
        files.append(str(path.resolve()))
    federation = Federation(exp, fed, schema, data.vocab_sizes, names, tuple(files))
    info = {"silos": silo_sizes(silos), "availability": matrices, "_silos": silos,
            "silo_tasks": {s.name: list(s.tasks) for s in silos},
            **({"world": world} if world is not None else {})}
    return data, federation, info


def initial_model(data: PreparedData, fed: Federation) -> Any:
    """The server's starting model: the seeded weights every client builds, output biases at
    the pooled label rates (a count per task, what secure aggregation of the silos' counts
    would give), and unshared pieces zeroed: the server holds none of them."""
    model = fed.build()
    if fed.experiment.train.output_bias_prior:
        model.init_output_bias(label_priors(data.train, data.schema))
    _, local = fed.layout(model)
    zeros = {p.name: np.zeros_like(a) for p, a in zip(local, pack(model, local).values(),
                                                       strict=True)}
    unpack(model, local, zeros)
    return model


def serve(fed: Federation, data: PreparedData, grid: Any, log: Callable[[str], None] = print,
          checkpointer: Checkpointer | None = None, resume: bool = False
          ) -> tuple[Any, Recorder, dict[int, dict[str, Any]], float]:
    """The server's rounds on ``grid`` (the simulation engine's or a SuperLink's): the
    strategy (DP-wrapped when asked, behind the reply checks) from the initial model or the
    latest round checkpoint, the pooled evaluation every round. Returns the final global
    model, the clients' records (``dropped``: who was left out of each round and why), the
    server's pooled evaluation per round, and the seconds. ``checkpointer``: a checkpoint
    after each round (``federated.resume``); ``resume``: continue after the latest one."""
    from flwr.app import Array, ArrayRecord, MetricRecord

    cfg = fed.federated
    model = initial_model(data, fed)
    shared, _ = fed.layout(model)
    recorder = Recorder(fed.silo_names)
    pooled: dict[int, dict[str, Any]] = {}
    config = run_config(fed)
    first, start, moments = 1, pack(model, shared), {}
    if resume and cfg.dp.mode != "none":
        # the accountant's releases live in the strategy object, not in the checkpoint: a
        # resumed run would count epsilon from zero and under-report what was spent
        raise ConfigError("--resume with federated.dp: not supported (the privacy accountant's "
                          "state is not checkpointed); start the DP run again")
    best: dict[str, np.ndarray] = {}  # the best round's global arrays (select: best)
    if resume:
        assert checkpointer is not None
        done, start, moments, records, best = load_round(checkpointer, config)
        recorder.train, recorder.eval = (int_keys(records["train"]),
                                         int_keys(records["eval"]))
        recorder.dropped, pooled = int_keys(records["dropped"]), int_keys(records["pooled"])
        recorder.valid = int_keys(records.get("valid", {}))
        recorder.best = records.get("best", {})
        first = done + 1
        log(f"resuming after round {done} (checkpoint {checkpointer.latest()})")
    pooled_source = TableSource(data, fed.experiment.train.batch_size,
                                eval_batch_size=fed.experiment.train.eval_batch_size)
    t0 = time.perf_counter()

    def evaluate_fn(rnd: int, arrays: Any) -> Any:
        unpack(model, shared, {k: v.numpy() for k, v in arrays.items()})
        per_task = pooled_source.evaluate(model, "test")
        aucs = nest_auc(per_task)
        pooled[rnd] = {"auc": aucs, "seconds": time.perf_counter() - t0}
        eps = fdp.spent(strategy.inner) if rnd > 0 else None
        if eps is not None:
            recorder.privacy[rnd] = eps
        log(f"round {rnd}/{cfg.rounds}: pooled test AUC " + ", ".join(
            f"{t} {per_task[t].get('auc', float('nan')):.4f}" for t in per_task)
            + (f"; DP epsilon {eps['epsilon']:.3f} at delta {eps['delta']:g}"
               if eps is not None else ""))
        return MetricRecord({f"auc|{t}|{s}": v for t, m in aucs.items() for s, v in m.items()})

    inner = make_strategy(cfg, len(fed.silo_names), recorder.on_train, recorder.on_eval)
    if cfg.dp.mode != "none":
        inner = fdp.wrap(inner, cfg, len(fed.silo_names))
        recorder.dp = fdp.describe(inner, cfg, len(fed.silo_names))
        log(f"DP ({cfg.dp.mode}-side clipping): clip {cfg.dp.clip:g}, noise multiplier "
            f"{recorder.dp['noise_multiplier']:.4f}, noise std {recorder.dp['noise_std']:.3g} "
            f"on the mean of {recorder.dp['clients_per_round']} clients")
    # the reply checks sit in front of everything else, DP's clipping and noise included
    # (under SecAgg+ every reply carries the unmasked mean: the checks see only the aggregate)
    # cyclic: one reply at a time, each aggregated alone (a dropped one is skipped)
    strategy = Guard(inner, 1 if cfg.cyclic else min(cfg.min_clients, len(fed.silo_names)),
                     cfg.round_timeout, log)
    strategy.dropped = recorder.dropped
    restore_strategy(strategy, moments)
    if cfg.secagg:  # the strategy's training rounds through SecAgg+ (federated/secure.py)
        from shopmtl.federated.secure import SecureGrid

        # the weights' bound: every client's examples count below it (Flower warns above)
        grid = SecureGrid(grid, cfg, max_weight=float(len(data.train)))

    def after_round(rnd: int, arrays: Any) -> None:
        now = {k: v.numpy() for k, v in arrays.items()}
        if recorder.score(rnd) and cfg.select == "best":
            best.clear()
            best.update({k: v.copy() for k, v in now.items()})
        if rnd in recorder.valid:
            log(f"round {rnd}/{cfg.rounds}: validation score {recorder.valid[rnd]:.4f} "
                f"(best: round {recorder.best['round']})")
        if checkpointer is not None:
            records = {"train": recorder.train, "eval": recorder.eval,
                       "dropped": recorder.dropped, "pooled": pooled,
                       "valid": recorder.valid, "best": recorder.best}
            save_round(checkpointer, rnd, now, strategy_state(strategy), records, config,
                       best=best)

    random.seed(cfg.seed + first - 1)  # Flower samples the round's clients with ``random``
    np.random.seed(cfg.seed + first - 1)  # and draws the DP noise with numpy's global one
    strategy.names = roll_call(grid, fed.silo_names, log)
    initial = ArrayRecord({n: Array(v) for n, v in start.items()})
    final_arrays = run_rounds(strategy, grid, initial, first=first, last=cfg.rounds,
                              timeout=cfg.round_timeout, evaluate_fn=evaluate_fn,
                              after_round=after_round,
                              cyclic_seed=cfg.seed if cfg.cyclic else None, log=log)
    final = {k: v.numpy() for k, v in final_arrays.items()}
    if cfg.select == "best" and best:
        final = best
        chosen = recorder.best["round"]
        log(f"select: best: the model of round {chosen} (validation score "
            f"{recorder.best['score']:.4f})"
            + (f", not of the last round ({cfg.rounds})" if chosen != cfg.rounds else ""))
    unpack(model, shared, final)
    return model, recorder, pooled, time.perf_counter() - t0


def simulate(fed: Federation, data: PreparedData, log: Callable[[str], None] = print,
             checkpointer: Checkpointer | None = None, resume: bool = False
             ) -> tuple[Any, Recorder, dict[int, dict[str, Any]], float]:
    """Run the federation on Flower's simulation engine (``serve`` in this process, one
    virtual SuperNode per silo). Returns what ``serve`` returns."""
    return run_on_engine(lambda grid: serve(fed, data, grid, log, checkpointer, resume),
                         make_client_app(fed), len(fed.silo_names), fed.federated)


def run_on_engine(main: Callable[[Any], Any], client_app: Any, n_silos: int,
                  cfg: FederatedConfig) -> Any:
    """``main(grid)`` as the ``ServerApp`` in this process and ``client_app`` on
    ``n_silos`` virtual SuperNodes of Flower's simulation engine; returns what ``main``
    returned (the zoo's ``serve``, the joint model's ``federated.joint.serve``)."""
    require("flwr", "federated", "federated training")
    require("ray", "federated", "Flower's simulation engine")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # our one line a round instead
    app = ServerApp()
    result: dict[str, Any] = {}

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        try:
            result["r"] = main(grid)
        except Exception as e:  # raised here after the engine stops, not lost in its log
            result["error"] = e

    backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": cfg.engine_cpus, "include_dashboard": False,
                             "log_to_driver": False}}
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # the engine's workers inherit them; ours are put back after
    try:
        run_simulation(app, client_app, num_supernodes=n_silos, backend_config=backend)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if "error" in result:
        raise result["error"]
    if "r" not in result:
        raise RuntimeError("the federated run did not finish (see the engine's log above)")
    return result["r"]


def run_config(fed: Federation) -> dict[str, Any]:
    """The config a round checkpoint must be resumed with: the experiment and the
    federation but ``rounds`` (a run may be resumed with more), as JSON."""
    cfg = {k: v for k, v in to_dict(fed.federated).items() if k != "rounds"}
    return json.loads(json.dumps(json_safe({"experiment": to_dict(fed.experiment),
                                            "federated": cfg})))


def roll_call(grid: Any, names: tuple[str, ...], log: Callable[[str], None],
              timeout: float = 600.0) -> dict[int, str]:
    """Node id -> silo name, asked of every node before round 1 (a Flower ``query``
    message). The engine starts its workers and the clients load their rows here, not inside
    round 1's timeout. A node that does not answer is named by its id later."""
    from flwr.app import Message, RecordDict

    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < len(names) and time.monotonic() < deadline:  # the engine registers
        time.sleep(0.1)  # its nodes while the ServerApp starts (Flower's sample_nodes waits too)
        nodes = list(grid.get_node_ids())
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes],
        timeout=max(1.0, deadline - time.monotonic()))
    found = {m.metadata.src_node_id: names[int(m.content["silo"]["silo"])]
             for m in replies if not m.has_error()}
    if len(found) < len(names):
        log(f"roll call: {len(names) - len(found)} of {len(names)} nodes did not answer")
    return found


def summarise(fed: Federation, recorder: Recorder, pooled: dict[int, dict[str, Any]],
              info: dict[str, Any], seconds: float, shared_bytes: int) -> dict[str, Any]:
    rounds = []
    for r in sorted(set(recorder.train) | set(recorder.eval)):
        train = recorder.train.get(r, {})
        rounds.append({
            "round": r,
            "pooled": pooled.get(r, {}).get("auc", {}),
            "silos": {s: m["auc"] for s, m in recorder.eval.get(r, {}).items()},
            "valid_silos": {s: m.get("valid_auc", {}) for s, m in
                            recorder.eval.get(r, {}).items()},
            **({"valid_score": recorder.valid[r]} if r in recorder.valid else {}),
            "clients": sorted(train),
            "bytes_sent": {s: int(m["bytes-sent"]) for s, m in train.items()},
            "bytes_received": {s: int(m["bytes-received"]) for s, m in train.items()},
            "train_loss": {s: m["train_loss"] for s, m in train.items()},
            # a resumed run's clients: the round whose own state each one read back
            **({"restored": {s: m["restored_from"] for s, m in train.items()
                             if "restored_from" in m}}
               if any("restored_from" in m for m in train.values()) else {}),
            **({"privacy": recorder.privacy[r]} if r in recorder.privacy else {}),
            "dropped": recorder.dropped.get(r, {}),
        })
    cfg = fed.federated
    return json_safe({
        "federated": to_dict(cfg), "model": fed.experiment.model.name,
        "tasks": list(fed.schema.task_names), "scenarios": list(fed.schema.scenario_names),
        **info, "shared_bytes_per_client": shared_bytes,
        "initial_pooled": pooled.get(0, {}).get("auc", {}),
        "rounds": rounds, "final": rounds[-1] if rounds else {}, "seconds": seconds,
        "selected": selected_round(cfg.select, recorder, cfg.rounds),
        **({"dp": {**recorder.dp, "spent": recorder.privacy[max(recorder.privacy)]}}
           if recorder.privacy else {}),
    })


def selected_round(rule: str, recorder: Recorder, last: int) -> dict[str, Any]:
    """Which round's global model ``model/`` holds, and why (``metrics.json`` ``selected``):
    ``select: best`` falls back to the last round when no round was scored."""
    chosen = recorder.best["round"] if rule == "best" and recorder.best else last
    return {"rule": rule, "round": chosen, "valid_score": recorder.valid.get(chosen),
            "best_round": recorder.best.get("round")}


Engine = Callable[[Federation, PreparedData, Callable[[str], None], Checkpointer | None, bool],
                  tuple[Any, Recorder, dict[int, dict[str, Any]], float]]


def run_federated(run: FederatedRun, out: str | Path, log: Callable[[str], None] = print,
                  *, resume: bool = False, run_id: str | None = None,
                  engine: Engine = simulate) -> dict[str, Any]:
    """``shopmtl federate``: silos, the federation (``engine``: Flower's simulation engine by
    default; ``federated.deploy`` passes a SuperLink's grid), ``model/`` (the global model,
    unshared pieces zero), ``metrics.json`` and ``report.md`` in ``out``; a checkpoint after
    every round in ``out/checkpoints`` (``resume``: continue after the latest one; ``run_id``:
    the output folder's, ``train.outdir``). A joint config: ``federated.joint``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.federated.seed)
    data, fed, info = prepare(run, out, log)
    if not resume:  # a fresh run: no client continues from an earlier run's state
        for f in (out / "silos").glob("*.client-*.safetensors"):
            f.unlink()
    log(f"{len(fed.silo_names)} silos: " + ", ".join(
        f"{n} ({info['silos'][n]['train']:,} rows)" for n in fed.silo_names))
    checkpointer = Checkpointer(out / "checkpoints", run_id=run_id)
    model, recorder, pooled, seconds = engine(fed, data, log, checkpointer, resume)
    shared, _ = fed.layout(model)
    info = {k: v for k, v in info.items() if k != "_silos"}
    metrics = summarise(fed, recorder, pooled, info, seconds, nbytes(pack(model, shared)))
    save_model_dir(out / "model", model, fed.experiment, fed.schema, data.encoders,
                   {"federated": {"strategy": run.federated.strategy,
                                  "rounds": run.federated.rounds,
                                  "round": metrics["selected"]["round"],
                                  "share": list(run.federated.share)}})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    from shopmtl.federated.report import write_federated_report

    write_federated_report(out, metrics)
    return metrics
