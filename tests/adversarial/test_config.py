"""A config a user got wrong: every mistake stops `shopmtl train` at load, before any data is
read or anything is written, in one line that names the key as written in the file, with
exit status 2 (a usage error). These values used to train 0 steps and exit 0, or to fail
minutes later, after data preparation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.adversarial.common import assert_clean_failure, config, good_lines, write_csv
from tests.helpers import cli

USAGE = 2


def _train(tmp_path: Path, *sets: str):
    """`shopmtl train` over a good CSV with ``--set`` overrides; the output folder."""
    write_csv(tmp_path / "shop.csv", good_lines(60))
    out = tmp_path / "out"
    return cli("train", str(config(tmp_path)), "--out", str(out),
               *[a for s in sets for a in ("--set", s)]), out


@pytest.mark.parametrize(("override", "needle"), [
    ("train.batch_size=-5", "train.batch_size: must be >= 1, got -5"),
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.lr=.nan", "train.lr: must be > 0, got nan"),
    ("train.weight_decay=-1e-4", "train.weight_decay: must be >= 0, got -0.0001"),
    ("train.alpha.click=-1", "train.alpha.click: must be >= 0, got -1.0"),
    ("train.early_stopping.patience=-1", "train.early_stopping.patience: must be >= 0, got -1"),
    ("train.dist_timeout=0", "train.dist_timeout: must be > 0, got 0.0"),
    ("train.id_dropout.item_id=1", "train.id_dropout.item_id: must be in [0, 1), got 1.0"),
    ("data.valid_fraction=1.5", "data.valid_fraction: must be in [0, 1), got 1.5"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction: must be in [0, 1], got 2.0"),
    ("data.chunk_rows=0", "data.chunk_rows: must be >= 1, got 0"),
    ("data.test_fraction=0.9", "data: valid_fraction + test_fraction must be < 1, got 0.2 + 0.9"),
    ("model.args.embed_dim=0", "model.args.embed_dim: must be >= 1, got 0"),
    ("model.args.bottom=[8, 0]", "model.args.bottom[1]: must be >= 1, got 0"),
    ("model.args.dropout=1.0", "model.args.dropout: must be in [0, 1), got 1.0"),
    ("weighting={name: dwa, args: {temperature: 0}}",
     "weighting.args.temperature: must be > 0, got 0.0"),
    ("data.schema.features=[{name: user_id, kind: categorical, min_count: 0}]",
     "data.schema.features[0].min_count: must be >= 1, got 0"),
])
def test_a_value_out_of_range_stops_at_load_naming_the_key(tmp_path: Path, override: str,
                                                           needle: str) -> None:
    proc, out = _train(tmp_path, override)
    assert_clean_failure(proc, needle, code=USAGE)
    assert not out.exists()  # nothing prepared, nothing written


@pytest.mark.parametrize(("override", "needle"), [
    ("train.alpha.clik=2", "train.alpha: unknown task 'clik'; tasks: click, conversion"),
    ("train.early_stopping.metric=valid.click.checkout.auc",
     "train.early_stopping.metric: 'valid.click.checkout.auc' names unknown scenario "
     "'checkout'; scenarios: feed, search, all"),
    ("train.early_stopping.metric=valid.clik.all.auc", "names unknown task 'clik'"),
    ("weighting.name=uncertainy", "weighting.name: unknown weighting 'uncertainy'; valid:"),
    ("weighting={name: static, args: {alpha: {conversoin: 2}}}",
     "weighting.args.alpha: unknown task 'conversoin'"),
    ("model.name=shared_botom", "model.name: unknown model 'shared_botom'; valid:"),
    ("model.args.towers=[4]", "model.args: unknown key(s) ['towers']"),
    ("train.epoch=3", "train: unknown key(s) ['epoch']"),
])
def test_a_misspelled_name_stops_before_data_preparation(tmp_path: Path, override: str,
                                                         needle: str) -> None:
    """The data file is all bad rows: had it been read, the error would be about the data
    (and exit 1); the output folder would hold the quarantine."""
    write_csv(tmp_path / "shop.csv", ["not,a,row"] * 60)
    out = tmp_path / "out"
    proc = cli("train", str(config(tmp_path, policy="fail")), "--out", str(out), "--set",
               override)
    assert_clean_failure(proc, needle, code=USAGE)
    assert not out.exists()


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    proc = cli("train", str(tmp_path / "exp.yml"), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "config file not found", "exp.yml", code=USAGE)


def test_a_joint_config_out_of_range_names_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "joint.yaml"
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "bitext", "batch_size": 0}],
                                   "train": {"steps": 10}}))
    proc = cli("train", str(cfg), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "sources[0].batch_size: must be >= 1, got 0", code=USAGE)
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "bitext"}],
                                   "train": {"lr": -1.0}}))
    proc = cli("train", str(cfg), "--out", str(tmp_path / "out"))
    assert_clean_failure(proc, "train.lr: must be > 0, got -1.0", code=USAGE)
    assert not (tmp_path / "out").exists()
