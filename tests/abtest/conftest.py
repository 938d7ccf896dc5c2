"""Fixtures of the A/B tests: a small world's trained models (the multi-task model and its
single-task baselines, through the one training path), trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shopmtl.abtest.run import TrainSpec, train_models

# 300 users, 200 items: every scenario and task, trained in seconds; ad clicks made common
# (ad_click_base -2) so the single-task ad-click baseline of 15k rows beats its label prior
SMALL = {"n_users": 300, "n_items": 200, "chunk_rows": 15_000, "ad_click_base": -2.0}


@pytest.fixture(scope="session")
def ab_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickstart folder (model/, single_task/<task>/model, data/) of a 15k-row small world."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_models(TrainSpec(rows=15_000, seed=0, world=dict(SMALL), epochs=2),
                            tmp_path_factory.mktemp("ab_models"))
    finally:
        torch.set_num_threads(before)
