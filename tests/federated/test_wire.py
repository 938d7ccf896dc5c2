"""What crosses the wire: the user embedding rows never do (by default), the rest round-trips
exactly, and a bad update is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shopmtl.federated.wire import nbytes, pack, pieces, select, unpack


def _user_range(data, fed):
    start = 0
    for f in data.schema.of_kind("categorical"):
        if f.name == data.schema.group:
            return start, start + fed.vocab_sizes[f.name]
        start += fed.vocab_sizes[f.name]
    raise AssertionError


def test_user_embeddings_are_never_in_the_sent_arrays(prepared) -> None:
    data, fed, _ = prepared
    model = fed.build()
    lo, hi = _user_range(data, fed)
    with torch.no_grad():  # a value no other weight has
        model.embed.table.weight[lo:hi] = 7.25
    shared, local = fed.layout(model)
    sent = pack(model, shared)
    assert not any(np.any(a == 7.25) for a in sent.values())
    assert {p.part for p in shared} == {"dense", "items", "towers"}
    assert [p.part for p in local] == ["users"]
    table = model.embed.table.weight
    other = sent["embed.table.weight[other]"]
    assert other.shape == (table.shape[0] - (hi - lo), table.shape[1])
    # every floating weight but the user rows travels: the bytes add up
    total = sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point())
    assert nbytes(sent) == total - (hi - lo) * table.shape[1] * 4
    # sharing users too sends them
    everything = pack(model, select(pieces(model, data.schema, fed.vocab_sizes,
                                           data.schema.group), ("dense", "items", "towers",
                                                                "users")))
    assert np.all(everything["embed.table.weight[users]"] == 7.25)


def test_unpack_writes_the_shared_rows_around_the_local_ones(prepared) -> None:
    data, fed, _ = prepared
    a, b = fed.build(), fed.build()
    lo, hi = _user_range(data, fed)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    shared, _ = fed.layout(a)
    before_users = a.embed.table.weight[lo:hi].clone()
    unpack(a, shared, pack(b, shared))
    assert torch.equal(a.embed.table.weight[lo:hi], before_users)  # the silo's own rows
    assert torch.equal(a.embed.table.weight[hi:], b.embed.table.weight[hi:])
    assert torch.equal(a.bottom[0].weight, b.bottom[0].weight)
    arrays = pack(b, shared)
    arrays["bottom.0.weight"] = arrays["bottom.0.weight"][:, :3]
    with pytest.raises(ValueError, match=r"array 'bottom.0.weight' has shape"):
        unpack(a, shared, arrays)
    del arrays["bottom.0.weight"]
    with pytest.raises(ValueError, match=r"lacks arrays \['bottom.0.weight'\]"):
        unpack(a, shared, arrays)
