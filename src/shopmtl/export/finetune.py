"""``shopmtl export --prune R --finetune FILE``: a short fine-tune of the pruned model.

Slicing leaves the kept experts and units with weights trained beside the ones removed; a few
more steps let them take over what the removed ones did. The steps are the project's one
training core, ``train.loop.fit`` over a ``train.table.TableSource``, handed the ready (pruned)
model as a federated client hands it its global model (``federated.client.train_silo``), with
the source model's ``train`` config: its optimizer, learning rate and per-epoch decay, batch
size, weight decays, task weighting and ``alpha``, id dropout, clipping, FGM, precision and
seed. Only the number of epochs is the command's (``--finetune-epochs``, 1 by default), and
there is no early stopping: the weights exported are the last step's.

The fine-tune rows must not be the held-out ``--data`` the export measures on (the same
resolved path is refused): AUC after the fine-tune is only a measurement on rows it never saw.
The loop's own end-of-run evaluation (its bookkeeping, not a selection) scores the fine-tune
rows, so the held-out rows never enter the loop at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shopmtl.config import ConfigError, ExperimentConfig
from shopmtl.data.dataset import TensorTable
from shopmtl.data.encoders import Encoded
from shopmtl.data.ingest import BadRowLog, DataError
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import Schema
from shopmtl.models.base import MultiTaskModel
from shopmtl.predict import read_encoded
from shopmtl.train.loop import fit
from shopmtl.train.select import MetricSelector
from shopmtl.train.table import TableSource, id_dropout_table
from shopmtl.train.trainer import epoch_schedule
from shopmtl.weighting import build_weighting

CRITERION = ("{epochs} epoch(s) of the source model's train config (optimizer, lr and its "
             "per-epoch decay, batch size, weighting, seed) through train.loop.fit on the "
             "--finetune rows; no early stopping: the last step's weights are exported")


@dataclass(frozen=True)
class FineTune:
    """What ``--finetune FILE [--finetune-epochs E]`` asks for."""

    path: Path
    epochs: int = 1


def check_finetune(fine: FineTune | None, prune_ratio: float | None, data: Path) -> None:
    """Refusals before any work: a fine-tune needs a pruned model, a whole number of epochs,
    a file that exists and is not the held-out ``data``."""
    if fine is None:
        return
    if prune_ratio is None:
        raise ConfigError("--finetune: only a pruned model is fine-tuned; add --prune R")
    if fine.epochs < 1:
        raise ConfigError(f"--finetune-epochs {fine.epochs}: must be at least 1")
    if not fine.path.is_file():
        raise DataError(f"--finetune {fine.path.name}: no such file")
    if fine.path.resolve() == data.resolve():
        raise ConfigError(f"--finetune {fine.path.name}: that is the held-out --data the "
                          "export measures on; fine-tune on training rows")


def training_rows(schema: Schema, encoders: Any, cfg: ExperimentConfig, path: Path
                  ) -> Encoded:
    """Every row of the fine-tune file, read and encoded as the export's held-out rows are
    (the model's encoders; a bad row stops the export); at least one batch of them."""
    log = BadRowLog("fail", 1.0, stop_at_first=False)
    enc = read_encoded(schema, encoders, path, log, cfg.data.chunk_rows)
    log.raise_if_bad()
    n, batch = 0 if enc is None else len(enc), cfg.train.batch_size
    if enc is None or n < batch:
        raise DataError(f"--finetune {path.name}: {n} usable rows; the fine-tune needs at "
                        f"least one batch (train.batch_size {batch})")
    return enc


def finetune(model: MultiTaskModel, cfg: ExperimentConfig, schema: Schema, rows: Encoded,
             epochs: int) -> dict[str, Any]:
    """Train ``model`` in place ``epochs`` epochs over ``rows`` through ``train.loop.fit``,
    as the one-table run's ``Trainer`` configures the loop (on the CPU, where the export
    runs); returns what meta.json's ``pruning.finetune`` records of it."""
    t = cfg.train
    table = TensorTable(rows)
    # valid = the fine-tune rows: the loop evaluates once after its last step (a record, not
    # a selection), and the held-out rows must stay out of it
    data = PreparedData(schema, None, table, table, None, {}, None)  # type: ignore[arg-type]
    source = TableSource(data, t.batch_size, embedding_weight_decay=t.embedding_weight_decay,
                         id_dropout=id_dropout_table(t.id_dropout, schema),
                         eval_batch_size=t.eval_batch_size)
    schedule = epoch_schedule(t, source.num_batches(), epochs)
    weighting = build_weighting(cfg.weighting.name, cfg.weighting.args, schema.task_names)
    selector = MetricSelector(t.early_stopping.metric, t.early_stopping.mode, source.name)
    torch.manual_seed(t.seed)  # dropout's draws: the same fine-tune every time
    start = time.perf_counter()
    result = fit(model, [source], weighting, schedule, selector, alpha=t.alpha,
                 weight_decay=t.weight_decay, optimizer=t.optimizer)
    model.eval()
    return {"rows": len(rows), "epochs": epochs, "steps": result.state.step,
            "batch_size": t.batch_size, "lr": t.batch_lr(), "optimizer": t.optimizer,
            "seconds": time.perf_counter() - start}


def summary_line(record: dict[str, Any]) -> str:
    """One line: the fine-tune and what it did to each task's held-out AUC (the CLI prints
    it)."""
    aucs = ", ".join(f"{t} {b:.4f} -> {record['auc_after'][t]:.4f}"
                     for t, b in record["auc_before"].items() if b is not None)
    return (f"fine-tuned on {record['file']}: {record['epochs']} epoch(s), {record['steps']} "
            f"steps, {record['rows']:,} rows, {record['seconds']:.1f} s; held-out AUC {aucs}")
