import pytest
import torch

from shopmtl.config import ConfigError
from shopmtl.weighting import (
    WEIGHTINGS,
    GradientWeighting,
    LossWeighting,
    build_weighting,
)
from tests.weighting._properties import (
    TASKS,
    assert_one_finite_weight_per_task,
    grads_after,
    tiny_batch,
    tiny_model,
)

EXPECTED = {
    "equal", "static", "uncertainty", "gradnorm", "dwa", "rlw", "upgrad", "mgda", "pcgrad",
    "cagrad", "nash_mtl", "imtl_g", "aligned_mtl",
}  # fmt: skip


def test_registry_names():
    assert set(WEIGHTINGS) == EXPECTED


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown weighting 'upgrade'") as e:
        build_weighting("upgrade", {}, TASKS)
    for name in EXPECTED:
        assert name in str(e.value)


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("dwa", {"temprature": 2.0}, r"unknown key\(s\) \['temprature'\]"),
        ("dwa", {"temperature": "hot"}, "expected a number"),
        ("dwa", {"temperature": 0.0}, "must be > 0"),
        ("gradnorm", {"alpha": -1.0}, ">= 0"),
        ("uncertainty", {"lr": 0.0}, "must be > 0"),
        ("mgda", {"epsilon": 0.0}, r"weighting\.args\.epsilon: must be > 0, got 0\.0"),
        ("upgrad", {"parallel_chunk_size": 0}, ">= 1"),
        ("aligned_mtl", {"scale_mode": "max"}, "is not one of"),
    ],
)
def test_bad_args_raise_config_errors(name, args, match):
    with pytest.raises(ConfigError, match=match):
        build_weighting(name, args, TASKS)


# cagrad and nash_mtl need the optional torchjd[full] extra (cvxpy), which the project does not
# install: tests/weighting/test_aggregators.py checks the clear error they raise instead
OPTIONAL = {"cagrad", "nash_mtl"}


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - OPTIONAL))
def test_every_weighting_gives_one_finite_weight_per_task(name):
    w = build_weighting(name, None, TASKS)
    assert isinstance(w, (LossWeighting, GradientWeighting))
    assert w.needs_gradients == isinstance(w, GradientWeighting)
    model = tiny_model()
    grads, weights = grads_after(w, model, tiny_batch())
    assert_one_finite_weight_per_task(weights, len(TASKS))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())  # every parameter is trained
    torch.testing.assert_close(w.last_weights, weights)
