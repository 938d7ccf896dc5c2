"""What every benchmark worker shares: the matched hyperparameters, the prepared arrays, metrics
and the result record. numpy and the standard library only, so that it imports in the project
venv and in the peers venv (bench/.venv-peers) alike.

A worker is run as ``python -m bench.peers.run_<library> SPEC.json``: SPEC names the library,
model, dataset, batch size, seed and where the prepared data lie; the worker writes one JSON
record to ``spec["out"]``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# -- the protocol ---------------------------------------------------------------------------

EMBED_DIM = 16
N_EXPERTS = 4
EXPERT = [64]
TOWER = [32]
PLE_LEVELS = 2
PLE_SHARED = 2
PLE_SPECIFIC = 2
ESMM_TOWER = [64, 32]  # no bottom in ESMM: each tower is expert + tower of the other models
LR = 1e-3
# shopmtl's own large-batch rule (``train.lr_scaling``): LR is its rate at batch 256 and it
# trains at LR * sqrt(B / 256) (0.00283 at batch 2048); the peers and the minimal model run LR
# at every batch size, as their users would without such a rule
SHOPMTL_LR_SCALING = "sqrt"
LR_BASE_BATCH = 256
THREADS = 2
INFER_BATCH = 2048

DATASETS: dict[str, dict[str, Any]] = {
    "census": {"epochs": 5, "tasks": ["income_50k", "never_married"],
               "models": ["shared_bottom", "mmoe", "ple"]},
    "movielens": {"epochs": 3, "tasks": ["like", "love"],
                  "models": ["shared_bottom", "mmoe", "ple", "esmm"]},
}


def child_env() -> dict[str, str]:
    """The environment of every worker: 2 threads everywhere, no progress bars, no telemetry."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(THREADS)
    env["TQDM_DISABLE"] = "1"  # peers' per-batch bars (tqdm honours it): favours the peers
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + ([env["PYTHONPATH"]]
                                                      if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)


# -- prepared data --------------------------------------------------------------------------


class Arrays:
    """One split as encoded arrays (the same ids and standardised values shopmtl's encoders
    produce): cat [n, Fc] int64 (0 = OOV), scenario [n] int64 (a categorical field for the
    peers), num [n, Fn] float32, seq [n, Fs, L] int64 (0 = padding), labels [n, T] float32."""

    def __init__(self, z: Any, split: str) -> None:
        self.cat = z[f"{split}_cat"]
        self.scenario = z[f"{split}_scenario"]
        self.num = z[f"{split}_num"]
        self.seq = z[f"{split}_seq"]
        self.labels = z[f"{split}_labels"]

    def __len__(self) -> int:
        return len(self.labels)


def load_prepared(data_dir: str | Path) -> tuple[dict[str, Any], dict[str, Arrays]]:
    """meta.json (feature names, vocabulary sizes, tasks) and the three splits."""
    d = Path(data_dir)
    meta = json.loads((d / "meta.json").read_text())
    with np.load(d / "arrays.npz") as z:
        loaded = {k: z[k] for k in z.files}
    return meta, {s: Arrays(loaded, s) for s in ("train", "valid", "test")}


# -- metrics (one implementation for every library) -----------------------------------------


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney U)."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average rank of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
    ends = np.r_[starts[1:], len(p)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def task_metrics(tasks: list[str], labels: np.ndarray, probs: np.ndarray
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """probs [n, T]: the unconditional probability of each task's label (for ESMM the second
    task is pCTCVR = pCTR * pCVR, compared with the nested label on every row)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(tasks))
    return ({t: auc(labels[:, j], probs[:, j]) for j, t in enumerate(tasks)},
            {t: logloss(labels[:, j], probs[:, j]) for j, t in enumerate(tasks)})


# -- the record -----------------------------------------------------------------------------


def linear_flops_per_sample(model: Any) -> int:
    """Training FLOPs per sample of the dense layers: 3 x (2 * in * out) for every nn.Linear
    (forward, grad wrt input, grad wrt weight). Each Linear of these models runs once per sample;
    embedding lookups, mixtures, BatchNorm and activations are left out (they are memory-bound)."""
    import torch

    return int(sum(6 * m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, torch.nn.Linear)))


def count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def throughput(n_train: int, epoch_seconds: list[float]) -> tuple[float, float]:
    """(fastest epoch, all epochs) training samples/s."""
    return n_train / min(epoch_seconds), n_train * len(epoch_seconds) / sum(epoch_seconds)


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def read_spec() -> dict[str, Any]:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {sys.argv[0]} SPEC.json")
    return json.loads(Path(sys.argv[1]).read_text())


def vmhwm_mb() -> float | None:
    """This process's peak resident memory since its ``exec`` (Linux ``VmHWM``), in MB. Unlike
    ``ru_maxrss`` it does not keep the high-water mark of the parent it was forked from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    record = {k: spec[k] for k in ("library", "variant", "model", "dataset", "batch", "seed")}
    record.update(result)
    record["peak_rss_self_mb"] = self_peak_rss_mb()
    # the run's exact peak: VmHWM is reset by exec, so it excludes the harness the child was
    # forked from (ru_maxrss, and wait4's figure, keep that parent's ~480 MB as a floor)
    record["peak_vmhwm_mb"] = vmhwm_mb()
    out = Path(spec["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)


INFER_PASSES = 3


def infer_seconds(predict: Callable[[], object], passes: int = INFER_PASSES) -> float:
    """Median seconds of ``passes`` timed calls of a predict pass: one pass over 16-80k rows
    takes 0.05-1 s, so one hiccup of this shared machine would move a single timing by half."""
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        predict()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
