"""The convex last stage (joint.solve): L-BFGS reaches scikit-learn's optimum on the same
problem, and solving a head writes exactly what it scored back into the model, touching nothing
but the output layers; bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from shopmtl.config import ConfigError
from shopmtl.data.schema import TaskSpec
from shopmtl.joint.config import load_joint_config
from shopmtl.joint.model import JointModel
from shopmtl.joint.parts import load_parts, text_bank
from shopmtl.joint.solve import Inputs, _fit, _logits, bag_matrix, solve_heads
from shopmtl.joint.train import build_joint_model
from shopmtl.tasks import TASK_TYPES


def _problem(n: int = 400, d: int = 6, buckets: int = 50, seed: int = 0
             ) -> tuple[Inputs, np.ndarray, tuple[torch.Tensor, ...]]:
    """Dense features plus a sparse bag of ids with weights 1/sqrt(k); returns the inputs and
    the same design as a dense matrix [n, d + buckets], and the bags as EmbeddingBag input."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    flat, offsets, weights = [], [], []
    dense = np.zeros((n, buckets), np.float32)
    for i in range(n):
        offsets.append(len(flat))
        ids = rng.choice(buckets, size=rng.integers(1, 6), replace=False)
        w = 1 / np.sqrt(len(ids))
        flat += ids.tolist()
        weights += [w] * len(ids)
        dense[i, ids] = w
    x = np.concatenate([h, dense], 1)
    truth = rng.normal(size=x.shape[1])
    y = (x @ truth + rng.logistic(size=n) > 0).astype(np.float32)
    raw = (torch.tensor(flat), torch.tensor(offsets), torch.tensor(weights, dtype=torch.float32))
    inp = Inputs(torch.from_numpy(h), bag_matrix(*raw, buckets), None,
                 {"y": torch.from_numpy(y)})
    return inp, x, raw


def test_lbfgs_reaches_sklearns_logistic_regression() -> None:
    """mean BCE + l2/2 |w|^2 is scikit-learn's C = 1 / (l2 n) (intercept not penalised)."""
    from sklearn.linear_model import LogisticRegression

    inp, x, raw = _problem()
    y = inp.labels["y"].numpy()
    l2 = 1e-2
    p = {"w": torch.zeros(1, 6), "b": torch.zeros(1), "wide": torch.zeros(50, 1)}
    _fit(p, inp, TaskSpec("y", "binary"), l2, iters=200)
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=5000).fit(x, y)
    ours = np.concatenate([p["w"][0].numpy(), p["wide"][:, 0].numpy()])
    np.testing.assert_allclose(ours, ref.coef_[0], atol=2e-3)
    assert float(p["b"][0]) == pytest.approx(float(ref.intercept_[0]), abs=2e-3)
    # and the logits the solver scores are the model's own formula: the sparse product is the
    # sum-mode EmbeddingBag of the same bags
    logit = _logits(p, inp)[:, 0].detach().numpy()
    np.testing.assert_allclose(logit, x @ ours + float(p["b"][0]), atol=1e-4)
    flat, offsets, weights = raw
    bag = torch.nn.functional.embedding_bag(flat, p["wide"], offsets, mode="sum",
                                            per_sample_weights=weights)
    np.testing.assert_allclose((inp.bags.x @ p["wide"]).numpy(), bag.numpy(), atol=1e-5)


def test_multiclass_and_regression_reach_their_optimum() -> None:
    """Softmax and squared loss: the gradient of the penalised objective is ~0 at the end (up
    to float32 round-off: it starts near 1), and the squared loss lands on ridge regression's
    closed form."""
    inp, x, _ = _problem(seed=1)
    rng = np.random.default_rng(1)
    n = len(inp.h)
    inp.labels["c"] = torch.from_numpy(rng.integers(0, 3, n).astype(np.float32))
    inp.labels["r"] = inp.h[:, 0] * 2 + torch.from_numpy(rng.normal(size=n).astype(np.float32))
    specs = ((TaskSpec("c", "multiclass", n_classes=3), 3), (TaskSpec("r", "regression"), 1))
    for spec, k in specs:
        p = {"w": torch.zeros(k, 6), "b": torch.zeros(k), "wide": torch.zeros(50, k)}
        _fit(p, inp, spec, 1e-3, iters=300)
        params = [t.requires_grad_(True) for t in p.values()]
        out = _logits(p, inp)
        out = out if k > 1 else out.squeeze(-1)
        y = inp.labels[spec.name]
        obj = TASK_TYPES[spec.type].loss(out, y, ~torch.isnan(y), spec) + 0.5e-3 * sum(
            t.square().sum() for key, t in p.items() if key != "b")
        grads = torch.autograd.grad(obj, params)
        assert max(float(g.abs().max()) for g in grads) < 1e-3, spec.name
    # ridge: mean (x w + b - y)^2 + l2/2 |w|^2  ->  (2/n X'X + l2 I_w) [w; b] = 2/n X'y
    xb = np.concatenate([x, np.ones((n, 1))], 1).astype(np.float64)
    reg = np.diag([1e-3] * x.shape[1] + [0.0])
    yr = inp.labels["r"].numpy().astype(np.float64)
    exact = np.linalg.solve(2 / n * xb.T @ xb + reg, 2 / n * xb.T @ yr)
    ours = np.concatenate([p["w"][0].detach().numpy(), p["wide"][:, 0].detach().numpy(),
                           p["b"].detach().numpy()])
    np.testing.assert_allclose(ours, exact, atol=2e-3)


