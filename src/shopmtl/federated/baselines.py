"""The two controls of a federated run, trained through the same ``client.train_silo`` (the
one loop's ``fit``) for the same total epochs: centralised training on the pooled rows (what
federation gives up by not pooling) and each silo alone (what a silo gains by federating).
Both evaluate on test rows: the pooled split, and each silo's own rows."""

from __future__ import annotations

from typing import Any

from shopmtl.data.pipeline import PreparedData
from shopmtl.federated.client import Federation, nest_auc, train_silo
from shopmtl.federated.silos import Silo, silo_data
from shopmtl.train.table import TableSource
from shopmtl.train.trainer import label_priors


def train_alone(fed: Federation, data: PreparedData, epochs: float, seed: int) -> Any:
    """A model trained on ``data`` alone for ``epochs`` (the experiment's per-epoch lr decay),
    from the federation's seeded initial weights and ``data``'s own label rates."""
    exp = fed.experiment
    model = fed.build()
    if exp.train.output_bias_prior:
        model.init_output_bias(label_priors(data.train, data.schema))
    n = data.train.num_batches(exp.train.batch_size)
    train_silo(model, data, exp, steps=max(1, round(epochs * n)), lr=exp.train.batch_lr(),
               seed=seed, decay_every=n)
    return model


def test_auc(fed: Federation, model: Any, data: PreparedData) -> dict[str, dict[str, float]]:
    source = TableSource(data, fed.experiment.train.batch_size,
                         eval_batch_size=fed.experiment.train.eval_batch_size)
    return nest_auc(source.evaluate(model, "test"))


def centralised(fed: Federation, data: PreparedData, silos: list[Silo], epochs: float,
                seed: int) -> dict[str, Any]:
    """The pooled model: its pooled test AUC and its AUC on each silo's test rows."""
    model = train_alone(fed, data, epochs, seed)
    return {"pooled": test_auc(fed, model, data),
            "silos": {s.name: test_auc(fed, model, silo_data(data, s)) for s in silos}}


def local_only(fed: Federation, data: PreparedData, silos: list[Silo], epochs: float,
               seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Each silo's own model, on its own test rows."""
    out = {}
    for s in silos:
        part = silo_data(data, s)
        out[s.name] = test_auc(fed, train_alone(fed, part, epochs, seed * 1009 + s.index), part)
    return out
