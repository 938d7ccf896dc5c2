"""The joint model: shared parts, and one head per source.

Shared by every source: the sentence encoder's vectors go through one trainable text adapter
(``SharedText``), so what intent classification learns about words also shapes the search,
review and recommendation representations. In LoRA mode the encoder itself is tuned too (rank-8
adapters on its attention projections, ``nn.content.LoRATextTower``).

Per source:

- ``TableHead`` (customer service, reviews, demand): [adapter(text), numeric, id embeddings]
  -> MLP trunk -> one Linear per task, sized by the task type (classes, quantiles, 1).
- ``RankHead`` (search): for each query and each of its L candidates, [q * t, q, t, item]
  -> MLP -> a score; the listwise loss compares the L scores of a list.
- the recommendation source is a zoo model (SharedBottom, MMoE, ...) whose item-title content
  tower is replaced by the shared adapter plus its own projection.

Entity embeddings can be shared too (``model.share_ids``): a head's id (search's candidate
item) then adds the zoo model's row of the same entity to its own row (``IdHead``).

Every head returns logits (a dict task -> tensor); ``shopmtl.tasks`` turns them into losses and
predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shopmtl.data.schema import TaskSpec
from shopmtl.joint.config import JointModelConfig
from shopmtl.nn.layers import MLP, lookup
from shopmtl.tasks import out_dim


class SharedText(nn.Module):
    """Texts -> shared text features [..., text_dim].

    Two views of a text, added in the first hidden layer:

    - the pretrained sentence vector (semantics, synonyms, paraphrases);
    - a bag of hashed word uni- and bigrams (``hash_ngrams``): the lexical evidence a TF-IDF
      model lives on (exact product words, negations such as "not recommend"), which a frozen
      sentence vector blurs. Its embedding table is shared by every source too, so a word learnt
      from reviews means the same in a search query (fastText, Joulin et al. 2017).

    The texts of a run live in a bank (non-persistent buffers, rebuilt from the cache or the
    tokenizer, never saved with the weights): frozen mode keeps one sentence vector per text,
    LoRA mode its token ids, run through the adapted encoder once per distinct text of a batch.
    Row 0 is "no text" (a zero vector, no n-grams).
    """

    def __init__(self, width: int, cfg: JointModelConfig, lora_encoder: str | None = None,
                 ngram_buckets: int = 0) -> None:
        super().__init__()
        h = cfg.adapter_hidden
        self.vec_in = nn.Linear(width, h)
        self.ngram: nn.EmbeddingBag | None = None
        self.ngram_in: nn.Linear | None = None
        if ngram_buckets:
            # a narrow table, then a linear map: 2^17 x 32 parameters instead of 2^17 x hidden
            self.ngram = nn.EmbeddingBag(ngram_buckets + 1, cfg.ngram_dim, mode="mean",
                                         padding_idx=0)
            nn.init.normal_(self.ngram.weight, std=0.1)
            with torch.no_grad():
                self.ngram.weight[0].zero_()
            self.ngram_in = nn.Linear(cfg.ngram_dim, h, bias=False)
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(h, cfg.text_dim), nn.ReLU())
        self.out_dim = cfg.text_dim
        self.width = width
        self.lora: nn.Module | None = None
        if lora_encoder is not None:
            from shopmtl.nn.content import LoRATextTower

            self.lora = LoRATextTower(lora_encoder)
        self.register_buffer("bank", torch.zeros(1, width), persistent=False)
        self.register_buffer("bank_mask", torch.zeros(1, 1, dtype=torch.long), persistent=False)
        self.register_buffer("bank_ngrams", torch.zeros(1, 1, dtype=torch.long),
                             persistent=False)

    def set_bank(self, bank: Tensor, mask: Tensor | None = None,
                 ngrams: Tensor | None = None) -> None:
        """Frozen: vectors [U, W]; LoRA: token ids [U, L] and their attention mask; with
        n-grams: their hashed ids [U, N] (0 = padding)."""
        if self.lora is None and (bank.ndim != 2 or bank.shape[1] != self.width):
            raise ValueError(f"text bank: expected vectors [U, {self.width}], got "
                             f"{tuple(bank.shape)}")
        if self.lora is not None and mask is None:
            raise ValueError("text bank: LoRA mode needs token ids and their mask")
        if (self.ngram is None) != (ngrams is None):
            raise ValueError("text bank: n-gram ids must be given exactly when the model has "
                             "an n-gram table")
        if ngrams is not None and len(ngrams) != len(bank):
            raise ValueError(f"text bank: {len(bank)} texts but {len(ngrams)} n-gram rows")
        self.bank = bank
        self.bank_mask = mask if mask is not None else torch.zeros(1, 1, dtype=torch.long)
        self.bank_ngrams = ngrams if ngrams is not None else torch.zeros(1, 1, dtype=torch.long)

    def ngram_bags(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The n-grams of texts ``idx`` [B] as EmbeddingBag input: flat ids, offsets and
        weights 1/sqrt(n) (n = the text's n-gram count). Ragged, not a padded [B, N] matrix:
        titles have ~15 n-grams, reviews ~200, and padding would cost as much as real n-grams
        in the backward."""
        g = self.bank_ngrams[idx]
        keep = g > 0
        counts = keep.sum(1)
        offsets = torch.cumsum(counts, 0) - counts
        weights = torch.repeat_interleave(counts.clamp(min=1).float().rsqrt(), counts)
        return g[keep], offsets, weights

    def forward(self, vectors: Tensor) -> Tensor:
        """Sentence vectors alone (a zoo model's item-title field): no n-gram term."""
        return self.out(self.vec_in(vectors))

    def encode(self, idx: Tensor) -> Tensor:
        """Bank rows (any shape) -> [*idx.shape, text_dim]; each distinct text once."""
        uniq, inverse = torch.unique(idx.reshape(-1), return_inverse=True)
        if self.lora is None:
            vec = self.bank[uniq]
        else:
            vec = torch.zeros(len(uniq), self.width, device=self.vec_in.weight.device)
            has = uniq > 0
            if has.any():
                rows = uniq[has]
                tuned = self.lora(self.bank[rows], self.bank_mask[rows])
                vec = vec.index_put((has.nonzero().squeeze(1),), tuned.to(vec.dtype))
        h = self.vec_in(vec)
        if self.ngram is not None and self.ngram_in is not None:
            flat, offsets, _ = self.ngram_bags(uniq)  # a mean bag: no per-id weights
            h = h + self.ngram_in(self.ngram(flat, offsets))
        return self.out(h)[inverse].reshape(*idx.shape, self.out_dim)


