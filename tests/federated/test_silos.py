"""Silos from the data: each row in exactly one silo, a silo's rows and tasks only, the
availability matrix, and the refusals (a task no silo has, bad config)."""

from __future__ import annotations

import pytest
import torch

from shopmtl.config import ConfigError
from shopmtl.federated.config import SiloConfig, federated_from_dict
from shopmtl.federated.silos import (
    SPLITS,
    availability,
    check_tasks_covered,
    load_silo,
    save_silo,
    silo_data,
    split_silos,
    user_column,
)
from tests.federated.conftest import tiny_raw


def _partition(data, silos):  # every row of every split in exactly one silo
    for split in SPLITS:
        n = len(getattr(data, split))
        rows = torch.cat([s.rows[split] for s in silos])
        assert len(rows) == n
        assert torch.equal(rows.sort().values, torch.arange(n))


def test_by_scenario_one_silo_per_scenario_with_only_its_rows(prepared) -> None:
    data, _, info = prepared
    silos = info["_silos"]
    assert [s.name for s in silos] == list(data.schema.scenario_names)
    _partition(data, silos)
    for s in silos:
        part = silo_data(data, s)
        code = data.schema.scenario_names.index(s.name)
        for split in SPLITS:
            assert bool((getattr(part, split).scenario == code).all())
    # ad_click exists only in the ad slot: one silo has it, the others' matrices say no
    assert info["availability"]["ad_slot"]["ad_click"]["ad_slot"] is True
    assert not any(info["availability"]["home_feed"]["ad_click"].values())
    assert info["availability"]["home_feed"]["click"] == {
        "home_feed": True, "search": False, "ad_slot": False, "product_page": False}


def test_scenario_groups_and_user_hash(prepared) -> None:
    data = prepared[0]
    grouped = split_silos(data, SiloConfig(groups={"browse": ("home_feed", "product_page"),
                                                   "intent": ("search", "ad_slot")}))
    assert [s.name for s in grouped] == ["browse", "intent"]
    _partition(data, grouped)
    hashed = split_silos(data, SiloConfig(by="user_hash", count=3), seed=1)
    _partition(data, hashed)
    users = [set(data.train.cat[s.rows["train"], user_column(data.schema)].tolist())
             for s in hashed]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert min(len(s.rows["train"]) for s in hashed) > 0.2 * len(data.train)


def test_by_column_uses_the_encoded_values(prepared) -> None:
    data = prepared[0]
    silos = split_silos(data, SiloConfig(by="column", column="gender",
                                         groups={"a": ("0",), "b": ("1",)}))
    col = [f.name for f in data.schema.of_kind("categorical")].index("gender")
    ids = [set(data.train.cat[s.rows["train"], col].tolist()) for s in silos]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    with pytest.raises(ConfigError, match=r"groups\.a: 1 of its values are not in column"):
        split_silos(data, SiloConfig(by="column", column="gender", groups={"a": ("x9",)}))
    with pytest.raises(ConfigError, match="'price' is not a categorical feature"):
        split_silos(data, SiloConfig(by="column", column="price", groups={"a": ("1",)}))


def test_silo_tasks_drop_the_other_labels_and_an_orphan_task_is_refused(prepared) -> None:
    data = prepared[0]
    cfg = SiloConfig(tasks={"ad_slot": ("click",)})
    silos = split_silos(data, cfg)
    part = silo_data(data, silos[2])
    j = data.schema.task_names.index("ad_click")
    assert not bool(part.train.mask[:, j].any())
    assert bool(part.train.mask[:, 0].any())
    matrices = {s.name: availability(data.schema, silo_data(data, s).train) for s in silos}
    with pytest.raises(ConfigError, match=r"no silo has training labels for task\(s\) "
                                          r"\['ad_click'\]"):
        check_tasks_covered(data.schema, matrices)
    with pytest.raises(ConfigError, match="unknown silo or task"):
        split_silos(data, SiloConfig(tasks={"nowhere": ("click",)}))


def test_a_silo_file_reads_back_identically(prepared, tmp_path) -> None:
    data, _, info = prepared
    part = silo_data(data, info["_silos"][1])
    save_silo(tmp_path / "s.safetensors", part)
    back = load_silo(tmp_path / "s.safetensors", data.schema)
    for split in SPLITS:
        a, b = getattr(part, split), getattr(back, split)
        for col in ("cat", "num", "seq", "scenario", "labels", "mask", "group"):
            assert torch.equal(getattr(a, col), getattr(b, col))


@pytest.mark.parametrize(("change", "message"), [
    ({"bogus": 1}, r"federated: unknown key\(s\) \['bogus'\]"),
    ({"strategy": "fedsgd"}, "federated.strategy"),
    ({"rounds": 0}, "federated.rounds: must be >= 1"),
    ({"fraction": 1.5}, "federated.fraction"),
    ({"mu": 0.0}, "fedprox needs mu > 0"),
    ({"share": ["dense", "dense"]}, "listed twice"),
    ({"share": ["dense", "weights"]}, "federated.share"),
    ({"silos": {"by": "column"}}, "by: column needs the column's name"),
    ({"silos": {"by": "scenario", "groups": {"x": ["nowhere"]}}}, None),
])
def test_bad_federated_config_is_one_clear_error(change, message) -> None:
    if message is None:  # the scenario names are checked against the data: at prepare
        federated_from_dict(tiny_raw(**change))
        return
    with pytest.raises(ConfigError, match=message):
        federated_from_dict(tiny_raw(**change))


def test_missing_section_and_unknown_scenario_and_attacker(prepared, tiny_world,
                                                           tmp_path) -> None:
    import shutil

    from shopmtl.federated.server import prepare

    raw = tiny_raw()
    del raw["federated"]
    with pytest.raises(ConfigError, match="federated: the section is missing"):
        federated_from_dict(raw)
    with pytest.raises(ConfigError, match=r"\['nowhere'\] are not scenarios"):
        split_silos(prepared[0], SiloConfig(groups={"x": ("nowhere",)}))
    shutil.copytree(tiny_world / "data", tmp_path / "w" / "data")
    with pytest.raises(ConfigError, match=r"attack.silos: \['mars'\] are not silos"):
        prepare(federated_from_dict(tiny_raw(attack={"silos": ["mars"]})), tmp_path / "w",
                log=lambda s: None)