SMALL = {
    "sources": [{"name": "bitext", "batch_size": 32, "max_examples": 300},
                {"name": "reviews", "batch_size": 32, "max_examples": 300},
                {"name": "retail", "batch_size": 32, "max_examples": 300}],
    "model": {"adapter_hidden": 32, "text_dim": 16, "hidden": [16], "id_dim": 4,
              "wide_vector": True},
    "train": {"steps": 20, "threads": 1, "log_every": 0},
}


def _model(cfg_path: Path, tmp: Path) -> tuple[JointModel, list]:
    """A freshly initialised joint model of a config and its loaded parts."""
    cfg = load_joint_config(cfg_path)
    parts, texts, _ = load_parts(cfg, tmp, log=lambda *_: None)
    bank = text_bank(cfg, texts.texts)
    torch.manual_seed(0)
    model = build_joint_model(cfg, parts, bank.bank.shape[1])
    model.text.set_bank(bank.bank, bank.mask, bank.ngrams)
    return model, parts


def test_solving_heads_writes_back_what_it_scored(tmp_path: Path) -> None:
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    model, parts = _model(path, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs: list[str] = []
    res = solve_heads(model, parts, (1e-2, 1e-3), 30, logs.append)
    # the quantile tasks of retail are not solved; every other task is
    assert {s: set(r) for s, r in res.items()} == {"bitext": {"intent", "category"},
                                                  "reviews": {"rating", "recommend"}}
    assert len(logs) == 4
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    # an untrained model (20 steps): a solution wins on validation for every task, and only
    # output layers move
    kept = [r["kept"] for src in res.values() for r in src.values()]
    assert "trained" not in kept, kept
    assert moved and all(k.split(".")[2] in ("heads", "wide", "vector") for k in moved), moved
    assert any(".wide." in k for k in moved) and any(".vector." in k for k in moved)
    for part in parts:
        if part.name not in res:
            continue
        valid = part.evaluate(model, "valid")
        for task, r in res[part.name].items():
            key = "rmse" if task == "rating" else ("auc" if task == "recommend" else "accuracy")
            # what was scored on validation is what the model now answers
            assert valid[task][key] == pytest.approx(abs(r["valid"][r["kept"]]), abs=1e-5)
            assert abs(r["valid"][r["kept"]]) * (1 if key == "rmse" else -1) <= abs(
                r["valid_trained"]) * (1 if key == "rmse" else -1)
            assert set(r["valid"]) == {"solved", "linear x0.25", "linear x0.5",
                                       "linear x0.75", "linear x1"}
            assert [x["l2"] for x in r["path_solved"]] == [1e-2, 1e-3]
    # a wide row no training text of the source uses keeps its weight (zero)
    wide = model.heads["bitext"].wide.weight
    used = torch.unique(model.text.ngram_bags(parts[0].splits["train"].text)[0])
    unused = torch.ones(len(wide), dtype=torch.bool)
    unused[used] = False
    assert float(wide.detach()[unused].abs().max()) == 0.0



@pytest.mark.parametrize("sets, msg", [
    (["train.solve_l2=[]"], "solve_l2 must be a non-empty"),
    (["train.solve_l2=[0.1,-1]"], r"^train\.solve_l2\[1\]: must be >= 0, got -1\.0$"),
    (["train.solve_iters=0"], r"^train\.solve_iters: must be >= 1, got 0$"),
])
def test_bad_solve_settings_are_refused(sets: list[str], msg: str, tmp_path: Path) -> None:
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    with pytest.raises((ConfigError, ValueError), match=msg):
        load_joint_config(path, sets)


def test_a_diverged_solve_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A penalty whose L-BFGS run ends with NaN weights is recorded as such and skipped; the
    head keeps finite weights and answers with them."""
    import shopmtl.joint.solve as solve

    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "sources": SMALL["sources"][:1]}))
    model, parts = _model(path, tmp_path)
    real = solve._fit

    def diverges_at_1e2(p: dict, x: Inputs, spec: TaskSpec, l2: float, iters: int) -> None:
        real(p, x, spec, l2, iters)
        if l2 == 1e-2:
            p["b"].fill_(float("nan"))

    monkeypatch.setattr(solve, "_fit", diverges_at_1e2)
    res = solve_heads(model, parts, (1e-2, 1e-3), 30, lambda *_: None)
    for r in res["bitext"].values():
        for path in (r["path_solved"], r["path_linear"]):
            assert path[0] == {"l2": 1e-2, "valid": None, "valid_loss": None}
            assert path[1]["valid"] is not None
        assert r["l2"] == 1e-3 or r["kept"] == "trained"
    assert all(bool(torch.isfinite(t).all()) for t in model.heads.state_dict().values())
    acc = parts[0].evaluate(model, "valid")["intent"]["accuracy"]
    kept = res["bitext"]["intent"]
    want = kept["valid_trained"] if kept["kept"] == "trained" else kept["valid"][kept["kept"]]
    assert acc == pytest.approx(want, abs=1e-9)
