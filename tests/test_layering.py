"""The import graph of src/shopmtl is layered and has no circles.

Layers, bottom to top (each imports only from below):
  1 config, registry (may lazily import models to fill itself), jsonsafe, deps (the optional
    packages: ``require``, ``MissingDependencyError``), small utils;
    keys (a config key's doc and range) imports nothing from shopmtl, so every layer may use it
  2 data/ (schema, ingest, encoders, synthetic, pipeline, the data/source.py contract, sources/)
  3 metrics, tasks
  4 nn/, models/
  5 weighting/
  6 train/
  7 joint/ (model assembly for heterogeneous runs)
  8 apps: cli (and __main__, ``python -m shopmtl``), run, predict, compare, report;
    joint.predict is the joint half of the predict app, above predict (it scores a joint
    checkpoint's rec tasks with ``predict.predict_rows``);
    modeldir (``shopmtl.load``: any model directory, scored through predict and joint.predict);
    configdoc (docs/CONFIG.md from the config dataclasses of every layer)
    describe (``shopmtl describe``, docs/PREDICT.md: the contracts of a model directory)
    api (``shopmtl.train``: a config trained into an output folder, the ``shopmtl train`` path)
    export/ (``shopmtl export``: a zoo model as an ONNX bundle; modeldir loads a bundle with
    export.runtime, export.bundle reads its source through modeldir)
    serve/ (``shopmtl serve``: the HTTP service over ``shopmtl.load``'s Model, above modeldir
    and describe)
  the root package ``shopmtl/__init__.py`` is the public face above them all: its lazy
  ``__getattr__`` hands out ``shopmtl.load`` from modeldir and the callable ``shopmtl.train``
  package calls api on first use (exempt from "nothing imports an app")

``metrics`` is a leaf: it imports nothing from shopmtl (checked below), so the file sources in
data/sources/ may score their predictions with it although it is listed above data. ``deps``
is a leaf too (checked below): every layer may ask it for an optional package.

Every import statement counts: module level, inside functions, and inside ``if TYPE_CHECKING:``
blocks (none is exempted). A package ``__init__`` importing its own submodules is not a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "shopmtl"

APPS = ("cli", "run", "checks", "predict", "compare", "report", "joint.predict", "modeldir",
        "configdoc", "describe", "api", "serve", "__main__", "export", "abtest", "federated")
# what each layer must not import: rules (b), (c), (d). data/ may import the leaf ``metrics``.
DATA_FORBIDDEN = ("train", "joint", *APPS, "weighting", "models", "nn", "tasks")
LOW_FORBIDDEN = ("train", "joint", "models", "nn", "weighting", *APPS)


Edge = tuple[str, str, str, int]  # importer, imported, file, line


def _module_name(path: Path, src: Path) -> tuple[str, bool]:
    """Dotted module name of ``path`` under ``src`` and whether it is a package __init__."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def read_sources(src: Path = SRC) -> dict[str, tuple[str, str, bool]]:
    """module -> (file name, source text, is package) for every .py under src/shopmtl."""
    out = {}
    for path in sorted((src / ROOT_PACKAGE).rglob("*.py")):
        name, is_package = _module_name(path, src)
        out[name] = (str(path.relative_to(src.parent)), path.read_text(), is_package)
    return out


def import_edges(sources: Mapping[str, tuple[str, str, bool]]) -> list[Edge]:
    """Every import of a module of the root package, resolved to a module in ``sources``:
    ``from a.b import c`` is ``a.b.c`` when that module exists, else ``a.b``."""
    modules = set(sources)
    edges: list[Edge] = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for module, (filename, text, is_package) in sources.items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(text, filename)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    if node.level > 1:
                        base_parts = base_parts[: -(node.level - 1)]
                    base = ".".join(base_parts)
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                if target.split(".")[0] != ROOT_PACKAGE:
                    continue
                resolved = resolve(target)
                edge = (module, resolved, filename, node.lineno)
                if resolved is None or resolved == module or edge in edges:
                    continue
                edges.append(edge)
    return edges


def _is_own_submodule(importer: str, imported: str, sources: Mapping) -> bool:
    return sources[importer][2] and imported.startswith(importer + ".")


def cycles(edges: Iterable[Edge], sources: Mapping) -> list[list[Edge]]:
    """Strongly connected components with more than one module, as their edges (Tarjan).
    A package __init__ importing its own submodules is left out of the graph."""
    graph: dict[str, set[str]] = {}
    kept = [e for e in edges if not _is_own_submodule(e[0], e[1], sources)]
    for a, b, _, _ in kept:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[e for e in kept if e[0] in c and e[1] in c] for c in components]


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(
        module == f"{ROOT_PACKAGE}.{p}" or module.startswith(f"{ROOT_PACKAGE}.{p}.")
        for p in prefixes
    )


