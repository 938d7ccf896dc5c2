"""Checks of a loaded config against what it names: tasks, weightings, sources, and the
optional packages it needs (the 'text' extra for text features and joint runs). They run
right after the YAML is read and before any data is (``load_experiment``, ``load_joint``), so a
misspelled name costs one line, not a data preparation. They live here, above the config
layer, because they need the weighting registry and the joint source classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shopmtl.config import (
    ConfigError,
    ExperimentConfig,
    WeightingConfig,
    check_tasks,
    config_from_dict,
    from_dict,
)
from shopmtl.config import load_config as _load_config
from shopmtl.data.ingest import is_csv
from shopmtl.deps import require_extra
from shopmtl.joint.config import (
    REC,
    REC_TASKS,
    JointConfig,
    SourceConfig,
    is_joint_config,
    joint_config_from_dict,
    load_joint_config,
)
from shopmtl.joint.parts import _import_source, _sources
from shopmtl.registry import model_config
from shopmtl.train.distributed import check_batch_size, env_world
from shopmtl.weighting import WEIGHTINGS


def check_weighting(wc: WeightingConfig, where: str = "weighting") -> type:
    """The registered weighting class of ``wc.name`` with ``wc.args`` checked strictly;
    ConfigError (one line, with the valid names) otherwise."""
    if wc.name not in WEIGHTINGS:
        raise ConfigError(f"{where}.name: unknown weighting {wc.name!r}; valid: "
                          f"{', '.join(WEIGHTINGS)}")
    cls = WEIGHTINGS[wc.name]
    from_dict(cls.Config, dict(wc.args), f"{where}.args")  # type: ignore[attr-defined]
    return cls


def check_synthetic(cfg: ExperimentConfig) -> None:
    """``data.synthetic``'s keys, types and ranges, read now rather than when the world is
    generated (after the output folder is set up)."""
    if cfg.data.synthetic is not None:
        from shopmtl.data.synthetic import WorldConfig

        from_dict(WorldConfig, dict(cfg.data.synthetic), "data.synthetic")


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """A one-table config's model, weighting and synthetic world (its tasks are checked by
    ``config.load_config``); under torchrun (``WORLD_SIZE > 1``) also what several processes
    cannot do (docs/SCALING.md)."""
    model_config(cfg.model.name, cfg.model.args)
    check_synthetic(cfg)
    cls = check_weighting(cfg.weighting)
    schema_text = cfg.data.schema is not None and any(
        f.kind == "text" for f in cfg.data.schema.features)
    if schema_text or "title" in cfg.data.content:
        require_extra("text", "text features")
    world = env_world()[2]
    if world > 1:
        if cls.needs_gradients:
            usable = [n for n, c in WEIGHTINGS.items() if not c.needs_gradients]
            raise ConfigError(f"weighting.name: {cfg.weighting.name!r} combines per-task "
                              "gradients, which is not supported with several processes "
                              f"(torchrun); use one of: {', '.join(usable)}")
        if cfg.data.streaming and cfg.data.train is not None and is_csv(cfg.data.train):
            # ranks shard a streamed file by Parquet row groups (data.shards); CSV has none
            raise ConfigError("data.streaming: streamed training data with several processes "
                              "(torchrun) must be Parquet (each rank reads its own row "
                              f"groups); data.train is CSV ({Path(cfg.data.train).name}): "
                              "convert it to Parquet, or use in-memory data or one process")
        check_batch_size(cfg.train.batch_size, world)
    return cfg


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """``config.load_config`` and every check of this module."""
    return check_experiment(_load_config(path, overrides))


def source_task_names(sc: SourceConfig) -> tuple[str, ...] | None:
    """The tasks of a source, known without loading it: ``rec``'s, a built-in source class's
    ``task_names``, or a user's class (``cls``) that declares ``task_names``; None for a user's
    class that does not (its tasks are checked once it is loaded). ConfigError for an unknown
    source name or a class that cannot be imported."""
    if sc.name == REC:
        return REC_TASKS
    if sc.cls is not None:
        names = getattr(_import_source(sc.cls, sc.name), "task_names", None)
        return None if names is None else tuple(names)
    known = _sources()
    if sc.name not in known:
        raise ConfigError(f"unknown source {sc.name!r}; known: {sorted([REC, *known])} (or "
                          "give class: package.module:Class for your own)")
    return tuple(known[sc.name].task_names)


def check_joint_names(cfg: JointConfig) -> None:
    """What a joint config names that must exist, checked before any source is loaded: the
    weighting (a loss weighting once there are two sources), the sources, the tasks of
    ``train.alpha`` (when every source's tasks are known statically)."""
    cls = check_weighting(cfg.weighting)
    if cls.needs_gradients and len(cfg.sources) > 1:
        usable = [n for n, c in WEIGHTINGS.items() if not c.needs_gradients]
        raise ConfigError(f"weighting.name: {cfg.weighting.name!r} needs every task's gradient "
                          "on one batch, but the sources of a joint run never share a batch; "
                          f"use one of: {', '.join(usable)}")
    per_source = [source_task_names(sc) for sc in cfg.sources]
    if all(t is not None for t in per_source):
        tasks = [t for names in per_source for t in names or ()]
        check_tasks("train.alpha", cfg.train.alpha, tasks)


def load_joint(path: str | Path, overrides: list[str] | None = None) -> JointConfig:
    """``joint.config.load_joint_config`` and every check of this module. A joint run always
    has the shared sentence encoder (and its text sources their TF-IDF baselines): the 'text'
    extra is checked here, before any data is generated or read."""
    return check_joint(load_joint_config(path, overrides))


def check_joint(cfg: JointConfig) -> JointConfig:
    """A parsed joint config's names, the 'text' extra every joint run needs, and (like
    ``check_experiment``) what several processes cannot do (docs/SCALING.md)."""
    check_joint_names(cfg)
    world = env_world()[2]
    if world > 1:
        cls = check_weighting(cfg.weighting)
        if cls.needs_gradients:  # one source alone may name one; a torchrun job may not
            usable = [n for n, c in WEIGHTINGS.items() if not c.needs_gradients]
            raise ConfigError(f"weighting.name: {cfg.weighting.name!r} combines per-task "
                              "gradients, which is not supported with several processes "
                              f"(torchrun); use one of: {', '.join(usable)}")
        for i, sc in enumerate(cfg.sources):  # each source's batch is a global batch
            try:
                check_batch_size(sc.batch_size, world)
            except ConfigError as e:
                raise ConfigError(f"sources[{i}] ({sc.name}).batch_size: "
                                  f"{str(e).removeprefix('train.batch_size: ')}") from None
    require_extra("text", "a joint run (a config with `sources`)")
    return cfg


def load_run_config(config: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
                    ) -> ExperimentConfig | JointConfig:
    """What ``shopmtl train`` trains: a YAML file, or a dict shaped like one (the Python API;
    relative data paths are then relative to the working directory). A top-level ``sources``
    key makes it a joint config. Every check of this module runs."""
    overrides = list(overrides)
    if isinstance(config, Mapping):
        raw = dict(config)
        if "sources" in raw:
            return check_joint(joint_config_from_dict(raw, overrides))
        return check_experiment(config_from_dict(raw, overrides))
    if not isinstance(config, str | Path):
        raise ConfigError(f"config: a YAML file's path or a dict, got {type(config).__name__}")
    if is_joint_config(config):
        return load_joint(config, overrides)
    return load_experiment(config, overrides)
