"""Federated multi-scenario multi-task training on Flower (docs/FEDERATED.md).

Silos that never pool their rows train the one shared model: ``config`` (the ``federated``
section), ``silos`` (rows, tasks and availability per silo), ``wire`` (what crosses the wire:
user embedding rows stay local by default), ``proximal`` (FedProx's term as a regulariser of
the one loop), ``client`` (the ClientApp: local training is ``train.loop.fit``), ``server``
(the strategy on Flower's simulation engine, per-round evaluation, metrics.json) and
``report``. An app: it sits at the top of the layers, beside ``run`` and ``serve``.
``dp``: client-level differential privacy (Flower's fixed-clipping wrappers, its accountant).
``joint``: the joint model federated, one silo per group of its sources (the text adapter on
the wire, every head in its owner's silo).
"""
