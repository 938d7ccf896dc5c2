"""One model-directory format, one loader, one predict path (``shopmtl.modeldir``).

Directories written by the old code (format 1, tests/fixtures/format1, made by make.py at the
pre-refactor commit) load and predict exactly what the old ``shopmtl predict`` wrote; new ones
are format 2; ``shopmtl.load(...).predict`` checks rows with the CLI's code; a tampered or
unknown directory is refused in one line."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml

import shopmtl
from shopmtl.data.ingest import DataError
from shopmtl.train.checkpoint import CheckpointError
from tests.helpers import assert_one_error_line, cli

FIX = Path(__file__).parent / "fixtures" / "format1"
ZOO_TASKS = ("click", "conversion", "ad_click")
JOINT_TASKS = ("intent", "category")


def _old_zoo() -> list[dict]:
    return json.loads((FIX / "zoo_predictions.json").read_text())


def _old_joint() -> dict[str, list[dict]]:
    return json.loads((FIX / "joint_predictions.json").read_text())


def _assert_zoo_matches(table: pa.Table, tasks=ZOO_TASKS) -> None:
    old = _old_zoo()
    assert table.column_names == list(tasks) and table.num_rows == len(old)
    for t in tasks:
        np.testing.assert_allclose(table.column(t).to_numpy(), [r[t] for r in old], atol=1e-6,
                                   rtol=0)


def _assert_joint_matches(records: list[dict], task: str) -> None:
    """The old code wrote the class probabilities as one vector and the top class; the new
    answer names them: ``<task>`` is that class, ``<task>_p_<label>`` each probability
    (``all_classes``), and the labels are the training data's, stored in the old directory."""
    old = _old_joint()[task]
    labels = json.loads((FIX / "joint_model" / "sources.json").read_text()
                        )["bitext"]["meta"]["classes"][task]
    assert len(records) == len(old)
    for new, was in zip(records, old, strict=True):
        np.testing.assert_allclose([new[f"{task}_p_{lab}"] for lab in labels], was[task],
                                   atol=1e-6, rtol=0)
        assert new[task] == was[f"{task}_class"]
        assert new[f"{task}_p"] == pytest.approx(max(was[task]), abs=1e-6)


def test_fixtures_are_format_1_and_small() -> None:
    zoo = json.loads((FIX / "zoo_model" / "meta.json").read_text())
    joint = json.loads((FIX / "joint_model" / "meta.json").read_text())
    assert zoo["format"] == 1 and "kind" not in zoo
    assert joint == {"format": 1, "kind": "joint"}
    size = {d: sum(f.stat().st_size for f in (FIX / d).iterdir())
            for d in ("zoo_model", "joint_model")}
    assert size["zoo_model"] < 150_000 and size["joint_model"] < 300_000, size


def test_old_zoo_dir_loads_and_predicts_what_the_old_code_did() -> None:
    m = shopmtl.load(FIX / "zoo_model")
    assert (m.kind, m.tasks, m.path) == ("zoo", ZOO_TASKS, FIX / "zoo_model")
    table = pacsv.read_csv(FIX / "zoo_rows.csv")  # typed columns, as a Parquet file gives
    _assert_zoo_matches(m.predict(table))
    _assert_zoo_matches(m.predict(table.to_pylist()))
    _assert_zoo_matches(m.predict(FIX / "zoo_rows.csv"))
    _assert_zoo_matches(m.predict(str(FIX / "zoo_rows.csv"), task="conversion"), ["conversion"])
    # labels are not needed
    _assert_zoo_matches(m.predict(table.drop_columns(["click", "conversion", "ad_click"])))


def test_old_zoo_dir_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    proc = cli("predict", str(FIX / "zoo_model"), str(FIX / "zoo_rows.csv"), "--out", str(out),
               check=True)
    assert "wrote 8 rows" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    old = _old_zoo()
    assert [int(r["line"]) for r in rows] == [r["line"] for r in old]
    for t in ZOO_TASKS:
        np.testing.assert_allclose([float(r[t]) for r in rows], [r[t] for r in old], atol=1e-6)


