"""``shopmtl export --prune-ids F``: the embedding rows of the rarest ids dropped.

An encoder stores its vocabulary most frequent first (``CategoricalEncoder.finish``: by
training count), so the rarest ids of a vocabulary of ``n`` values are its tail: ids
``n - k + 1 .. n`` with ``k = floor(F * n)``. Pruning keeps ids ``0 .. n - k`` and drops the
rest in two places at once, so that the bundle stays one consistent model:

- the bundle's ``encoders.json`` holds the shortened vocabulary, so a dropped value now reads
  as the unknown row 0, exactly as a value unseen in training does (and in a sequence it is
  absent from the pooling, as an unseen item is);
- the model's one embedding table (``nn.layers.FeatureEmbedding``: every vocabulary stacked,
  one offset each) becomes a new, shorter table holding each vocabulary's kept rows, with the
  offsets recomputed. A sequence with ``vocab_from`` reads its categorical's rows, so it follows
  that vocabulary's cut; a sequence with its own vocabulary is cut as a categorical is.

The held-out rows the export measures on are re-encoded the same way (``reencode``: a dropped
id becomes 0), so parity compares the graph with the pruned model on the inputs the bundle's
reader produces, and the AUC reported is what the pruned bundle gives. Kept whole, and named in
the report: hashed vocabularies (``buckets`` > 0: ids carry no frequency), and every vocabulary
too small to lose an id (at least one real id is always kept). The source model is never
changed: the caller hands a copy.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from shopmtl.config import ConfigError
from shopmtl.data.encoders import Encoded
from shopmtl.data.schema import Schema
from shopmtl.export.prune import n_params
from shopmtl.models.base import MultiTaskModel
from shopmtl.nn.layers import FeatureEmbedding

CRITERION = ("the rarest F of each vocabulary by training frequency: the stored order (most "
             "frequent first), its last floor(F * n) ids dropped; a dropped value reads as the "
             "unknown id 0; hashed vocabularies kept whole; at least one real id kept")


def check_fraction(fraction: float) -> float:
    """``F`` must lie strictly between 0 and 1 (nothing dropped, or every id)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--prune-ids {fraction:g}: the fraction of ids to drop must lie "
                          "strictly between 0 and 1")
    return fraction


def _own_vocabularies(schema: Schema) -> list[tuple[str, str]]:
    """(feature, section of encoders.json) of every feature with its own vocabulary, in the
    order ``FeatureEmbedding`` stacks them: the categoricals, then the sequences without
    ``vocab_from``."""
    return ([(f.name, "categorical") for f in schema.of_kind("categorical")]
            + [(f.name, "sequence_vocab") for f in schema.of_kind("sequence")
               if f.vocab_from is None])


def plan(schema: Schema, encoders_json: dict[str, Any], fraction: float
         ) -> tuple[dict[str, int], dict[str, Any]]:
    """Per vocabulary, the real ids kept (``keep``: ids 1..keep stay) and its report entry;
    hashed vocabularies are absent from ``keep`` (kept whole)."""
    keep: dict[str, int] = {}
    report: dict[str, Any] = {}
    for name, section in _own_vocabularies(schema):
        enc = encoders_json[section][name]
        if enc.get("buckets"):
            report[name] = {"kept_whole": f"hashed into {enc['buckets']} buckets: ids carry "
                                          "no training frequency"}
            continue
        n = len(enc["vocabulary"])
        kept = n - min(int(fraction * n), max(n - 1, 0))  # at least one real id stays
        keep[name] = kept
        entry: dict[str, Any] = {"ids_before": n, "ids_after": kept}
        if kept == n:
            entry["kept_whole"] = "too few ids to drop one"
        report[name] = entry
    return keep, report


def shortened_encoders(schema: Schema, encoders_json: dict[str, Any], keep: dict[str, int]
                       ) -> dict[str, Any]:
    """``encoders.json`` with each pruned vocabulary cut to its first ``keep`` values (a new
    dict; the source's untouched)."""
    out = copy.deepcopy(encoders_json)
    for name, section in _own_vocabularies(schema):
        if name in keep:
            out[section][name]["vocabulary"] = out[section][name]["vocabulary"][: keep[name]]
    return out


