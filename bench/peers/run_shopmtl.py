"""One shopmtl run, through its user-facing path: the split files -> ``prepare_data`` (its own
ingestion and encoders) -> ``train_model`` (the Trainer: per-epoch validation, checkpoints,
TensorBoard, best epoch reloaded) -> ``predict_table``.

Variants: ``matched`` sets ``interaction: none`` so that the bottom is the plain concatenation
of the fields the peers use (and embedding L2 0, as for the peers); ``default`` keeps shopmtl's
default dot-interaction bottom (and its default embedding L2 of 1e-6).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench.peers import common as C
from shopmtl.arrowpool import prefer_jemalloc

# Arrow's allocator as the ``shopmtl`` command chooses it (cli._main; ``import shopmtl`` leaves a
# process alone), before anything allocates: bench/peers/rss_probe.py measures the command's
# memory
prefer_jemalloc()


def model_args(model: str, variant: str) -> dict[str, Any]:
    base: dict[str, Any] = {"embed_dim": C.EMBED_DIM, "dropout": 0.0,
                            "interaction": "none" if variant == "matched" else "dot"}
    if model == "shared_bottom":
        return {**base, "bottom": C.EXPERT, "tower": C.TOWER}
    if model == "mmoe":
        return {**base, "n_experts": C.N_EXPERTS, "expert": C.EXPERT, "tower": C.TOWER}
    if model == "ple":
        return {**base, "levels": C.PLE_LEVELS, "specific_experts": C.PLE_SPECIFIC,
                "shared_experts": C.PLE_SHARED, "expert": C.EXPERT, "tower": C.TOWER}
    if model == "esmm":
        return {**base, "tower": C.ESMM_TOWER}
    raise ValueError(model)


def build_config(spec: dict[str, Any], meta: dict[str, Any]) -> Any:
    from bench.peers.prepare import esmm_schema, schema_config
    from shopmtl.config import (
        DataConfig,
        EarlyStopping,
        ExperimentConfig,
        ModelConfig,
        TrainConfig,
    )

    sc = schema_config(spec["dataset"])
    if spec["model"] == "esmm":
        sc = esmm_schema(sc)
    files = meta["files"]
    epochs = spec["epochs"]
    return ExperimentConfig(
        data=DataConfig(schema=sc, train=files["train"], valid=files["valid"],
                        test=files["test"]),
        model=ModelConfig(spec["model"], model_args(spec["model"], spec["variant"])),
        train=TrainConfig(
            epochs=epochs, batch_size=spec["batch"], lr=C.LR, lr_scaling=C.SHOPMTL_LR_SCALING,
            lr_base_batch=C.LR_BASE_BATCH, weight_decay=0.0,
            embedding_weight_decay=0.0 if spec["variant"] == "matched" else 1e-6,
            optimizer="adam", seed=spec["seed"], threads=C.THREADS,
            # never stops early within the epoch budget; the best epoch is still reloaded
            early_stopping=EarlyStopping("valid.all_tasks.auc", "max", patience=epochs + 1),
        ),
    )


def probabilities(model: str, preds: dict[str, np.ndarray], tasks: list[str]) -> np.ndarray:
    """[n, T] unconditional probabilities; shopmtl's ESMM predicts love as p(love | like)."""
    cols = [preds[t] for t in tasks]
    if model == "esmm":
        cols[1] = cols[0] * cols[1]  # pCTCVR = pCTR * pCVR
    return np.stack(cols, 1)


def main() -> None:
    spec = C.read_spec()
    C.seed_everything(spec["seed"])
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.train.evaluate import predict_table
    from shopmtl.train.trainer import train_model

    hwm = {"imports": C.vmhwm_mb()}  # peak memory after each stage (bench/peers/rss_probe.py)
    meta, arrays = C.load_prepared(spec["data_dir"])
    hwm["arrays"] = C.vmhwm_mb()
    cfg = build_config(spec, meta)
    schema = cfg.data.schema.build()
    t0 = time.perf_counter()
    data = prepare_data(cfg.data, schema)
    prep_s = time.perf_counter() - t0
    hwm["prepare_data"] = C.vmhwm_mb()
    if spec["model"] != "esmm":  # the same labels and row order as the peers see
        assert np.array_equal(data.test.labels.numpy(), arrays["test"].labels)
    with tempfile.TemporaryDirectory(prefix="shopmtl-bench-") as tmp:
        model, state = train_model(cfg, data, tmp, progress=False)
    hwm["train"] = C.vmhwm_mb()
    epoch_s = [h["seconds"] for h in state.history]
    tasks = meta["tasks"]
    probs = probabilities(spec["model"], predict_table(model, data.test, C.INFER_BATCH), tasks)
    auc, ll = C.task_metrics(tasks, arrays["test"].labels, probs)
    # inference: the predict path at batch 2048 over the training split (more rows than test)
    predict_table(model, data.valid, C.INFER_BATCH)  # warm-up
    infer_s = C.infer_seconds(lambda: predict_table(model, data.train, C.INFER_BATCH))
    hwm["predict"] = C.vmhwm_mb()
    fast, overall = C.throughput(len(data.train), epoch_s)
    C.write_result(spec, {
        "auc": auc, "logloss": ll, "epoch_seconds": epoch_s, "best_epoch": state.best_epoch,
        "train_samples_per_s": fast, "train_samples_per_s_all_epochs": overall,
        "infer_samples_per_s": len(data.train) / infer_s,
        "params": C.count_params(model), "flops_per_sample": C.linear_flops_per_sample(model),
        "n_train": len(data.train), "prepare_seconds": prep_s,
        "threads": torch.get_num_threads(), "vmhwm_mb": hwm,
        "notes": f"{spec['variant']}: interaction "
                 f"{cfg.model.args['interaction']}; best epoch reloaded",
    })


if __name__ == "__main__":
    main()
