"""Faulty clients: who is dropped from a round and why, and the fault injection that tests it.

The server trusts no reply. Before a round is aggregated, ``Guard`` (a strategy wrapper, like
Flower's own DP wrappers: it holds the real strategy and passes every call through) checks
each train reply with ``check_reply`` and drops

- a client whose ClientApp raised (Flower turns the exception into an error reply),
- a client that did not answer within ``federated.round_timeout`` (Flower's Grid timeout:
  ``send_and_receive`` returns what arrived; the late reply is never pulled),
- a reply larger than what was sent (``oversized``), with other arrays, shapes or dtypes
  than were sent (``shape``), with a NaN or an infinity, or without ``num-examples``;

with one log line naming the silo (or the node id, for a node that never said which silo it
is) and the reason, never a value of the reply. With at least ``federated.min_clients`` valid
replies the round aggregates them; with fewer it keeps the previous global model (logged).

``FaultConfig`` (``federated.faults``) is a test tool, not a feature: it makes named silos
fail on purpose in given rounds (``inject_*``, called by the client) so that the tests and
the docs can show the handling above.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shopmtl.keys import check_fields, key

KINDS = ("ok", "exception", "timeout", "nan", "shape", "oversized")


@dataclass(frozen=True)
class FaultConfig:
    """A TEST TOOL (docs/FEDERATED.md, "Faults"): silos that fail on purpose. ``silos`` maps
    a silo's name to its behaviour round by round: ``[exception, ok, nan]`` raises in round
    1, is healthy in round 2, sends NaNs in round 3; rounds past the list are healthy."""

    silos: dict[str, tuple[str, ...]] = key(
        factory=dict, doc="TEST TOOL: silo name -> its fault in round 1, 2, ... (ok, "
                          "exception, timeout, nan, shape, oversized); later rounds are healthy")
    delay: float = key(0.0, "TEST TOOL: seconds a 'timeout' fault sleeps (0: "
                            "federated.round_timeout + 1)", ge=0)

    def __post_init__(self) -> None:
        check_fields(self)
        for silo, kinds in self.silos.items():
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"federated.faults.silos.{silo}: unknown fault {bad[0]!r}; "
                                 f"one of {list(KINDS)}")


def fault_for(faults: FaultConfig, silo: str, rnd: int) -> str:
    """The fault ``silo`` shows in round ``rnd`` (``ok``: none)."""
    kinds = faults.silos.get(silo, ())
    return kinds[rnd - 1] if 0 < rnd <= len(kinds) else "ok"


class InjectedFault(RuntimeError):
    """What a silo with an ``exception`` fault raises (a test tool)."""


def inject_before(kind: str, delay: float) -> None:
    """The client's faults before it trains: a crash, or a sleep past the round's timeout
    (it then answers, too late: the server has moved on)."""
    if kind == "exception":
        raise InjectedFault("injected fault (federated.faults): exception")
    if kind == "timeout":
        time.sleep(delay)


def inject_after(kind: str, sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's faults in what it sends: NaNs in the first array, one row less in the
    first array, or an extra array four times the size of the whole update."""
    if kind not in ("nan", "shape", "oversized"):
        return sent
    out = dict(sent)
    first = next(iter(out))
    if kind == "nan":
        out[first] = np.full_like(out[first], np.nan)
    elif kind == "shape":
        out[first] = out[first][:-1] if out[first].ndim else out[first].reshape(1)
    else:
        total = sum(v.size for v in out.values())
        out["padding"] = np.zeros(4 * total, np.float32)
    return out


# -- the server's checks -------------------------------------------------------------------

Spec = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape, dtype) as sent


def spec_of(arrays: Any) -> Spec:
    """What a reply must hold: the names, shapes and dtypes of the arrays sent."""
    return {k: (tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in arrays.items()}


def spec_bytes(spec: Spec) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in spec.values())


# an exception's type at the start of a traceback line ("pkg.mod.SomeError: ..."): in a
# chained traceback the first one is the root cause (the engine wraps it in its own types)
_EXC_LINE = re.compile(r"^\s*((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Fault|Interrupt))"
                       r"(?::|$)", re.MULTILINE)
_EXC_CLASS = re.compile(r"<class '([\w.()]+)'>")


