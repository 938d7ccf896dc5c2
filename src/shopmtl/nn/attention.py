"""Target attention over a behaviour sequence: the activation unit of DIN (Zhou et al., "Deep
Interest Network for Click-Through Rate Prediction", KDD 2018).

Each history item k is scored against the target q (the candidate item or category of the row)
by a small MLP over ``[q, k, q - k, q * k]``; the history is the score-weighted *sum* of its
items. As in the paper the scores are not normalised by default (the sum keeps the intensity of
the user's interest); ``softmax=True`` normalises them over the real items instead. Padding
(id 0) never contributes, and a history with no real item pools to zeros. The pooled vector is
a function of the set of items: reordering the history does not change it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TargetAttention(nn.Module):
    """DIN activation unit + weighted sum pooling: (q [B, D], keys [B, L, D], present [B, L])
    -> [B, D]."""

    def __init__(
        self, dim: int, hidden: tuple[int, ...] | list[int] = (36,), softmax: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 4 * dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.PReLU(h)]  # the paper uses PReLU (or Dice)
            d = h
        layers.append(nn.Linear(d, 1))
        self.mlp = nn.Sequential(*layers)
        self.softmax = softmax
        self.dim = dim

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Raw activation-unit scores [B, L] (padding not yet masked)."""
        q = query.unsqueeze(1).expand_as(keys)  # [B, L, D]
        x = torch.cat([q, keys, q - keys, q * keys], -1)  # [B, L, 4D]
        return self.mlp(x.flatten(0, 1)).view(keys.shape[:2])  # PReLU wants [N, C]: [B, L]

    def forward(self, query: Tensor, keys: Tensor, present: Tensor) -> Tensor:
        s = self.scores(query, keys)  # [B, L]
        present = present.to(torch.bool)
        if self.softmax:
            any_item = present.any(-1, keepdim=True)  # [B, 1]
            # an all-padding row gets finite logits (no NaN, even in the gradient), then zeros
            s = torch.where(any_item, s.masked_fill(~present, float("-inf")), torch.zeros_like(s))
            w = torch.softmax(s, -1)
        else:
            w = s
        w = w * present.to(w.dtype)  # padding contributes nothing
        return torch.einsum("bl,bld->bd", w, keys)  # [B, D]
