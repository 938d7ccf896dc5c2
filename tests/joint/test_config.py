"""A joint config's names are checked when it is loaded, before any source is read: the
weighting (a loss weighting once there are two sources), the sources, the tasks of
train.alpha; the legacy ``train.weighting`` still loads. Nothing here trains or loads data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shopmtl.checks import load_joint as load_joint_config
from shopmtl.config import ConfigError, WeightingConfig, from_dict, to_dict
from shopmtl.joint.config import JointConfig
from tests.helpers import assert_one_error_line, cli

TWO = [{"name": "rec", "args": {"rows": 2000}}, {"name": "search"}]
OWN = Path(__file__).parents[2] / "examples" / "own_source"


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("raw", "needles"), [
    ({"sources": TWO, "train": {"alpha": {"clik": 2.0}}},
     ["train.alpha: unknown task 'clik'; tasks: click, conversion, ad_click, relevance"]),
    ({"sources": TWO, "weighting": {"name": "magic"}},
     ["weighting.name: unknown weighting 'magic'; valid: equal, static, uncertainty"]),
    ({"sources": TWO, "weighting": {"name": "upgrad"}},
     ["weighting.name: 'upgrad' needs every task's gradient on one batch, but the sources of a "
      "joint run never share a batch; use one of: equal, static, uncertainty, dwa, rlw"]),
    ({"sources": TWO, "train": {"steps": 0}}, ["train.steps: must be >= 1, got 0"]),
    ({"sources": [*TWO, {"name": "tiktok"}]}, ["unknown source 'tiktok'; known:", "bitext"]),
])
def test_bad_joint_config_stops_at_load_in_one_line(tmp_path: Path, raw: dict,
                                                    needles: list[str]) -> None:
    out = tmp_path / "out"
    proc = cli("train", str(_write(tmp_path, raw)), "--out", str(out))
    assert_one_error_line(proc, *needles, code=2)
    assert not out.exists()  # no source loaded, no world generated


@pytest.mark.parametrize("source", ["bitext", "reviews", "retail", "search", "rec"])
def test_alpha_is_checked_against_every_builtin_source(tmp_path: Path, source: str) -> None:
    tasks = {"bitext": ["intent", "category"], "reviews": ["rating", "recommend"],
             "retail": ["demand_1d", "demand_7d"], "search": ["relevance"],
             "rec": ["click", "conversion", "ad_click"]}[source]
    raw = {"sources": [{"name": source}], "train": {"alpha": dict.fromkeys(tasks, 0.5)}}
    assert load_joint_config(_write(tmp_path, raw)).train.alpha == dict.fromkeys(tasks, 0.5)
    raw["train"]["alpha"]["nope"] = 1.0
    with pytest.raises(ConfigError, match=f"^train.alpha: unknown task 'nope'; tasks: "
                                          f"{', '.join(tasks)}$"):
        load_joint_config(_write(tmp_path, raw))


def test_weighting_top_level_and_the_legacy_train_weighting(tmp_path: Path) -> None:
    cfg = load_joint_config(_write(tmp_path, {"sources": TWO}))
    assert cfg.weighting == WeightingConfig("equal")
    # old configs: train.weighting uncertainty becomes the top-level weighting
    cfg = load_joint_config(_write(tmp_path, {"sources": TWO,
                                              "train": {"weighting": "uncertainty"}}))
    assert cfg.weighting == WeightingConfig("uncertainty")
    assert cfg.train.weighting == "uncertainty"
    # an explicit top-level weighting wins
    cfg = load_joint_config(_write(tmp_path, {"sources": TWO, "weighting": {"name": "dwa"},
                                              "train": {"weighting": "uncertainty"}}))
    assert cfg.weighting.name == "dwa"
    # an old checkpoint's config JSON (no top-level weighting) loads the same way
    saved = to_dict(cfg)
    del saved["weighting"]
    assert from_dict(JointConfig, saved, "joint").weighting == WeightingConfig("uncertainty")
    # a gradient method is fine with one source (its tasks share every batch)
    cfg = load_joint_config(_write(tmp_path, {"sources": TWO[:1],
                                              "weighting": {"name": "upgrad"}}))
    assert cfg.weighting.name == "upgrad"
    with pytest.raises(ConfigError, match=r"^weighting\.args: unknown key"):
        load_joint_config(_write(tmp_path, {"sources": TWO, "weighting": {
            "name": "dwa", "args": {"temprature": 2}}}))


def test_own_source_alpha_checked_when_it_declares_its_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(OWN))
    import ticket_source

    own = {"name": "tickets", "cls": "ticket_source:TicketSource", "args": {"path": "x.csv"}}
    raw = {"sources": [own, {"name": "bitext"}], "train": {"alpha": {"hours": 0.5}}}
    assert load_joint_config(_write(tmp_path, raw)).train.alpha == {"hours": 0.5}
    raw["train"]["alpha"] = {"hour": 0.5}
    with pytest.raises(ConfigError, match="unknown task 'hour'; tasks: priority, hours, intent"):
        load_joint_config(_write(tmp_path, raw))
    # without task_names the tasks are unknown until the source is loaded (train_joint checks)
    monkeypatch.delattr(ticket_source.TicketSource, "task_names")
    assert load_joint_config(_write(tmp_path, raw)).train.alpha == {"hour": 0.5}
    raw["sources"][0]["cls"] = "ticket_source:Nope"
    with pytest.raises(ConfigError, match="source 'tickets': cannot import"):
        load_joint_config(_write(tmp_path, raw))


def test_a_joint_run_under_torchrun_is_checked_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked with the config (checks.check_joint), before anything in OUT is touched: the
    example's batches divide by 2 processes (accepted), not by 3 (refused, naming the source;
    tests/joint/test_torchrun.py runs a job)."""
    from shopmtl.checks import load_run_config

    path = Path(__file__).resolve().parents[2] / "examples" / "joint.yaml"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_run_config(path) == load_joint_config(path)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"sources\[0\] \(rec\)\.batch_size: 1024 .* "
                                          r"divisible by the number of processes \(3\)"):
        load_joint_config(path)
    with pytest.raises(ConfigError, match="number of processes"):
        load_run_config(path)
