"""What crosses the wire: a zoo model's weights split into parts, and the shared ones packed
into named numpy arrays (a Flower ``ArrayRecord``) and back.

Parts (``federated.share``):

- ``users``: the rows of the user id (the schema's group) in every ``FeatureEmbedding`` table.
  Kept in their silo by default: a silo's users' vectors never leave it.
- ``items``: everything else of the embedding modules: the other categorical rows (items,
  categories, brands, ...), numeric and scenario vectors.
- ``towers``: every weight under a ``towers`` module (one head per task).
- ``dense``: the rest (the shared bottom, experts, gates).

The user rows sit inside one concatenated table (``nn.layers.FeatureEmbedding``), so a part is
a (state key, row indices) pair: the wire carries the table's other rows, and unpacking writes
them back around the silo's own user rows. Integer buffers (BatchNorm's counters) never travel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from shopmtl.data.schema import Schema
from shopmtl.nn.layers import FeatureEmbedding


@dataclass(frozen=True, eq=False)  # eq=False: ``rows`` is a tensor
class Piece:
    """One array on the wire: ``key`` of the state dict, its ``rows`` (None: all)."""

    name: str
    key: str
    rows: Tensor | None
    part: str


def _user_rows(schema: Schema, vocab_sizes: dict[str, int], user: str) -> tuple[int, int]:
    """[start, stop) of the user id's rows in a FeatureEmbedding table (its offset order:
    the categorical features in schema order)."""
    start = 0
    for f in schema.of_kind("categorical"):
        if f.name == user:
            return start, start + vocab_sizes[f.name]
        start += vocab_sizes[f.name]
    raise ValueError(f"'{user}' is not a categorical feature")


def pieces(model: nn.Module, schema: Schema, vocab_sizes: dict[str, int],
           user: str | None) -> list[Piece]:
    """Every floating-point weight of ``model`` as pieces, each tagged with its part."""
    embeds = [n for n, m in model.named_modules() if isinstance(m, FeatureEmbedding)]
    out = []
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        prefix = next((e for e in embeds if key.startswith(f"{e}.")), None)
        if prefix is not None:
            if key == f"{prefix}.table.weight" and user is not None:
                lo, hi = _user_rows(schema, vocab_sizes, user)
                n = value.shape[0]
                other = torch.cat([torch.arange(0, lo), torch.arange(hi, n)])
                out.append(Piece(f"{key}[users]", key, torch.arange(lo, hi), "users"))
                out.append(Piece(f"{key}[other]", key, other, "items"))
            else:
                out.append(Piece(key, key, None, "items"))
        elif "towers" in key.split("."):
            out.append(Piece(key, key, None, "towers"))
        else:
            out.append(Piece(key, key, None, "dense"))
    return out


def select(all_pieces: list[Piece], parts: tuple[str, ...]) -> list[Piece]:
    return [p for p in all_pieces if p.part in parts]


def pack(model: nn.Module, chosen: list[Piece]) -> dict[str, np.ndarray]:
    """The chosen pieces of ``model``'s weights as float32 numpy arrays (copies)."""
    state = model.state_dict()
    out = {}
    for p in chosen:
        v = state[p.key].detach()
        v = v if p.rows is None else v[p.rows]
        out[p.name] = v.to(torch.float32).cpu().numpy().copy()
    return out


@torch.no_grad()
def unpack(model: nn.Module, chosen: list[Piece], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (named as ``pack`` names them) into ``model``'s weights in place; a
    missing or mis-shaped array is an error naming it."""
    state = model.state_dict()
    missing = [p.name for p in chosen if p.name not in arrays]
    if missing:
        raise ValueError(f"the update lacks arrays {missing}")
    for p in chosen:
        target = state[p.key]
        value = torch.from_numpy(np.asarray(arrays[p.name])).to(target.dtype)
        want = tuple(target.shape) if p.rows is None else (len(p.rows), *target.shape[1:])
        if tuple(value.shape) != want:
            raise ValueError(f"array '{p.name}' has shape {tuple(value.shape)}, the model "
                             f"expects {want}")
        if p.rows is None:
            target.copy_(value)
        else:
            target[p.rows] = value


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
