"""The README's Python API example runs as written, and prints what its comments say."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one python block"
    return blocks[0]


def test_the_readme_python_api_example_runs(tmp_path: Path) -> None:
    code = python_api_block()
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.yaml", tmp_path / "examples")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert printed[0] == "zoo ('click', 'conversion', 'ad_click')"
    assert printed[1] == "29938 ['click', 'conversion', 'ad_click']"
    probs = re.findall(r"'click': ([0-9.e-]+)", printed[2])
    assert len(probs) == 3 and all(0.0 < float(p) < 1.0 for p in probs)
    # the comments in the block say the same
    assert "# zoo ('click', 'conversion', 'ad_click')" in code
    assert "# 29938 ['click', 'conversion', 'ad_click']" in code
    assert (tmp_path / "runs" / "api" / "model" / "meta.json").is_file()
