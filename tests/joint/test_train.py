"""The heterogeneous joint run end to end on small slices of every source: every task trained
and scored, the checkpoint answers any task through `shopmtl predict --task`, the shared text
adapter learns from every source, the LoRA path trains, bad configs and inputs fail clearly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from shopmtl.config import ConfigError
from shopmtl.joint.checkpoint import load_joint_dir
from shopmtl.joint.config import JointConfig, SourceConfig, TextConfig, load_joint_config
from shopmtl.joint.parts import SourcePart, load_parts, text_width
from shopmtl.joint.train import build_joint_model, train_joint
from tests.helpers import cli

# examples/joint_tiny.yaml: every source on a small slice (tests/joint/conftest.py trains it)
SMALL = yaml.safe_load((Path(__file__).parents[2] / "examples" / "joint_tiny.yaml").read_text())
TASKS = {"click": "rec", "conversion": "rec", "ad_click": "rec", "relevance": "search",
         "intent": "bitext", "category": "bitext", "rating": "reviews", "recommend": "reviews",
         "demand_1d": "retail", "demand_7d": "retail"}


def test_every_task_is_trained_and_scored(run: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    joint = m["joint"]
    assert joint["sources"] == ["rec", "search", "bitext", "reviews", "retail"]
    assert set(joint["tasks"]) == set(TASKS)
    # round-robin: 60 steps, 12 per source
    assert joint["steps_per_source"] == dict.fromkeys(joint["sources"], 12)
    for task, src in TASKS.items():
        cell = joint["test"][src][task]
        assert all(v is None or np.isfinite(v) for v in cell.values() if not isinstance(v, dict))
    assert 0.0 <= joint["test"]["bitext"]["intent"]["accuracy"] <= 1.0
    assert 0.0 < joint["test"]["search"]["relevance"]["ndcg@10"] <= 1.0
    assert joint["test"]["retail"]["demand_1d"]["wape"] > 0.0
    assert "home_feed" in joint["test"]["rec"]["click"]["by_scenario"]
    # the last stage (train.solve_heads) ran on the table heads' solvable tasks, and what the
    # run reports on validation is the kept layer's score
    assert {s: set(r) for s, r in joint["solve"].items()} == {
        "bitext": {"intent", "category"}, "reviews": {"rating", "recommend"}}
    for src, tasks in joint["solve"].items():
        for task, r in tasks.items():
            key = {"intent": "accuracy", "category": "accuracy", "rating": "rmse",
                   "recommend": "auc"}[task]
            want = r["valid_trained"] if r["kept"] == "trained" else r["valid"][r["kept"]]
            assert joint["valid"][src][task][key] == pytest.approx(abs(want), abs=1e-5)
    # the comparison: each source alone for its own steps, each baseline, one row per task
    assert set(m["alone"]) == set(joint["sources"])
    assert m["alone"]["bitext"]["steps"] == 12
    rows = {r["task"]: r for r in m["table"]}
    assert set(rows) == set(TASKS)
    assert rows["intent"]["baseline"] > 0.5  # TF-IDF + logistic regression on 150 utterances
    assert rows["click"]["baseline_kind"] == "ID-only model"
    assert rows["click"]["baseline"] is not None  # the ID-only rec model was trained
    r = rows["demand_1d"]  # lower is better: the gain is alone - joint
    assert r["joint_minus_alone"] == pytest.approx(r["alone"] - r["joint"])
    report = (run / "report.md").read_text()
    assert report.count("\n| ") == len(TASKS) + 1  # header + one row per task
    # TensorBoard scalars, as for a one-table run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "joint" / "tb"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert "valid/score" in tags and {f"valid/{t}" for t in TASKS} <= tags


def test_checkpoint_answers_a_text_task(run: Path, tmp_path: Path) -> None:
    """predict --task intent from the saved directory reproduces the test accuracy, with the
    training data's labels."""
    from shopmtl.data.sources.bitext import BitextSource

    data = BitextSource().load().sample(150)
    names = data.meta["classes"]["intent"]
    inputs = tmp_path / "utterances.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in data.test.text))
    out = tmp_path / "pred.jsonl"
    cli("predict", str(run / "joint" / "model"), str(inputs), "--out", str(out),
        "--task", "intent", "--all-classes", check=True)
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == len(data.test.text)
    probs = np.array([[p[f"intent_p_{n}"] for n in names] for p in preds])
    assert probs.shape == (150, 27)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    acc = float((probs.argmax(1) == data.test.labels["intent"]).mean())
    m = json.loads((run / "metrics.json").read_text())
    assert acc == pytest.approx(m["joint"]["test"]["bitext"]["intent"]["accuracy"], abs=1e-9)
    assert all(p["intent"] == names[int(np.argmax(q))] for p, q in zip(preds, probs, strict=True))


