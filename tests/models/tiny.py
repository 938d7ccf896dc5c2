"""A tiny schema and batch for model tests: 4 scenarios, 3 tasks (click; conversion given click;
ad_click only in the ad slot), every feature kind. Labels are masked the way ingestion masks
them: a conditional label exists only where its condition is positive."""

from __future__ import annotations

from typing import Any

import torch

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec
from shopmtl.models.base import MultiTaskModel
from shopmtl.nn.chains import given_order
from shopmtl.registry import build_model

SCENARIOS = ("feed", "search", "ad", "page")
VOCAB = {"user_id": 30, "item_id": 20, "segment": 5, "hist_item": 20, "query": 12}

# small widths keep each test fast on a shared CPU; every key must be a valid config key
SMALL: dict[str, dict[str, Any]] = {
    "shared_bottom": {"embed_dim": 8, "bottom": [32], "tower": [16]},
    "mmoe": {"embed_dim": 8, "n_experts": 3, "expert": [32, 16], "tower": [16]},
    "ple": {"embed_dim": 8, "levels": 2, "expert": [16], "tower": [16]},
    "esmm": {"embed_dim": 8, "tower": [32, 16]},
    "aitm": {"embed_dim": 8, "tower": [32, 16], "head": [8]},
    "star": {"embed_dim": 8, "star": [32, 16], "tower": [16], "aux": [8]},
    "pepnet": {"embed_dim": 8, "tower": [32, 16], "gate_hidden": 16},
    "m2m": {"embed_dim": 8, "expert": [32, 16], "scenario_dim": 8, "attention_dim": 8},
}


def tiny_schema(tasks: tuple[TaskSpec, ...] | None = None) -> Schema:
    cat = "categorical"
    return Schema(
        features=(
            FeatureSpec("user_id", cat),
            FeatureSpec("item_id", cat),
            FeatureSpec("segment", cat),
            FeatureSpec("price", "numeric"),
            FeatureSpec("hist_item", "sequence", max_len=4, vocab_from="item_id"),
            FeatureSpec("query", "sequence", max_len=3),
        ),
        tasks=tasks
        or (
            TaskSpec("click"),
            TaskSpec("conversion", given="click"),
            TaskSpec("ad_click", scenarios=("ad",)),
        ),
        scenario=ScenarioSpec("scenario", SCENARIOS),
    )


def tiny_batch(schema: Schema, n: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(1, VOCAB["user_id"], (n,), generator=g)
    item = torch.randint(1, VOCAB["item_id"], (n,), generator=g)
    seg = torch.randint(0, VOCAB["segment"], (n,), generator=g)
    cat = torch.stack([user, item, seg], 1)  # [B, 3]
    num = torch.randn(n, 1, generator=g)  # [B, 1]
    hist = torch.randint(0, VOCAB["item_id"], (n, 4), generator=g)
    query = torch.nn.functional.pad(torch.randint(0, VOCAB["query"], (n, 3), generator=g), (0, 1))
    seq = torch.stack([hist, query], 1)  # [B, 2, 4]
    scenario = torch.arange(n) % len(SCENARIOS)  # every scenario present
    labels = torch.zeros(n, len(schema.tasks))
    mask = torch.zeros(n, len(schema.tasks), dtype=torch.bool)
    avail = schema.availability()
    for name in given_order(schema):  # a condition's labels before its dependants'
        j, t = schema.task_names.index(name), schema.task(name)
        y = (torch.rand(n, generator=g) < 0.5).float()
        defined = torch.tensor([avail[t.name][SCENARIOS[s]] for s in scenario.tolist()])
        if t.given is not None:
            p = schema.task_names.index(t.given)
            defined &= mask[:, p] & (labels[:, p] == 1)
        labels[:, j] = torch.where(defined, y, 0.0)
        mask[:, j] = defined
    return Batch(cat, num, seq, scenario, labels, mask)


def build(name: str, schema: Schema | None = None, seed: int = 0, **args: Any) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(name, {**SMALL.get(name, {}), **args}, schema or tiny_schema(), VOCAB)
