"""``shopmtl export --prune R``: structured pruning of a zoo model before it is exported.

Structured, so the result is a smaller model of the same class with the same forward (fewer
experts, narrower layers), not a model with zeros in it: every Linear is sliced, and the graph
exported from it is smaller and does less work. The criteria, applied with one fraction ``R``:

- experts (MMoE, PLE): drop ``floor(R * n)`` experts of each group (MMoE: the experts; PLE, per
  level: the shared experts, and each task's own experts) with the least mean gate weight, the
  mean over the ``--data`` rows and over every gate that mixes the expert. The gates' output
  rows of the dropped experts are removed, so the softmax renormalises over the kept ones. A
  group always keeps at least one expert (``R < 1``).
- hidden units of MLPs (SharedBottom's bottom, every task tower built as an ``MLP``): drop
  ``floor(R * h)`` units of each hidden layer with the smallest L2 norm of their outgoing
  weights (the columns of the next Linear, or of every tower's first Linear for the bottom's
  last layer). The layer's output rows and the next layers' input columns are sliced.

Kept whole, and named in the report: the embedding tables, the interaction and input norm
(the model's input width does not change), the experts' inner units, and any tower that is not
a plain ``MLP`` (PEPNet's gated towers: scaling inputs by a gate makes slicing unsafe). No
MLP of the zoo has a BatchNorm or LayerNorm between its layers, so no norm is sliced. This
module only slices; ``export.finetune`` trains the sliced model more when ``--finetune`` asks
(``CRITERIA["fine_tune"]`` is "none" otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.config import ConfigError
from shopmtl.data.encoders import Encoded
from shopmtl.models.base import MultiTaskModel
from shopmtl.models.mmoe import MMoE
from shopmtl.models.ple import PLE
from shopmtl.models.shared_bottom import SharedBottom
from shopmtl.nn.layers import MLP
from shopmtl.nn.moe import CGC, Experts, Gate
from shopmtl.predict import torch_forward

CRITERIA = {
    "experts": "drop floor(R * n) experts of each group with the least mean gate weight over "
               "the --data rows (mean over every gate mixing the expert); the gates' rows of the "
               "dropped experts removed (softmax renormalised over the kept ones)",
    "units": "drop floor(R * h) units of each hidden MLP layer with the smallest L2 norm of "
             "their outgoing weights; the Linear layers sliced in and out",
    "fine_tune": "none",
}


def check_ratio(ratio: float) -> float:
    """``R`` must lie strictly between 0 and 1 (nothing pruned, or everything)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--prune {ratio:g}: the fraction to prune must lie strictly between "
                          "0 and 1")
    return ratio


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sliced(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None
            ) -> nn.Linear:
    """A new Linear with the output ``rows`` and input ``cols`` of ``linear`` (None: all)."""
    w = linear.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    return out


def _lowest(scores: Tensor, ratio: float) -> Tensor:
    """The sorted indices to keep: all but the ``floor(ratio * n)`` lowest scores."""
    n = scores.numel()
    keep = n - int(ratio * n)
    return torch.sort(torch.topk(scores, keep).indices).values


# -- hidden units ------------------------------------------------------------------------------

Slot = tuple[nn.Module, str]  # (parent module, attribute name) of a Linear


def _linear_slots(mlp: nn.Sequential) -> list[Slot]:
    return [(mlp, name) for name, m in mlp.named_children() if isinstance(m, nn.Linear)]


def _prune_layer(producer: Slot, consumers: list[Slot], ratio: float) -> dict[str, int]:
    """Drop the units of ``producer``'s output whose outgoing weights (the columns of every
    consumer) have the smallest L2 norm; slice the producer's rows, the consumers' columns."""
    out_w = torch.cat([getattr(m, a).weight.detach() for m, a in consumers])  # [sum out, h]
    keep = _lowest(out_w.norm(dim=0), ratio)
    setattr(producer[0], producer[1], _sliced(getattr(*producer), rows=keep))
    for m, a in consumers:
        setattr(m, a, _sliced(getattr(m, a), cols=keep))
    return {"before": out_w.shape[1], "after": len(keep), "kept": keep.tolist()}