def _vocab_of(schema: Schema) -> dict[str, str]:
    """Each categorical / sequence feature -> the feature whose vocabulary it reads."""
    return {**{f.name: f.name for f in schema.of_kind("categorical")},
            **{f.name: f.vocab_from or f.name for f in schema.of_kind("sequence")}}


def reencode(enc: Encoded, schema: Schema, keep: dict[str, int]) -> Encoded:
    """``enc`` as the shortened encoders would have encoded the same rows: every id above its
    vocabulary's ``keep`` becomes 0 (a new ``Encoded``; ``enc`` untouched)."""
    vocab = _vocab_of(schema)
    cat, seq = enc.cat.copy(), enc.seq.copy()
    for j, f in enumerate(schema.of_kind("categorical")):
        if (k := keep.get(vocab[f.name])) is not None:
            cat[:, j][cat[:, j] > k] = 0
    for s, f in enumerate(schema.of_kind("sequence")):
        if (k := keep.get(vocab[f.name])) is not None:
            seq[:, s][seq[:, s] > k] = 0
    return dataclasses.replace(enc, cat=cat, seq=seq)


@torch.no_grad()
def prune_table(embed: FeatureEmbedding, schema: Schema, sizes: dict[str, int],
                keep: dict[str, int]) -> None:
    """Replace ``embed.table`` by a new table of each vocabulary's rows ``0..keep`` (all rows
    of one kept whole; ``sizes``: each vocabulary's rows before, OOV included) and recompute
    the offsets. The old table is not modified (sliced copies only)."""
    weight = embed.table.weight.detach()
    parts, new_offset, start, total = [], {}, 0, 0
    for name, _ in _own_vocabularies(schema):
        rows = keep[name] + 1 if name in keep else sizes[name]
        parts.append(weight[start : start + rows])
        new_offset[name] = total
        start += sizes[name]
        total += rows
    if start != weight.shape[0] and not (start == 0 and weight.shape[0] == 1):
        raise ValueError(f"--prune-ids: the embedding table has {weight.shape[0]} rows, the "
                         f"encoders' vocabularies {start}")
    table = nn.Embedding(max(total, 1), weight.shape[1])
    if total:
        table.weight.copy_(torch.cat(parts))
    embed.table = table
    vocab = _vocab_of(schema)
    embed.cat_offsets = torch.tensor([new_offset[f.name] for f in schema.of_kind("categorical")],
                                     dtype=torch.long)
    embed.seq_offsets = torch.tensor(
        [new_offset[vocab[f.name]] for f in schema.of_kind("sequence")], dtype=torch.long)


def prune_ids(model: MultiTaskModel, schema: Schema, encoders_json: dict[str, Any],
              fraction: float) -> tuple[dict[str, int], dict[str, Any]]:
    """Drop the rarest ``fraction`` of every learnt vocabulary from ``model`` (in place: hand
    it a copy) and say what went: returns ``keep`` (``reencode``, ``shortened_encoders``) and
    the report written into meta.json as ``id_pruning``."""
    check_fraction(fraction)
    embed = getattr(model, "embed", None)
    if not isinstance(embed, FeatureEmbedding):
        raise ConfigError(f"--prune-ids: a {type(model).__name__} model has no feature "
                          "embedding table to prune")
    keep, vocabularies = plan(schema, encoders_json, fraction)
    sizes = {name: len(encoders_json[sec][name].get("vocabulary", ())) + 1
             if not encoders_json[sec][name].get("buckets")
             else encoders_json[sec][name]["buckets"] + 1
             for name, sec in _own_vocabularies(schema)}
    before = n_params(model)
    prune_table(embed, schema, sizes, keep)
    return keep, {"fraction": fraction, "criterion": CRITERION, "vocabularies": vocabularies,
                  "embedding_rows": {"before": sum(sizes.values()),
                                     "after": int(embed.table.weight.shape[0])},
                  "params": {"before": before, "after": n_params(model)}}


def summary(report: dict[str, Any]) -> str:
    """One line: what id pruning removed (the CLI prints it)."""
    r, p = report["embedding_rows"], report["params"]
    return (f"pruned ids {report['fraction']:g}: embedding rows {r['before']:,} -> "
            f"{r['after']:,}, parameters {p['before']:,} -> {p['after']:,} "
            f"({p['after'] / p['before']:.2f}x)")

