"""The sources of a joint run, loaded: tensors, heads, batch streams, evaluation.

``SourcePart`` wraps a ``data.source.Source`` (customer service, reviews, demand, search):
its splits become tensors whose texts are rows of one run-wide text bank (``TextIndex``).
``RecPart`` wraps the synthetic recommendation world and a zoo model, through the ordinary data
pipeline (encoders fitted on train, AUC per task x scenario).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError, to_dict
from shopmtl.data.schema import TaskSpec
from shopmtl.data.source import Source, SourceData, SourceSplit
from shopmtl.joint.config import REC, JointConfig, SourceConfig
from shopmtl.joint.model import JointModel, RankHead, TableHead
from shopmtl.tasks import TASK_TYPES, RankingTask
from shopmtl.train.distributed import check_batch_size, pin_memory
from shopmtl.train.table import TableSource


def _sources() -> dict[str, type]:
    # imported here: the source modules pull in scikit-learn for their baselines
    from shopmtl.data.sources.bitext import BitextSource
    from shopmtl.data.sources.retail import RetailDemandSource
    from shopmtl.data.sources.reviews import ReviewsSource
    from shopmtl.data.sources.search import SearchSource

    return {"bitext": BitextSource, "reviews": ReviewsSource, "retail": RetailDemandSource,
            "search": SearchSource}


SOURCE_NAMES = ("rec", "search", "bitext", "reviews", "retail")

def _import_source(path: str, name: str) -> type:
    """``package.module:Class``: a user's own source, importable from the Python path."""
    import importlib

    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"source '{name}': class must be 'package.module:Class', got {path!r}")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"source '{name}': cannot import {path!r} ({e})") from None
    for method in ("load", "metrics", "baseline"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"source '{name}': {path} has no {method}() (see "
                             "shopmtl.data.source.Source)")
    return cls


def source_class(sc: SourceConfig) -> type:
    """The class of a (non-rec) source: a built-in one by name, or a user's ``class:``."""
    if sc.cls is not None:
        return _import_source(sc.cls, sc.name)
    known = _sources()
    if sc.name not in known:
        raise ConfigError(f"unknown source {sc.name!r}; known: {sorted([REC, *known])} (or "
                         "give class: package.module:Class for your own)")
    return known[sc.name]


def build_source(sc: SourceConfig) -> Source:
    cls = source_class(sc)
    args = dict(sc.args)
    if sc.name == "search" and isinstance(args.get("world"), dict):
        from shopmtl.config import from_dict
        from shopmtl.data.synthetic import WorldConfig

        args["world"] = from_dict(WorldConfig, args["world"], "sources.search.args.world")
    try:
        return cls(**args)
    except TypeError as e:
        raise ConfigError(f"source '{sc.name}': bad args {sorted(sc.args)} ({e})") from None


# -- tensors ----------------------------------------------------------------------------------


class TextIndex:
    """Every distinct text of a run gets one row (row 0: no text)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.texts: list[str] = [""]

    def add(self, texts: list[str] | None) -> np.ndarray:
        if texts is None:
            return np.zeros(0, np.int64)
        out = np.empty(len(texts), np.int64)
        for i, t in enumerate(texts):
            if not t:
                out[i] = 0
                continue
            r = self.rows.get(t)
            if r is None:
                r = self.rows[t] = len(self.texts)
                self.texts.append(t)
            out[i] = r
        return out


def _labels(spec: TaskSpec, y: np.ndarray) -> Tensor:
    """A label array as float32 with NaN where it is missing (multiclass: class id, -1 = none)."""
    a = np.asarray(y)
    if spec.type == "multiclass":
        f = a.astype(np.float32)
        f[a < 0] = np.nan
        return torch.from_numpy(f)
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


@dataclass
class SplitTensors:
    text: Tensor  # int64 [n] text rows (zero-width when the source has no text)
    numeric: Tensor  # float32 [n, k]
    ids: dict[str, Tensor]
    labels: dict[str, Tensor]
    cand_text: Tensor | None = None  # int64 [n, L] (ranking)
    cand_ids: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.numeric)

    def take(self, idx: Tensor) -> SplitTensors:
        return SplitTensors(
            self.text[idx] if len(self.text) else self.text,
            self.numeric[idx],
            {k: v[idx] for k, v in self.ids.items()},
            {k: v[idx] for k, v in self.labels.items()},
            None if self.cand_text is None else self.cand_text[idx],
            {k: v[idx] for k, v in self.cand_ids.items()},
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> SplitTensors:
        """The rows on ``device`` (the same object when they are already there)."""
        if self.numeric.device == device:
            return self
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin(self) -> SplitTensors:
        """The rows in pinned (page-locked) host memory: asynchronous copies to a GPU."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Any) -> SplitTensors:
        return SplitTensors(
            fn(self.text), fn(self.numeric), {k: fn(v) for k, v in self.ids.items()},
            {k: fn(v) for k, v in self.labels.items()},
            None if self.cand_text is None else fn(self.cand_text),
            {k: fn(v) for k, v in self.cand_ids.items()},
        )