def upward_edges(edges: Iterable[Edge]) -> dict[str, list[Edge]]:
    """Imports breaking rules (b), (c) and (d), by rule."""
    out: dict[str, list[Edge]] = {"data": [], "metrics/tasks": [], "apps": []}
    for edge in edges:
        importer, imported = edge[0], edge[1]
        if _under(importer, ("data",)) and _under(imported, DATA_FORBIDDEN):
            out["data"].append(edge)
        if _under(importer, ("metrics", "tasks")) and _under(imported, LOW_FORBIDDEN):
            out["metrics/tasks"].append(edge)
        if not _under(importer, APPS) and importer != ROOT_PACKAGE and _under(imported, APPS):
            out["apps"].append(edge)
    return out


def _show(edges: Iterable[Edge]) -> str:
    return "\n".join(f"  {a} -> {b}  ({f}:{line})" for a, b, f, line in edges)


def _report_cycles(found: list[list[Edge]]) -> str:
    return "\n".join(
        f"circle {i + 1} ({len({e[0] for e in c})} modules):\n{_show(c)}"
        for i, c in enumerate(found)
    )


def test_no_import_cycles():
    sources = read_sources()
    found = cycles(import_edges(sources), sources)
    assert not found, "import circles in src/shopmtl:\n" + _report_cycles(found)


def test_data_imports_nothing_above_it():
    bad = upward_edges(import_edges(read_sources()))["data"]
    assert not bad, "shopmtl.data imports from a layer above it:\n" + _show(bad)


def test_metrics_and_tasks_import_nothing_above_them():
    bad = upward_edges(import_edges(read_sources()))["metrics/tasks"]
    assert not bad, "shopmtl.metrics/shopmtl.tasks import from a layer above:\n" + _show(bad)


def test_metrics_is_a_leaf():
    bad = [e for e in import_edges(read_sources()) if e[0] == f"{ROOT_PACKAGE}.metrics"]
    assert not bad, "shopmtl.metrics must import nothing from shopmtl:\n" + _show(bad)


def test_deps_is_a_leaf():
    bad = [e for e in import_edges(read_sources()) if e[0] == f"{ROOT_PACKAGE}.deps"]
    assert not bad, "shopmtl.deps must import nothing from shopmtl:\n" + _show(bad)


def test_nothing_below_the_apps_imports_an_app():
    bad = upward_edges(import_edges(read_sources()))["apps"]
    assert not bad, "modules below the apps import an app module:\n" + _show(bad)


def test_the_checker_finds_a_cycle_and_an_upward_edge():
    sources = {
        "shopmtl": ("shopmtl/__init__.py", "from shopmtl import a\n", True),
        "shopmtl.a": ("shopmtl/a.py", "from shopmtl import b\n", False),
        "shopmtl.b": ("shopmtl/b.py", "def f():\n    from . import a\n", False),
        "shopmtl.data": ("shopmtl/data/__init__.py", "", True),
        "shopmtl.data.x": ("shopmtl/data/x.py", "import shopmtl.train.trainer\n", False),
        "shopmtl.train": ("shopmtl/train/__init__.py", "", True),
        "shopmtl.train.trainer": (
            "shopmtl/train/trainer.py", "from shopmtl.run import go\n", False,
        ),
        "shopmtl.run": ("shopmtl/run.py", "from .a import y\n", False),
    }
    edges = import_edges(sources)
    found = cycles(edges, sources)
    assert [sorted({e[0] for e in c}) for c in found] == [["shopmtl.a", "shopmtl.b"]]
    assert ("shopmtl.b", "shopmtl.a", "shopmtl/b.py", 2) in found[0]
    bad = upward_edges(edges)
    assert bad["data"] == [("shopmtl.data.x", "shopmtl.train.trainer", "shopmtl/data/x.py", 1)]
    assert bad["apps"] == [
        ("shopmtl.train.trainer", "shopmtl.run", "shopmtl/train/trainer.py", 1)
    ]
    assert ("shopmtl.run", "shopmtl.a", "shopmtl/run.py", 1) in edges
    assert ("shopmtl", "shopmtl.a", "shopmtl/__init__.py", 1) in edges  # kept out of circles
    assert "shopmtl.a -> shopmtl.b" in _report_cycles(found)
