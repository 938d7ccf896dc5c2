"""Content towers: item text, images and precomputed vectors as D-dim fields.

``ContentFields`` holds every content matrix of a schema as a buffer (filled from the fitted
``data.content`` encoders, not saved in the weights: the model directory keeps them once, beside
the encoders) and maps a batch's content rows [B, Fx] to fields [B, Fx, D]:

- frozen text and vectors: a gather, then ``Linear(H -> D)``;
- images: a small CNN (``ImageTower``) over the distinct rows of the batch;
- LoRA text: the pretrained encoder, fine-tuned through rank-8 LoRA adapters on its query and
  value projections (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR
  2022), run once per distinct title of the batch, mean-pooled and L2-normalised, then
  ``Linear(H -> D)``.

Row 0 is "no content" (the key was not in the catalog): a zero vector for text and vectors (so
the field is the projection's bias), a blank image for images.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from shopmtl.data.schema import FeatureSpec, Schema

LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.05


class ImageTower(nn.Module):
    """uint8 images [N, 3, H, W] -> [N, D]: three 3x3 convolutions (the last two stride 2), a
    global average (texture and colour statistics) and a linear map."""

    def __init__(self, dim: int, channels: tuple[int, int, int] = (16, 32, 32)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.out = _projection(c3, dim)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1.0  # [N, 3, H, W] in [-1, 1]
        return self.out(self.convs(x).mean(dim=(2, 3)))  # [N, D]


class LoRATextTower(nn.Module):
    """A pretrained encoder with LoRA adapters; token ids [N, L] -> sentence vectors [N, H].

    Only the adapters train; the base weights are frozen (``requires_grad=False``).
    """

    def __init__(self, encoder: str) -> None:
        super().__init__()
        from shopmtl.data.text import load_encoder
        from shopmtl.deps import require

        peft = require("peft", "text", "text features with mode: lora")

        _, base = load_encoder(encoder)
        cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                              target_modules=["query", "value"])
        self.encoder = peft.get_peft_model(copy.deepcopy(base), cfg)  # the cached base stays frozen

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        from shopmtl.data.text import mean_pool

        width = int(mask.sum(1).max().clamp(min=1))  # drop the all-padding tail
        tokens, mask = tokens[:, :width], mask[:, :width]
        hidden = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        return mean_pool(hidden, mask)  # [N, H]


def _text_width(f: FeatureSpec) -> int:
    if f.dim:
        return f.dim
    from shopmtl.data.text import encoder_width

    return encoder_width(f.encoder)


def content_shapes(f: FeatureSpec, rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The matrices a content feature holds: name -> (shape, dtype), as ``data.content`` fits."""
    if f.kind == "image":
        h, w = f.image_size
        return {"values": ((rows, 3, h, w), torch.uint8)}
    if f.kind == "vector":
        return {"values": ((rows, f.dim), torch.float32)}
    if f.mode == "lora":
        return {"tokens": ((rows, f.max_tokens), torch.int64),
                "token_mask": ((rows, f.max_tokens), torch.int64)}
    return {"values": ((rows, _text_width(f)), torch.float32)}


class ContentFields(nn.Module):
    """Content rows [B, Fx] -> fields [B, Fx, D], one tower per content feature (schema order)."""

    def __init__(self, schema: Schema, vocab_sizes: dict[str, int], dim: int) -> None:
        super().__init__()
        self.features = schema.content_features
        self.towers = nn.ModuleDict()
        for f in self.features:
            shapes = content_shapes(f, vocab_sizes[f.name])
            for k, (shape, dtype) in shapes.items():
                # not in the state dict: the matrices are the catalog, saved with the encoders
                self.register_buffer(_buf(f.name, k), torch.zeros(shape, dtype=dtype),
                                     persistent=False)
            if f.kind == "image":
                self.towers[f.name] = ImageTower(dim)
            elif f.kind == "text" and f.mode == "lora":
                text = LoRATextTower(f.encoder)
                self.towers[f.name] = nn.ModuleDict(
                    {"encoder": text, "proj": _projection(_text_width(f), dim)}
                )
            else:
                self.towers[f.name] = _projection(shapes["values"][0][1], dim)

    def load_content(self, arrays: dict[str, Tensor]) -> None:
        """Copy the fitted matrices (``Encoders.content_tensors()``: ``<feature>.<array>``)."""
        for f in self.features:
            for k in content_shapes(f, 1):
                buf = getattr(self, _buf(f.name, k))
                src = arrays.get(f"{f.name}.{k}")
                if src is None or src.shape != buf.shape:
                    got = None if src is None else tuple(src.shape)
                    raise ValueError(f"content '{f.name}.{k}': expected shape {tuple(buf.shape)}, "
                                     f"got {got}")
                buf.copy_(src)

    def forward(self, rows: Tensor) -> Tensor:
        cols = []
        for j, f in enumerate(self.features):
            r = rows[:, j]  # [B]
            tower = self.towers[f.name]
            if f.kind == "image" or (f.kind == "text" and f.mode == "lora"):
                # each distinct item once: a batch shows popular items many times
                uniq, inverse = torch.unique(r, return_inverse=True)
                cols.append(self._heavy(f, tower, uniq)[inverse])  # [B, D]
            else:
                cols.append(tower(getattr(self, _buf(f.name, "values"))[r]))  # [B, D]
        return torch.stack(cols, 1)  # [B, Fx, D]

    def _heavy(self, f: FeatureSpec, tower: nn.Module, uniq: Tensor) -> Tensor:
        if f.kind == "image":
            return tower(getattr(self, _buf(f.name, "values"))[uniq])  # [U, D]
        tokens = getattr(self, _buf(f.name, "tokens"))[uniq]  # [U, L]
        mask = getattr(self, _buf(f.name, "token_mask"))[uniq]
        vec = torch.zeros(len(uniq), tower["proj"].in_features, device=uniq.device)
        has = uniq > 0  # row 0 (no title) stays the zero vector
        if has.any():
            vec = vec.index_put((has.nonzero().squeeze(1),),
                                tower["encoder"](tokens[has], mask[has]))
        return tower["proj"](vec)  # [U, D]


def _projection(in_dim: int, dim: int) -> nn.Linear:
    """Linear(in -> D) whose outputs start at the scale of the id embeddings (std ~0.05), so a
    new field does not dominate the dot interactions before it has learned anything."""
    lin = nn.Linear(in_dim, dim)
    nn.init.normal_(lin.weight, std=0.05)
    nn.init.zeros_(lin.bias)
    return lin


def _buf(feature: str, array: str) -> str:
    return f"content__{feature}__{array}"