def tensorise(split: SourceSplit, texts: TextIndex) -> SplitTensors:
    cand = None
    if split.cand_text is not None:
        flat = [t for row in split.cand_text for t in row]
        cand = torch.from_numpy(texts.add(flat).reshape(len(split.cand_text), -1))
    return SplitTensors(
        torch.from_numpy(texts.add(split.text)),
        torch.from_numpy(np.asarray(split.numeric, dtype=np.float32).reshape(len(split), -1)),
        {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in split.ids.items()},
        {},  # filled by the caller, which knows the task specs
        cand,
        {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in split.cand_ids.items()},
    )


# -- parts ------------------------------------------------------------------------------------


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, and back to the mode it had after (a refit stage
    trains heads over a shared adapter that stays in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class SourcePart:
    """A loaded source: its data, tensors, head and batch stream."""

    refit_first: ClassVar[bool] = False  # see RecPart

    def __init__(self, sc: SourceConfig, source: Source, data: SourceData, texts: TextIndex,
                 seed: int) -> None:
        self.name = sc.name
        self.cfg = sc
        self.source = source
        self.data = data
        self.tasks = data.tasks
        self.ranking = any(t.type == "ranking" for t in self.tasks)
        if self.ranking and len(self.tasks) != 1:
            raise ValueError(f"source '{self.name}': a ranking source has exactly one task")
        self.splits: dict[str, SplitTensors] = {}
        for s in ("train", "valid", "test"):
            sp = data.split(s)
            missing = [t.name for t in self.tasks if t.name not in sp.labels]
            if missing:
                raise ValueError(f"source '{self.name}' split '{s}': no labels for {missing}")
            st = tensorise(sp, texts)
            st.labels = {t.name: _labels(t, sp.labels[t.name]) for t in self.tasks}
            self.splits[s] = st
        self.has_text = len(self.splits["train"].text) > 0
        self.place(torch.device("cpu"))

    def place(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        """Where training batches go (the model's device; pinned first only for a GPU) and,
        under torchrun, this process's share: every ``world``-th row of each global batch of
        ``cfg.batch_size`` rows (``TableSource.place``, the same rule)."""
        if world > 1:
            check_batch_size(self.cfg.batch_size, world)
        self.device, self.pin = torch.device(device), pin_memory(torch.device(device))
        self.rank, self.world = rank, world

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def num_batches(self) -> int:
        # with several processes a last partial batch is kept only when every process gets
        # at least one of its rows (``TensorTable.num_batches``)
        full, rest = divmod(len(self.splits["train"]), self.cfg.batch_size)
        return full + (1 if rest >= self.world else 0)

    def build_head(self, text_dim: int, cfg: Any, ngram_buckets: int = 0,
                   vector_width: int = 0) -> nn.Module:
        if self.ranking:
            return RankHead(self.tasks[0], text_dim, self.data.id_sizes, cfg)
        n_num = self.splits["train"].numeric.shape[1]
        wide = ngram_buckets if (cfg.wide and self.has_text) else 0
        vec = vector_width if self.has_text else 0  # 0 unless model.wide_vector
        return TableHead(self.tasks, text_dim if self.has_text else 0, n_num,
                         self.data.id_sizes, cfg, wide_buckets=wide, vector_width=vec)

    def batches(self, epoch: int, seed: int, skip: int = 0) -> Iterator[SplitTensors]:
        """Epoch ``epoch``'s training batches in a seeded order, from batch ``skip`` on (this
        rank's rows of each, on the training device)."""
        train, bs = self.splits["train"], self.cfg.batch_size
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(train), generator=g)
        for i in range(skip, self.num_batches()):
            batch = train.take(perm[i * bs : (i + 1) * bs][self.rank :: self.world])
            if self.device.type != "cpu":
                batch = (batch.pin() if self.pin else batch).to(self.device, non_blocking=True)
            yield batch

    def head(self, model: JointModel) -> nn.Module:
        return model.heads[self.name]

    def describe(self, model: JointModel) -> dict[str, Any]:
        """What ``joint.checkpoint.load_joint_dir`` needs to rebuild this source's head."""
        return {
            "tasks": [to_dict(t) for t in self.tasks],
            "id_sizes": self.data.id_sizes,
            "numeric": int(self.splits["train"].numeric.shape[1]),
            "has_text": self.has_text,
            "ranking": self.ranking,
            "meta": self.data.meta,
            # ids that add the rec model's rows (their row map is a buffer in the weights)
            "shared_ids": list(model.heads[self.name].shared),
            # what its tasks read and answer (data.contract; None: a source without one)
            "contract": (self.source.contract(self.data).to_json()
                         if callable(getattr(self.source, "contract", None)) else None),
        }

    def extra_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def baseline(self) -> dict[str, dict[str, Any]]:
        """The source's own simple baseline on its test split, per task (a source with several
        baselines names the one to beat "best")."""
        res = self.source.baseline(self.data)
        return {t: (m["best"] if isinstance(m.get("best"), dict) else m) for t, m in res.items()}

    def logits(self, model: JointModel, b: SplitTensors) -> dict[str, Tensor]:
        return head_logits(model, self.name, self.ranking, self.has_text, b)

    def losses(self, model: JointModel, b: SplitTensors) -> dict[str, Tensor]:
        out = self.logits(model, b)
        return {t.name: TASK_TYPES[t.type].loss(out[t.name], b.labels[t.name],
                                                _label_mask(t, b.labels[t.name]), t)
                for t in self.tasks}

    def loss_counts(self, b: SplitTensors) -> Tensor:
        """[T] the rows (lists, for a ranking task) each task's loss averages over: its weight
        when several processes combine their shards of one batch (``train.distributed``)."""
        counts = []
        for t in self.tasks:
            y = b.labels[t.name]
            mask = _label_mask(t, y)
            counts.append(RankingTask.counted_lists(y, mask, t).sum() if t.type == "ranking"
                          else mask.sum())
        return torch.stack(counts).float()

    @torch.no_grad()
    def predict(self, model: JointModel, split: str, batch_size: int = 2048
                ) -> dict[str, np.ndarray]:
        st = self.splits[split]
        outs: dict[str, list[np.ndarray]] = {t.name: [] for t in self.tasks}
        device = next(model.parameters()).device  # the model's, wherever it was moved
        with eval_mode(model):
            for lo in range(0, len(st), batch_size):
                b = st.take(torch.arange(lo, min(lo + batch_size, len(st)))).to(device)
                logits = self.logits(model, b)
                for t in self.tasks:
                    outs[t.name].append(TASK_TYPES[t.type].activate(logits[t.name]).float()
                                        .cpu().numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}

    def evaluate(self, model: JointModel, split: str) -> dict[str, dict[str, float]]:
        preds = self.predict(model, split)
        return {t: self.source.metrics(self.data, split, t, p) for t, p in preds.items()}


def _label_mask(spec: TaskSpec, y: Tensor) -> Tensor:
    """Which rows have a label (a ranking task: which lists have any)."""
    return ~torch.isnan(y).all(-1) if spec.type == "ranking" else ~torch.isnan(y)


def head_logits(model: JointModel, name: str, ranking: bool, has_text: bool, b: SplitTensors
                ) -> dict[str, Tensor]:
    """Source ``name``'s head on a batch: what training, evaluation and ``shopmtl predict`` run."""
    head = model.heads[name]
    if ranking:
        assert b.cand_text is not None
        return head(model.text.encode(b.text), model.text.encode(b.cand_text), b.cand_ids)
    return head.run(model.text, b.text if has_text else None, b.numeric, b.ids)


def _rec(model: nn.Module) -> nn.Module:
    return model.rec  # type: ignore[return-value]


class RecPart(TableSource):
    """The recommendation / ads source: the synthetic world through a zoo model (the joint
    model's ``rec``), a ``TableSource`` like a one-table run's."""

    # refit before the other heads: a head that borrows the rec model's rows
    # (``model.share_ids``) then refits on the rows as they end
    refit_first: ClassVar[bool] = True
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "rows": 400_000, "seed": 0, "model": "shared_bottom",
        "model_args": {"embed_dim": 16, "interaction": "dot", "bottom": [128], "tower": [32],
                       "dropout": 0.0, "input_norm": "none"},
        "content": ["title"], "embedding_weight_decay": 0.01,
    }

    def __init__(self, sc: SourceConfig, out_dir: Path, text_cfg: Any, seed: int,
                 log: Any = print) -> None:
        from shopmtl.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
        from shopmtl.data.pipeline import prepare_data, resolve_synthetic

        unknown = sorted(set(sc.args) - set(self.DEFAULTS))
        if unknown:
            raise ConfigError(f"source 'rec': unknown args {unknown}; known: "
                             f"{sorted(self.DEFAULTS)}")
        a = {**self.DEFAULTS, **sc.args}
        self.cfg = sc
        self.args = a
        exp = ExperimentConfig(
            data=DataConfig(synthetic={"rows": a["rows"], "seed": a["seed"]},
                            content=tuple(a["content"])),
            model=ModelConfig(a["model"], dict(a["model_args"])),
            train=TrainConfig(seed=seed),
        )
        exp, self.world = resolve_synthetic(exp, out_dir / "data", log)
        self.exp = exp
        schema = exp.data.schema.build()
        super().__init__(prepare_data(exp.data, schema, out_dir), sc.batch_size, name=REC,
                         module=_rec, embedding_weight_decay=float(a["embedding_weight_decay"]))

    def describe(self, model: JointModel) -> dict[str, Any]:
        return {"schema": to_dict(self.schema), "encoders": self.data.encoders.to_json(),
                "args": self.args}

    def extra_tensors(self) -> dict[str, dict[str, Tensor]]:
        """The item catalog's content matrices, stored once (not in the weights)."""
        if not self.schema.content_features:
            return {}
        return {"rec_content": self.data.encoders.content_tensors()}

    def baseline(self) -> dict[str, dict[str, Any]]:
        return {}  # the ID-only model, trained by ``joint.report.run_joint``

    def build_model(self) -> nn.Module:
        from shopmtl.registry import build_model
        from shopmtl.train.trainer import label_priors

        content = self.data.encoders.content_tensors() if self.schema.content_features else None
        model = build_model(self.args["model"], self.args["model_args"], self.schema,
                            self.data.vocab_sizes, content)
        model.init_output_bias(label_priors(self.data.train, self.schema))
        return model

    def table_rows(self, model: nn.Module, feature: str, keys: list[str]) -> Tensor:
        """The rows of ``model``'s embedding table (built by ``build_model``) that hold the
        entities ``keys`` of categorical ``feature``: int64 [len(keys)], -1 where a key is
        empty or not in the feature's vocabulary (unseen or rarer than its min_count)."""
        import pyarrow as pa

        cats = [f.name for f in self.schema.of_kind("categorical")]
        if feature not in cats:
            raise ConfigError(f"model.share_ids: the rec model has no categorical feature "
                              f"{feature!r}; it has {cats}")
        enc = self.data.encoders.categorical[feature]
        idx = enc.transform(pa.array(keys, pa.string()))
        offset = int(model.embed.cat_offsets[cats.index(feature)])
        known = (idx > 0) & (np.asarray(keys, object) != "")
        return torch.from_numpy(np.where(known, idx + offset, -1).astype(np.int64))


