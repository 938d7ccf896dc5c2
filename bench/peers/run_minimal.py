"""The practical ceiling: a minimal tensor-resident MMoE in plain torch (no data loader, no
framework), with the same architecture as the peers' MMoE (one embedding table with offsets for
every categorical field and the scenario, mean-pooled sequences, raw dense values appended;
4 experts [64], softmax gates without hidden layer, towers [32]), Adam lr 1e-3, BCE on logits.
A batch is ``tensor[perm[i:i + B]]``, nothing else.

Also ``python -m bench.peers.run_minimal --matmul OUT.json``: the physical ceiling, sustained
2048 x 2048 fp32 matmul GFLOP/s on the benchmark's threads.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.peers import common as C


class MinimalMMoE(nn.Module):
    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__()
        vocabs = [*meta["cat_vocab"], meta["scenario_vocab"], *meta["seq_vocab"]]
        offsets = np.concatenate([[0], np.cumsum(vocabs)[:-1]])
        n_cat = len(meta["cat_vocab"]) + 1
        self.register_buffer("cat_off", torch.tensor(offsets[:n_cat], dtype=torch.long))
        self.register_buffer("seq_off", torch.tensor(offsets[n_cat:], dtype=torch.long))
        self.table = nn.Embedding(int(sum(vocabs)), C.EMBED_DIM)
        nn.init.normal_(self.table.weight, std=0.05)
        width = (n_cat + len(meta["seq"])) * C.EMBED_DIM + len(meta["num"])
        h = C.EXPERT[-1]
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, h), nn.ReLU())
                                     for _ in range(C.N_EXPERTS))
        n_tasks = len(meta["tasks"])
        self.gates = nn.ModuleList(nn.Linear(width, C.N_EXPERTS) for _ in range(n_tasks))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(h, C.TOWER[-1]), nn.ReLU(), nn.Linear(C.TOWER[-1], 1))
            for _ in range(n_tasks))

    def forward(self, cat: Tensor, seq: Tensor, num: Tensor) -> Tensor:
        parts = [self.table(cat + self.cat_off).flatten(1)]
        if seq.shape[1]:
            emb = self.table(seq + self.seq_off[None, :, None])  # [B, Fs, L, D]
            m = (seq > 0).unsqueeze(-1).to(emb.dtype)
            parts.append(((emb * m).sum(2) / m.sum(2).clamp(min=1.0)).flatten(1))
        parts.append(num)
        x = torch.cat(parts, 1)
        e = torch.stack([ex(x) for ex in self.experts], 1)  # [B, E, H]
        outs = [tw(torch.einsum("beh,be->bh", e, torch.softmax(g(x), -1)))
                for g, tw in zip(self.gates, self.towers, strict=True)]
        return torch.cat(outs, 1)  # [B, T] logits


def tensors(a: C.Arrays) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cat = torch.from_numpy(np.concatenate([a.cat, a.scenario[:, None]], 1)).contiguous()
    return (cat, torch.from_numpy(a.seq).contiguous(), torch.from_numpy(a.num).contiguous(),
            torch.from_numpy(a.labels).contiguous())


def main() -> None:
    spec = C.read_spec()
    C.seed_everything(spec["seed"])
    meta, arrays = C.load_prepared(spec["data_dir"])
    cat, seq, num, y = tensors(arrays["train"])
    model = MinimalMMoE(meta)
    opt = torch.optim.Adam(model.parameters(), lr=C.LR)
    n, b = len(y), spec["batch"]
    g = torch.Generator().manual_seed(spec["seed"])
    epoch_s = []
    for _ in range(spec["epochs"]):
        model.train()
        perm = torch.randperm(n, generator=g)
        t0 = time.perf_counter()
        for i in range(0, n, b):
            idx = perm[i:i + b]
            loss = F.binary_cross_entropy_with_logits(model(cat[idx], seq[idx], num[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epoch_s.append(time.perf_counter() - t0)
    model.eval()

    @torch.no_grad()
    def predict(t: tuple[Tensor, ...]) -> np.ndarray:
        out = [torch.sigmoid(model(t[0][i:i + C.INFER_BATCH], t[1][i:i + C.INFER_BATCH],
                                   t[2][i:i + C.INFER_BATCH]))
               for i in range(0, len(t[0]), C.INFER_BATCH)]
        return torch.cat(out).numpy()

    te = tensors(arrays["test"])
    auc, ll = C.task_metrics(meta["tasks"], arrays["test"].labels, predict(te))
    predict(tensors(arrays["valid"]))  # warm-up
    infer_s = C.infer_seconds(lambda: predict((cat, seq, num)))
    fast, overall = C.throughput(n, epoch_s)
    C.write_result(spec, {
        "auc": auc, "logloss": ll, "epoch_seconds": epoch_s,
        "train_samples_per_s": fast, "train_samples_per_s_all_epochs": overall,
        "infer_samples_per_s": n / infer_s,
        "params": C.count_params(model), "flops_per_sample": C.linear_flops_per_sample(model),
        "n_train": n, "threads": torch.get_num_threads(),
        "notes": "tensor-resident reference: batches are index slices of resident tensors",
    })


def matmul(out: str, seconds: float = 3.0) -> None:
    """Sustained 2048 x 2048 fp32 matmul GFLOP/s (best of 3 windows) on THREADS threads."""
    import json
    from pathlib import Path

    torch.set_num_threads(C.THREADS)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    for _ in range(3):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(3):
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b, out=c)
            k += 1
        rates.append(2 * 2048**3 * k / (time.perf_counter() - t0) / 1e9)
    Path(out).write_text(json.dumps({"gflops": max(rates), "gflops_windows": rates,
                                     "threads": torch.get_num_threads(),
                                     "peak_rss_self_mb": C.self_peak_rss_mb()}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--matmul":
        matmul(sys.argv[2])
    else:
        main()
