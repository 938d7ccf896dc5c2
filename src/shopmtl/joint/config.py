"""Configuration of a heterogeneous joint run: frozen dataclasses loaded strictly from YAML.

A joint config is recognised by its top-level ``sources`` key (an ordinary experiment config
has ``data``/``model``/``train``). Example: ``examples/joint.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shopmtl.config import (
    SYNTHETIC_TASKS,
    ConfigError,
    WeightingConfig,
    _yaml_load,
    apply_overrides,
    from_dict,
    yaml_problem,
)
from shopmtl.data.schema import DEFAULT_TEXT_ENCODER
from shopmtl.train.sampling import SamplingMethod

REC = "rec"  # the recommendation / ads source: the synthetic world through a zoo model


@dataclass(frozen=True)
class SourceConfig:
    """One data source: a built-in name (``rec``, ``search``, ``bitext``, ``reviews``,
    ``retail``) or any name with ``cls`` pointing at your own ``data.source.Source`` class; its
    batch size and its constructor arguments (``rec``: ``rows``, ``seed`` of the synthetic
    world, ``model`` and ``model_args`` of the zoo model, ``content``)."""

    name: str
    cls: str | None = None  # your own source: "package.module:Class" (docs/JOINT.md)
    batch_size: int = 128
    args: dict[str, Any] = field(default_factory=dict)
    max_examples: int = 0  # > 0: every split cut to n seeded random examples (a quick slice)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"source '{self.name}': batch_size must be >= 1")
        if self.max_examples < 0:
            raise ValueError(f"source '{self.name}': max_examples must be >= 0")


@dataclass(frozen=True)
class TextConfig:
    """The shared sentence encoder: frozen with a cache (the CPU default) or LoRA-tuned."""

    encoder: str = DEFAULT_TEXT_ENCODER
    max_tokens: int = 64
    mode: Literal["frozen", "lora"] = "frozen"
    cache_dir: str | None = None  # default: shopmtl.data.text.default_cache_dir()
    # hashed word n-grams beside the sentence vector (0 buckets: none); docs/JOINT.md
    ngrams: int = 2  # uni- and bigrams
    ngram_buckets: int = 131072
    ngram_max: int = 256  # n-grams kept per text (the first ones)

    def __post_init__(self) -> None:
        if self.ngrams < 1 or self.ngram_buckets < 0 or self.ngram_max < 1:
            raise ValueError("ngrams and ngram_max must be >= 1, ngram_buckets >= 0")


@dataclass(frozen=True)
class JointModelConfig:
    adapter_hidden: int = 256  # the shared text adapter: width -> hidden -> text_dim
    text_dim: int = 128
    hidden: tuple[int, ...] = (128,)  # each source's trunk
    id_dim: int = 16  # id embeddings (products, items, classes)
    ngram_dim: int = 32  # width of the hashed n-gram table
    wide: bool = True  # text sources: a linear n-gram term per task (Wide & Deep)
    # text sources, frozen encoder: a linear term per task on the raw sentence vector too, so
    # the head holds the linear probe on [n-grams, vector] that beats TF-IDF (bench/text_probe.py)
    wide_vector: bool = False
    dropout: float = 0.1
    # shared entity embeddings: a source's id name -> a categorical feature of the rec model,
    # e.g. {item: item_id}. A source's id of that name (with ``SourceData.id_keys``) then adds
    # the rec model's row of the same entity to its own row, so search lists train the item
    # vectors that the click model reads (docs/JOINT.md, "Shared item embeddings")
    share_ids: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingConfig:
    method: SamplingMethod = "temperature"
    temperature: float = 2.0


@dataclass(frozen=True)
class JointTrainConfig:
    steps: int = 3000
    lr: float = 2e-3
    lr_decay: float = 1.0  # lr multiplied by this every `decay_every` steps
    decay_every: int = 1000
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 0  # 0: torch's default
    # legacy: the top-level ``weighting`` replaces it ("uncertainty" here still means
    # ``weighting: {name: uncertainty}``; see JointConfig.__post_init__)
    weighting: Literal["equal", "uncertainty"] = "equal"
    alpha: dict[str, float] = field(default_factory=dict)  # task -> loss weight (default 1)
    log_every: int = 200
    # > 0: score the validation splits every n steps and keep the best step's weights
    # (``joint.train.valid_score``)
    eval_every: int = 0
    # > 0: after the joint steps, the shared parts frozen, each source's head trains alone for
    # up to this many steps and keeps its own best validation step (``joint.train.refit_heads``)
    refit_steps: int = 0
    refit_lr: float = 5e-4
    refit_eval_every: int = 250
    refit_patience: int = 4  # evaluations without a better validation score before stopping
    # then each table head's output layer is solved by full-batch L-BFGS for each L2 penalty
    # of solve_l2 (whole layer; linear part alone, mixed with the trained layer), and the best
    # on validation replaces the trained layer if it beats it (``joint.solve``)
    solve_heads: bool = False
    solve_l2: tuple[float, ...] = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
    solve_iters: int = 100  # L-BFGS iterations per penalty
    # stop when a task's recent loss exceeds this many times its first one; 0: off
    divergence_factor: float = 100.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.refit_steps < 0 or self.refit_eval_every < 1 or self.refit_patience < 1:
            raise ValueError("refit_steps must be >= 0, refit_eval_every and refit_patience "
                             ">= 1")
        if not self.refit_lr > 0:
            raise ValueError(f"refit_lr must be > 0, got {self.refit_lr}")
        if not self.solve_l2 or not all(x >= 0 for x in self.solve_l2):
            raise ValueError(f"solve_l2 must be a non-empty list of penalties >= 0, got "
                             f"{list(self.solve_l2)}")
        if not self.divergence_factor >= 0:
            raise ValueError(f"divergence_factor must be >= 0 (0: off), got "
                             f"{self.divergence_factor}")
        if self.solve_iters < 1:
            raise ValueError(f"solve_iters must be >= 1, got {self.solve_iters}")


@dataclass(frozen=True)
class JointConfig:
    sources: tuple[SourceConfig, ...]
    text: TextConfig = TextConfig()
    model: JointModelConfig = JointModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: JointTrainConfig = JointTrainConfig()
    # how the task losses become one update (``shopmtl weightings``); only the loss weightings:
    # a gradient method needs every task's gradient on one batch, and sources never share one
    weighting: WeightingConfig = field(default_factory=WeightingConfig)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("sources: name at least one source")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicated {dup}")
        # Old configs (and the config JSON of old checkpoints) say ``train: {weighting:
        # uncertainty}``: with the top-level weighting left at its default, that becomes
        # ``weighting: {name: uncertainty}``. An explicit top-level weighting wins.
        if self.train.weighting == "uncertainty" and self.weighting == WeightingConfig():
            object.__setattr__(self, "weighting", WeightingConfig("uncertainty"))


def is_joint_config(path: str | Path) -> bool:
    try:
        raw = _yaml_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "sources" in raw


def load_joint_config(path: str | Path, overrides: list[str] | None = None) -> JointConfig:
    p = Path(path)
    try:
        raw = _yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return joint_config_from_dict(raw, overrides, where=str(p))


def joint_config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None,
                           where: str = "config") -> JointConfig:
    """The joint config of a dict shaped like the YAML file (the Python API, or a file's)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(JointConfig, raw, "joint")
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check outside from_dict
        raise ConfigError(f"{where}: {e}") from None
    return cfg


REC_TASKS = SYNTHETIC_TASKS  # the rec source trains the synthetic world's tasks