def prune_mlp(mlp: nn.Sequential, ratio: float, consumers: list[Slot] | None = None
              ) -> list[dict[str, int]]:
    """Every hidden layer of ``mlp``: one whose output another Linear of ``mlp`` reads, and
    the last too when ``consumers`` (the Linears reading ``mlp``'s output) are given."""
    slots = _linear_slots(mlp)
    report = [_prune_layer(p, [c], ratio) for p, c in pairwise(slots)]
    if consumers:
        report.append(_prune_layer(slots[-1], consumers, ratio))
        mlp.out_dim = getattr(*slots[-1]).out_features
    return report


def _prune_towers(model: MultiTaskModel, ratio: float) -> tuple[dict, list[str]]:
    towers = getattr(model, "towers", {})
    done, skipped = {}, []
    for name, tower in towers.items():
        if isinstance(tower, MLP):
            done[name] = prune_mlp(tower, ratio)
        else:
            skipped.append(f"tower {name} ({type(tower).__name__}: not a plain MLP)")
    return done, skipped


# -- experts -----------------------------------------------------------------------------------

def keep_experts(experts: Experts, keep: Tensor) -> None:
    """Slice the packed experts to ``keep`` (sorted indices): the first Linear's row blocks and
    the deeper layers' expert axis."""
    h0 = experts.hidden[0]
    rows = (keep[:, None] * h0 + torch.arange(h0)).flatten()
    experts.first = _sliced(experts.first, rows=rows)
    for i in range(len(experts.weights)):
        experts.weights[i] = nn.Parameter(experts.weights[i].detach()[keep].clone())
        experts.biases[i] = nn.Parameter(experts.biases[i].detach()[keep].clone())
    experts.n = len(keep)


def keep_gate(gate: Gate, keep: Tensor) -> None:
    """Only ``keep``'s logits: the softmax renormalises over the kept experts."""
    gate.linear = _sliced(gate.linear, rows=keep)


class GateMeans:
    """Sums of each gate's softmax weights over the rows seen (``mean`` divides by them)."""

    def __init__(self) -> None:
        self.sums: dict[int, Tensor] = {}
        self.rows = 0

    def add(self, key: int, gate: Gate, x: Tensor) -> None:
        w = torch.softmax(gate.linear(x), -1).sum(0)
        self.sums[key] = self.sums.get(key, 0) + w

    def mean(self, key: int) -> Tensor:
        return self.sums[key] / max(self.rows, 1)


def _collect(model: MultiTaskModel, enc: Encoded, hook_on: list[nn.Module],
             on_input: Callable[[GateMeans, nn.Module, tuple, Any], None]) -> GateMeans:
    """Run ``model`` over ``enc`` with a forward hook on each of ``hook_on``; the hooks add
    gate weights to one ``GateMeans``."""
    means = GateMeans()
    handles = [m.register_forward_hook(lambda mod, args, out: on_input(means, mod, args, out))
               for m in hook_on]
    try:
        means.rows = len(enc)
        torch_forward(model)(enc)
    finally:
        for h in handles:
            h.remove()
    return means


def prune_mmoe(model: MMoE, enc: Encoded, ratio: float) -> dict[str, Any]:
    """MMoE: every gate reads the input norm's output; the experts' score is their mean weight
    over the rows and the task gates."""
    gates = list(model.gates.values())

    def on_input(means: GateMeans, mod, args, x: Tensor) -> None:
        for i, g in enumerate(gates):
            means.add(i, g, x)

    means = _collect(model, enc, [model.input_norm], on_input)
    score = torch.stack([means.mean(i) for i in range(len(gates))]).mean(0)
    keep = _lowest(score, ratio)
    keep_experts(model.experts, keep)
    for g in gates:
        keep_gate(g, keep)
    return {"levels": [{"experts": {"before": len(score), "after": len(keep),
                                    "kept": keep.tolist(),
                                    "mean_gate_weight": score.tolist()}}]}


def _cgc_scores(cgc: CGC, means: GateMeans, base: int) -> tuple[list[Tensor], Tensor]:
    """Per group of one PLE level (each task's own experts, the shared ones), each expert's
    mean weight over the gates that mix it: its task gate (or every task gate) and the shared
    gate when the level has one."""
    n_tasks, ns = len(cgc.specific), cgc.specific[0].n
    task_w = [means.mean(base + t) for t in range(n_tasks)]  # [ns + nsh] each
    shared_w = means.mean(base + n_tasks) if cgc.shared_gate is not None else None
    specific = []
    for t in range(n_tasks):
        parts = [task_w[t][:ns]] + ([shared_w[t * ns:(t + 1) * ns]] if shared_w is not None
                                    else [])
        specific.append(torch.stack(parts).mean(0))
    parts = [w[ns:] for w in task_w] + ([shared_w[n_tasks * ns:]] if shared_w is not None
                                        else [])
    return specific, torch.stack(parts).mean(0)