class _Borrowed(nn.Module):
    """Calls a module owned elsewhere without registering it (one copy in the state dict)."""

    def __init__(self, module: nn.Module, then: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", module)
        self.then = then

    def forward(self, x: Tensor) -> Tensor:
        return self.then(self._shared(x))


class IdHead(nn.Module):
    """A head's id embeddings (``self.ids``, one table per id name), some of them shared.

    An id listed by ``share`` (``model.share_ids``) adds to its own row the rec model's row of
    the same entity: ``rows[id]`` is that row in the zoo model's embedding table (-1: the
    entity is not in its vocabulary, e.g. an item it never saw, and only the own row counts).
    The table is borrowed, not registered (one copy in the state dict, trained by both), and
    ``rows`` is a buffer saved with the head, so a loaded model needs no rec vocabulary."""

    def __init__(self, id_sizes: dict[str, int], dim: int) -> None:
        super().__init__()
        self.ids = nn.ModuleDict({k: nn.Embedding(n, dim) for k, n in id_sizes.items()})
        for e in self.ids.values():
            nn.init.normal_(e.weight, std=0.05)
        self.shared: tuple[str, ...] = ()
        object.__setattr__(self, "_table", None)

    def share(self, rows: dict[str, Tensor]) -> None:
        """``rows``: id name -> int64 [id rows], the rec table row of each (-1: none)."""
        for k, r in rows.items():
            if k not in self.ids:
                raise KeyError(f"no id {k!r} to share; this head has {sorted(self.ids)}")
            if r.shape != (self.ids[k].num_embeddings,):
                raise ValueError(f"id {k!r}: {self.ids[k].num_embeddings} rows, but "
                                 f"{tuple(r.shape)} shared rows")
            self.register_buffer(f"shared_rows_{k}", r.to(torch.long).clone())
        self.shared = tuple(rows)

    def bind(self, table: nn.Embedding) -> None:
        dims = {e.embedding_dim for e in self.ids.values()}
        if dims != {table.embedding_dim}:
            raise ValueError(f"model.share_ids: the rec model's embeddings are "
                             f"{table.embedding_dim} wide, this head's ids {sorted(dims)}: "
                             "set model.id_dim to the rec model's embed_dim")
        object.__setattr__(self, "_table", table)

    def id_vectors(self, ids: dict[str, Tensor]) -> list[Tensor]:
        """Each id's vectors [*ids[k].shape, dim], in ``self.ids`` order."""
        out = []
        for k, emb in self.ids.items():
            v = emb(ids[k])
            if k in self.shared:
                if self._table is None:
                    raise RuntimeError(f"id {k!r} is shared but no rec table is bound")
                r = getattr(self, f"shared_rows_{k}")[ids[k]]
                v = v + lookup(self._table, r.clamp(min=0)) * (r >= 0).unsqueeze(-1)
            out.append(v)
        return out


def _heads(width: int, tasks: tuple[TaskSpec, ...]) -> nn.ModuleDict:
    return nn.ModuleDict({t.name: nn.Linear(width, out_dim(t)) for t in tasks})


def squeeze_logits(logits: Tensor, spec: TaskSpec) -> Tensor:
    """[B, 1] -> [B] for a one-output task (a quantile task keeps its [B, Q])."""
    return logits.squeeze(-1) if out_dim(spec) == 1 and spec.type != "quantile" else logits


class TableHead(IdHead):
    """A source of one example per row (text and/or numeric and/or ids).

    With ``wide_buckets`` (a text source with hashed n-grams), each task's logit also gets a
    linear term over the text's n-grams (the wide part of Wide & Deep, Cheng et al. 2016): the
    bag-of-words model a TF-IDF + linear baseline is, learned jointly with the deep part and
    started at zero. Bags are summed with weight 1/sqrt(n) so that a long review and a short
    utterance get logits of the same scale (as an L2-normalised TF vector).
    """

    def __init__(self, tasks: tuple[TaskSpec, ...], text_dim: int, n_numeric: int,
                 id_sizes: dict[str, int], cfg: JointModelConfig, wide_buckets: int = 0,
                 vector_width: int = 0) -> None:
        super().__init__(id_sizes, cfg.id_dim)
        self.tasks = tasks
        self.text_dim = text_dim
        width = text_dim + n_numeric + cfg.id_dim * len(id_sizes)
        self.trunk = MLP(width, cfg.hidden, cfg.dropout)
        self.heads = _heads(self.trunk.out_dim, tasks)
        self.widths = [out_dim(t) for t in tasks]
        self.wide: nn.EmbeddingBag | None = None
        if wide_buckets:
            self.wide = nn.EmbeddingBag(wide_buckets + 1, sum(self.widths), mode="sum",
                                        padding_idx=0)
            nn.init.zeros_(self.wide.weight)
        # the frozen sentence vector's linear term (``wide_vector``), also started at zero
        self.vector: nn.Linear | None = None
        if vector_width:
            self.vector = nn.Linear(vector_width, sum(self.widths), bias=False)
            nn.init.zeros_(self.vector.weight)

    def run(self, shared: SharedText, idx: Tensor | None, numeric: Tensor,
            ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """Logits for rows whose texts are bank rows ``idx`` (None: a source without text)."""
        return self.output(*self.inputs(shared, idx, numeric, ids))

    def inputs(self, shared: SharedText, idx: Tensor | None, numeric: Tensor,
               ids: dict[str, Tensor]
               ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None, Tensor | None]:
        """What the output layer reads: the trunk's features [B, H], the texts' n-gram bags
        (flat ids, offsets, per-id weights) for the wide term and their frozen sentence
        vectors for the ``vector`` term (None where the head has no such term). Once the
        trunk is fixed each task's logit is linear in these (``joint.solve``)."""
        if idx is None or not self.text_dim:
            return self.features(None, numeric, ids), None, None
        wide = shared.ngram_bags(idx) if self.wide is not None else None
        vectors = shared.bank[idx] if self.vector is not None else None
        return self.features(shared.encode(idx), numeric, ids), wide, vectors

    def features(self, text: Tensor | None, numeric: Tensor, ids: dict[str, Tensor]) -> Tensor:
        parts = [] if text is None else [text]
        parts.append(numeric)
        parts += self.id_vectors(ids)
        return self.trunk(torch.cat(parts, 1))

    def forward(self, text: Tensor | None, numeric: Tensor, ids: dict[str, Tensor],
                ngrams: tuple[Tensor, Tensor, Tensor] | None = None,
                vectors: Tensor | None = None) -> dict[str, Tensor]:
        """``ngrams``: (flat ids, offsets, per-id weights) of the rows' texts, for the wide part;
        ``vectors``: their frozen sentence vectors, for the ``vector`` term."""
        return self.output(self.features(text, numeric, ids), ngrams, vectors)

    def output(self, h: Tensor, ngrams: tuple[Tensor, Tensor, Tensor] | None = None,
               vectors: Tensor | None = None) -> dict[str, Tensor]:
        wide = None
        if self.wide is not None and ngrams is not None:
            flat, offsets, weights = ngrams
            wide = torch.split(self.wide(flat, offsets, per_sample_weights=weights),
                               self.widths, dim=1)
        lin = None
        if self.vector is not None and vectors is not None:
            lin = torch.split(self.vector(vectors), self.widths, dim=1)
        out = {}
        for j, t in enumerate(self.tasks):
            logit = self.heads[t.name](h)
            if wide is not None:
                logit = logit + wide[j]
            if lin is not None:
                logit = logit + lin[j]
            out[t.name] = squeeze_logits(logit, t)
        return out


class RankHead(IdHead):
    """A ranking source: a query and L candidates (text + ids) per list -> scores [G, L]."""

    def __init__(self, task: TaskSpec, text_dim: int, id_sizes: dict[str, int],
                 cfg: JointModelConfig) -> None:
        super().__init__(id_sizes, cfg.id_dim)
        self.task = task
        width = 3 * text_dim + cfg.id_dim * len(id_sizes)
        self.scorer = MLP(width, cfg.hidden, cfg.dropout, out_dim=1)

    def forward(self, query: Tensor, cands: Tensor, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """query [G, d], cands [G, L, d], ids name -> [G, L]."""
        q = query.unsqueeze(1).expand_as(cands)
        parts = [q * cands, q, cands, *self.id_vectors(ids)]
        return {self.task.name: self.scorer(torch.cat(parts, -1)).squeeze(-1)}  # [G, L]


class JointModel(nn.Module):
    """The shared text adapter, the per-source heads and (optionally) the zoo model of the
    recommendation source, in one module: one checkpoint answers every task."""

    def __init__(self, text: SharedText, heads: dict[str, nn.Module],
                 rec: nn.Module | None = None) -> None:
        super().__init__()
        self.text = text
        self.heads = nn.ModuleDict(heads)
        self.rec = rec
        if rec is not None:
            share_title(rec, text)
        for name, head in heads.items():
            if isinstance(head, IdHead) and head.shared:
                if rec is None:
                    raise ValueError(f"source '{name}' shares ids with the rec model, "
                                     "which this model does not have")
                head.bind(rec.embed.table)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.text.parameters())


def share_title(rec: nn.Module, text: SharedText) -> bool:
    """Route a zoo model's frozen ``title`` content field through the shared adapter: its tower
    (Linear(W -> D)) becomes adapter -> Linear(text_dim -> D). Returns False when the model has
    no frozen title field (nothing is shared then)."""
    from shopmtl.nn.content import _projection

    embed = getattr(rec, "embed", None)
    content = getattr(embed, "content", None)
    if content is None or "title" not in content.towers:
        return False
    tower = content.towers["title"]
    if not isinstance(tower, nn.Linear):  # a LoRA title keeps its own encoder
        return False
    content.towers["title"] = _Borrowed(text, _projection(text.out_dim, tower.out_features))
    return True
