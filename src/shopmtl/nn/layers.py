"""Building blocks shared by every architecture: feature embedding, MLP, feature interaction.

``FeatureEmbedding`` is the only module that knows vocabulary sizes; models see fields [B, F, D].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from shopmtl.data.dataset import Batch
from shopmtl.data.schema import Schema
from shopmtl.nn.attention import TargetAttention
from shopmtl.nn.content import ContentFields


class _Lookup(torch.autograd.Function):
    """``weight[ids]`` whose backward adds each output row's gradient into its id's row with
    ``index_add_``, in one thread, instead of ``F.embedding``'s backward, which sorts the ids
    and reduces runs of equal ids. The sort was 15 % of a census MMoE training step (63,000
    ids into a 514-row table per batch of 2048); ``bench/embedding_backward.py`` times both,
    quiet and with another job on the cores. One thread because the scatter is too small to
    split and a parallel region stalls when a core is taken by another process."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]
        return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        dim = grad.shape[-1]
        out = grad.new_zeros(ctx.rows, dim)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out.index_add_(0, ids.reshape(-1), grad.reshape(-1, dim))
        finally:
            torch.set_num_threads(threads)
        return out, None


def lookup(table: nn.Embedding, ids: Tensor) -> Tensor:
    """``table(ids)`` -> [*ids.shape, D], the same values and gradient, with a sort-free
    backward (``_Lookup``)."""
    return _Lookup.apply(table.weight, ids)


class ScenarioTable(nn.Embedding):
    """The scenario embedding, one row per scenario (an ``nn.Embedding``: the same weights)."""

    @torch.no_grad()
    def for_scenario(self, index: int) -> nn.Embedding:
        """Scenario ``index``'s row alone, a one-row table: a one-scenario sub-model reads it
        at index 0 (``export.scenario``)."""
        row = nn.Embedding(1, self.embedding_dim)
        row.weight.copy_(self.weight[index : index + 1])
        return row


