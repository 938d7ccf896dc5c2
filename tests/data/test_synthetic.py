"""The default synthetic world is realistic by the numbers the foundation issue asks for, and its
generation is deterministic, chunked and split by time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shopmtl.data.synthetic import WorldConfig, build_world, generate, impressions
from shopmtl.metrics import auc


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    cfg = WorldConfig(rows=400_000)
    return impressions(build_world(cfg), 400_000, 0)


def test_rates_are_realistic(rows: dict[str, np.ndarray]) -> None:
    rates = {}
    for s in WorldConfig().scenarios:
        m = rows["scenario"] == s
        rates[s] = rows["click"][m].mean()
        assert 0.01 < rates[s] < 0.10, f"click rate in {s}: {rates[s]:.3f}"
        conv_per_click = rows["conversion"][m].sum() / rows["click"][m].sum()
        assert 0.02 < conv_per_click < 0.20
    assert max(rates.values()) / min(rates.values()) > 1.5  # scenarios differ


def test_oracle_auc_in_the_range_real_ctr_systems_see(rows: dict[str, np.ndarray]) -> None:
    for s in WorldConfig().scenarios:
        m = rows["scenario"] == s
        a = auc(rows["click"][m], rows["true_click"][m])
        assert 0.70 <= a <= 0.85, f"oracle click AUC in {s}: {a:.3f}"


def test_latent_effects_carry_a_third_of_the_click_logit_variance(rows) -> None:
    share = rows["_latent"].var() / rows["_z"].var()
    assert share >= 1 / 3


def test_heavy_tails(rows: dict[str, np.ndarray]) -> None:
    users = np.sort(np.bincount(rows["user_id"]))[::-1]
    items = np.sort(np.bincount(rows["item_id"]))[::-1]
    assert users[: len(users) // 10].sum() / users.sum() > 0.25  # top 10% users: >25% traffic
    assert items[: len(items) // 10].sum() / items.sum() > 0.4


def test_labels_follow_the_availability_rules(tmp_path: Path) -> None:
    cfg = WorldConfig(rows=30_000, n_users=300, n_items=200)
    generate(cfg, tmp_path)
    for split in ("train", "valid", "test"):
        t = pq.read_table(tmp_path / f"{split}.parquet").to_pydict()
        scen = np.asarray(t["scenario"])
        ad = np.asarray([v is not None for v in t["ad_click"]])
        assert (ad == (scen == "ad_slot")).all()  # ad click exists in the ad slot alone
        conv = np.asarray([v is not None for v in t["conversion"]])
        assert (conv == (np.asarray(t["click"]) == 1)).all()  # conversion only after a click
        new = np.asarray(t["is_new_item"]) == 1
        assert new.any() == (split == "test")  # cold-start items appear in the test period only
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["rows"] == 30_000


def test_generation_is_deterministic_and_chunked(tmp_path: Path) -> None:
    cfg = WorldConfig(rows=20_000, n_users=200, n_items=100, chunk_rows=7_000)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    for split in ("train", "valid", "test"):
        a = pq.read_table(tmp_path / "a" / f"{split}.parquet")
        b = pq.read_table(tmp_path / "b" / f"{split}.parquet")
        assert a.equals(b)
    total = sum(pq.ParquetFile(tmp_path / "a" / f"{s}.parquet").metadata.num_rows
                for s in ("train", "valid", "test"))
    assert total == 20_000
    other = WorldConfig(rows=20_000, n_users=200, n_items=100, chunk_rows=7_000, seed=1)
    generate(other, tmp_path / "c")
    assert not pq.read_table(tmp_path / "c" / "test.parquet").equals(
        pq.read_table(tmp_path / "a" / "test.parquet"))


def test_conflicting_tasks_knob_flips_the_sign_of_the_shared_part() -> None:
    def corr(rho: float) -> float:
        cfg = WorldConfig(rows=50_000, task_correlation=rho)
        r = impressions(build_world(cfg), 50_000, 0)
        return float(np.corrcoef(r["true_click"], r["true_conversion"])[0, 1])

    assert corr(0.9) > 0.3
    assert corr(-0.9) < -0.3


def test_bad_world_config_is_refused() -> None:
    with pytest.raises(ValueError, match="traffic"):
        build_world(WorldConfig(traffic=(0.5, 0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match="one value per scenario"):
        build_world(WorldConfig(click_base=(-3.0,)))
