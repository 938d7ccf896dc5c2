"""Secure aggregation: Flower's SecAgg+ protocol around a round of training, so the server
sees only the weighted sum of the clients' shared arrays, never one client's.

Flower 1.42 ships SecAgg+ for its legacy API only (``flwr.server.workflow.SecAggPlusWorkflow``
on the server, ``flwr.client.mod.secaggplus_mod`` on the client, both speaking the legacy
``FitIns`` / ``FitRes`` records). This module is the adapter between them and the project's
Message-API strategy, so that the strategy, the ``ClientApp`` and the local training stay the
ones every run uses:

- server: ``SecureGrid`` wraps the strategy's grid. A round's training messages go through
  ``SecAggPlusWorkflow`` (4 stages: keys, key shares, masked vectors, unmasking); what comes
  back is one reply per client carrying the *unmasked weighted mean* (the only thing the
  protocol reveals) and the client's plain metrics (examples, bytes, losses). The strategy's
  own weighted mean of identical arrays is that mean again.
- client: ``secagg_mod`` (a ClientApp mod) runs ``secaggplus_mod`` on SecAgg+ messages and
  translates the ``FitIns`` it hands down into the message ``client_train`` reads, and the
  reply back into a ``FitRes``; other messages pass through untouched.

What it costs: each weight is clipped to ``[-secagg_clip, secagg_clip]`` and quantised to
2**22 levels before masking (an error of about ``2 * clip / 2**22`` per weight), and 3 more
message exchanges a round. What cannot combine with it (refused in ``federated.config``):
robust aggregation (trimmed mean, median, Krum need each client's update) and row-aware
averaging (needs to know which rows each client changed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shopmtl.federated.config import FederatedConfig

QUANTIZATION = 2**22  # Flower's default: levels of a weight in [-clip, clip]
MODULUS = 2**32  # Flower's default mask range; > clients * QUANTIZATION
_NAMES = "array-names"  # the FitIns config key carrying the arrays' names (legacy has none)
_DETAIL = "detail-json"  # the client's per-silo JSON travels as a FitRes metric

log = logging.getLogger("shopmtl.federated")


# -- the server's side -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Node:
    """What the workflow needs of a legacy ``ClientProxy``: its node id."""

    node_id: int


@dataclass
class _Relay:
    """The legacy strategy the workflow calls: ``configure_fit`` hands it the messages the
    Message-API strategy built; ``aggregate_fit`` keeps what the protocol revealed."""

    messages: dict[int, Any]
    names: list[str]
    results: list[Any] = field(default_factory=list)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any
                      ) -> list[tuple[_Node, Any]]:
        from flwr.common import FitIns, ndarrays_to_parameters

        out = []
        for nid, msg in self.messages.items():
            arrays = msg.content["arrays"]
            config = {k: v for k, v in msg.content["config"].items()}
            config[_NAMES] = json.dumps(self.names)
            params = ndarrays_to_parameters([arrays[n].numpy() for n in self.names])
            out.append((_Node(nid), FitIns(params, config)))
        return out

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]
                      ) -> tuple[Any, dict]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


def secure_round(grid: Any, messages: list[Any], cfg: FederatedConfig, max_weight: float,
                 timeout: float | None) -> list[Any]:
    """One round of training under SecAgg+: ``messages`` (the strategy's, one per sampled
    node) sent through the protocol; one reply per client that finished it, each holding the
    unmasked weighted mean and that client's metrics ([] if the protocol halted: too few
    clients left, and the strategy keeps the previous model)."""
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    first = messages[0].content
    names = list(first["arrays"].keys())
    rnd = int(first["config"]["server-round"])
    relay = _Relay({m.metadata.dst_node_id: m for m in messages}, names)
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                run_config={}), strategy=relay)  # type: ignore[arg-type]
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([first["arrays"][n].numpy() for n in names]), True)
    workflow = SecAggPlusWorkflow(num_shares=float(cfg.secagg_shares),
                                  reconstruction_threshold=float(cfg.secagg_threshold),
                                  max_weight=max_weight, clipping_range=cfg.secagg_clip,
                                  quantization_range=QUANTIZATION, modulus_range=MODULUS,
                                  timeout=timeout)
    workflow(grid, ctx)
    replies = []
    dtypes = {n: first["arrays"][n].numpy().dtype for n in names}
    for node, fitres in relay.results:
        mean = parameters_to_ndarrays(fitres.parameters)
        arrays = ArrayRecord({n: Array(np.asarray(a, dtype=dtypes[n]))
                              for n, a in zip(names, mean, strict=True)})
        metrics = dict(fitres.metrics)
        detail = str(metrics.pop(_DETAIL, "{}"))
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                              "detail": ConfigRecord({"json": detail})})
        replies.append(Message(content, reply_to=relay.messages[node.node_id]))
    if not replies:
        log.warning("round %d: secure aggregation halted (too few clients finished it); "
                    "the global model stays as it was", rnd)
    return replies


class SecureGrid:
    """The strategy's grid, whose training messages go through SecAgg+ (``secure_round``);
    evaluation and everything else go to the wrapped grid as they are."""

    def __init__(self, grid: Any, cfg: FederatedConfig, max_weight: float) -> None:
        self._grid = grid
        self._cfg = cfg
        self._max_weight = max_weight

    def __getattr__(self, name: str) -> Any:  # get_node_ids, push_messages, ...
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        from flwr.app import MessageType

        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        return secure_round(self._grid, messages, self._cfg, self._max_weight, timeout)


# -- the client's side -------------------------------------------------------------------------

def _clip(ctxt: Any) -> float:
    """The clipping range the server set in the protocol's setup stage (kept by
    ``secaggplus_mod`` in the node's state)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key

    state = ctxt.state.config_records.get(RECORD_KEY_STATE, {})
    return float(state.get(Key.CLIPPING_RANGE, float("inf")) or float("inf"))


def _as_fit(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """``secaggplus_mod``'s inner call: the legacy ``FitIns`` made the message
    ``client_train`` reads, its reply made a legacy ``FitRes``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = json.loads(str(config.pop(_NAMES)))
    arrays = parameters_to_ndarrays(fitins.parameters)
    msg.content = RecordDict({
        "arrays": ArrayRecord({n: Array(a) for n, a in zip(names, arrays, strict=True)}),
        "config": ConfigRecord(config)})
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    out = reply.content
    metrics: dict[str, Any] = dict(out["metrics"])
    metrics[_DETAIL] = str(out["detail"]["json"]) if "detail" in out else "{}"
    sent = [out["arrays"][n].numpy() for n in names]
    clip = _clip(ctxt)
    over = [(n, float(np.abs(a).max())) for n, a in zip(names, sent, strict=True)
            if a.size and float(np.abs(a).max()) > clip]
    if over:  # Flower's quantiser clips them silently: the aggregate would be off
        log.warning("secure aggregation: %d shared array(s) exceed secagg_clip %.3g (largest "
                    "|w| %.3g in '%s'); they are clipped: raise federated.secagg_clip",
                    len(over), clip, max(v for _, v in over), max(over, key=lambda x: x[1])[0])
    params = ndarrays_to_parameters(sent)
    fitres = FitRes(Status(Code.OK, ""), params, int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, True), reply_to=msg)


def secagg_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """A ClientApp mod: SecAgg+ training messages through Flower's ``secaggplus_mod`` (the
    update leaves the client quantised and masked), everything else untouched."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, lambda m, c: _as_fit(m, c, call_next))