class FeatureEmbedding(nn.Module):
    """Every input as one D-dim field: categorical ids, mean-pooled sequences, numeric values
    (value x learned vector, so they join the interactions), and the scenario.

    All categorical vocabularies live in one table with offsets: one lookup per batch. A
    sequence with ``vocab_from`` reads the rows of that feature (shared item/category vectors).
    A sequence with ``attend_to`` is pooled by DIN target attention against the embedding of
    its target feature (``nn.attention.TargetAttention``, one unit per such sequence, with
    ``attention_hidden`` widths and optional ``attention_softmax``); the others are mean-pooled.

    Content features (text, image, vector; ``nn.content.ContentFields``) add one field each,
    after the numeric ones; the scenario is always the last field. ``content`` fills their
    matrices (``Encoders.content_tensors()``); without it they are zeros until
    ``load_content``. A schema without content features builds no content module at all.
    """

    def __init__(
        self,
        schema: Schema,
        vocab_sizes: dict[str, int],
        dim: int,
        attention_hidden: tuple[int, ...] = (36,),
        attention_softmax: bool = False,
        content: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        cats = schema.of_kind("categorical")
        seqs = schema.of_kind("sequence")
        cat_index = {f.name: i for i, f in enumerate(cats)}
        # (sequence position, target's categorical position) of each attended sequence
        self.attended = [(s, cat_index[f.attend_to]) for s, f in enumerate(seqs) if f.attend_to]
        self.attention = nn.ModuleList(
            TargetAttention(dim, attention_hidden, attention_softmax) for _ in self.attended
        )
        offsets, total = {}, 0
        for f in cats:
            offsets[f.name] = total
            total += vocab_sizes[f.name]
        seq_offsets = []
        for f in seqs:
            if f.vocab_from:
                seq_offsets.append(offsets[f.vocab_from])
            else:
                seq_offsets.append(total)
                total += vocab_sizes[f.name]
        self.register_buffer(
            "cat_offsets",
            torch.tensor([offsets[f.name] for f in cats], dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "seq_offsets", torch.tensor(seq_offsets, dtype=torch.long), persistent=False
        )
        self.table = nn.Embedding(max(total, 1), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        n_num = len(schema.of_kind("numeric"))
        self.num_weight = nn.Parameter(torch.randn(n_num, dim) * 0.05)
        self.num_bias = nn.Parameter(torch.zeros(n_num, dim))
        self.scenario = ScenarioTable(len(schema.scenario_names), dim)
        nn.init.normal_(self.scenario.weight, std=0.05)
        self.content: ContentFields | None = None
        if schema.content_features:
            self.content = ContentFields(schema, vocab_sizes, dim)
            if content is not None:
                self.content.load_content(content)
        n_content = len(schema.content_features)
        self.num_fields = len(cats) + len(seqs) + n_num + n_content + 1
        self.dim = dim

    def load_content(self, content: dict[str, Tensor]) -> None:
        """Fill the content matrices (a no-op for a schema without content features)."""
        if self.content is not None:
            self.content.load_content(content)

    def forward(self, batch: Batch) -> Tensor:
        fields = [lookup(self.table, batch.cat + self.cat_offsets)]  # [B, Fc, D]
        if batch.seq.shape[1]:
            ids = batch.seq + self.seq_offsets[None, :, None]  # [B, Fs, L]
            emb = lookup(self.table, ids)  # [B, Fs, L, D]
            present = (batch.seq > 0).unsqueeze(-1).to(emb.dtype)
            pooled = (emb * present).sum(2) / present.sum(2).clamp(min=1.0)  # [B, Fs, D]
            if self.attended:
                cols = list(pooled.unbind(1))
                for (s, c), unit in zip(self.attended, self.attention, strict=True):
                    cols[s] = unit(fields[0][:, c], emb[:, s], batch.seq[:, s] > 0)  # [B, D]
                pooled = torch.stack(cols, 1)
            fields.append(pooled)
        if batch.num.shape[1]:
            fields.append(batch.num.unsqueeze(-1) * self.num_weight + self.num_bias)  # [B, Fn, D]
        if self.content is not None:
            if batch.content is None:
                raise ValueError("the model has content features but the batch has no content")
            fields.append(self.content(batch.content))  # [B, Fx, D]
        fields.append(self.scenario(batch.scenario).unsqueeze(1))  # [B, 1, D]
        return torch.cat(fields, 1)  # [B, F, D]


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) stack; ``out_dim`` adds a final bare Linear."""

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...] | list[int],
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        super().__init__(*layers)
        self.out_dim = d


class DotInteraction(nn.Module):
    """All pairwise dot products of fields (DLRM / FM second order): [B, F, D] -> [B, F(F-1)/2].

    The explicit <user, item> product is what lets a model learn user x item affinities, which
    an MLP over concatenated embeddings learns poorly.
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = int(rows.numel())

    def forward(self, fields: Tensor) -> Tensor:
        gram = torch.bmm(fields, fields.transpose(1, 2))  # [B, F, F]
        return gram[:, self.rows, self.cols]


class CrossNetwork(nn.Module):
    """DCN-v2 cross layers: x_{l+1} = x0 * (W x_l + b) + x_l (Wang et al., WWW 2021)."""

    def __init__(self, dim: int, layers: int = 2) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        for lin in self.linears:
            nn.init.zeros_(lin.bias)
            nn.init.normal_(lin.weight, std=0.01)
        self.out_dim = dim

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for lin in self.linears:
            x = x0 * lin(x) + x
        return x


def interaction_features(kind: str, fields: Tensor, layer: nn.Module | None) -> Tensor:
    """The flat input of a shared bottom: concatenated fields plus their interactions."""
    flat = fields.flatten(1)  # [B, F*D]
    if kind == "none" or layer is None:
        return flat
    if kind == "dot":
        return torch.cat([flat, layer(fields)], 1)
    if kind == "cross":
        return layer(flat)
    raise ValueError(f"unknown interaction '{kind}'; valid: none, dot, cross")


def make_interaction(
    kind: str, num_fields: int, dim: int, cross_layers: int = 2
) -> tuple[nn.Module | None, int]:
    """(layer, output width) for an interaction kind."""
    flat = num_fields * dim
    if kind == "none":
        return None, flat
    if kind == "dot":
        layer = DotInteraction(num_fields)
        return layer, flat + layer.out_dim
    if kind == "cross":
        return CrossNetwork(flat, cross_layers), flat
    raise ValueError(f"unknown interaction '{kind}'; valid: none, dot, cross")


def make_input_norm(kind: str, width: int) -> nn.Module:
    """The normalisation of a bottom's input (fields plus interactions): ``none``, ``batch``
    or ``layer`` (the default of SharedBottom, MMoE, PLE and ESMM).

    With small initial embeddings (std 0.05) the first layer otherwise starts with tiny
    pre-activations, and a large-batch run (few Adam steps) spends them on scale instead of
    ranking. BatchNorm (per column, over the batch) fixed that at batch 2048 but cost 0.002-0.004
    test AUC at batch 256 on census (its statistics are noisy there, and inference uses running
    ones); LayerNorm (per row) fixes the scale without depending on the batch, and was level or
    better at both sizes on census and MovieLens (docs/BENCHMARKS.md; bench/peers/input_norm.py).
    """
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown input_norm '{kind}'; valid: none, batch, layer")