def test_old_joint_dir_loads_and_predicts_what_the_old_code_did() -> None:
    m = shopmtl.load(FIX / "joint_model")
    assert (m.kind, m.tasks) == ("joint", JOINT_TASKS)
    texts = [json.loads(line) for line in (FIX / "joint_rows.jsonl").read_text().splitlines()]
    for task in JOINT_TASKS:
        for rows in (FIX / "joint_rows.jsonl", texts, pa.Table.from_pylist(texts)):
            _assert_joint_matches(m.predict(rows, task=task, all_classes=True).to_pylist(),
                                  task)


def test_old_joint_dir_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    cli("predict", str(FIX / "joint_model"), str(FIX / "joint_rows.jsonl"), "--out", str(out),
        "--task", "category", "--all-classes", check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [r["line"] for r in _old_joint()["category"]]
    _assert_joint_matches(records, "category")


def test_in_memory_rows_are_checked_by_the_cli_rules(tmp_path: Path) -> None:
    m = shopmtl.load(FIX / "zoo_model")
    rows = pacsv.read_csv(FIX / "zoo_rows.csv").to_pylist()
    rows[1]["price"] = "cheap"
    rows[2]["price"] = "cheap"
    with pytest.raises(DataError) as info:
        m.predict(rows)
    assert str(info.value) == ("bad row: rows: row 1, column 'price': non-numeric value in a "
                               "numeric feature (2 bad rows in all)")
    # the same rows in a file: the same message, with the file's name and line
    bad = tmp_path / "bad.csv"
    pacsv.write_csv(pa.Table.from_pylist([{k: (None if v is None else str(v))
                                           for k, v in r.items()} for r in rows]), bad)
    with pytest.raises(DataError, match=r"bad row: bad.csv: line 3, column 'price': non-numeric"):
        m.predict(bad)
    with pytest.raises(DataError, match=r"rows: missing column\(s\) \['price'\]"):
        m.predict([{k: v for k, v in r.items() if k != "price"} for r in rows])
    with pytest.raises(DataError, match=r"unknown task\(s\) \['refund'\]"):
        m.predict(rows[:1], task="refund")
    with pytest.raises(DataError, match="expected a pyarrow Table"):
        m.predict(42)
    j = shopmtl.load(FIX / "joint_model")
    with pytest.raises(DataError, match=r"bad row: rows: row 1: unknown field\(s\) \['txt'\]; "
                       r"the fields are \['text'\] \(1 bad row in all\)"):
        j.predict([{"text": "where is my order"}, {"txt": 1}], task="intent")
    with pytest.raises(DataError, match="one task at a time: pass task=NAME"):
        j.predict([{"text": "where is my order"}])
    with pytest.raises(DataError, match=r"unknown task 'click'.*category"):
        j.predict([{"text": "where is my order"}], task="click")


def test_a_dataframe_is_accepted() -> None:
    import pandas as pd  # the dev extra has it (shopmtl itself does not need pandas)

    m = shopmtl.load(FIX / "zoo_model")
    _assert_zoo_matches(m.predict(pd.read_csv(FIX / "zoo_rows.csv", keep_default_na=True)))


def _rewrite(path: Path, name: str, text: str, fix_manifest: bool = True) -> None:
    (path / name).write_text(text)
    if fix_manifest:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest[name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
        (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("meta", [{"format": 2, "kind": "tree"}, {"format": 3, "kind": "zoo"},
                                  {"format": 2}, {"kind": "joint"}, []])
def test_unknown_kind_or_format_is_one_line_naming_the_dir(meta, tmp_path: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(FIX / "zoo_model", d)
    _rewrite(d, "meta.json", json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        shopmtl.load(d)
    msg = str(info.value)
    assert "\n" not in msg and str(d) in msg and "known kinds: zoo, joint" in msg
    assert_one_error_line(cli("predict", str(d), str(FIX / "zoo_rows.csv")), str(d),
                          "known kinds: zoo, joint", code=1)


@pytest.mark.parametrize("which", ["zoo_model", "joint_model"])
def test_tampered_or_incomplete_dirs_are_refused(which: str, tmp_path: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(FIX / which, d)
    _rewrite(d, "config.json", (d / "config.json").read_text() + " ", fix_manifest=False)
    with pytest.raises(CheckpointError, match=r"'config\.json' is corrupt"):
        shopmtl.load(d)
    shutil.copy(FIX / which / "config.json", d / "config.json")
    shopmtl.load(d)  # restored: loads
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["model.safetensors"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        shopmtl.load(d)
    shutil.copy(FIX / which / "manifest.json", d / "manifest.json")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"'model\.safetensors' .* is missing"):
        shopmtl.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        shopmtl.load(d)
    rows = "zoo_rows.csv" if which == "zoo_model" else "joint_rows.jsonl"
    assert_one_error_line(cli("predict", str(d), str(FIX / rows), "--task", "click"),
                          "not a checkpoint", code=1)


def test_new_dirs_are_format_2_and_load(tmp_path: Path) -> None:
    """A zoo and a joint run of the current code write the same meta.json keys."""
    from shopmtl.data.synthetic import WorldConfig, generate
    from tests.helpers import world_config_yaml

    generate(WorldConfig(rows=2000, n_users=50, n_items=30, chunk_rows=20_000), tmp_path / "w")
    # 2,000 rows, one epoch of ~6 steps: not learnable by design (the file format is under
    # test, not the model), so the label-prior guard is off
    cfg = world_config_yaml(tmp_path / "w", tmp_path / "zoo.yaml", epochs=1, prior_guard=False)
    joint = tmp_path / "joint.yaml"
    joint.write_text(yaml.safe_dump({
        "sources": [{"name": "bitext", "batch_size": 16, "max_examples": 40}],
        "text": {"ngram_buckets": 1024},
        "model": {"adapter_hidden": 8, "text_dim": 8, "hidden": [8], "ngram_dim": 4},
        "train": {"steps": 4, "threads": 1, "log_every": 0}}))
    cli("train", str(cfg), "--out", str(tmp_path / "zoo"), check=True)
    cli("train", str(joint), "--out", str(tmp_path / "joint"), check=True)
    zoo_meta = json.loads((tmp_path / "zoo" / "model" / "meta.json").read_text())
    joint_meta = json.loads((tmp_path / "joint" / "joint" / "model" / "meta.json").read_text())
    common = {"format": 2, "shopmtl_version": version("shopmtl")}
    assert zoo_meta == {**common, "kind": "zoo", "tasks": list(ZOO_TASKS),
                        "model": "shared_bottom", "epoch": 1,
                        "valid_metric": zoo_meta["valid_metric"]}
    assert joint_meta == {**common, "kind": "joint", "tasks": list(JOINT_TASKS),
                          "sources": ["bitext"]}
    m = shopmtl.load(tmp_path / "zoo" / "model")
    assert (m.kind, m.tasks) == ("zoo", ZOO_TASKS)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "w" / "test.parquet").slice(0, 20)
    preds = m.predict(rows)
    out = tmp_path / "p.csv"
    pq.write_table(rows, tmp_path / "rows.parquet")
    cli("predict", str(m.path), str(tmp_path / "rows.parquet"), "--out", str(out), check=True)
    written = list(csv.DictReader(out.open()))
    for t in ZOO_TASKS:
        np.testing.assert_allclose(preds.column(t).to_numpy(), [float(r[t]) for r in written],
                                   atol=1e-6)
    j = shopmtl.load(tmp_path / "joint" / "joint" / "model")
    assert (j.kind, j.tasks) == ("joint", JOINT_TASKS)
    got = j.predict([{"text": "cancel my order"}], task="intent", all_classes=True).to_pylist()
    labels = j.contract("intent").output("intent").labels
    assert len(got) == 1 and len(labels) == 27 and got[0]["intent"] in labels
    assert sum(got[0][f"intent_p_{x}"] for x in labels) == pytest.approx(1.0, abs=1e-5)
    assert_one_error_line(cli("evaluate", str(j.path), str(FIX / "zoo_rows.csv")),
                          "`shopmtl evaluate` takes a zoo model directory", code=2)


def test_import_shopmtl_stays_light() -> None:
    code = ("import sys, shopmtl; heavy = [m for m in ('torch', 'pyarrow', 'shopmtl.modeldir') "
            "if m in sys.modules]; assert not heavy, heavy; assert callable(shopmtl.load); "
            "assert 'shopmtl.modeldir' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shopmtl.nope  # noqa: B018


# --- shopmtl.train: the command's path from Python ----------------------------------------------

def _shop_config(tmp_path: Path) -> dict:
    """The adversarial tests' small CSV run as a dict (its data path absolute)."""
    from tests.adversarial.common import config, good_lines, write_csv

    write_csv(tmp_path / "shop.csv", good_lines(300))
    raw = yaml.safe_load(config(tmp_path).read_text())
    raw["data"]["train"] = str(tmp_path / "shop.csv")
    return raw


def test_shopmtl_train_from_a_dict_returns_the_model_with_the_commands_checks(tmp_path: Path
                                                                              ) -> None:
    import shopmtl.train.trainer  # binds the package to the name shopmtl.train: still callable
    from shopmtl.config import ConfigError
    from shopmtl.train.outdir import OutputFolderError

    assert shopmtl.train is sys.modules["shopmtl.train"] and callable(shopmtl.train)
    raw, out = _shop_config(tmp_path), tmp_path / "run"
    m = shopmtl.train(raw, out, log=lambda *_: None)
    assert (m.kind, m.tasks, m.path) == ("zoo", ("click", "conversion"), out / "model")
    assert len(m.predict([{"user_id": "u1", "item_id": "i3", "price": "2.5",
                           "scenario": "feed"}])) == 1
    assert raw["data"]["train"] == str(tmp_path / "shop.csv")  # the caller's dict is untouched
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputFolderError, match=r"is not empty .* --resume .* --overwrite"):
        shopmtl.train(raw, out, log=lambda *_: None)
    with pytest.raises(OutputFolderError, match="cannot be used together"):
        shopmtl.train(raw, out, resume=True, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    m = shopmtl.train(raw, out, overrides=["train.seed=5"], overwrite=True, log=lambda *_: None)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 5
    assert m.path == out / "model"
    assert issubclass(OutputFolderError, ConfigError)
    with pytest.raises(ConfigError, match="a YAML file's path or a dict, got int"):
        shopmtl.train(42, tmp_path / "nowhere")  # type: ignore[arg-type]
    assert not (tmp_path / "nowhere").exists()


def test_shopmtl_train_on_a_joint_config_returns_the_joint_model(tmp_path: Path) -> None:
    joint = {"sources": [{"name": "bitext", "batch_size": 16, "max_examples": 40}],
             "text": {"ngram_buckets": 1024},
             "model": {"adapter_hidden": 8, "text_dim": 8, "hidden": [8], "ngram_dim": 4},
             "train": {"steps": 4, "threads": 1, "log_every": 0}}
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(joint))
    m = shopmtl.train(path, tmp_path / "j", log=lambda *_: None)
    assert (m.kind, m.tasks, m.path) == ("joint", JOINT_TASKS, tmp_path / "j" / "joint" / "model")
    m = shopmtl.train(joint, tmp_path / "j", overwrite=True, log=lambda *_: None)
    assert m.kind == "joint"
    assert json.loads((tmp_path / "j" / "shopmtl-run.json").read_text())["command"] == "train"