def test_checkpoint_answers_rec_and_search_tasks(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "click.csv"
    test_file = run / "rec" / "data" / "test.parquet"
    cli("predict", str(run / "joint" / "model"), str(test_file), "--out", str(out),
        "--task", "click", check=True)
    rows = list(csv.DictReader(out.open()))
    assert rows and all(0.0 < float(r["click"]) < 1.0 for r in rows)
    lists = tmp_path / "queries.jsonl"
    cands = [{"item_id": "1", "title": "red shoe"}, {"item_id": "2", "title": "blue lamp"},
             {"item_id": "999999", "title": "running sneaker"}]  # an unknown item id too
    lists.write_text(json.dumps({"query": "red running shoes", "candidates": cands}) + "\n"
                     + json.dumps({"query": "lamp", "candidates": cands[:2]}) + "\n")
    out = tmp_path / "rank.csv"
    cli("predict", str(run / "joint" / "model"), str(lists), "--out", str(out),
        "--task", "relevance", check=True)
    ranked = list(csv.DictReader(out.open()))  # one row per candidate, best first per request
    assert [(r["line"], r["rank"]) for r in ranked] == [
        ("1", "1"), ("1", "2"), ("1", "3"), ("2", "1"), ("2", "2")]
    assert sorted(r["item_id"] for r in ranked[:3]) == ["1", "2", "999999"]
    for lst in (ranked[:3], ranked[3:]):
        scores = [float(r["score"]) for r in lst]
        assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


def test_predict_errors_name_the_line_and_the_task(run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "where is my order"}) + "\n" + json.dumps({"txt": 1})
                   + "\n")
    proc = cli("predict", str(run / "joint" / "model"), str(bad), "--task", "intent",
               "--out", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 1  # bad data: a runtime error
    assert ("bad row: bad.jsonl: line 2: unknown field(s) ['txt']; the fields are ['text'] "
            "(1 bad row in all)") in proc.stderr
    proc = cli("predict", str(run / "joint" / "model"), str(bad), "--task", "nope",
               "--out", str(tmp_path / "p.jsonl"))
    # a --task the model lacks, or none for a joint model: usage errors
    assert proc.returncode == 2 and "intent" in proc.stderr and "demand_7d" in proc.stderr
    proc = cli("predict", str(run / "joint" / "model"), str(bad),
               "--out", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 2 and "one task at a time" in proc.stderr


def test_corrupt_checkpoint_is_refused(run: Path, tmp_path: Path) -> None:
    import shutil

    from shopmtl.train.checkpoint import CheckpointError

    copy = tmp_path / "model"
    shutil.copytree(run / "joint" / "model", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError):
        load_joint_dir(copy)


def test_shared_adapter_learns_from_every_source(small_cfg: Path, tmp_path: Path) -> None:
    """One step of each source gives the shared text adapter a gradient (the rec source
    through its item-title field), and the adapter is stored once in the state dict."""
    from shopmtl.joint.parts import text_bank

    cfg = load_joint_config(small_cfg)
    parts, texts, _ = load_parts(cfg, tmp_path, log=lambda *_: None)
    bank = text_bank(cfg, texts.texts)
    model = build_joint_model(cfg, parts, bank.bank.shape[1])
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    first = model.text.vec_in.weight
    for p in parts:
        model.zero_grad(set_to_none=True)
        losses = p.losses(model, next(p.batches(0, 0)))
        sum(v for k, v in losses.items() if not k.startswith("_")).backward()
        assert first.grad is not None and first.grad.abs().sum() > 0, p.name
    keys = [k for k in model.state_dict() if k.endswith("vec_in.weight")]
    assert keys == ["text.vec_in.weight"]


def test_joint_training_learns_the_text_tasks(small_cfg: Path, tmp_path: Path
                                                        ) -> None:
    cfg = load_joint_config(small_cfg)
    parts, texts, _ = load_parts(cfg, tmp_path, log=lambda *_: None)
    logs: list[str] = []
    # round robin over the two text sources: 150 steps each, ~30 epochs of their 150 examples
    train_joint(cfg, tmp_path / "run", log=logs.append, save=False, shared=(parts, texts),
                only=("bitext", "reviews"), steps=300)
    # held-out check: the trained intent head is far better than chance (1/27)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test"]["bitext"]["intent"]["accuracy"] > 0.2
    assert m["test"]["reviews"]["recommend"]["auc"] > 0.6


def test_lora_path_trains_on_a_small_slice(tmp_path: Path) -> None:
    cfg = JointConfig(sources=(SourceConfig("bitext", batch_size=8, max_examples=24),),
                      text=TextConfig(mode="lora", max_tokens=16))
    cfg = load_joint_config_from(cfg, tmp_path, ["train.steps=6", "train.lr=0.01"])
    parts, texts, _ = load_parts(cfg, tmp_path, log=lambda *_: None)
    from shopmtl.joint.parts import text_bank

    bank = text_bank(cfg, texts.texts)
    assert bank.mask is not None and bank.bank.shape == (len(texts.texts), 16)
    model = build_joint_model(cfg, parts, text_width(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or
              "base_layer" in k}
    assert any("lora_" in k for k in before) and any("base_layer" in k for k in before)
    m = train_joint(cfg, tmp_path / "run", log=lambda *_: None, shared=(parts, texts))
    assert np.isfinite(m["test"]["bitext"]["intent"]["logloss"])
    loaded, _, _ = load_joint_dir(tmp_path / "run" / "model")
    after = loaded.state_dict()
    lora_changed = [k for k in before if "lora_" in k and not torch.equal(before[k], after[k])]
    base_changed = [k for k in before if "base_layer" in k and not torch.equal(before[k],
                                                                               after[k])]
    assert lora_changed and not base_changed


def load_joint_config_from(cfg: JointConfig, tmp: Path, sets: list[str]) -> JointConfig:
    from shopmtl.config import to_dict

    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return load_joint_config(path, sets)


@pytest.mark.parametrize(("raw", "msg"), [
    ({"sources": []}, "at least one source"),
    ({"sources": [{"name": "bitext"}, {"name": "bitext"}]}, "duplicated"),
    ({"sources": [{"name": "bitext", "batch_size": 0}]}, "batch_size"),
    ({"sources": [{"name": "bitext"}], "sampling": {"method": "sqrt"}}, "sampling.method"),
    ({"sources": [{"name": "bitext"}], "train": {"stepz": 3}}, "unknown key"),
    ({"sources": [{"name": "bitext"}], "train": {"refit_steps": -1}}, "refit_steps"),
    ({"sources": [{"name": "bitext"}], "train": {"refit_lr": 0}}, "refit_lr"),
])
def test_bad_config_names_the_key(raw: dict, msg: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=msg):
        load_joint_config(path)


def test_unknown_source_and_alpha_task_are_refused(tmp_path: Path) -> None:
    """At load (tests/joint/test_config.py), and again once the sources are loaded, for a
    config built in Python (or a user's source that does not declare its task_names)."""
    from shopmtl.joint.config import JointTrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "tiktok"}]}))
    from shopmtl.checks import load_joint

    with pytest.raises(ConfigError, match=r"unknown source 'tiktok'; known: .*bitext"):
        load_joint(path)
    with pytest.raises(ConfigError, match=r"unknown source 'tiktok'; known: .*bitext"):
        load_parts(JointConfig((SourceConfig("tiktok"),)), tmp_path)
    cfg = JointConfig((SourceConfig("bitext", max_examples=20),),
                      train=JointTrainConfig(steps=1, alpha={"clicks": 2.0}))
    with pytest.raises(ConfigError, match=r"train\.alpha: unknown task 'clicks'; tasks: intent"):
        train_joint(cfg, tmp_path / "o", log=lambda *_: None)