def shared_rows(share_ids: dict[str, str], part: SourcePart, rec_part: RecPart | None,
                rec: nn.Module | None) -> dict[str, Tensor]:
    """For each id of ``part`` named in ``share_ids``: the rec table row of each of its id rows
    (``IdHead.share``). Empty without a rec source (a source trained alone keeps its own ids)."""
    out: dict[str, Tensor] = {}
    if rec is None:  # built from rec_part: both or neither
        return out
    assert rec_part is not None
    for name, feature in share_ids.items():
        if name not in part.data.id_sizes:
            continue
        keys = part.data.id_keys.get(name)
        if keys is None:
            raise ConfigError(f"model.share_ids: source '{part.name}' gives no id_keys for its "
                              f"id {name!r}, so its rows cannot be matched to the rec model's "
                              f"{feature!r} (data.source.SourceData.id_keys)")
        if len(keys) != part.data.id_sizes[name]:
            raise ValueError(f"source '{part.name}': id {name!r} has {part.data.id_sizes[name]} "
                             f"rows but {len(keys)} id_keys")
        out[name] = rec_part.table_rows(rec, feature, keys)
    return out


# -- the run ----------------------------------------------------------------------------------


def load_parts(cfg: JointConfig, out_dir: Path, log: Any = print
               ) -> tuple[list[Any], TextIndex, dict[str, float]]:
    texts = TextIndex()
    parts: list[Any] = []
    seconds: dict[str, float] = {}
    for sc in cfg.sources:
        t0 = time.perf_counter()
        if sc.name == REC:
            parts.append(RecPart(sc, out_dir / "rec", cfg.text, cfg.train.seed, log))
        else:
            src = build_source(sc)
            data = src.load()
            if sc.max_examples:
                data = data.sample(sc.max_examples, cfg.train.seed)
            parts.append(SourcePart(sc, src, data, texts, cfg.train.seed))
        seconds[sc.name] = time.perf_counter() - t0
        log(f"source {sc.name}: {parts[-1].num_batches()} training batches "
            f"({seconds[sc.name]:.1f}s)")
    return parts, texts, seconds


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def hash_ngrams(texts: list[str], n: int, buckets: int, max_len: int) -> np.ndarray:
    """Hashed word 1..n-grams of each text: int64 [len(texts), max_len], ids in 1..buckets,
    0 = padding. crc32 of the n-gram's UTF-8 bytes: stable across runs and machines (Python's
    ``hash`` of a str is salted per process)."""
    out = np.zeros((len(texts), max_len), np.int64)
    for r, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        grams = [" ".join(words[i : i + k]) for k in range(1, n + 1)
                 for i in range(len(words) - k + 1)][:max_len]
        for c, g in enumerate(grams):
            out[r, c] = zlib.crc32(g.encode()) % buckets + 1
    return out


