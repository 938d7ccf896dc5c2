"""examples/federated_movielens.yaml on the real MovieLens ratings (docs/FEDERATED.md,
must-show 1's second table): 4 silos by genre group, every rating in exactly one, both tasks
labelled in every silo, each silo's rows of its own genre group only."""

from __future__ import annotations

from pathlib import Path

import torch

from shopmtl.data.sources import EXAMPLES, require_dataset
from shopmtl.data.sources.movielens import SCENARIOS, prepare_movielens
from shopmtl.federated.config import load_federated
from shopmtl.federated.server import prepare
from shopmtl.federated.silos import SPLITS, load_silo


def test_movielens_example_cuts_four_genre_silos(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    parquet = prepare_movielens(require_dataset("movielens_latest_small"), tmp_path / "ml")
    run = load_federated(EXAMPLES / "federated_movielens.yaml", [f"data.train={parquet}"])
    assert run.federated.strategy == "fedprox" and "users" not in run.federated.share
    data, fed, info = prepare(run, tmp_path / "out", log=lambda s: None)
    assert fed.silo_names == SCENARIOS
    sizes = info["silos"]
    # 100,004 ratings, 80/10/10; every rating of every split in exactly one silo
    assert sum(len(getattr(data, s)) for s in SPLITS) == 100_004
    for split in SPLITS:
        assert sum(sizes[n][split] for n in SCENARIOS) == len(getattr(data, split))
    # the genre groups' sizes (the movielens module's docstring: 37,610 / 30,316 / 21,038 /
    # 11,040 ratings), about 80% of each in training
    for name, total in zip(SCENARIOS, (37_610, 30_316, 21_038, 11_040), strict=True):
        assert sum(sizes[name].values()) == total
        assert abs(sizes[name]["train"] / total - 0.8) < 0.02
    for k, name in enumerate(SCENARIOS):
        # both tasks have labels in the silo, only in its own scenario
        assert info["availability"][name] == {
            t: {s: s == name for s in SCENARIOS} for t in ("like", "love")}
        silo = load_silo(Path(fed.silo_files[k]), fed.schema)  # what its client reads
        for split in SPLITS:
            t = getattr(silo, split)
            assert len(t) == sizes[name][split] and bool((t.scenario == k).all())
        # like = rating >= 4 (52% of all ratings), love a subset of like
        y = silo.train.labels
        assert 0.3 < float(y[:, 0].mean()) < 0.7 and bool((y[:, 1] <= y[:, 0]).all())