def test_source_part_rejects_missing_labels(tmp_path: Path) -> None:
    import dataclasses

    from shopmtl.data.sources.bitext import BitextSource
    from shopmtl.joint.parts import TextIndex

    src = BitextSource()
    data = src.load().sample(10)
    broken = dataclasses.replace(data, valid=dataclasses.replace(
        data.valid, labels={"intent": data.valid.labels["intent"]}))
    with pytest.raises(ValueError, match="split 'valid': no labels for \\['category'\\]"):
        SourcePart(SourceConfig("bitext"), src, broken, TextIndex(), 0)


def _tickets(path: Path, n: int = 240) -> Path:
    """Support tickets whose priority and resolution time follow from their wording."""
    rng = np.random.default_rng(0)
    words = {"low": "a small question about the newsletter",
             "normal": "my parcel is late, please check the delivery",
             "urgent": "payment taken twice, refund now, account locked"}
    hours = {"low": 48.0, "normal": 12.0, "urgent": 2.0}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["message", "priority", "hours"])
        for i in range(n):
            p = ("low", "normal", "urgent")[i % 3]
            w.writerow([f"ticket {i}: {words[p]}", p, f"{hours[p] * rng.uniform(0.8, 1.2):.1f}"])
    return path


def test_own_source_from_the_docs_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """docs/JOINT.md's example: a user's own task and data through `cls`, beside a built-in
    source, beats its baseline."""
    import os

    own = str(Path(__file__).parents[2] / "examples" / "own_source")  # beside any given path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [own, os.environ.get(
        "PYTHONPATH")])))
    data = _tickets(tmp_path / "tickets.csv")
    cfg = tmp_path / "joint.yaml"
    cfg.write_text(yaml.safe_dump({
        "sources": [{"name": "tickets", "cls": "ticket_source:TicketSource",
                     "args": {"path": str(data)}, "batch_size": 32},
                    {"name": "bitext", "max_examples": 100, "batch_size": 32}],
        "model": {"adapter_hidden": 32, "text_dim": 16, "hidden": [16]},
        "sampling": {"method": "round_robin"},
        "train": {"steps": 200, "lr": 0.005, "threads": 1, "log_every": 0},
    }))
    out = tmp_path / "run"
    cli("train", str(cfg), "--out", str(out), check=True)
    table = {r["task"]: r for r in json.loads((out / "metrics.json").read_text())["table"]}
    assert table["priority"]["joint"] > 0.9 and table["priority"]["baseline"] < 0.5
    assert table["hours"]["joint_beats_baseline"] is True
    # its tasks answer raw requests through its contract: labels, hours in range
    asks = tmp_path / "asks.jsonl"
    asks.write_text(json.dumps({"message": "payment taken twice, refund now, account locked"})
                    + "\n" + json.dumps({"message": "a small question about the newsletter"})
                    + "\n")
    cli("predict", str(out / "joint" / "model"), str(asks), "--task", "priority", "--out",
        str(tmp_path / "p.csv"), check=True)
    assert [r["priority"] for r in csv.DictReader((tmp_path / "p.csv").open())] == [
        "urgent", "low"]
    cli("predict", str(out / "joint" / "model"), str(asks), "--task", "hours", "--out",
        str(tmp_path / "h.csv"), check=True)
    hours = [float(r["hours"]) for r in csv.DictReader((tmp_path / "h.csv").open())]
    assert 1.6 <= hours[0] < 12.0 < hours[1] <= 57.6  # urgent ~2 h, low ~48 h, in range
    # a bad row of the user's file: a clear error with the line, nothing silently dropped
    data.write_text(data.read_text().replace(",urgent,", ",panic,", 1))
    proc = cli("train", str(cfg), "--out", str(tmp_path / "bad"))
    assert proc.returncode == 1 and "tickets.csv line" in proc.stderr
    assert "priority must be one of" in proc.stderr


