"""A/B timings of candidate src changes to shopmtl's training step, applied here as
monkeypatches (src/ is not edited): census MMoE (matched), batch 2048, ``Trainer.step``.
Variants alternate round by round so that load drift hits them alike; the figure is the median
ms per step and its ratio to the baseline.

    .venv/bin/python -m bench.peers.speedups --data-dir DIR/census [--rounds 6]

Variants:
- ``adam_foreach`` / ``adam_fused``: ``make_optimizer`` with ``foreach=True`` / ``fused=True``
  (torch's default on CPU is the per-tensor loop).
- ``lazy_l2``: skip ``MultiTaskModel._track_l2`` (the embedding-norm forward) when
  ``embedding_weight_decay`` is 0.
- ``packed_experts``: the experts' layers as one matmul each (weights concatenated), and every
  task's gate as one Linear.
- ``all``: all of the above (with fused Adam).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.peers import common as C


def packed_experts_forward(self: Any, x: Tensor) -> Tensor:
    """Experts.forward with each layer of the n experts as one matmul (same math)."""
    h = x
    first = True
    for layers in zip(*[e for e in self.experts], strict=True):
        if not isinstance(layers[0], torch.nn.Linear):
            h = torch.relu(h)
            continue
        w = torch.cat([m.weight for m in layers])  # [n*out, in]
        b = torch.cat([m.bias for m in layers])
        if first:
            h = F.linear(h, w, b).view(h.shape[0], self.n, -1)  # [B, n, out]
            first = False
        else:  # per-expert layer on its own slice: batched matmul
            wn = w.view(self.n, -1, w.shape[1])  # [n, out, in]
            h = torch.baddbmm(b.view(self.n, 1, -1), h.transpose(0, 1),
                              wn.transpose(1, 2)).transpose(0, 1)
    return h


def packed_mmoe_forward(self: Any, batch: Any) -> dict[str, Tensor]:
    from shopmtl.nn.layers import interaction_features
    from shopmtl.nn.moe import mix

    fields = self.embed(batch)
    self._track_l2(fields)
    x = interaction_features(self.config.interaction, fields, self.interaction)
    experts = self.experts(x)
    gates = list(self.gates.values())
    w = torch.cat([g.linear.weight for g in gates])
    b = torch.cat([g.linear.bias for g in gates])
    logits = F.linear(x, w, b).view(x.shape[0], len(gates), -1).softmax(-1)  # [B, T, E]
    return {name: self.towers[name](mix(experts, logits[:, j])).squeeze(-1)
            for j, name in enumerate(self.gates)}


def build(variant: str, cfg: Any, data: Any, tmp: str) -> Any:
    from shopmtl.models import base, mmoe
    from shopmtl.nn import moe
    from shopmtl.train import trainer as T

    patches: list[tuple[Any, str, Any]] = []
    v = {"all": {"adam_fused", "lazy_l2", "packed_experts"}}.get(variant, {variant})
    if "adam_foreach" in v or "adam_fused" in v:
        kw = {"foreach": True} if "adam_foreach" in v else {"fused": True}

        def make_optimizer(model: Any, cfg: Any) -> torch.optim.Optimizer:
            return torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                                    weight_decay=cfg.train.weight_decay, **kw)
        patches.append((T, "make_optimizer", make_optimizer))
    if "lazy_l2" in v:
        patches.append((base.MultiTaskModel, "_track_l2", lambda self, fields: None))
    if "packed_experts" in v:
        patches.append((moe.Experts, "forward", packed_experts_forward))
        patches.append((mmoe.MMoE, "forward", packed_mmoe_forward))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    torch.manual_seed(0)
    tr = T.Trainer(cfg, data, Path(tmp) / variant, progress=False)
    return tr, saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    C.seed_everything(0)
    from bench.peers.run_shopmtl import build_config
    from shopmtl.data.pipeline import prepare_data

    meta, _ = C.load_prepared(args.data_dir)
    spec = {"dataset": "census", "model": "mmoe", "variant": "matched", "batch": 2048,
            "seed": 0, "epochs": 5}
    cfg = build_config(spec, meta)
    data = prepare_data(cfg.data, cfg.data.schema.build())
    batches = list(data.train.batches(2048, 0, 0))[:-1]  # full batches only
    variants = ["baseline", "adam_foreach", "adam_fused", "lazy_l2", "packed_experts", "all"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    load0 = round(__import__("os").getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for v in variants:  # each trainer keeps its patched functions bound
            tr, saved = build(v, cfg, data, tmp)
            trainers[v] = (tr, saved)
            for obj, name, old in saved:  # restore for the next build
                setattr(obj, name, old)
        for r in range(args.rounds + 1):
            for v in variants:
                tr, saved = trainers[v]
                old = [(obj, name, getattr(obj, name)) for obj, name, _ in saved]
                build_patches = _patches_of(v)
                for obj, name, new in build_patches:
                    setattr(obj, name, new)
                t0 = time.perf_counter()
                for s in range(args.steps):
                    tr.step(batches[s % len(batches)])
                dt = (time.perf_counter() - t0) * 1000 / args.steps
                for obj, name, o in old:
                    setattr(obj, name, o)
                if r:  # round 0 is warm-up
                    times[v].append(dt)
    base = statistics.median(times["baseline"])
    res = {"setup": "census MMoE (interaction none), batch 2048, Trainer.step, 2 threads",
           "load_average": [load0, round(__import__("os").getloadavg()[0], 2)],
           "ms_per_step": {v: statistics.median(t) for v, t in times.items()},
           "ms_per_step_rounds": times,
           "speedup_vs_baseline": {v: base / statistics.median(t) for v, t in times.items()}}
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


def _patches_of(variant: str) -> list[tuple[Any, str, Any]]:
    """The patches of ``variant`` (re-applied around its steps: patches are global)."""
    from shopmtl.models import base, mmoe
    from shopmtl.nn import moe

    v = {"all": {"adam_fused", "lazy_l2", "packed_experts"}}.get(variant, {variant})
    out: list[tuple[Any, str, Any]] = []
    if "lazy_l2" in v:
        out.append((base.MultiTaskModel, "_track_l2", lambda self, fields: None))
    if "packed_experts" in v:
        out.append((moe.Experts, "forward", packed_experts_forward))
        out.append((mmoe.MMoE, "forward", packed_mmoe_forward))
    return out


if __name__ == "__main__":
    main()
