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


def test_a_client_can_keep_its_optimizer_state_between_rounds(prepared) -> None:
    """``federated.keep_optimizer``: the moments travel through the client's own (flat,
    named) arrays and continue where they stopped: two 6-step fits with the state carried
    over equal one 12-step fit; without it the second fit restarts Adam and differs."""
    from shopmtl.federated.client import optimizer_arrays, optimizer_state

    data, fed, info = prepared
    torch.set_num_threads(1)
    part = silo_data(data, info["_silos"][0])

    def run(chunks: int, carry: bool) -> dict:
        model = fed.build()
        state, opt = None, None
        for _ in range(chunks):
            res = train_silo(model, part, fed.experiment, steps=12 // chunks, lr=0.01, seed=3,
                             start=state, optimizer_state=opt)
            state = res.state
            opt = optimizer_state(optimizer_arrays(res.optimizer)) if carry else None
        assert state.step == 12 and res.optimizer
        return {k: v.clone() for k, v in model.state_dict().items()}

    whole, kept, fresh = run(1, True), run(2, True), run(2, False)
    assert all(torch.allclose(whole[k], kept[k], atol=1e-6) for k in whole)
    assert any(not torch.allclose(whole[k], fresh[k], atol=1e-4) for k in whole)