def test_refit_keeps_the_shared_parts_and_each_heads_best_step(small_cfg: Path,
                                                                tmp_path: Path) -> None:
    """Stage two: the shared adapter does not move, every head does, each head ends at the
    step whose validation score it reports, and the adapter is trainable again afterwards."""
    from shopmtl.joint.parts import text_bank
    from shopmtl.joint.train import refit_heads
    from shopmtl.train.select import primary as _summary
    from shopmtl.train.select import valid_score

    cfg = load_joint_config(small_cfg, ["train.refit_steps=40", "train.refit_eval_every=10",
                                        "train.refit_patience=4", "train.refit_lr=0.01"])
    parts, texts, _ = load_parts(cfg, tmp_path, log=lambda *_: None)
    parts = [p for p in parts if p.name in ("bitext", "reviews", "rec")]
    bank = text_bank(cfg, texts.texts)
    torch.manual_seed(0)
    model = build_joint_model(cfg, parts, bank.bank.shape[1])
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    types = {t.name: t.type for p in parts for t in p.tasks}
    first = {p.name: _summary({p.name: p.evaluate(model, "valid")}, types) for p in parts}
    text0 = {k: v.clone() for k, v in model.text.state_dict().items()}
    heads0 = {k: v.clone() for k, v in model.heads.state_dict().items()}
    logs: list[str] = []
    info = refit_heads(model, parts, cfg, types, logs.append)
    assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in text0.items())
    assert all(p.requires_grad for p in model.text.parameters())
    assert set(info) == {"rec", "bitext", "reviews"} and len(logs) == 3
    for p in parts:
        r = info[p.name]
        assert r["best_step"] in range(0, r["steps"] + 1, 10)
        now = _summary({p.name: p.evaluate(model, "valid")}, types)
        gain = valid_score(now, first[p.name], types)
        assert gain == pytest.approx(r["valid_gain"], abs=1e-9), p.name
    # 40 steps on 150 utterances: the intent head got better than where it started
    assert info["bitext"]["best_step"] > 0 and info["bitext"]["valid_gain"] > 0
    changed = [k for k, v in heads0.items() if not torch.equal(v, model.heads.state_dict()[k])]
    assert any(k.startswith("bitext.") for k in changed)


