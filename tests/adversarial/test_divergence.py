"""Divergence: a learning rate of 1e6 on the user's raw export (every row holds ``SECRET``)
stops the run in one line, exit 1, and nothing is saved as the best model. (The loss-history
rule itself is tested in tests/train/test_loop.py; the world-sized run in
tests/train/test_trainer.py.)"""

from __future__ import annotations

from pathlib import Path

from tests.adversarial.common import SECRET, config, good_lines, write_csv
from tests.helpers import cli

RUNTIME = 1


def test_a_runaway_learning_rate_stops_in_one_line_and_saves_nothing(tmp_path: Path) -> None:
    write_csv(tmp_path / "shop.csv", good_lines(600))
    out = tmp_path / "run"
    proc = cli("train", str(config(tmp_path, lr=1e6, epochs=3)), "--out", str(out))
    # progress lines came before on stdout; the error is the one line on stderr
    assert proc.returncode == RUNTIME, proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step "), lines
    line = lines[0]
    assert "over 100x its first value" in line or "non-finite" in line, line
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