def error_reason(msg: Any) -> str:
    """An error reply's reason without its free text: Flower's error code and the type of
    the exception that caused it (its message, or a traceback's lines, may quote data)."""
    from flwr.common.constant import ErrorCode

    code = int(msg.error.code)
    names = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}
    text = str(msg.error.reason)
    m = _EXC_LINE.search(text) or _EXC_CLASS.search(text)
    kind = m.group(1).rsplit(".", 1)[-1] if m else "no exception type given"
    return f"crashed ({names.get(code, f'error code {code}')}: {kind})"


def _nbytes(a: Any) -> int:
    """An array's bytes from its header (shape x item size), without decoding it; an
    unknown dtype counts as the bytes carried."""
    try:
        return math.prod(a.shape) * np.dtype(a.dtype).itemsize
    except TypeError:
        return len(a.data)


def check_reply(msg: Any, spec: Spec) -> str | None:
    """Why a train reply cannot be aggregated, or None when it can: an error reply, no
    arrays, more bytes than were sent, other names / shapes / dtypes than were sent,
    non-finite values, no positive ``num-examples``. One line naming array names only."""
    if msg.has_error():
        return error_reason(msg)
    content = msg.content
    if "arrays" not in content.array_records:
        return "no arrays in the reply"
    arrays = content.array_records["arrays"]
    got = sum(_nbytes(a) for a in arrays.values())
    want = spec_bytes(spec)
    if got > want:
        return f"oversized: {got:,} bytes of arrays, {want:,} sent"
    missing = sorted(set(spec) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(spec))
    if missing or extra:
        return f"wrong arrays: {len(missing)} missing, {len(extra)} unexpected"
    for name, (shape, dtype) in spec.items():
        a = arrays[name]
        if tuple(a.shape) != shape or a.dtype != dtype:
            return f"wrong shape: {name} is {tuple(a.shape)} {a.dtype}, {shape} {dtype} sent"
    for name in spec:
        if not np.isfinite(arrays[name].numpy()).all():
            return f"non-finite values in {name}"
    metrics = content.metric_records.get("metrics")
    n = metrics.get("num-examples") if metrics is not None else None
    if not isinstance(n, int | float) or not n > 0:
        return "no positive num-examples"
    return None


class Guard:
    """Flower strategy ``inner`` behind the checks above. ``names``: node id -> silo name
    (the roll call's answers); ``min_replies``: the fewest valid replies a round aggregates.
    ``dropped[round]``: {silo or node: reason} of every round."""

    def __init__(self, inner: Any, min_replies: int, timeout: float,
                 log: Callable[[str], None] = print) -> None:
        self.inner = inner
        self.min_replies = min_replies
        self.timeout = timeout
        self.log = log
        self.names: dict[int, str] = {}
        self.dropped: dict[int, dict[str, str]] = {}
        self._spec: Spec = {}
        self._sent_to: list[int] = []

    def name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any
                        ) -> Iterable[Any]:
        self._spec = spec_of(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent_to = [m.metadata.dst_node_id for m in messages]
        return messages

    def expect(self, nodes: list[int]) -> None:
        """The nodes the next ``aggregate_train`` waits for (a cyclic round sends its
        messages one at a time: ``resume.cyclic_train``)."""
        self._sent_to = list(nodes)

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        replies = list(replies)
        dropped: dict[str, str] = {}
        answered = {m.metadata.src_node_id for m in replies}
        for node in self._sent_to:
            if node not in answered:
                dropped[self.name(node)] = f"timed out (no reply within {self.timeout:g} s)"
        valid = []
        for m in replies:
            reason = check_reply(m, self._spec)
            if reason is None:
                valid.append(m)
            else:
                dropped[self.name(m.metadata.src_node_id)] = reason
        for who, reason in sorted(dropped.items()):
            self.log(f"round {server_round}: dropped {who}: {reason}")
        self.dropped.setdefault(server_round, {}).update(dropped)  # a cyclic round: per step
        if len(valid) < self.min_replies:
            self.log(f"round {server_round}: {len(valid)} valid replies, fewer than "
                     f"federated.min_clients = {self.min_replies}: the previous global model "
                     "is kept")
            return None, None
        return self.inner.aggregate_train(server_round, valid)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any
                           ) -> Iterable[Any]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        # a client that crashes or is late in evaluation is only missing from that round's
        # per-silo table; Flower's strategy skips error replies itself
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
