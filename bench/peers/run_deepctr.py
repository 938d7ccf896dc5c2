"""One DeepCTR-Torch 0.3.0 run (peers venv), as its examples run it: feature columns,
``compile("adam"-like, loss=[binary_crossentropy] * T)``, ``fit(x, y)`` with y a 2-D array
(n, T), ``predict(x, batch_size)``.

Its import starts a thread that asks PyPI for the latest version (no timeout): ``requests.get``
is replaced by a stub before the import, so nothing goes on the network and nothing hangs.
Matched settings: Adam lr 1e-3, L2 0 on embeddings, linear part and DNN (its defaults are 1e-5,
1e-5, 0), gates without a hidden layer (``gate_dnn_hidden_units=()``, its default is (64,)), no
dropout, ``verbose=0`` (no per-batch metrics or progress bar; favours it). No validation data is
passed: it keeps the last epoch's weights anyway, and ``on_epoch_end`` then times the training
loop alone. Library traits kept: Linear/embedding init N(0, 1e-4), sigmoid outputs with
``binary_cross_entropy`` summed over the batch, the whole input cast to float32.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from bench.peers import common as C


def import_offline() -> Any:
    import requests

    class _NoNetwork:
        status_code = 599  # not ok: check_version logs nothing and returns

    requests.get = lambda *a, **k: _NoNetwork()  # its version check calls requests.get
    import deepctr_torch

    return deepctr_torch


def columns(meta: dict[str, Any]) -> list:
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    cols: list = [SparseFeat(n, v, embedding_dim=C.EMBED_DIM)
                  for n, v in zip(meta["cat"], meta["cat_vocab"], strict=True)]
    if meta["scenario"]:
        cols.append(SparseFeat(meta["scenario"], meta["scenario_vocab"],
                               embedding_dim=C.EMBED_DIM))
    cols += [VarLenSparseFeat(SparseFeat(n, v, embedding_dim=C.EMBED_DIM), maxlen=ln,
                              combiner="mean")
             for n, v, ln in zip(meta["seq"], meta["seq_vocab"], meta["seq_len"], strict=True)]
    cols += [DenseFeat(n, 1) for n in meta["num"]]
    return cols


def x_dict(meta: dict[str, Any], a: C.Arrays) -> dict[str, np.ndarray]:
    x = {n: a.cat[:, j] for j, n in enumerate(meta["cat"])}
    if meta["scenario"]:
        x[meta["scenario"]] = a.scenario
    x.update({n: a.seq[:, j] for j, n in enumerate(meta["seq"])})
    x.update({n: a.num[:, j] for j, n in enumerate(meta["num"])})
    return x


def build(model: str, meta: dict[str, Any], seed: int) -> torch.nn.Module:
    from deepctr_torch.models import ESMM, MMOE, PLE, SharedBottom

    cols = columns(meta)
    common: dict[str, Any] = {"l2_reg_linear": 0.0, "l2_reg_embedding": 0.0, "l2_reg_dnn": 0.0,
                              "dnn_dropout": 0.0, "seed": seed, "task_names": tuple(meta["tasks"]),
                              "task_types": ("binary",) * len(meta["tasks"]), "device": "cpu"}
    if model == "shared_bottom":
        return SharedBottom(cols, bottom_dnn_hidden_units=tuple(C.EXPERT),
                            tower_dnn_hidden_units=tuple(C.TOWER), **common)
    if model == "mmoe":
        return MMOE(cols, num_experts=C.N_EXPERTS, expert_dnn_hidden_units=tuple(C.EXPERT),
                    gate_dnn_hidden_units=(), tower_dnn_hidden_units=tuple(C.TOWER), **common)
    if model == "ple":
        return PLE(cols, shared_expert_num=C.PLE_SHARED, specific_expert_num=C.PLE_SPECIFIC,
                   num_levels=C.PLE_LEVELS, expert_dnn_hidden_units=tuple(C.EXPERT),
                   gate_dnn_hidden_units=(), tower_dnn_hidden_units=tuple(C.TOWER), **common)
    if model == "esmm":
        return ESMM(cols, tower_dnn_hidden_units=tuple(C.ESMM_TOWER), **common)
    raise ValueError(model)


def main() -> None:
    spec = C.read_spec()
    import_offline()
    C.seed_everything(spec["seed"])
    from deepctr_torch.callbacks import Callback

    meta, arrays = C.load_prepared(spec["data_dir"])
    tr, te = arrays["train"], arrays["test"]
    model = build(spec["model"], meta, spec["seed"])
    model.compile(torch.optim.Adam(model.parameters(), lr=C.LR),
                  loss=["binary_crossentropy"] * len(meta["tasks"]))
    epoch_s: list[float] = []

    class EpochTimer(Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_s.append(time.perf_counter() - self.t0)

    model.fit(x_dict(meta, tr), tr.labels.astype(np.float32), batch_size=spec["batch"],
              epochs=spec["epochs"], verbose=0, callbacks=[EpochTimer()])
    # ESMM's outputs are (pCTR, pCTCVR): the unconditional like / love already
    probs = model.predict(x_dict(meta, te), batch_size=C.INFER_BATCH)
    auc, ll = C.task_metrics(meta["tasks"], te.labels, probs)
    model.predict(x_dict(meta, arrays["valid"]), batch_size=C.INFER_BATCH)  # warm-up
    x_train = x_dict(meta, tr)
    infer_s = C.infer_seconds(lambda: model.predict(x_train, batch_size=C.INFER_BATCH))
    fast, overall = C.throughput(len(tr), epoch_s)
    C.write_result(spec, {
        "auc": auc, "logloss": ll, "epoch_seconds": epoch_s,
        "train_samples_per_s": fast, "train_samples_per_s_all_epochs": overall,
        "infer_samples_per_s": len(tr) / infer_s,
        "params": C.count_params(model), "flops_per_sample": C.linear_flops_per_sample(model),
        "n_train": len(tr), "threads": torch.get_num_threads(),
        "notes": "last epoch's weights; init N(0, 1e-4)",
    })


if __name__ == "__main__":
    main()
