from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from pathlib import Path

import pytest

from shopmtl.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
)
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec

CONFIG = """\
data:
  train: data/train.csv
  valid: /abs/valid.parquet
  bad_rows: quarantine
  schema:
    features:
      - {name: user_id, kind: categorical, min_count: 2}
      - {name: item_id, kind: categorical, vocab: hash, buckets: 1000}
      - {name: price, kind: numeric, transform: log1p, fill: 0}
      - {name: hist, kind: sequence, vocab_from: item_id, max_len: 20}
    tasks:
      - {name: click}
      - {name: conversion, given: click}
      - {name: ad_click, scenarios: [ad]}
    scenario: {column: scenario, values: [home, search, ad]}
    group: user_id
model:
  name: shared_bottom
  args: {bottom: [64, 32], dropout: 0.1}
train:
  epochs: 2
  lr: 0.001
  alpha: {click: 1, conversion: 2.5}
  early_stopping: {metric: valid.click.all.auc, patience: 4}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    sub = tmp_path / "experiments"
    sub.mkdir()
    path = sub / "exp.yaml"
    path.write_text(CONFIG)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_load_builds_typed_dataclasses(config_file: Path) -> None:
    cfg = load_config(config_file)
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.data, DataConfig)
    assert cfg.data.bad_rows == "quarantine"
    assert cfg.data.chunk_rows == 200_000  # default kept
    feats = cfg.data.schema.features
    assert isinstance(feats, tuple) and all(isinstance(f, FeatureSpec) for f in feats)
    assert feats[1].vocab == "hash" and feats[1].buckets == 1000
    assert feats[2].fill == 0.0 and isinstance(feats[2].fill, float)
    assert cfg.data.schema.tasks[2] == TaskSpec("ad_click", scenarios=("ad",))
    assert cfg.data.schema.scenario == ScenarioSpec("scenario", ("home", "search", "ad"))
    schema = cfg.data.schema.build()
    assert isinstance(schema, Schema)
    assert schema.availability()["ad_click"] == {"home": False, "search": False, "ad": True}
    assert cfg.model.args == {"bottom": [64, 32], "dropout": 0.1}
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.001
    assert cfg.train.alpha == {"click": 1.0, "conversion": 2.5}
    assert cfg.train.early_stopping.patience == 4
    assert cfg.train.early_stopping.mode == "max"  # default kept


def test_scientific_notation_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-3 as a string; a learning rate written that way must still load."""
    path = write(
        tmp_path,
        """\
        data:
          train: t.csv
          schema: {features: [], tasks: [{name: click}]}
        train: {lr: 1e-3, embedding_weight_decay: 1.0e-6, weight_decay: 5E-4}
        """,
    )
    cfg = load_config(path, ["train.grad_clip=1e1"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.embedding_weight_decay == pytest.approx(1e-6)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    assert cfg.train.grad_clip == pytest.approx(10.0)
    # integers and strings are unaffected
    cfg = load_config(path, ["train.epochs=7", "data.split_seed=0", "model.name=1e3x"])
    assert cfg.train.epochs == 7 and cfg.model.name == "1e3x"


@pytest.mark.parametrize(
    ("override", "path_in_message", "also"),
    [
        ("train.epoch=5", "train", "'epoch'"),
        ("data.chunk_row=5", "data", "'chunk_row'"),
        ("train.early_stopping.patienc=1", "train.early_stopping", "'patienc'"),
        ("bogus=1", "the top level", "'bogus'"),
        ("data.schema.scenario.colour=red", "data.schema.scenario", "'colour'"),
    ],
)
def test_unknown_key_raises_with_dotted_path(
    config_file: Path, override: str, path_in_message: str, also: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    msg = str(info.value)
    assert msg.startswith(f"{path_in_message}: unknown key(s)")
    assert also in msg


def test_unknown_key_inside_a_list_names_the_index(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        data:
          train: t.csv
          schema:
            features: [{name: a, kind: numeric}, {name: b, kind: numeric, colour: red}]
            tasks: [{name: click}]
        """,
    )
    with pytest.raises(
        ConfigError, match=r"^data\.schema\.features\[1\]: unknown"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        ("train.epochs=five", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("data.streaming=1", "data.streaming"),
        ("data.valid=5", "data.valid"),
        ("data.bad_rows=drop", "data.bad_rows"),
        ("train.optimizer=sgd", "train.optimizer"),
        ("train.alpha.click=high", "train.alpha.click"),
        ("train.early_stopping=3", "train.early_stopping"),
        ("data.schema.scenario.values=ad", "data.schema.scenario.values"),
        (
            "data.schema.tasks=[{name: c, type: ordinal}]",
            "data.schema.tasks[0].type",
        ),
    ],
)
def test_wrong_type_raises_with_dotted_path(config_file: Path, override: str, dotted: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    assert str(info.value).startswith(f"{dotted}: ")


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {schema: {features: [], tasks: [{name: click}]}}\n")
    with pytest.raises(ConfigError, match=r"data: give `train` and `schema`"):
        load_config(path)
    nested = write(tmp_path, "data: {schema: {features: []}, train: x.csv}\n")
    with pytest.raises(ConfigError, match=r"data\.schema: missing required key 'tasks'"):
        load_config(nested)


def test_overrides_apply(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        ["train.epochs=5", "data.streaming=true", "model.args.bottom=[8]", "train.seed=3"],
    )
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.data.streaming is True
    assert cfg.model.args == {"bottom": [8], "dropout": 0.1}
    assert cfg.train.seed == 3
    assert cfg.train.lr == 0.001  # untouched


def test_overrides_do_not_mutate_the_input() -> None:
    raw = {"train": {"epochs": 1}}
    out = apply_overrides(raw, ["train.epochs=5", "model.name=mmoe"])
    assert out == {"train": {"epochs": 5}, "model": {"name": "mmoe"}}
    assert raw == {"train": {"epochs": 1}}


@pytest.mark.parametrize("override", ["train.epochs", "train.epochs.x=1"])
def test_malformed_override_raises(config_file: Path, override: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load_config(config_file, [override])


def test_relative_data_paths_resolve_against_the_config_file(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config_file)
    assert cfg.data.train == str(config_file.parent.resolve() / "data" / "train.csv")
    assert cfg.data.valid == "/abs/valid.parquet"  # absolute: untouched
    assert cfg.data.test is None
    cfg = load_config(config_file, ["data.test=../held/test.csv"])
    assert cfg.data.test == str((tmp_path / "held" / "test.csv").resolve())


def test_dump_and_reload_round_trip(config_file: Path, tmp_path: Path) -> None:
    cfg = load_config(config_file)
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("data: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_from_dict_names_the_class_at_the_root() -> None:
    with pytest.raises(ConfigError, match=r"^FeatureSpec: unknown key\(s\) \['x'\]"):
        from_dict(FeatureSpec, {"name": "a", "kind": "numeric", "x": 1})
    assert from_dict(FeatureSpec, {"name": "a", "kind": "numeric"}) == FeatureSpec("a", "numeric")


def test_yaml_reads_the_task_type_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        data:
          train: t.csv
          schema:
            features: [{name: user_id, kind: categorical}]
            tasks:
              - {name: click, loss: focal, pos_weight: 3}
              - {name: kind, type: multiclass, n_classes: 4}
              - {name: sales, type: quantile, quantiles: [0.1, 0.5, 0.9]}
              - {name: rank, type: ranking, loss: pairwise, k: 5}
            group: user_id
        """,
    )
    cfg = load_config(path)
    click, kind, sales, rank = cfg.data.schema.tasks
    assert (click.loss, click.pos_weight) == ("focal", 3.0)
    assert kind.n_classes == 4 and kind.resolved_loss == "cross_entropy"
    assert sales.quantiles == (0.1, 0.5, 0.9)
    assert (rank.loss, rank.k) == ("pairwise", 5)
    cfg.data.schema.build()
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    ("task", "match"),
    [
        ("{name: sales, type: quantile}", r"tasks\[0\].*quantiles: \[0\.1, 0\.5, 0\.9\]"),
        ("{name: kind, type: multiclass}", r"tasks\[0\].*'kind'.*n_classes >= 2"),
        ("{name: rank, type: ranking, loss: hinge}", r"tasks\[0\]\.loss.*'hinge'"),
        ("{name: sales, type: quantile, quantiles: 0.5}", r"tasks\[0\]\.quantiles.*list"),
    ],
)
def test_yaml_task_type_errors_name_the_task(tmp_path: Path, task: str, match: str) -> None:
    text = (
        "data:\n  train: t.csv\n  schema:\n    features: [{name: u, kind: categorical}]\n"
        f"    tasks: [{task}]\n"
    )
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_regression_task_saved_with_the_old_default_loss_still_loads() -> None:
    # configs and checkpoints written before `loss` became optional hold loss 'bce' everywhere
    t = from_dict(TaskSpec, {"name": "dwell", "type": "regression", "loss": "bce"})
    assert t == TaskSpec("dwell", type="regression") and t.resolved_loss == "mse"


# what a user's process must keep through ``import shopmtl`` and its use: variables the old
# code set (Arrow's pool at import; the hub's offline switches at an encoder load)
_CHOSEN_ELSEWHERE = ("ARROW_DEFAULT_MEMORY_POOL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                     "HF_HUB_DISABLE_PROGRESS_BARS")


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in _CHOSEN_ELSEWHERE}


_PROCESS_STATE = """
import json, os, sys
from pathlib import Path
import matplotlib

def state():
    # the backend as set, unresolved (reading rcParams["backend"] would pick one)
    return {"env": dict(os.environ),
            "backend": repr(dict.__getitem__(matplotlib.rcParams, "backend")),
            "pyplot": "matplotlib.pyplot" in sys.modules}

before = state()
import shopmtl, shopmtl.modeldir, shopmtl.cli, shopmtl.api, shopmtl.run, shopmtl.checks
import shopmtl.compare, shopmtl.report, shopmtl.predict, shopmtl.joint.report
import shopmtl.joint.train, shopmtl.data.text, shopmtl.train.trainer
imported = state()

# and used: a report's curves drawn, the text encoder loaded
from transformers.utils import logging as hf
hf.set_verbosity_info()  # the user's choice
from shopmtl.report import plot_curves
hist = [{"epoch": e, "valid_auc": {"click": 0.6}, "train_loss": {"click": 0.5}} for e in (1, 2)]
plot_curves({"multi_task": hist}, Path(sys.argv[1]))
from shopmtl.data.text import load_encoder
load_encoder("minilm")
used = state()
print(json.dumps({"before": before, "imported": imported, "used": used,
                  "verbosity": hf.get_verbosity(), "bars": hf.is_progress_bar_enabled()}))
"""


def test_importing_and_using_shopmtl_changes_no_process_state(tmp_path) -> None:
    import json
    import subprocess
    import sys

    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-c", _PROCESS_STATE, str(png)], env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["imported"] == got["before"]  # not one variable, no backend, no pyplot
    # in use: torch itself sets a variable or two as transformers loads a model
    # (TORCHINDUCTOR_CACHE_DIR); none of shopmtl's old ones, no backend chosen, no pyplot
    assert not set(_CHOSEN_ELSEWHERE) & set(got["used"].pop("env"))
    assert got["used"] == {k: v for k, v in got["before"].items() if k != "env"}
    assert got["verbosity"] == 20 and got["bars"]  # transformers: INFO, bars on, as set
    assert png.stat().st_size > 10_000  # the curves were drawn all the same


_POOL = """
import sys
from shopmtl.cli import app
sys.argv = ["shopmtl", "models"]
try:
    app()
except SystemExit:
    pass
import pyarrow as pa
print(pa.default_memory_pool().backend_name)
"""


def test_the_cli_picks_jemalloc_for_arrow_unless_the_user_chose() -> None:
    import subprocess
    import sys

    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", _POOL], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == "jemalloc"
    chosen = subprocess.run([sys.executable, "-c", _POOL],
                            env={**env, "ARROW_DEFAULT_MEMORY_POOL": "system"},
                            capture_output=True, text=True, check=True).stdout.split()
    assert chosen[-1] == "system"


# -- names checked at load, before any data is read --------------------------------------------

SYNTHETIC = "data: {synthetic: {rows: 1000}}\n"


@pytest.mark.parametrize(("override", "message"), [
    ("train.alpha={clik: 2}",
     "train.alpha: unknown task 'clik'; tasks: click, conversion, ad_click"),
    ("train.alpha={clik: 2, conv: 1}",
     "train.alpha: unknown tasks 'clik', 'conv'; tasks: click, conversion, ad_click"),
    ("train.early_stopping.metric=valid.clik.all.auc",
     "train.early_stopping.metric: 'valid.clik.all.auc' names unknown task 'clik'; tasks: "
     "click, conversion, ad_click"),
    ("weighting.name=upgrd", "weighting.name: unknown weighting 'upgrd'; valid: equal, static"),
    ("weighting={name: dwa, args: {temprature: 2}}", "weighting.args: unknown key(s)"),
    ("weighting={name: static, args: {alpha: {clik: 2}}}",
     "weighting.args.alpha: unknown task 'clik'"),
])
def test_unknown_names_are_refused_at_load_in_one_line(
    config_file: Path, tmp_path: Path, override: str, message: str
) -> None:
    """Against the schema of the config (the file in data.train does not even exist), and
    against the synthetic world's tasks (``checks.load_experiment``: ``config.load_config``
    and the weighting registry)."""
    from shopmtl.checks import load_experiment

    for path in (config_file, write(tmp_path, SYNTHETIC)):
        with pytest.raises(ConfigError) as info:
            load_experiment(path, [override])
        assert str(info.value).startswith(message)
        assert "\n" not in str(info.value)


def test_known_names_load(config_file: Path, tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SYNTHETIC), [
        "train.alpha={click: 1, ad_click: 0.1}",
        "train.early_stopping.metric=valid.ad_click.ad_slot.auc",
        "weighting={name: static, args: {alpha: {conversion: 2}}}"])
    assert cfg.weighting.name == "static"
    assert load_config(config_file, ["weighting.name=upgrad"]).weighting.name == "upgrad"
    # the schema's own tasks: a task the schema lacks is unknown
    with pytest.raises(ConfigError, match=r"unknown task 'conversion'; tasks: click$"):
        load_config(config_file, ["data.schema.tasks=[{name: click}]"])


def test_a_dataclass_check_becomes_a_config_error_naming_the_section(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"^train\.lr_base_batch: must be >= 1, got 0$"):
        load_config(config_file, ["train.lr_base_batch=0"])
    # a check across keys names the section
    with pytest.raises(ConfigError, match=r"^data: valid_fraction \+ test_fraction must be < 1"):
        load_config(config_file, ["data.valid_fraction=0.6", "data.test_fraction=0.4"])
    # the schema's own checks run at load too, not once training starts
    with pytest.raises(ConfigError, match=r"^data\.schema: task 'conversion' is given 'buy'"):
        load_config(config_file, ["data.schema.tasks=[{name: click}, {name: conversion, "
                                  "given: buy}]", "train.alpha={}"])


# -- every numeric key is checked against its declared range, at load ---------------------------

def _outside(f, tp) -> object:
    """A value just outside field ``f``'s range, of its type (an item of a list, a mapping's
    value for ``click``)."""
    from shopmtl.keys import range_of

    rng = range_of(f)
    if rng.lo is not None:
        bad = rng.lo if rng.lo_open else rng.lo - 1
    else:
        bad = rng.hi if rng.hi_open else rng.hi + 1
    inner = _strip_optional(tp)
    origin = typing.get_origin(inner)
    if origin is tuple:
        item = typing.get_args(inner)[0]
        return [int(bad) if item is int else float(bad)]
    if origin is dict:
        return {"click": float(bad)}
    return int(bad) if inner is int else float(bad)


def _strip_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _ranged_keys() -> list[tuple[str, object]]:
    from shopmtl.config import EarlyStopping, TrainConfig
    from shopmtl.keys import range_of

    out = []
    for cls, prefix in ((DataConfig, "data"), (TrainConfig, "train"),
                        (EarlyStopping, "train.early_stopping")):
        hints = typing.get_type_hints(cls)
        out += [(f"{prefix}.{f.name}", _outside(f, hints[f.name]))
                for f in dataclasses.fields(cls) if range_of(f) is not None]
    return out


@pytest.mark.parametrize(("key", "bad"), _ranged_keys(), ids=[k for k, _ in _ranged_keys()])
def test_a_value_outside_its_range_is_refused_naming_the_key(config_file: Path, key: str,
                                                            bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [f"{key}={json.dumps(bad)}"])
    msg = str(info.value)
    assert msg.startswith(key) and ": must be " in msg and "\n" not in msg, msg


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_non_finite_number_is_refused(config_file: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0, got (nan|inf|-inf)$"):
        load_config(config_file, [f"train.lr={value}"])


def test_a_config_built_in_python_is_held_to_the_same_ranges() -> None:
    from shopmtl.config import TrainConfig

    with pytest.raises(ValueError, match=r"^batch_size: must be >= 1, got -5$"):
        TrainConfig(batch_size=-5)


@pytest.mark.parametrize(("metric", "problem"), [
    ("valid.click.auc", "is not a validation metric"),
    ("click.all.auc", "is not a validation metric"),
    ("valid.all_tasks.all.auc", "is not a validation metric"),
    ("valid.click.moon.auc", "names unknown scenario 'moon'; scenarios: home, search, ad, all"),
])
def test_a_malformed_early_stopping_metric_stops_at_load(config_file: Path, metric: str,
                                                         problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [f"train.early_stopping.metric={metric}"])
    assert str(info.value).startswith(f"train.early_stopping.metric: {metric!r} {problem}")
