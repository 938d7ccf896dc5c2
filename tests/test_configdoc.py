"""docs/CONFIG.md is generated from the config dataclasses and kept current; every key it lists
has a meaning, and every default lies in its own range."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from shopmtl.configdoc import COMMAND, render
from shopmtl.keys import doc_of, range_problem

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_config_md_is_current() -> None:
    """Regenerate it when this fails: python -m shopmtl.configdoc > docs/CONFIG.md"""
    assert DOC.read_text() == render(), f"docs/CONFIG.md is stale; run: {COMMAND}"


def test_config_md_states_its_command_at_the_top() -> None:
    assert COMMAND in "\n".join(DOC.read_text().splitlines()[:4])


def _config_classes() -> list[type]:
    """Every dataclass a config file reaches: the experiment and joint configs and what they
    nest, the synthetic world, each model's and each weighting's arguments."""
    from shopmtl.config import ExperimentConfig
    from shopmtl.data.synthetic import WorldConfig
    from shopmtl.joint.config import JointConfig
    from shopmtl.registry import MODELS
    from shopmtl.weighting import WEIGHTINGS

    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for arg in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(arg):
                    walk(arg)

    roots = [ExperimentConfig, JointConfig, WorldConfig, *(c for _, c in MODELS.values()),
             *(w.Config for w in WEIGHTINGS.values())]
    for root in roots:
        walk(root)
    return seen


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_key_has_a_meaning_and_a_default_in_its_range(cls: type) -> None:
    for f in dataclasses.fields(cls):
        assert doc_of(f), f"{cls.__name__}.{f.name} has no doc (declare it with keys.key)"
        if f.default is not dataclasses.MISSING:
            assert range_problem(f, f.default, f.name) is None, f"{cls.__name__}.{f.name}"
        elif f.default_factory is not dataclasses.MISSING:
            assert range_problem(f, f.default_factory(), f.name) is None
