"""Configuration of a heterogeneous joint run: frozen dataclasses loaded strictly from YAML.

A joint config is recognised by its top-level ``sources`` key (an ordinary experiment config
has ``data``/``model``/``train``). Example: ``examples/joint.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from shopmtl.config import (
    ROOT,
    SYNTHETIC_TASKS,
    ConfigError,
    WeightingConfig,
    _yaml_load,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
)
from shopmtl.data.schema import DEFAULT_TEXT_ENCODER
from shopmtl.keys import check_fields, key
from shopmtl.train.sampling import SamplingMethod

REC = "rec"  # the recommendation / ads source: the synthetic world through a zoo model


@dataclass(frozen=True)
class SourceConfig:
    """One data source: a built-in name (``rec``, ``search``, ``bitext``, ``reviews``,
    ``retail``) or any name with ``cls`` pointing at your own ``data.source.Source`` class; its
    batch size and its constructor arguments (``rec``: ``rows``, ``seed`` of the synthetic
    world, ``model`` and ``model_args`` of the zoo model, ``content``)."""

    name: str = key(doc="a built-in source (rec, search, bitext, reviews, retail) or your "
                        "own with `cls`")
    cls: str | None = key(None, "your own source class: package.module:Class "
                                "(docs/JOINT.md)")
    batch_size: int = key(128, "examples a step from this source", ge=1)
    args: dict[str, Any] = key(factory=dict, doc="the source's constructor arguments")
    max_examples: int = key(0, "> 0: every split cut to n seeded random examples (a quick "
                               "slice)", ge=0)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TextConfig:
    """The shared sentence encoder: frozen with a cache (the CPU default) or LoRA-tuned."""

    encoder: str = key(DEFAULT_TEXT_ENCODER, "the sentence encoder (minilm or a local "
                                             "directory)")
    max_tokens: int = key(64, "tokens per text", ge=2)
    mode: Literal["frozen", "lora"] = key("frozen", "frozen with a cache, or LoRA-tuned")
    cache_dir: str | None = key(None, "the sentence-vector cache (default: "
                                      "data.text.default_cache_dir())")
    # hashed word n-grams beside the sentence vector (docs/JOINT.md)
    ngrams: int = key(2, "hashed word n-grams up to this n (2: uni- and bigrams)", ge=1)
    ngram_buckets: int = key(131072, "hash buckets of the n-grams (0: no n-grams)", ge=0)
    ngram_max: int = key(256, "n-grams kept per text (the first ones)", ge=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class JointModelConfig:
    adapter_hidden: int = key(256, "the shared text adapter: width -> hidden -> text_dim", ge=1)
    text_dim: int = key(128, "width of the adapted text vector", ge=1)
    hidden: tuple[int, ...] = key((128,), "each source's trunk: layer widths", ge=1)
    id_dim: int = key(16, "id embeddings (products, items, classes)", ge=1)
    ngram_dim: int = key(32, "width of the hashed n-gram table", ge=1)
    wide: bool = key(True, "text sources: a linear n-gram term per task (Wide & Deep)")
    # text sources, frozen encoder: a linear term per task on the raw sentence vector too, so
    # the head holds the linear probe on [n-grams, vector] that beats TF-IDF (bench/text_probe.py)
    wide_vector: bool = key(False, "text sources, frozen encoder: a linear term on the raw "
                                   "sentence vector too")
    dropout: float = key(0.1, "dropout probability", ge=0, lt=1)
    # shared entity embeddings: a source's id name -> a categorical feature of the rec model,
    # e.g. {item: item_id}. A source's id of that name (with ``SourceData.id_keys``) then adds
    # the rec model's row of the same entity to its own row, so search lists train the item
    # vectors that the click model reads (docs/JOINT.md, "Shared item embeddings")
    share_ids: dict[str, str] = key(factory=dict, doc="a source's id name -> a categorical "
                                                      "feature of the rec model")


@dataclass(frozen=True)
class SamplingConfig:
    method: SamplingMethod = key("temperature", "how the next source is picked")
    temperature: float = key(2.0, "temperature sampling: p ~ size^(1/T) (1: proportional)",
                             gt=0)


@dataclass(frozen=True)
class JointTrainConfig:
    steps: int = key(3000, "joint training steps", ge=1)
    lr: float = key(2e-3, "learning rate", gt=0)
    lr_decay: float = key(1.0, "lr multiplied by this every `decay_every` steps", gt=0)
    decay_every: int = key(1000, "steps between lr decays (0: no decay)", ge=0)
    weight_decay: float = key(0.0, "L2 weight decay", ge=0)
    seed: int = key(0, "seed of initialisation and sampling", ge=0)
    threads: int = key(0, "torch threads (0: torch's default)", ge=0)
    # legacy: the top-level ``weighting`` replaces it ("uncertainty" here still means
    # ``weighting: {name: uncertainty}``; see JointConfig.__post_init__)
    weighting: Literal["equal", "uncertainty"] = key("equal", "legacy: use the top-level "
                                                              "`weighting`")
    alpha: dict[str, float] = key(factory=dict, doc="task -> loss weight (default 1)", ge=0)
    log_every: int = key(200, "log the training losses every n steps (0: off)", ge=0)
    # (``joint.train.valid_score``)
    eval_every: int = key(0, "> 0: score validation every n steps and keep the best step",
                          ge=0)
    # after the joint steps, the shared parts frozen, each source's head trains alone and keeps
    # its own best validation step (``joint.train.refit_heads``)
    refit_steps: int = key(0, "> 0: then each head trains alone for up to n steps", ge=0)
    refit_lr: float = key(5e-4, "learning rate of the head refit", gt=0)
    refit_eval_every: int = key(250, "head refit: steps between validation scores", ge=1)
    refit_patience: int = key(4, "head refit: evaluations without a better score before "
                                 "stopping", ge=1)
    # each table head's output layer is solved by full-batch L-BFGS for each L2 penalty of
    # solve_l2 (whole layer; linear part alone, mixed with the trained layer), and the best on
    # validation replaces the trained layer if it beats it (``joint.solve``)
    solve_heads: bool = key(False, "then solve each table head's output layer by L-BFGS")
    solve_l2: tuple[float, ...] = key((3e-3, 1e-3, 3e-4, 1e-4, 3e-5),
                                      "the L2 penalties tried by solve_heads", ge=0)
    solve_iters: int = key(100, "L-BFGS iterations per penalty", ge=1)
    divergence_factor: float = key(100.0, "stop when a task's loss exceeds this many times "
                                          "its first (0: off)", ge=0)
    # the one-table run's three keys, with the same meaning (docs/SCALING.md)
    device: Literal["auto", "cpu", "cuda"] = key("auto", "where the loop runs (auto: cuda when "
                                                         "torch sees one)")
    precision: Literal["fp32", "bf16"] = key("fp32", "bf16: forward and losses under autocast "
                                                     "(weights stay fp32)")
    dist_timeout: float = key(300.0, "torchrun: seconds a process waits in a collective", gt=0)

    def __post_init__(self) -> None:
        check_fields(self)  # a config built in Python: the loader's ranges
        if not self.solve_l2:
            raise ValueError("solve_l2 must be a non-empty list of penalties >= 0, got []")


@dataclass(frozen=True)
class JointConfig:
    sources: tuple[SourceConfig, ...] = key(doc="the data sources (sources[] below)")
    text: TextConfig = key(TextConfig(), "the shared sentence encoder")
    model: JointModelConfig = key(JointModelConfig(), "the shared parts and the heads")
    sampling: SamplingConfig = key(SamplingConfig(), "which source feeds the next step")
    train: JointTrainConfig = key(JointTrainConfig(), "how to train")
    # only the loss weightings: a gradient method needs every task's gradient on one batch,
    # and sources never share one
    weighting: WeightingConfig = key(factory=WeightingConfig,
                                     doc="how the task losses become one update (loss "
                                         "weightings only)")

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
    raw = read_yaml_mapping(p)
    return joint_config_from_dict(raw, overrides, where=str(p))


def joint_config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None,
                           where: str = "config") -> JointConfig:
    """The joint config of a dict shaped like the YAML file (the Python API, or a file's)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(JointConfig, raw, ROOT)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check outside from_dict
        raise ConfigError(f"{where}: {e}") from None
    return cfg


REC_TASKS = SYNTHETIC_TASKS  # the rec source trains the synthetic world's tasks


