"""The output folder under attack: two runs into one ``--out``, a used or foreign folder, a
retrain with fewer steps then ``--resume``, the leftovers of killed writes. Every refusal is
one line and leaves the folder as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from shopmtl.train import checkpoint as ck
from shopmtl.train.outdir import MARKER
from tests.adversarial.common import assert_clean_failure, config, good_lines, write_csv
from tests.helpers import cli

USAGE = 2  # a command line that cannot be carried out as given
RUNTIME = 1  # a run that cannot go on (another run holds OUT)

NOT_EMPTY = "is not empty (a previous run?); pass --resume to continue it or --overwrite to " \
            "replace it"


def _setup(tmp_path: Path, rows: int = 400, **train) -> Path:
    write_csv(tmp_path / "shop.csv", good_lines(rows))
    return config(tmp_path, **train)


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size): what a refusal must not change."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file()}


def _seed(path: Path) -> int:
    return yaml.safe_load(path.read_text())["train"]["seed"]


def _run_id(out: Path) -> str:
    return json.loads((out / MARKER).read_text())["run_id"]


def _own_checkpoints(checkpoints: Path, run_id: str) -> list[str]:
    return sorted(p.name for p in checkpoints.glob("ckpt-*")
                  if ck.checkpoint_run_id(p) == run_id)


def test_a_second_run_into_a_busy_out_is_refused_and_the_first_completes(tmp_path: Path
                                                                         ) -> None:
    cfg = _setup(tmp_path, epochs=3)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "shopmtl.cli", "train", str(cfg), "--out",
                              str(out), "--set", "train.seed=1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "config.yaml").is_file() and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.005)
        # frozen mid-run, the first run holds the lock for as long as the second one takes
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before the second one could start"
        run_id, before = _run_id(out), _tree(out)
        second = cli("train", str(cfg), "--out", str(out), "--set", "train.seed=2")
        assert_clean_failure(second, f"{out} is in use by another shopmtl run (pid {first.pid})",
                             code=RUNTIME)
        assert _tree(out) == before  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    # the folder is the first run's alone: its id, its seed in the config and in the model
    assert _run_id(out) == run_id
    assert _seed(out / "config.yaml") == 1
    assert json.loads((out / "model" / "config.json").read_text())["train"]["seed"] == 1


def test_a_non_empty_out_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = _tree(out)
    assert_clean_failure(cli("train", str(cfg), "--out", str(out)), f"{out} {NOT_EMPTY}",
                         code=USAGE)
    assert _tree(out) == before
    # a finished run's folder too: the same command twice does not mix two runs
    done = tmp_path / "done"
    cli("train", str(cfg), "--out", str(done), check=True)
    before = _tree(done)
    assert_clean_failure(cli("train", str(cfg), "--out", str(done)), f"{done} {NOT_EMPTY}",
                         code=USAGE)
    both = cli("train", str(cfg), "--out", str(done), "--resume", "--overwrite")
    assert_clean_failure(both, "--resume and --overwrite cannot be used together", code=USAGE)
    assert _tree(done) == before
    # a folder holding only a dead run's lock file is empty
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".lock").write_text("4242\n")
    cli("train", str(cfg), "--out", str(stale), check=True)
    assert (stale / "model" / "meta.json").is_file()


def test_overwrite_refuses_a_folder_no_shopmtl_run_made(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    home = tmp_path / "home"  # shopmtl train ... --out ~ --overwrite
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH")
    (home / "Documents" / "thesis.tex").write_text("\\begin{document}")
    before = _tree(home)
    proc = cli("train", str(cfg), "--out", str(home), "--overwrite")
    assert_clean_failure(proc, f"{home} does not look like a shopmtl run (no {MARKER})",
                         code=USAGE)
    proc = cli("quickstart", "--out", str(home), "--rows", "2000")
    assert_clean_failure(proc, f"{home} is not empty and is not a previous quickstart",
                         code=USAGE)
    assert _tree(home) == before


def test_overwrite_replaces_a_previous_run_and_keeps_data_it_reads(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    out = tmp_path / "out"
    cli("train", str(cfg), "--out", str(out), "--set", "train.seed=1", "--baselines",
        check=True)
    first = _run_id(out)
    assert (out / "single_task").is_dir()
    cli("train", str(cfg), "--out", str(out), "--set", "train.seed=2", "--overwrite",
        check=True)
    assert _run_id(out) != first
    assert not (out / "single_task").exists()  # nothing of the first run is left
    assert _seed(out / "config.yaml") == 2
    # data copied into the run folder is not deleted by a replace that would then read it
    (out / "shop.csv").write_text((tmp_path / "shop.csv").read_text())
    inside = tmp_path / "inside.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["train"] = str(out / "shop.csv")
    inside.write_text(yaml.safe_dump(raw))
    before = _tree(out)
    proc = cli("train", str(inside), "--out", str(out), "--overwrite")
    assert_clean_failure(proc, f"--overwrite would delete {out / 'shop.csv'}", code=USAGE)
    assert _tree(out) == before


def test_retrain_with_fewer_steps_then_resume(tmp_path: Path) -> None:
    """The old bug: a retrain with fewer steps into a used folder had its own checkpoints
    deleted by retention (the old run's sorted after them), then --resume failed."""
    cfg = _setup(tmp_path, checkpoint_every=5)
    out = tmp_path / "out"
    cli("train", str(cfg), "--out", str(out), "--set", "train.epochs=3", check=True)
    cli("train", str(cfg), "--out", str(out), "--overwrite", check=True)  # 1 epoch: 20 steps
    run_id, checkpoints = _run_id(out), out / "checkpoints"
    assert _own_checkpoints(checkpoints, run_id) == ["ckpt-00-000000015", "ckpt-00-000000020"]
    # in the same folder: a user's folder named like a checkpoint, and another run's checkpoint
    # (a later step than any of this run's)
    (checkpoints / "ckpt-foo-bar").mkdir()
    (checkpoints / "ckpt-foo-bar" / "notes.txt").write_text("mine")
    ck.write_dir(checkpoints / "ckpt-00-000000099", {"weights": {"x": torch.zeros(1)}},
                 {"run": {"run_id": "someone-else"}})
    cli("train", str(cfg), "--out", str(out), "--resume", "--set", "train.epochs=2",
        check=True)
    assert _run_id(out) == run_id  # a resume continues the run
    assert _own_checkpoints(checkpoints, run_id) == ["ckpt-00-000000035", "ckpt-00-000000040"]
    assert (checkpoints / "latest").read_text() == "ckpt-00-000000040"
    assert (checkpoints / "ckpt-foo-bar" / "notes.txt").read_text() == "mine"
    assert ck.checkpoint_run_id(checkpoints / "ckpt-00-000000099") == "someone-else"


_KILLED_WRITE = """
import os, signal, sys, torch
from pathlib import Path
from shopmtl.train import checkpoint as ck

class KilledMidway(dict):
    def items(self):  # the first file is written, then the process is SIGKILLed
        yield "weights", {"x": torch.ones(4)}
        os.kill(os.getpid(), signal.SIGKILL)

ck.write_dir(Path(sys.argv[1]), KilledMidway(), {"run": {}})
"""


def _killed_write(target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_the_temp_folders_of_killed_writes_are_removed_when_a_run_starts(tmp_path: Path
                                                                         ) -> None:
    cfg = _setup(tmp_path)
    out = tmp_path / "out"
    cli("train", str(cfg), "--out", str(out), "--baselines", check=True)
    # writes SIGKILLed midway: of the model, of a checkpoint, of a baseline's checkpoint
    _killed_write(out / "model")
    _killed_write(out / "checkpoints" / "ckpt-00-000000021")
    _killed_write(out / "single_task" / "click" / "checkpoints" / "ckpt-00-000000003")
    # what a killed replace leaves where no atomic exchange exists, and a killed pointer write
    (out / f".model.old-{'ab12' * 3}").mkdir()
    (out / f".model.old-{'ab12' * 3}" / "model.safetensors").write_bytes(b"old")
    (out / "checkpoints" / ".latest.tmp").write_text("ckpt-00-000000021")
    stale = [p for p in out.rglob(".*") if ck.is_stale_temp(p.name)]
    assert len(stale) == 5, stale
    # a resumed finished run writes no model and no checkpoint, so what removes them is the
    # start of the run
    cli("train", str(cfg), "--out", str(out), "--resume", check=True)
    assert not [p for p in out.rglob(".*") if ck.is_stale_temp(p.name)]
    ck.verify_dir(out / "model")
    assert (out / "single_task" / "click" / "model").is_dir()


def test_quickstart_reruns_on_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    args = ("quickstart", "--out", str(out), "--rows", "6000", "--no-baselines")
    cli(*args, check=True)
    first, world = _run_id(out), (out / "data" / "world.json").stat().st_mtime_ns
    cli(*args, check=True)  # the README's first command, run again
    assert _run_id(out) != first
    assert (out / "data" / "world.json").stat().st_mtime_ns == world  # the same world, reused
    assert json.loads((out / MARKER).read_text())["command"] == "quickstart"
    # a train run's folder is not the quickstart's to replace
    cfg = _setup(tmp_path)
    run = tmp_path / "run"
    cli("train", str(cfg), "--out", str(run), check=True)
    before = _tree(run)
    proc = cli("quickstart", "--out", str(run), "--rows", "6000")
    assert_clean_failure(proc, "is not a previous quickstart's folder", code=USAGE)
    assert _tree(run) == before
    assert os.path.isfile(run / "model" / "meta.json")
