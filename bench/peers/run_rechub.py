"""One torch-rechub 0.9.0 run (peers venv), as its examples run it: Feature objects,
``DataGenerator(x, y).generate_dataloader``, ``MTLTrainer.fit(train_dl, val_dl)`` (it validates
every epoch; only ``train_one_epoch`` is timed) and ``MTLTrainer.predict``.

Matched settings: Adam lr 1e-3 with weight_decay 0 (the trainer's default is 1e-5), no dropout,
early-stopping patience above the epoch count (so the last epoch's weights are kept, as in its
default runs), ``model_path`` in a temporary folder (``fit`` writes a .pth there). Library
traits kept as they are: BatchNorm after every Linear of its MLPs (gates included), sigmoid
outputs trained with BCELoss, embeddings initialised N(0, 1e-4). Its ESMM takes sparse features
only (dense ones are silently dropped by its embedding layer), so MovieLens' movie_age is absent
there.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench.peers import common as C


def features(meta: dict[str, Any]) -> tuple[list, list, list]:
    """(sparse incl. scenario and sequences, dense, the x-dict keys)."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature

    sparse: list = [SparseFeature(n, v, embed_dim=C.EMBED_DIM)
                    for n, v in zip(meta["cat"], meta["cat_vocab"], strict=True)]
    if meta["scenario"]:
        sparse.append(SparseFeature(meta["scenario"], meta["scenario_vocab"],
                                    embed_dim=C.EMBED_DIM))
    sparse += [SequenceFeature(n, v, embed_dim=C.EMBED_DIM, pooling="mean", padding_idx=0)
               for n, v in zip(meta["seq"], meta["seq_vocab"], strict=True)]
    dense = [DenseFeature(n) for n in meta["num"]]
    return sparse, dense, [f.name for f in sparse + dense]


def x_dict(meta: dict[str, Any], a: C.Arrays) -> dict[str, np.ndarray]:
    x = {n: a.cat[:, j] for j, n in enumerate(meta["cat"])}
    if meta["scenario"]:
        x[meta["scenario"]] = a.scenario
    x.update({n: a.seq[:, j] for j, n in enumerate(meta["seq"])})
    x.update({n: a.num[:, j] for j, n in enumerate(meta["num"])})
    return x


def build(model: str, meta: dict[str, Any]) -> torch.nn.Module:
    from torch_rechub.models.multi_task import ESMM, MMOE, PLE, SharedBottom

    sparse, dense, _ = features(meta)
    feats = sparse + dense
    types = ["classification"] * len(meta["tasks"])
    expert = {"dims": C.EXPERT, "dropout": 0.0}
    towers = [{"dims": C.TOWER, "dropout": 0.0} for _ in types]
    if model == "shared_bottom":
        return SharedBottom(feats, types, bottom_params=expert, tower_params_list=towers)
    if model == "mmoe":
        return MMOE(feats, types, n_expert=C.N_EXPERTS, expert_params=expert,
                    tower_params_list=towers)
    if model == "ple":
        return PLE(feats, types, n_level=C.PLE_LEVELS, n_expert_specific=C.PLE_SPECIFIC,
                   n_expert_shared=C.PLE_SHARED, expert_params=expert, tower_params_list=towers)
    if model == "esmm":
        user = [f for f in sparse if f.name in ("userId", "hour", "weekday")]
        item = [f for f in sparse if f not in user]
        tower = {"dims": C.ESMM_TOWER, "dropout": 0.0}
        return ESMM(user, item, cvr_params=tower, ctr_params=dict(tower))
    raise ValueError(model)


def labels(model: str, y: np.ndarray) -> np.ndarray:
    # ESMM's columns are (cvr, ctr, ctcvr); its trainer trains ctr and ctcvr only, the cvr
    # column (here = love) is only scored by its validation
    return np.stack([y[:, 1], y[:, 0], y[:, 1]], 1) if model == "esmm" else y


def main() -> None:
    spec = C.read_spec()
    C.seed_everything(spec["seed"])
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    meta, arrays = C.load_prepared(spec["data_dir"])
    model_name = spec["model"]
    tr, va, te = arrays["train"], arrays["valid"], arrays["test"]
    dg = DataGenerator(x_dict(meta, tr), labels(model_name, tr.labels))
    train_dl, val_dl, _ = dg.generate_dataloader(
        x_val=x_dict(meta, va), y_val=labels(model_name, va.labels),
        x_test=x_dict(meta, te), y_test=labels(model_name, te.labels), batch_size=spec["batch"])
    model = build(model_name, meta)
    n_out = 3 if model_name == "esmm" else len(meta["tasks"])
    epoch_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rechub-bench-") as tmp:
        trainer = MTLTrainer(
            model, task_types=["classification"] * n_out,
            # "lr": bench/peers/scaled_lr.py (torch-rechub at shopmtl's scaled rate)
            optimizer_params={"lr": spec.get("lr", C.LR), "weight_decay": 0.0},
            n_epoch=spec["epochs"],
            earlystop_taskid=1 if model_name == "esmm" else 0,
            earlystop_patience=spec["epochs"] + 1, device="cpu", model_path=tmp)
        inner = trainer.train_one_epoch

        def timed(loader: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(loader)
            epoch_s.append(time.perf_counter() - t0)
            return out

        trainer.train_one_epoch = timed
        trainer.fit(train_dl, val_dl)

    def predict(a: C.Arrays) -> np.ndarray:
        dl = torch.utils.data.DataLoader(PredictDataset(x_dict(meta, a)),
                                         batch_size=C.INFER_BATCH, shuffle=False)
        return np.asarray(trainer.predict(trainer.model, dl), dtype=np.float64)

    p = predict(te)
    probs = p[:, [1, 2]] if model_name == "esmm" else p  # (pCTR, pCTCVR)
    auc, ll = C.task_metrics(meta["tasks"], te.labels, probs)
    predict(va)  # warm-up
    infer_s = C.infer_seconds(lambda: predict(tr))
    fast, overall = C.throughput(len(tr), epoch_s)
    C.write_result(spec, {
        "auc": auc, "logloss": ll, "epoch_seconds": epoch_s,
        "train_samples_per_s": fast, "train_samples_per_s_all_epochs": overall,
        "infer_samples_per_s": len(tr) / infer_s,
        "params": C.count_params(model), "flops_per_sample": C.linear_flops_per_sample(model),
        "n_train": len(tr), "threads": torch.get_num_threads(),
        "notes": "last epoch's weights; BatchNorm in every MLP"
                 + ("; ESMM: dense features dropped by the library" if model_name == "esmm"
                    else ""),
    })


if __name__ == "__main__":
    main()