def test_search_shares_the_rec_models_item_rows(small_cfg: Path, tmp_path: Path) -> None:
    """model.share_ids {item: item_id}: search's item i (world item i - 1) reads the rec
    table's row of that item, a search loss trains that row, the table is stored once, and a
    saved model scores the same lists the same."""
    import dataclasses

    import pyarrow as pa

    from shopmtl.joint.checkpoint import save_joint_dir
    from shopmtl.joint.parts import RecPart, text_bank
    from shopmtl.joint.train import refit_heads

    cfg = load_joint_config(small_cfg)
    parts, texts, _ = load_parts(cfg, tmp_path, log=lambda *_: None)
    parts = [p for p in parts if p.name in ("rec", "search")]
    rec_part, search = parts
    assert isinstance(rec_part, RecPart) and isinstance(search, SourcePart)
    bank = text_bank(cfg, texts.texts)
    logs: list[str] = []
    torch.manual_seed(0)
    model = build_joint_model(cfg, parts, bank.bank.shape[1], logs.append)
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    head = model.heads["search"]
    assert head.shared == ("item",)
    rows = head.shared_rows_item
    n_items = search.data.id_sizes["item"] - 1
    cats = [f.name for f in rec_part.schema.of_kind("categorical")]
    offset = int(model.rec.embed.cat_offsets[cats.index("item_id")])
    idx = rec_part.data.encoders.categorical["item_id"].transform(
        pa.array([str(w) for w in range(n_items)], pa.string()))
    assert rows[0] == -1
    np.testing.assert_array_equal(rows[1:].numpy(), np.where(idx > 0, idx + offset, -1))
    assert int((rows >= 0).sum()) > n_items // 2  # most items were seen by the rec model
    assert any("shares the rec model's 'item_id' rows" in line for line in logs)
    # a search batch trains exactly the rec rows of its candidates (and no other rec row)
    b = next(search.batches(0, 0))
    model.zero_grad(set_to_none=True)
    search.losses(model, b)["relevance"].backward()
    grad = model.rec.embed.table.weight.grad
    touched = set((grad.abs().sum(1) > 0).nonzero().flatten().tolist())
    want = {int(r) for r in rows[b.cand_ids["item"]].flatten() if r >= 0}
    assert touched == want and want
    keys = [k for k in model.state_dict() if k.endswith("embed.table.weight")]
    assert keys == ["rec.embed.table.weight"]
    # the saved model scores the same lists the same
    save_joint_dir(tmp_path / "model", model, cfg, parts)
    loaded, _, _ = load_joint_dir(tmp_path / "model")
    loaded.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(search.logits(loaded, b)["relevance"],
                                   search.logits(model, b)["relevance"])
    # refitting search alone leaves the rec model (and its rows) as they were
    rec0 = {k: v.clone() for k, v in model.rec.state_dict().items()}
    types = {t.name: t.type for p in parts for t in p.tasks}
    fit = load_joint_config(small_cfg, ["train.refit_steps=20", "train.refit_eval_every=10"])
    refit_heads(model, [search], fit, types, lambda *_: None)
    assert all(torch.equal(v, model.rec.state_dict()[k]) for k, v in rec0.items())
    assert all(p.requires_grad for p in model.parameters())
    # without a rec source (a source trained alone) the ids are the head's own
    alone = build_joint_model(cfg, [search], bank.bank.shape[1], lambda *_: None)
    assert alone.heads["search"].shared == ()
    # an unknown rec feature, and a source whose ids have no keys, are refused by name
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                             share_ids={"item": "nope"}))
    with pytest.raises(ConfigError, match="no categorical feature 'nope'"):
        build_joint_model(bad, parts, bank.bank.shape[1], lambda *_: None)
    search.data = dataclasses.replace(search.data, id_keys={})
    with pytest.raises(ConfigError, match="no id_keys"):
        build_joint_model(cfg, parts, bank.bank.shape[1], lambda *_: None)


