"""A/B testing (docs/ABTEST.md): a simulated shop with known truth, experiments in the service,
their event store, the statistics and the decision report.

``events``: the one event store (SQLite in WAL mode) that the simulator and the service write
and ``abtest analyze`` reads; ``assign``: the salted-hash assignment of users to arms;
``shop``: the simulated shop on the synthetic world's truth; ``ope``: off-policy evaluation
(exact Plackett-Luce propensities, IPS / SNIPS / DR); ``run``: ``shopmtl abtest run``.
"""
