"""docs/CONFIG.md, the reference of every config key, generated from the config dataclasses:

    python -m shopmtl.configdoc > docs/CONFIG.md

Each key's type and default come from its dataclass field, its meaning and allowed range from
the field's ``keys.key`` metadata, the very range the loader checks; a test regenerates the
file and compares, so the reference cannot fall behind the code.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any, Literal

from shopmtl.config import ExperimentConfig, to_dict
from shopmtl.keys import doc_of, range_of

COMMAND = "python -m shopmtl.configdoc > docs/CONFIG.md"
HEADER = ("key", "type", "default", "allowed", "meaning")


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    """A field type in YAML terms: number, list of int, mapping of string to number, ..."""
    tp, optional = _strip_none(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        name = "mapping"
    elif origin is Literal:
        name = "string"
    elif origin is tuple:
        name = f"list of {type_name(args[0])}"
    elif origin is dict:
        name = f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    else:
        name = {int: "int", float: "number", bool: "bool", str: "string"}.get(tp, "any")
    return f"{name} or null" if optional else name


def _choices(tp: Any) -> tuple[Any, ...]:
    """The values of a Literal (also inside ``| None`` or a list), else ()."""
    tp, _ = _strip_none(tp)
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def allowed(f: dataclasses.Field, tp: Any) -> str:
    choices = _choices(tp)
    if choices:
        return ", ".join(f"`{c}`" for c in choices)
    rng = range_of(f)
    return "" if rng is None else str(rng)


def default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        return "(below)"
    return f"`{json.dumps(to_dict(value))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _nested(tp: Any) -> type | None:
    """The dataclass a field holds (itself, or the items of its list), else None."""
    tp, _ = _strip_none(tp)
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return tp if dataclasses.is_dataclass(tp) else None


def _paragraph(doc: str) -> str:
    """The first paragraph of a docstring on one line, in markdown's backticks."""
    lines = doc.strip().split("\n\n")[0].splitlines()
    return " ".join(line.strip() for line in lines).replace("``", "`")


def _intro(cls: type) -> str:
    """A class's docstring paragraph (not the signature dataclasses makes up)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else _paragraph(doc)


def table(cls: type, prefix: str) -> tuple[list[str], list[tuple[type, str]]]:
    """The markdown table of ``cls``'s keys under ``prefix``, and the dataclasses nested in
    it (each with its own prefix), to be listed after it."""
    hints = typing.get_type_hints(cls)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        sub = _nested(tp)
        if sub is not None:
            is_list = typing.get_origin(_strip_none(tp)[0]) is tuple
            nested.append((sub, f"{key}[]" if is_list else key))
        cells = (f"`{key}`", type_name(tp), default(f), allowed(f, tp), doc_of(f))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines, nested


def section(cls: type, prefix: str, level: int = 3) -> list[str]:
    """A heading, the class's intro, its table, then each nested dataclass's section."""
    lines, nested = table(cls, prefix)
    out = [f"{'#' * level} " + (f"`{prefix}`" if prefix else "Top level"), ""]
    intro = _intro(cls)
    out += [intro, ""] if intro else []
    out += [*lines, ""]
    for sub, sub_prefix in nested:
        out += section(sub, sub_prefix, level)
    return out


def per_name(title: str, prefix: str, configs: dict[str, type], docs: dict[str, str]
             ) -> list[str]:
    """One table per name (a model's or a weighting's args); the names without any listed
    together."""
    out = [f"### {title}", ""]
    bare = [n for n, c in configs.items() if not dataclasses.fields(c)]
    for name, cfg in configs.items():
        if name in bare:
            continue
        out += [f"#### `{prefix}` of `{name}`", "", docs.get(name, ""), ""]
        out += [*table(cfg, prefix)[0], ""]
    if bare:
        out += [f"No arguments: {', '.join(f'`{n}`' for n in bare)}.", ""]
    return out


def _about(obj: Any) -> str:
    """What a model or weighting is: its docstring's (or its module's) first paragraph."""
    return _paragraph(obj.__doc__ or sys.modules[obj.__module__].__doc__ or "")


def render() -> str:
    from shopmtl.data.synthetic import WorldConfig
    from shopmtl.joint.config import JointConfig
    from shopmtl.registry import MODELS
    from shopmtl.weighting import WEIGHTINGS

    models = {n: cfg for n, (_, cfg) in MODELS.items()}
    model_docs = {n: _about(sys.modules[cls.__module__]) for n, (cls, _) in MODELS.items()}
    weightings = {n: cls.Config for n, cls in WEIGHTINGS.items()}  # type: ignore[attr-defined]
    weighting_docs = {n: _about(cls) for n, cls in WEIGHTINGS.items()}
    out = [
        "# Configuration reference",
        "",
        f"Generated by `{COMMAND}` from the config dataclasses (each key's `keys.key` "
        "metadata); do not edit by hand: a test checks that this file is current.",
        "",
        "A config is read strictly: an unknown key, a value of the wrong type or outside its "
        "range (the *allowed* column) stops `shopmtl` before any data is read, with one line "
        "naming the key as written in the file (`train.batch_size: must be >= 1, got -5`) and "
        "exit status 2. Every range also means finite: `.nan` and `.inf` are refused. Paths "
        "are relative to the config file. `--set key.path=value` overrides any key.",
        "",
        "## Experiment config (`shopmtl train exp.yaml`)",
        "",
        *section(ExperimentConfig, ""),
        "### `data.synthetic`",
        "",
        "A generated world instead of files (the keys of `shopmtl synth --set world.KEY=...`).",
        "",
        *table(WorldConfig, "data.synthetic")[0],
        "",
        *per_name("`model.args`", "model.args", models, model_docs),
        *per_name("`weighting.args`", "weighting.args", weightings, weighting_docs),
        "## Joint config (a config with a top-level `sources` key)",
        "",
        "`weighting` and `weighting.args` are those of the experiment config (loss weightings "
        "only: the sources of a joint run never share a batch).",
        "",
        *section(JointConfig, ""),
    ]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
