"""Last stage of a joint run (``train.solve_heads``): each table head's output layer solved.

After the joint steps and the head refits, the shared adapter and every head's trunk are fixed.
A ``TableHead`` task's logit is then linear in fixed inputs: the trunk's features, the text's
n-gram bag (the wide term) and its frozen sentence vector (the ``vector`` term). With a binary
(logistic), multiclass (softmax) or regression (squared) loss that is a generalised linear
model, which Adam on batches of 64 rows, stopped early on a mean over sources, leaves short of
its optimum: a logistic regression on [n-grams, sentence vector] beats the joint heads
(``bench/text_probe.py``). So each such task's output layer is solved here by full-batch
L-BFGS with an L2 penalty, over a path of penalties from strong to weak (each solve starts
from the previous one; last-layer retraining, Kirichenko et al. 2023). Two candidates:

- the whole layer, trunk term included. It tends to lose on validation: the trunk's features
  were fit to the same training rows, so the solution leans on them;
- the linear part alone (n-grams, sentence vector, bias), the trunk term dropped, then mixed
  with the trained layer: (1 - a) trained + a linear, a in ``MIX``, is again one output layer.

The penalty and the candidate are picked on validation (ties in a coarse metric such as
accuracy go to the lower loss), and the choice replaces the trained layer only when it scores
better there. Only the wide rows some training text of the source uses are free; an n-gram seen
only in validation or test keeps its weight (zero: it never had a gradient).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shopmtl.data.schema import TaskSpec
from shopmtl.joint.model import JointModel, TableHead, squeeze_logits
from shopmtl.joint.parts import SourcePart, eval_mode
from shopmtl.tasks import TASK_TYPES

# the task types whose loss is convex and smooth in the logits (pinball and listwise are not
# solved here: the quantile loss has kinks L-BFGS handles badly; a ranking head has no linear
# output layer)
SOLVABLE = ("binary", "multiclass", "regression")
# the weights a of the solved linear part in (1 - a) trained layer + a linear part
MIX = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Inputs:
    """One split's fixed inputs to a head's output layer."""

    h: Tensor  # trunk features [n, H]
    bags: Bags | None  # the n-gram bags over the free wide rows (``bag_matrix``)
    vectors: Tensor | None  # frozen sentence vectors [n, W]
    labels: dict[str, Tensor]


@dataclass
class Bags:
    """The n-gram bags as a sparse design matrix: x [n, u] (row i holds text i's n-gram
    weights on the u free rows) and its transpose for the backward. A full-batch pass is one
    sparse matrix product each way: ~30x faster than ``embedding_bag`` on the 2M n-grams of the
    reviews' training split, whose backward sorts the ids."""

    x: Tensor  # sparse CSR [n, u]
    xt: Tensor  # sparse CSR [u, n]


class _BagProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, table: Tensor, bags: Bags) -> Tensor:  # type: ignore[override]
        ctx.bags = bags
        return bags.x @ table

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.bags.xt @ g, None


def bag_matrix(flat: Tensor, offsets: Tensor, weights: Tensor, n_cols: int) -> Bags:
    """``EmbeddingBag``-style input (flat column ids, offsets, per-id weights) as a sparse
    matrix of ``n_cols`` columns; ids >= n_cols (rows that are not free) are dropped, and a
    repeated id in one bag is summed, as a sum-mode bag does."""
    counts = torch.diff(offsets, append=torch.tensor([len(flat)], device=offsets.device))
    rows = torch.repeat_interleave(torch.arange(len(offsets), device=offsets.device), counts)
    keep = flat < n_cols
    idx = torch.stack([rows[keep], flat[keep]])
    vals = weights[keep]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products only here
        warnings.simplefilter("ignore", UserWarning)
        x = torch.sparse_coo_tensor(idx, vals, (len(offsets), n_cols)).coalesce()
        xt = torch.sparse_coo_tensor(idx.flip(0), vals, (n_cols, len(offsets))).coalesce()
        return Bags(x.to_sparse_csr(), xt.to_sparse_csr())


