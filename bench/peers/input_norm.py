"""Test AUC of shopmtl's matched models with ``input_norm`` none, batch and layer (findings.md).

    .venv/bin/python -m bench.peers.prepare /tmp/bd          # the fixed splits, once
    .venv/bin/python -m bench.peers.input_norm --data-dir /tmp/bd --dataset census \
        --batch 2048 --seeds 0,1,2 [--model ple] [--norms none,batch,layer]

Same config as ``run_shopmtl`` (matched hyperparameters, the dataset's epochs, lr 1e-3 at batch
256, sqrt-scaled to 0.00283 at 2048 since 2026-12-02: the findings' earlier figures used 1e-3) with
one thread; prints one JSON line per (input_norm, seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

import torch

from bench.peers import common as C
from bench.peers import run_shopmtl as R


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="census", choices=sorted(C.DATASETS))
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--norms", default="none,batch,layer")
    args = ap.parse_args()
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.train.evaluate import predict_table
    from shopmtl.train.trainer import train_model

    torch.set_num_threads(1)
    meta, arrays = C.load_prepared(f"{args.data_dir}/{args.dataset}")
    for norm in args.norms.split(","):
        for seed in map(int, args.seeds.split(",")):
            spec = {"dataset": args.dataset, "model": args.model, "variant": "matched",
                    "batch": args.batch, "seed": seed,
                    "epochs": C.DATASETS[args.dataset]["epochs"]}
            cfg = R.build_config(spec, meta)
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, args={**cfg.model.args,
                                                                "input_norm": norm}),
                train=dataclasses.replace(cfg.train, threads=1))
            data = prepare_data(cfg.data, cfg.data.schema.build())
            with tempfile.TemporaryDirectory() as tmp:
                model, _ = train_model(cfg, data, tmp, progress=False)
            probs = R.probabilities(args.model, predict_table(model, data.test, 2048),
                                    meta["tasks"])
            auc, _ = C.task_metrics(meta["tasks"], arrays["test"].labels, probs)
            print(json.dumps({"dataset": args.dataset, "batch": args.batch, "input_norm": norm,
                              "seed": seed, "auc": auc}), flush=True)


if __name__ == "__main__":
    main()