def _prune_cgc(cgc: CGC, specific: list[Tensor], shared: Tensor, ratio: float
               ) -> dict[str, Any]:
    n_tasks, ns = len(cgc.specific), cgc.specific[0].n
    keep_spec = [_lowest(s, ratio) for s in specific]
    keep_shared = _lowest(shared, ratio)
    for t, gate in enumerate(cgc.task_gates):
        keep_gate(gate, torch.cat([keep_spec[t], ns + keep_shared]))
    if cgc.shared_gate is not None:
        keep_gate(cgc.shared_gate, torch.cat([*(t * ns + k for t, k in enumerate(keep_spec)),
                                              n_tasks * ns + keep_shared]))
    for e, k in zip(cgc.specific, keep_spec, strict=True):
        keep_experts(e, k)
    keep_experts(cgc.shared, keep_shared)
    return {"shared": {"before": len(shared), "after": len(keep_shared),
                       "kept": keep_shared.tolist()},
            "specific": [{"before": len(s), "after": len(k), "kept": k.tolist()}
                         for s, k in zip(specific, keep_spec, strict=True)]}


def prune_ple(model: PLE, enc: Encoded, ratio: float) -> dict[str, Any]:
    """PLE: each level's gates read that level's inputs (a hook on each CGC)."""
    stride = len(model.task_names) + 1
    index = {id(c): i for i, c in enumerate(model.levels)}

    def on_input(means: GateMeans, cgc: CGC, args: tuple, out: Any) -> None:
        task_in, shared_in = args
        base = index[id(cgc)] * stride
        for t, g in enumerate(cgc.task_gates):
            means.add(base + t, g, task_in[t])
        if cgc.shared_gate is not None:
            means.add(base + len(cgc.task_gates), cgc.shared_gate, shared_in)

    means = _collect(model, enc, list(model.levels), on_input)
    scores = [_cgc_scores(c, means, i * stride) for i, c in enumerate(model.levels)]
    return {"levels": [_prune_cgc(c, spec, sh, ratio)
                       for c, (spec, sh) in zip(model.levels, scores, strict=True)]}


# -- the model ---------------------------------------------------------------------------------

PRUNED_PARTS = {"towers", "experts", "gates", "levels", "bottom"}


def _kept_whole(model: MultiTaskModel, experts: bool) -> list[str]:
    """The model's parts with weights that pruning did not touch (embeddings, interaction,
    input norm, a STAR's star FC, ...), named as its attributes."""
    kept = [name for name, m in model.named_children()
            if name not in PRUNED_PARTS and any(True for _ in m.parameters())]
    return kept + (["the experts' inner units (experts are pruned whole)"] if experts else [])


@torch.no_grad()
def prune(model: MultiTaskModel, enc: Encoded, ratio: float) -> dict[str, Any]:
    """Prune ``model`` in place by ``ratio`` (module docstring); ``enc``: the rows the gate
    weights are averaged over. Returns the report written into the bundle's meta.json."""
    check_ratio(ratio)
    model.eval()
    before = n_params(model)
    report: dict[str, Any] = {"ratio": ratio, "criteria": CRITERIA, "rows": len(enc)}
    if isinstance(model, MMoE):
        report["experts"] = prune_mmoe(model, enc, ratio)
    elif isinstance(model, PLE):
        report["experts"] = prune_ple(model, enc, ratio)
    towers, skipped = _prune_towers(model, ratio)
    if isinstance(model, SharedBottom):
        consumers = [_linear_slots(t)[0] for t in model.towers.values()]
        report["units_bottom"] = prune_mlp(model.bottom, ratio, consumers)
    report["units_towers"] = towers
    if not towers and "experts" not in report:
        raise ConfigError(f"--prune: nothing of a {type(model).__name__} model can be pruned "
                          "safely (no experts, no plain MLP tower)")
    report["kept_whole"] = _kept_whole(model, "experts" in report) + skipped
    report["params"] = {"before": before, "after": n_params(model)}
    return report


def summary(report: dict[str, Any]) -> str:
    """One line: what pruning removed (the CLI prints it)."""
    p = report["params"]
    return (f"pruned {report['ratio']:g}: parameters {p['before']:,} -> {p['after']:,} "
            f"({p['after'] / p['before']:.2f}x)")