@torch.no_grad()
def head_inputs(model: JointModel, part: SourcePart, split: str
                ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None, Tensor | None]:
    """A split's trunk features, n-gram bags and sentence vectors (eval mode, no gradient),
    in one pass: ``SharedText.encode`` runs each distinct text once."""
    head = model.heads[part.name]
    assert isinstance(head, TableHead)
    st = part.splits[split].to(next(model.parameters()).device)
    with eval_mode(model):
        return head.inputs(model.text, st.text if part.has_text else None, st.numeric, st.ids)


def _remap(flat: Tensor, free: Tensor, n_rows: int) -> Tensor:
    """Table rows -> positions in ``free`` (the rows being solved); any other row -> len(free),
    dropped by ``bag_matrix`` (its weight is held at zero)."""
    pos = torch.full((n_rows,), len(free), dtype=torch.long, device=flat.device)
    pos[free] = torch.arange(len(free), device=flat.device)
    return pos[flat]


def _logits(p: dict[str, Tensor], x: Inputs) -> Tensor:
    """The output layer's logits; without "w", the linear part alone (no trunk term)."""
    out = p["b"] + (x.h @ p["w"].T if "w" in p else 0.0)
    if "wide" in p and x.bags is not None:
        out = out + _BagProduct.apply(p["wide"], x.bags)
    if "vec" in p and x.vectors is not None:
        out = out + x.vectors @ p["vec"].T
    return out


def _fit(p: dict[str, Tensor], x: Inputs, spec: TaskSpec, l2: float, iters: int) -> None:
    """Minimise mean loss + l2/2 * |weights|^2 (the bias is not penalised) in place."""
    y = x.labels[spec.name]
    mask = ~torch.isnan(y)
    loss_fn = TASK_TYPES[spec.type].loss
    params = list(p.values())
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(squeeze_logits(_logits(p, x), spec), y, mask, spec)
        reg = sum(t.square().sum() for k, t in p.items() if k != "b")
        total = loss + 0.5 * l2 * reg
        total.backward()
        return total

    opt.step(closure)
    for t in params:
        t.requires_grad_(False)


def _score(part: SourcePart, spec: TaskSpec, split: str, logits: Tensor) -> tuple[float, float]:
    """(primary metric signed so that higher is better, -loss): the validation order (ties in
    a coarse metric such as accuracy on a few hundred rows go to the lower loss)."""
    y = part.splits[split].labels[spec.name].to(logits.device)
    loss = float(TASK_TYPES[spec.type].loss(logits, y, ~torch.isnan(y), spec))
    pred = TASK_TYPES[spec.type].activate(logits).cpu().numpy()
    key, higher = TASK_TYPES[spec.type].primary
    m = part.source.metrics(part.data, split, spec.name, pred)[key]
    return (m if higher else -m), -loss


def _path(p: dict[str, Tensor], splits: dict[str, Inputs], part: SourcePart, spec: TaskSpec,
          grid: tuple[float, ...], iters: int
          ) -> tuple[dict[str, Tensor], float, list[dict[str, Any]]]:
    """Solve from ``p`` for each penalty of ``grid``, strongest first, each solve starting
    from the previous one; return the best on validation, its penalty and the path. A solve
    that ends with non-finite weights (a line search gone wrong) is recorded and dropped, and
    the next starts from the last finite solution."""
    tried: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], float, dict[str, Tensor]] | None = None
    good = {k: v.clone() for k, v in p.items()}
    for l2 in sorted(grid, reverse=True):
        p = {k: v.clone() for k, v in good.items()}
        _fit(p, splits["train"], spec, l2, iters)
        with torch.no_grad():
            logits = squeeze_logits(_logits(p, splits["valid"]), spec)
            if not all(bool(torch.isfinite(t).all()) for t in (*p.values(), logits)):
                tried.append({"l2": l2, "valid": None, "valid_loss": None})
                continue
            sc = _score(part, spec, "valid", logits)
        good = p
        tried.append({"l2": l2, "valid": sc[0], "valid_loss": -sc[1]})
        if best is None or sc > best[0]:
            best = (sc, l2, {k: v.clone() for k, v in p.items()})
    if best is None:  # every solve diverged: the start, scored, is the answer
        with torch.no_grad():
            sc = _score(part, spec, "valid", squeeze_logits(_logits(good, splits["valid"]), spec))
        best = (sc, float("nan"), good)
    return best[2], best[1], tried