@pytest.mark.parametrize("weighting", ["static", "uncertainty", "dwa", "rlw"])
def test_loss_weightings_train_a_joint_run(small_cfg: Path, tmp_path: Path, weighting: str
                                           ) -> None:
    """Every loss weighting runs a joint run through the one loop: a step weighs only the
    tasks of its source (an uncertainty log-variance moves only on its own source's steps)."""
    import dataclasses

    from shopmtl.config import WeightingConfig

    cfg = load_joint_config(small_cfg, ["train.eval_every=10", "train.solve_heads=false"])
    args = {"alpha": {"intent": 2.0}} if weighting == "static" else {}
    cfg = dataclasses.replace(cfg, weighting=WeightingConfig(weighting, args))
    parts, texts, _ = load_parts(cfg, tmp_path, log=lambda *_: None)
    m = train_joint(cfg, tmp_path / "run", log=lambda *_: None, save=False,
                    shared=(parts, texts), only=("bitext", "reviews"), steps=40)
    assert m["steps_per_source"] == {"bitext": 20, "reviews": 20}
    assert len(m["valid_history"]) == 4
    for src in ("bitext", "reviews"):
        for cell in m["test"][src].values():
            assert all(v is None or np.isfinite(v) for v in cell.values()
                       if isinstance(v, float))


def test_training_leaves_the_processes_float_state_as_it_found_it(run: Path) -> None:
    """Training flushes subnormal floats (speed); the process-wide FPU flag is restored after,
    so a caller's own numerics (and hypothesis, which refuses to run under it) are unchanged."""
    from shopmtl.joint.train import _denormals_flushed, flushed_denormals

    assert (run / "metrics.json").is_file()  # the session's joint run has trained
    assert not _denormals_flushed()
    with flushed_denormals():
        assert _denormals_flushed()
        with flushed_denormals():
            assert _denormals_flushed()
        assert _denormals_flushed()  # an inner scope restores the outer one's setting
    assert not _denormals_flushed()
    tiny = np.finfo(np.float64).tiny
    assert tiny / 2 > 0  # subnormals exist again
