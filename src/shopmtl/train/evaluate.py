"""Predict a split and compute metrics per task x scenario (plus the ``all`` aggregate)."""

from __future__ import annotations

import math

import numpy as np
import torch

from shopmtl.data.dataset import StreamingSource, TensorTable, _subset, concat_tables, labels_only
from shopmtl.data.schema import ALL, Schema
from shopmtl.models.base import MultiTaskModel
from shopmtl.tasks import TASK_TYPES


@torch.no_grad()
def predict_table(
    model: MultiTaskModel, table: TensorTable, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    model.eval()
    # the model's device (a model without parameters: CPU); CPU numpy back
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs: dict[str, list[np.ndarray]] = {n: [] for n in model.task_names}
    for batch in table.batches(batch_size, shuffle=False):
        for name, p in model.predict(batch.to(device, non_blocking=True)).items():
            outs[name].append(p.float().cpu().numpy())
    return {n: (np.concatenate(v) if v else np.zeros(0, np.float32)) for n, v in outs.items()}


def predict_split(
    model: MultiTaskModel, split: TensorTable | StreamingSource, batch_size: int = 4096
) -> tuple[dict[str, np.ndarray], TensorTable]:
    """Predictions for a split and the table to score them against. A streamed split is read
    chunk by chunk and only its label columns are kept (``labels_only``), so evaluating a split
    larger than memory holds its predictions and labels, not its features."""
    if isinstance(split, TensorTable):
        return predict_table(model, split, batch_size), split
    preds: list[dict[str, np.ndarray]] = []
    kept: list[TensorTable] = []
    for chunk in split.tables():
        preds.append(predict_table(model, chunk, batch_size))
        kept.append(labels_only(chunk))
    if not kept:
        raise ValueError(f"{split.path.name}: no usable rows to evaluate")
    return {n: np.concatenate([p[n] for p in preds]) for n in model.task_names}, concat_tables(kept)


def metrics_by_scenario(
    schema: Schema, table: TensorTable, preds: dict[str, np.ndarray]
) -> dict[str, dict[str, dict[str, float]]]:
    """metrics[task][scenario] -> {auc, gauc, logloss, calibration, n, oracle_auc, ...}.

    Only rows where the label exists count (the availability mask); a scenario where a task is
    not defined is left out rather than reported as empty.
    """
    labels = table.labels.numpy()
    mask = table.mask.numpy()
    scen = table.scenario.numpy()
    group = table.group.numpy() if schema.group else None
    oracle = table.oracle.numpy() if table.oracle is not None else None
    avail = schema.availability()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for j, t in enumerate(schema.tasks):
        if t.name not in preds:  # a task left out by the caller (e.g. one without a prior)
            continue
        tt = TASK_TYPES[t.type]
        per: dict[str, dict[str, float]] = {}
        scopes = [(ALL, mask[:, j])]
        if schema.scenario is not None:
            scopes += [
                (s, mask[:, j] & (scen == k))
                for k, s in enumerate(schema.scenario_names)
                if avail[t.name][s]
            ]
        for name, m in scopes:
            if not m.any():
                continue
            o = None
            if oracle is not None and not np.isnan(oracle[m, j]).any():
                o = oracle[m, j]
            per[name] = tt.metrics(
                labels[m, j], preds[t.name][m], group[m] if group is not None else None, o,
                spec=t,
            )
        out[t.name] = per
    return out


def metrics_by_slice(
    schema: Schema, table: TensorTable, preds: dict[str, np.ndarray]
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """metrics[slice][task][scenario] over the rows where each slice column is 1 (e.g.
    ``is_new_item``: cold-start items). A slice with no rows in ``table`` is left out."""
    out = {}
    for k, name in enumerate(schema.slices):
        rows = table.slices[:, k].nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        sub = _subset(table, rows)
        idx = rows.numpy()
        out[name] = metrics_by_scenario(schema, sub, {t: p[idx] for t, p in preds.items()})
    return out


def summary_metric(task_metrics: dict[str, dict[str, dict[str, float]]], key: str = "auc") -> float:
    """Mean of ``key`` over tasks on the ``all`` scope (the default early-stopping metric)."""
    vals = [
        m[ALL][key]
        for m in task_metrics.values()
        if ALL in m and key in m[ALL] and not math.isnan(m[ALL][key])
    ]
    return float(np.mean(vals)) if vals else math.nan
