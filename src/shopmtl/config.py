"""Experiment configuration: frozen dataclasses per concern, loaded strictly from YAML.

Unknown keys and wrong types raise with the dotted path of the offending key (nanoGPT's two good
rules, without exec). ``a.b=value`` overrides are merged before validation.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from shopmtl.data.schema import (
    ALL,
    CONTENT_KINDS,
    DEFAULT_TEXT_ENCODER,
    FeatureSpec,
    ScenarioSpec,
    Schema,
    TaskSpec,
)
from shopmtl.keys import check_fields, key, range_problem

# the tasks of the synthetic world (``data.synthetic``): a config with ``data.synthetic`` trains
# these, known before the world is generated
SYNTHETIC_TASKS: tuple[str, ...] = ("click", "conversion", "ad_click")


class ConfigError(ValueError):
    """A configuration file, an override or a command-line option is invalid; the message
    names the key (or the option). A usage error: ``shopmtl`` exits 2."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2), not as the string '1e-3'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and its line/column (never the file's text)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


@dataclass(frozen=True)
class SchemaConfig:
    features: tuple[FeatureSpec, ...] = key(doc="the input features (data.schema.features[] "
                                                "below)")
    tasks: tuple[TaskSpec, ...] = key(doc="the prediction targets (data.schema.tasks[] below)")
    scenario: ScenarioSpec | None = key(None, "the scenario column and its values (null: one "
                                              "scenario, `all`)")
    group: str | None = key(None, "column grouping rows for GAUC (the user); a ranking task's "
                                  "lists")
    slices: tuple[str, ...] = key((), "0/1 columns: test metrics also on the rows where each "
                                      "is 1")

    def build(self) -> Schema:
        return Schema(self.features, self.tasks, self.scenario, self.group, slices=self.slices)