@dataclass
class TextBank:
    """What ``SharedText.set_bank`` takes; row 0 is "no text"."""

    bank: Tensor  # frozen: sentence vectors [U, W]; LoRA: token ids [U, L]
    mask: Tensor | None = None  # LoRA: attention mask [U, L]
    ngrams: Tensor | None = None  # hashed n-gram ids [U, N]


def text_bank(cfg: JointConfig, texts: list[str]) -> TextBank:
    """The bank of ``SharedText``: sentence vectors (frozen, cached) or token ids (LoRA), and
    the hashed n-grams of every text."""
    from shopmtl.data.text import embed_texts, tokenize

    body = texts[1:]
    t = cfg.text
    ngrams = None
    if t.ngram_buckets:
        ngrams = torch.from_numpy(hash_ngrams(texts, t.ngrams, t.ngram_buckets, t.ngram_max))
        ngrams[0] = 0
    if t.mode == "lora":
        ids, mask = tokenize(body, t.encoder, t.max_tokens)
        pad = np.zeros((1, ids.shape[1]), np.int64)
        return TextBank(torch.from_numpy(np.concatenate([pad, ids])),
                        torch.from_numpy(np.concatenate([pad, mask])), ngrams)
    vec = embed_texts(body, t.encoder, t.max_tokens, t.cache_dir)
    zero = np.zeros((1, vec.shape[1]), np.float32)
    return TextBank(torch.from_numpy(np.concatenate([zero, vec])), None, ngrams)


def text_width(cfg: JointConfig) -> int:
    from shopmtl.data.text import encoder_width

    return encoder_width(cfg.text.encoder)


def vector_width(cfg: JointConfig) -> int:
    """Width of the heads' raw sentence-vector term: the encoder's, in frozen mode only (in LoRA
    mode the bank holds token ids and the vectors move with the encoder)."""
    return text_width(cfg) if cfg.model.wide_vector and cfg.text.mode == "frozen" else 0


