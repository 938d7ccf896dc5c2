"""FedProx's term, a regulariser source around the one loop: mu > 0 changes the local update
and keeps it nearer the global model than mu = 0 from the same start and batches."""

from __future__ import annotations

import torch

from shopmtl.federated.client import train_silo
from shopmtl.federated.silos import silo_data
from shopmtl.federated.wire import pack


def _delta(fed, data, mu: float) -> tuple[dict, dict]:
    model = fed.build()
    shared, _ = fed.layout(model)
    start = pack(model, shared)
    res = train_silo(model, data, fed.experiment, steps=12, lr=0.01, seed=3, mu=mu,
                     anchor=shared)
    assert res.state.step == 12
    return start, pack(model, shared)


def test_the_proximal_term_changes_the_local_update_and_pulls_it_back(prepared) -> None:
    data, fed, info = prepared
    torch.set_num_threads(1)
    part = silo_data(data, info["_silos"][0])
    start, free = _delta(fed, part, 0.0)
    start2, prox = _delta(fed, part, 5.0)
    assert all((start[k] == start2[k]).all() for k in start)  # the same global model
    dist = {name: sum(float(((w[k] - s[k]) ** 2).sum()) for k in s)
            for name, w, s in (("free", free, start), ("prox", prox, start))}
    assert dist["prox"] < 0.9 * dist["free"]
    assert any(not (free[k] == prox[k]).all() for k in free)
    # mu = 0 is plain local training: the same steps give the same weights
    _, again = _delta(fed, part, 0.0)
    assert all((again[k] == free[k]).all() for k in free)