@dataclass(frozen=True)
class DataConfig:
    # either files + a schema, or `synthetic`: WorldConfig fields (e.g. {rows: 500000,
    # scenario_shift: 1.0}); the world is generated into OUT/data and its schema is used
    schema: SchemaConfig | None = key(None, "what the files hold (with `train`)")
    train: str | None = key(None, "training file, CSV (.csv, .csv.gz) or Parquet, relative to "
                                  "the config")
    synthetic: dict[str, Any] | None = key(
        None, "instead of files: a generated world (`shopmtl synth` keys, e.g. {rows: 500000})")
    # synthetic only: item content features from the world's catalog (items.parquet), keyed by
    # item_id: `title` (text, frozen MiniLM) and/or `image` (16x16 rendered images)
    content: tuple[Literal["title", "image"], ...] = key(
        (), "synthetic only: item content features from the world's catalog")
    valid: str | None = key(None, "validation file (default: `valid_fraction` of `train`)")
    test: str | None = key(None, "test file (default: `test_fraction` of `train`)")
    valid_fraction: float = key(0.1, "without `valid`: share of `train` held out for "
                                     "validation", ge=0, lt=1)
    test_fraction: float = key(0.1, "without `test`: share of `train` held out for testing",
                               ge=0, lt=1)
    split_seed: int = key(0, "seed of the random held-out fractions", ge=0)
    bad_rows: Literal["fail", "quarantine"] = key(
        "fail", "a bad row stops the run (`fail`) or is set aside in OUT/quarantine")
    max_bad_fraction: float = key(0.05, "quarantine gives up past this share of bad rows",
                                  ge=0, le=1)
    chunk_rows: int = key(200_000, "rows read (and parsed) at a time", ge=1)
    streaming: bool = key(False, "re-read the files chunk by chunk each epoch (constant "
                                 "memory)")
    shuffle_buffer_chunks: int = key(4, "streaming: chunks shuffled together", ge=1)
    # parsing and encoding a streamed chunk (or pinning a batch for a GPU) would otherwise
    # stall the step that waits for it; the batches and their order are the same either way
    prefetch: int = key(4, "batches made ahead in a background thread when the training "
                           "data is streamed or the device is a GPU (0: off)", ge=0, le=64)

    def __post_init__(self) -> None:
        # the held-out fractions come out of the same rows: together they must leave some
        # to train on (valid 0.6 + test 0.5 used to train on nothing and exit 0)
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(f"valid_fraction + test_fraction must be < 1, got "
                             f"{self.valid_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = key("shared_bottom", "the architecture (`shopmtl models`; model.args below)")
    args: dict[str, Any] = key(factory=dict, doc="the architecture's arguments (per model "
                                                 "below)")


@dataclass(frozen=True)
class EarlyStopping:
    metric: str = key("valid.all_tasks.auc", "validation metric: valid.all_tasks.METRIC or "
                                             "valid.TASK.SCENARIO.METRIC (SCENARIO all: every "
                                             "row)")
    mode: Literal["max", "min"] = key("max", "whether a larger metric is better")
    patience: int = key(2, "epochs without a better metric before stopping (0: never stop)",
                        ge=0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(3, "passes over the training data", ge=1)
    batch_size: int = key(2048, "rows a step (the global batch under torchrun)", ge=1)
    lr: float = key(2e-3, "learning rate", gt=0)
    lr_decay: float = key(1.0, "lr of epoch e is lr * lr_decay**e", gt=0)
    # "sqrt": ``lr`` is the rate at ``lr_base_batch`` rows a step, and a run at batch B trains at
    # lr * sqrt(B / lr_base_batch), the square-root rule for Adam (Hoffer et al. 2017; Malladi
    # et al. 2022): one lr then serves batch 256 and batch 2048 (at a fixed lr, batch 2048 makes
    # 8x fewer steps per epoch and under-trains in a few epochs). "none": ``lr`` as given.
    lr_scaling: Literal["none", "sqrt"] = key(
        "none", "`sqrt`: lr is the rate at lr_base_batch, scaled by sqrt(batch_size / "
                "lr_base_batch)")
    lr_base_batch: int = key(256, "the batch size `lr` is meant for under lr_scaling: sqrt",
                             ge=1)
    weight_decay: float = key(0.0, "L2 weight decay of the dense parameters", ge=0)
    embedding_weight_decay: float = key(1e-6, "L2 on the embedding rows a batch touches", ge=0)
    optimizer: Literal["adam", "adamw"] = key("adam", "the optimizer")
    # start each binary task's output bias at logit(its positive rate in the training data)
    # (regression: the label mean), so the first steps rank instead of shifting every
    # prediction from 0.5 towards the base rate (in-memory training data only)
    output_bias_prior: bool = key(True, "start each task's output bias at its base rate")
    alpha: dict[str, float] = key(factory=dict, doc="task -> loss weight (default 1)", ge=0)
    seed: int = key(0, "seed of initialisation and batch order", ge=0)
    threads: int = key(0, "torch intra-op threads (0: number of cores)", ge=0)
    checkpoint_every: int = key(0, "also checkpoint every N steps (0: each epoch only)", ge=0)
    grad_clip: float = key(0.0, "clip the gradient norm to this (0: off)", ge=0)
    early_stopping: EarlyStopping = key(factory=EarlyStopping,
                                        doc="when to stop and which epoch to keep")
    eval_batch_size: int = key(4096, "rows a step when scoring", ge=1)
    log_every: int = key(50, "log the training losses every N steps (0: off)", ge=0)
    log_grad_cosine: bool = key(False, "log task-gradient cosines on the shared parameters "
                                       "(T extra backwards)")
    # FGM (Miyato et al. 2017): also train on the embedding table moved by epsilon along its
    # normalised gradient (one extra forward/backward per step)
    adversarial: Literal["none", "fgm"] = key("none", "`fgm`: also train on adversarially "
                                                      "perturbed embeddings")
    adversarial_epsilon: float = key(1.0, "size of the FGM perturbation", gt=0)
    # id dropout (DropoutNet, Volkovs et al., NeurIPS 2017): categorical feature -> probability
    # that a training row sees the OOV id instead of its own, e.g. {item_id: 0.3}; the model
    # then learns to score an item from its other (content) features, as it must for new items
    id_dropout: dict[str, float] = key(factory=dict, doc="categorical feature -> probability "
                                                         "a training row sees the OOV id",
                                       ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = key("auto", "where the loop runs (auto: cuda when "
                                                         "torch sees one)")
    # the batches' gather then runs on the GPU, with no host work or copy per step
    resident: Literal["auto", "on", "off"] = key(
        "auto", "a GPU run: keep the in-memory training table on the GPU (auto: when it takes "
        "at most half of the GPU's free memory; CPU runs: no effect)")
    # bf16: the forward and the losses under torch.autocast(bfloat16); weights stay float32
    precision: Literal["fp32", "bf16"] = key("fp32", "bf16: forward and losses under autocast "
                                                     "(weights stay fp32)")
    # torchrun: a rank that died ends the job instead of hanging it (docs/SCALING.md)
    dist_timeout: float = key(300.0, "torchrun: seconds a process waits in a collective", gt=0)
    # stop with a named error when a task's recent training loss exceeds this many times its
    # loss at initialisation (a learning rate far too high) (``train.loop``)
    divergence_factor: float = key(100.0, "stop when a task's loss exceeds this many times its "
                                          "first (0: off)", ge=0)
    # model selection must beat the label prior (the constant prediction of each task's
    # training label rate/mean) on the validation split: an evaluation that does not is never
    # saved as best, and a run with none that does ends with a named error (``train.loop``)
    prior_guard: bool = key(True, "save as best only evaluations that beat the label prior's "
                                  "validation metric; fail when none does")

    def __post_init__(self) -> None:
        check_fields(self)  # a config built in Python is held to the loader's ranges

    def batch_lr(self) -> float:
        """The learning rate of a step at ``batch_size`` (``lr_scaling`` applied)."""
        if self.lr_scaling == "sqrt":
            return self.lr * (self.batch_size / self.lr_base_batch) ** 0.5
        return self.lr


@dataclass(frozen=True)
class WeightingConfig:
    """How the task losses become one update: a loss weighting or a gradient aggregator
    (``shopmtl weightings`` lists them). ``train.alpha`` scales the losses before it."""

    name: str = key("equal", "loss weighting or gradient aggregator (`shopmtl weightings`)")
    args: dict[str, Any] = key(factory=dict, doc="its arguments (per weighting below)")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = key(doc="what to train on")
    model: ModelConfig = key(factory=ModelConfig, doc="the architecture")
    train: TrainConfig = key(factory=TrainConfig, doc="how to train")
    weighting: WeightingConfig = key(factory=WeightingConfig,
                                     doc="how the task losses become one update")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment config of a YAML file (with ``a.b=value`` overrides), every name in it
    checked: any problem is a one-line ConfigError, raised before any data is read."""
    try:
        return _load_config(Path(path), overrides)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check outside from_dict (e.g. replace())
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None,
                     base: str | Path = ".") -> ExperimentConfig:
    """The experiment config of a dict shaped like the YAML file (the Python API), checked as
    ``load_config`` checks a file; relative data paths are relative to ``base``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    try:
        return _config_from_raw(raw, overrides, Path(base))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def read_yaml_mapping(path: str | Path, label: str = "") -> dict[str, Any]:
    """A config file's top-level mapping (an empty file is {}); a missing file, bad YAML or
    another top level is a ``ConfigError`` naming the path (``label``: a prefix, such as the
    key that named the file), never the file's text."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{label}config file not found: {path}")
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}{path}: the top level must be a mapping")
    return raw


def _load_config(path: Path, overrides: list[str] | None) -> ExperimentConfig:
    return _config_from_raw(read_yaml_mapping(path), overrides, path.parent)


def _config_from_raw(raw: dict[str, Any], overrides: list[str] | None, base: Path
                     ) -> ExperimentConfig:
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(ExperimentConfig, raw, ROOT)
    if cfg.data.synthetic is None and (cfg.data.schema is None or cfg.data.train is None):
        raise ConfigError("data: give `train` and `schema` (your files) or `synthetic` "
                          "(a generated world)")
    if cfg.data.content and cfg.data.synthetic is None:
        raise ConfigError("data.content: only for a synthetic world; with your own files, add "
                          "text/image/vector features to data.schema.features (docs/CONTENT.md)")
    check_names(cfg)
    return _resolve_paths(cfg, base)


def config_task_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The tasks a config trains, known without reading data: its schema's, or for
    ``data.synthetic`` the synthetic world's (``SYNTHETIC_TASKS``)."""
    if cfg.data.schema is not None and cfg.data.synthetic is None:
        return tuple(t.name for t in cfg.data.schema.tasks)
    return SYNTHETIC_TASKS


def config_scenario_names(cfg: ExperimentConfig) -> tuple[str, ...] | None:
    """The scenarios of a config's schema (with ``all``, the aggregate), or None when they are
    known only once the synthetic world is generated."""
    if cfg.data.schema is None or cfg.data.synthetic is not None:
        return None
    return (*cfg.data.schema.build().scenario_names, ALL)


METRIC_FORMS = "valid.all_tasks.<metric> or valid.<task>.<scenario|all>.<metric>"


def check_metric(metric: str, tasks: typing.Sequence[str],
                 scenarios: typing.Sequence[str] | None) -> None:
    """ConfigError (one line) when the early-stopping ``metric`` path has the wrong shape or
    names an unknown task or scenario. Its last part, the metric itself, depends on the task's
    type and is checked at the first evaluation (``train.select``)."""
    where = "train.early_stopping.metric"
    parts = metric.split(".")
    if parts[0] != "valid" or len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(f"{where}: {metric!r} is not a validation metric; use {METRIC_FORMS}")
    task = parts[1]
    if (task == "all_tasks") != (len(parts) == 3):
        raise ConfigError(f"{where}: {metric!r} is not a validation metric; use {METRIC_FORMS}")
    if task != "all_tasks" and task not in tasks:
        raise ConfigError(f"{where}: {metric!r} names unknown task {task!r}; tasks: "
                          f"{', '.join(tasks)} (or valid.all_tasks.<auc|logloss>)")
    if len(parts) == 4 and scenarios is not None and parts[2] not in scenarios:
        raise ConfigError(f"{where}: {metric!r} names unknown scenario {parts[2]!r}; "
                          f"scenarios: {', '.join(scenarios)}")


def check_tasks(where: str, names: Any, tasks: typing.Sequence[str]) -> None:
    """ConfigError (one line) when ``names`` holds a name that is not one of ``tasks``."""
    unknown = [n for n in names if n not in tasks]
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{where}: unknown task{s} {', '.join(repr(n) for n in unknown)}; "
                          f"tasks: {', '.join(tasks)}")


def check_names(cfg: ExperimentConfig) -> None:
    """What a config names that must exist, checked before any data is read: the tasks of
    ``train.alpha`` and of ``train.early_stopping.metric``, and the schema itself (its own
    checks, which otherwise run once training starts). The weighting's name and args are
    checked by ``shopmtl.checks`` (it needs the weighting registry, a layer above this one).
    The trainer's own checks stay (for configs built in Python)."""
    if cfg.data.schema is not None and cfg.data.synthetic is None:
        try:
            cfg.data.schema.build()
        except ValueError as e:
            raise ConfigError(f"data.schema: {str(e).removeprefix('schema: ')}") from None
    tasks = config_task_names(cfg)
    check_tasks("train.alpha", cfg.train.alpha, tasks)
    check_metric(cfg.train.early_stopping.metric, tasks, config_scenario_names(cfg))
    alpha = cfg.weighting.args.get("alpha")
    if isinstance(alpha, dict):  # static: per-task weights
        check_tasks("weighting.args.alpha", alpha, tasks)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``a.b=value`` strings (values parsed as YAML) into a nested dict (copy)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a mapping")
        node[parts[-1]] = _yaml_load(value)
    return out


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain JSON/YAML-able structures (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


ROOT = ""  # ``from_dict``'s ``where`` for a whole config file: keys named as in the file


def from_dict(cls: type, data: Any, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; raise ConfigError on unknown keys, bad types or
    values outside a key's range (``keys.key``). ``where`` prefixes the key paths in messages
    (default: the class name; ``ROOT``: none, for a whole config file)."""
    return _convert(cls, data, cls.__name__ if where is None else where)


def _sub(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        at = where or "the top level"
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                path = _sub(where, name)
                kwargs[name] = _convert(hints[name], value[name], path)
                problem = range_problem(f, kwargs[name], path)
                if problem:
                    raise ConfigError(problem)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{at}: missing required key '{name}'")
        try:
            return tp(**kwargs)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{at}: {e}") from None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {'; '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item_tp = args[0]
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Data paths in a config file are relative to the file, as users expect."""

    def fix(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    schema = cfg.data.schema
    if schema is not None and schema.features:
        # a content feature's catalog (and a local encoder directory) are data paths too
        features = tuple(
            dataclasses.replace(
                f,
                table=fix(f.table),
                encoder=f.encoder if f.encoder == DEFAULT_TEXT_ENCODER else fix(f.encoder),
            )
            if f.kind in CONTENT_KINDS
            else f
            for f in schema.features
        )
        schema = dataclasses.replace(schema, features=features)
    data = dataclasses.replace(
        cfg.data, train=fix(cfg.data.train), valid=fix(cfg.data.valid), test=fix(cfg.data.test),
        schema=schema,
    )
    return dataclasses.replace(cfg, data=data)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