@torch.no_grad()
def _write(head: TableHead, task: str, cols: slice, free: Tensor | None,
           p: dict[str, Tensor]) -> None:
    lin = head.heads[task]
    lin.weight.copy_(p["w"])
    lin.bias.copy_(p["b"])
    if "wide" in p:
        assert head.wide is not None and free is not None
        rows = head.wide.weight[free]
        rows[:, cols] = p["wide"]
        head.wide.weight[free] = rows
    if "vec" in p:
        assert head.vector is not None
        head.vector.weight[cols] = p["vec"]


def solve_head(model: JointModel, part: SourcePart, grid: tuple[float, ...], iters: int,
               log: Any = print) -> dict[str, dict[str, Any]]:
    """Solve the output layer of each solvable task of ``part``'s head; returns per task what
    was tried and what was kept."""
    head = model.heads[part.name]
    assert isinstance(head, TableHead)
    splits = {}
    free = None
    for s in ("train", "valid"):
        h, bags, vec = head_inputs(model, part, s)
        design = None
        if bags is not None:
            assert head.wide is not None
            flat, offsets, weights = bags
            if free is None:  # the training split's rows
                free = torch.unique(flat)
            design = bag_matrix(_remap(flat, free, head.wide.num_embeddings), offsets, weights,
                                len(free))
        # the solve runs where the head lives (a full-batch L-BFGS: a GPU's kind of work)
        labels = {k: v.to(h.device) for k, v in part.splits[s].labels.items()}
        splits[s] = Inputs(h, design, vec, labels)
    out: dict[str, dict[str, Any]] = {}
    col = 0
    for spec, width in zip(head.tasks, head.widths, strict=True):
        cols = slice(col, col + width)
        col += width
        if spec.type not in SOLVABLE:
            continue
        lin = head.heads[spec.name]
        start = {"w": lin.weight.detach().clone(), "b": lin.bias.detach().clone()}
        if head.wide is not None and free is not None:
            start["wide"] = head.wide.weight.detach()[free][:, cols].clone()
        if head.vector is not None and splits["train"].vectors is not None:
            start["vec"] = head.vector.weight.detach()[cols].clone()
        kept = _score(part, spec, "valid", squeeze_logits(_logits(start, splits["valid"]), spec))
        # candidate 1: the whole output layer, trunk term included
        full, l2_full, path_full = _path(dict(start), splits, part, spec, grid, iters)
        # candidate 2: the linear part alone (n-grams, sentence vector, bias), then mixed with
        # the trained layer: (1 - a) trained + a linear is again one output layer
        linear, l2_lin, path_lin = _path({k: v for k, v in start.items() if k != "w"},
                                         splits, part, spec, grid, iters)
        cands = {"solved": (full, l2_full)}
        for a in MIX:
            mixed = {k: (1 - a) * v for k, v in start.items()}
            for k, v in linear.items():
                mixed[k] = mixed[k] + a * v
            cands[f"linear x{a:g}"] = (mixed, l2_lin)
        scored = {}
        with torch.no_grad():
            for name, (cand, _) in cands.items():
                scored[name] = _score(part, spec, "valid",
                                      squeeze_logits(_logits(cand, splits["valid"]), spec))
        name = max(scored, key=lambda k: scored[k])
        took = scored[name] > kept
        if took:
            _write(head, spec.name, cols, free, cands[name][0])
        out[spec.name] = {"kept": name if took else "trained", "l2": cands[name][1],
                          "valid_trained": kept[0],
                          "valid": {k: v[0] for k, v in scored.items()},
                          "path_solved": path_full, "path_linear": path_lin}
        log(f"solve {part.name}/{spec.name}: validation {abs(kept[0]):.4f} trained, "
            + ", ".join(f"{abs(v[0]):.4f} {k}" for k, v in scored.items())
            + f" -> kept {out[spec.name]['kept']}")
    return out


def solve_heads(model: JointModel, parts: list[Any], grid: tuple[float, ...], iters: int,
                log: Any = print) -> dict[str, dict[str, Any]]:
    out = {}
    heads = dict(model.heads.items())
    for part in parts:
        # the table heads (not a ranking head; the rec zoo model is no head)
        if isinstance(heads.get(part.name), TableHead):
            res = solve_head(model, part, grid, iters, log)
            if res:
                out[part.name] = res
    return out
