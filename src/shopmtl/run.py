"""End-to-end jobs: train + evaluate (+ single-task baselines), and the quickstart."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from shopmtl.config import (
    ConfigError,
    DataConfig,
    EarlyStopping,
    ExperimentConfig,
    ModelConfig,
    SchemaConfig,
    TrainConfig,
    dump_config,
)
from shopmtl.data.dataset import StreamingSource, TensorTable
from shopmtl.data.pipeline import PreparedData, prepare_data, resolve_synthetic
from shopmtl.jsonsafe import json_safe
from shopmtl.report import negative_transfer, write_report
from shopmtl.train.distributed import resolve_device, setup, shutdown
from shopmtl.train.evaluate import (
    metrics_by_scenario,
    metrics_by_slice,
    predict_split,
    predict_table,
)
from shopmtl.train.outdir import check_output, start_run
from shopmtl.train.outlock import locked_output
from shopmtl.train.trainer import train_model

# where a ``data.synthetic`` run generates its world (reused by the next run when it matches)
SYNTHETIC_DATA = "data"


def _subset_table(t: TensorTable, cols: list[int]) -> TensorTable:
    """Those task columns, and only the rows where at least one of them has a label: a row
    without any label adds nothing to a model of these tasks (a conversion-only model trains
    on clicked impressions, an ad-click model on the ad slot), so it is not worth a step."""
    rows = t.mask[:, cols].any(1).nonzero().squeeze(1)
    out = TensorTable.__new__(TensorTable)
    for name in ("cat", "num", "seq", "scenario", "group", "content", "slices"):
        setattr(out, name, getattr(t, name)[rows])
    out.labels = t.labels[rows][:, cols].contiguous()
    out.mask = t.mask[rows][:, cols].contiguous()
    out.oracle = None if t.oracle is None else t.oracle[rows][:, cols].contiguous()
    return out


def restrict(data: PreparedData, tasks: tuple[str, ...]) -> PreparedData:
    """The same encoded rows with a subset of tasks (single-task baselines share the data)."""
    if not isinstance(data.train, TensorTable):
        raise ConfigError("single-task baselines need in-memory data (data.streaming: false)")
    cols = [data.schema.task_names.index(t) for t in tasks]
    return dataclasses.replace(
        data,
        schema=data.schema.only_tasks(tasks),
        train=_subset_table(data.train, cols),
        valid=_subset_table(data.valid, cols),
        test=None if data.test is None else _subset_table(data.test, cols),
    )


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, baselines: bool = False,
                   resume: bool = False, progress: bool = True, extra: dict | None = None,
                   log: Any = print, run_id: str | None = None) -> dict[str, Any]:
    """Train the multi-task model (and optionally one single-task model per task), evaluate on
    the test split, write metrics.json and report.md. Returns the metrics dict. ``run_id``: the
    id of the run in ``out_dir`` (``train.outdir``), carried by every checkpoint it writes.

    Under torchrun (``WORLD_SIZE > 1``) every process trains its shard; rank 0 alone writes
    files and evaluates the test split, and returns the metrics (the other ranks return {}
    after waiting for it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dist = setup(resolve_device(cfg.train.device), cfg.train.dist_timeout)
    main = dist is None or dist.main
    if dist is not None:
        if baselines:
            raise ConfigError("--baselines is not supported with several processes (torchrun); "
                              "train the baselines in one process")
        if not main:
            progress = False
            log = _quiet
            dist.barrier()  # rank 0 generates a synthetic world first
    cfg, world = resolve_synthetic(cfg, out / SYNTHETIC_DATA, log)
    if world is not None:
        extra = {"world": world, **(extra or {})}
    if main:
        dump_config(cfg, out / "config.yaml")
        if dist is not None:
            dist.barrier()
    schema = cfg.data.schema.build()
    data = prepare_data(cfg.data, schema, out if main else None)
    if data.bad_rows:
        log(f"quarantined bad rows: {data.bad_rows} -> {data.quarantine_file}")
    rows = len(data.train) if isinstance(data.train, TensorTable) else data.train.rows
    log(f"data ready: {rows:,}"
        f" training rows ({time.perf_counter() - t0:.1f}s)")
    if dist is not None and isinstance(data.train, StreamingSource):  # each rank's row groups
        log(data.train.plan(cfg.train.batch_size, dist.world).describe())
    metrics: dict[str, Any] = {"tasks": list(schema.task_names),
                               "scenarios": list(schema.scenario_names),
                               "availability": schema.availability(), **(extra or {})}
    histories: dict[str, list] = {}

    t1 = time.perf_counter()
    pointer = out / "checkpoints" / "latest"
    if resume and pointer.is_file():  # which one: ckpt-<stage>-<step>
        name = pointer.read_text().strip()
        log(f"resuming from checkpoint {name} (step {int(name.rsplit('-', 1)[1])})")
    model, state = train_model(cfg, data, out, resume=resume, progress=progress, run_id=run_id)
    if not main:
        shutdown()  # waits for rank 0's test evaluation and files
        return {}
    histories["multi_task"] = state.history
    metrics["train"] = {"best_epoch": state.best_epoch, "epochs_run": len(state.history),
                        "best_valid_metric": state.best_metric,
                        "seconds": time.perf_counter() - t1}
    log(f"multi-task model trained: best epoch {state.best_epoch}, "
        f"{time.perf_counter() - t1:.1f}s")
    test_table = data.test if data.test is not None else data.valid
    metrics["test_split"] = "test" if data.test is not None else "valid"
    preds, scored = predict_split(model, test_table)
    metrics["test"] = metrics_by_scenario(schema, scored, preds)
    if schema.slices:  # e.g. is_new_item: the cold-start rows
        metrics["slices"] = metrics_by_slice(schema, scored, preds)
    if baselines and len(schema.tasks) > 1:
        single: dict[str, Any] = {}
        for task in schema.task_names:
            sub = restrict(data, (task,))
            scfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, schema=SchemaConfig(sub.schema.features, sub.schema.tasks,
                                              sub.schema.scenario, sub.schema.group)),
                train=dataclasses.replace(cfg.train, alpha={},
                                          early_stopping=_single_es(cfg, task)))
            t2 = time.perf_counter()
            smodel, sstate = train_model(scfg, sub, out / "single_task" / task, progress=progress,
                                         run_id=run_id)
            histories[f"single:{task}"] = sstate.history
            stest = sub.test if sub.test is not None else sub.valid
            single.update(metrics_by_scenario(sub.schema, stest, predict_table(smodel, stest)))
            log(f"single-task baseline '{task}' trained ({time.perf_counter() - t2:.1f}s)")
        metrics["single_task"] = single
        metrics["negative_transfer"] = negative_transfer(metrics["test"], single)
    metrics["seconds_total"] = time.perf_counter() - t0
    metrics = json_safe(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    write_report(out, "shopmtl run report", metrics, histories, notes=[
        f"Model: `{cfg.model.name}`; tasks: {', '.join(schema.task_names)}; "
        f"scenarios: {', '.join(schema.scenario_names)}.",
        f"Evaluated on the {metrics['test_split']} split. Regenerate with the command in "
        "`command.txt` (or `shopmtl train config.yaml`).",
    ])
    shutdown()  # torchrun: the other ranks are waiting for these files
    return metrics


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log of a torchrun rank other than 0: rank 0 speaks for the job."""


def _single_es(cfg: ExperimentConfig, task: str) -> EarlyStopping:
    es = cfg.train.early_stopping
    parts = es.metric.removeprefix("valid.").split(".")
    if parts[0] == "all_tasks" or parts[0] == task:
        return es
    # the multi-task run stops on another task's metric; a baseline stops on its own
    return dataclasses.replace(es, metric=f"valid.{task}.all.{parts[-1]}")


# -- the quickstart ---------------------------------------------------------------------------

# input_norm none: on this world BatchNorm on the dot-interaction input cost click AUC (product
# page efficiency 0.899 with it, 0.910 without, alpha 0.1; README "How the default was chosen")
QUICKSTART_MODEL: dict[str, Any] = {"embed_dim": 16, "interaction": "dot", "bottom": [128],
                                    "tower": [32], "dropout": 0.0, "input_norm": "none"}

# Each task's loss is a mean over its own labelled rows, so one conversion label (clicked rows,
# ~6% of impressions) weighs ~17x a click label and one ad_click label (ad slot, 15%) ~7x.
# Under equal alpha the two sparse, noisy tasks pull the shared bottom away from click
# (negative transfer: click AUC efficiency 0.87-0.88 in every scenario). alpha 0.1 takes back
# most of that imbalance (README: measured numbers and how they were chosen).
QUICKSTART_ALPHA: dict[str, float] = {"click": 1.0, "conversion": 0.1, "ad_click": 0.1}


def quickstart_config(rows: int, seed: int) -> ExperimentConfig:
    """The default run: the synthetic world, SharedBottom with a dot-interaction bottom."""
    return ExperimentConfig(
        data=DataConfig(synthetic={"rows": rows, "seed": seed}),
        model=ModelConfig("shared_bottom", dict(QUICKSTART_MODEL)),
        train=TrainConfig(epochs=4, batch_size=2048, lr=2e-3, lr_decay=0.5,
                          embedding_weight_decay=1e-2, seed=seed, alpha=dict(QUICKSTART_ALPHA),
                          early_stopping=EarlyStopping("valid.click.all.auc", "max", 1)),
    )


def quickstart(out_dir: str | Path, rows: int = 4_000_000, seed: int = 0, progress: bool = True,
               baselines: bool = True, log: Any = print) -> dict[str, Any]:
    """Generate the default synthetic world, train the multi-task model and the single-task
    baselines, and report every metric beside the oracle.

    ``out_dir`` is locked for the run (``train.outlock``). The README's first command is rerun
    on one folder, so a previous quickstart's folder is replaced (its generated world kept:
    reused when it is the same world); any other non-empty folder is refused
    (``train.outdir``)."""
    out = Path(out_dir)
    with locked_output(out):
        action = check_output(out, command="quickstart")
        run_id = start_run(out, action, command="quickstart", keep=(SYNTHETIC_DATA,))
        torch.manual_seed(seed)
        cfg = quickstart_config(rows, seed)
        command = f"shopmtl quickstart --out {out} --rows {rows} --seed {seed}\n"
        (out / "command.txt").write_text(command)
        return run_experiment(cfg, out, baselines=baselines, progress=progress, log=log,
                              run_id=run_id)
