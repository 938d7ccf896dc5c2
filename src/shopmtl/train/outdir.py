"""What a run may do with its output folder, decided before it writes anything there.

A new run starts on an empty ``OUT`` (``.lock`` aside: ``train.outlock``). A non-empty one is
continued (``--resume``) or replaced (``--overwrite``), never mixed into silently: re-training
into a used folder used to leave the old run's checkpoints beside the new run's, and checkpoint
retention then deleted the new ones. ``--overwrite`` replaces only a folder that a shopmtl run
made (its marker file, ``shopmtl-run.json``, written when the run starts), so a mistyped
``--out ~`` cannot empty a home directory.

The marker also holds the run's id: every checkpoint carries it (``train.stages.Checkpointer``)
and retention deletes only checkpoints of the current run. A resumed run keeps its id.

Use (under the lock): ``check_output`` first (cheap, refuses before any work), then the caller
validates its config, then ``start_run`` replaces or tidies the folder and writes the marker.
"""

from __future__ import annotations

import datetime
import json
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from shopmtl.config import ConfigError
from shopmtl.train.outlock import LOCK

MARKER = "shopmtl-run.json"
Action = Literal["fresh", "resume", "overwrite"]


class OutputFolderError(ConfigError):
    """The output folder cannot be used as asked: not empty without --resume/--overwrite,
    --overwrite on a folder no shopmtl run made, both flags at once. A usage error."""


def new_run_id() -> str:
    """A run's id: when it started (readable, sortable) and 48 random bits (unique)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(6)}"


def check_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise OutputFolderError("--resume and --overwrite cannot be used together: --resume "
                                "continues the run in OUT, --overwrite replaces it")


def entries(out: Path) -> list[Path]:
    """What ``out`` holds, but the lock file: the caller holds the lock, so the file is either
    its own or a dead process's (``flock`` is released when a process ends)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name != LOCK)


def read_marker(out: Path) -> dict[str, Any] | None:
    """The marker of a run folder; None when absent or not a shopmtl marker."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("run_id"), str):
        return None
    return marker


def run_command(out: Path) -> str | None:
    """Which shopmtl command made ``out`` ("train", "quickstart"), or None when no shopmtl
    run did. Folders from before the marker are recognised by a checkpoint ``latest`` pointer
    (a file only shopmtl writes there) and a quickstart's by its command.txt."""
    marker = read_marker(out)
    if marker is not None:
        return str(marker.get("command", "train"))
    if not any((out / d / "latest").is_file() for d in ("checkpoints", "joint/checkpoints")):
        return None
    command = out / "command.txt"
    quick = command.is_file() and command.read_text().startswith("shopmtl quickstart")
    return "quickstart" if quick else "train"


def check_output(out: Path, *, command: str = "train", resume: bool = False,
                 overwrite: bool = False) -> Action:
    """What a run may do with ``out``, or OutputFolderError (one line). ``command``
    "quickstart" replaces its own previous run (its README command is rerun on one folder)
    and nothing else."""
    check_flags(resume, overwrite)
    if not entries(out):
        return "fresh"
    if resume:
        return "resume"
    made_by = run_command(out)
    if command == "quickstart":
        if made_by != "quickstart":
            raise OutputFolderError(f"{out} is not empty and is not a previous quickstart's "
                                    "folder; choose another --out (or empty it yourself)")
        return "overwrite"
    if not overwrite:
        raise OutputFolderError(f"{out} is not empty (a previous run?); pass --resume to "
                                "continue it or --overwrite to replace it")
    if made_by is None:
        raise OutputFolderError(f"{out} does not look like a shopmtl run (no {MARKER}); "
                                "--overwrite replaces only a previous run's folder: choose "
                                "another --out (or empty it yourself)")
    return "overwrite"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def inputs_inside(config: Mapping[str, Any], out: Path, keep: tuple[str, ...] = ()
                  ) -> list[str]:
    """Every string of a config (as a dict) naming an existing file or folder inside ``out``
    but outside its kept entries: what ``--overwrite`` would delete before the run reads it
    (say, data copied into a run folder)."""
    root = out.resolve()
    kept = [root / k for k in keep]
    found = []

    def walk(v: Any) -> None:
        if isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and "\0" not in v:
            p = Path(v).expanduser()
            try:
                exists = p.exists()
            except OSError:  # a name too long, say: not a path
                return
            p = p.resolve()
            if exists and _inside(p, root) and not any(_inside(p, k) for k in kept):
                found.append(v)

    walk(config)
    return found


def clear(out: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete what ``out`` holds but the lock and ``keep``; the marker last, so a clear that
    is killed midway leaves a folder ``--overwrite`` still recognises."""
    for p in entries(out):
        if p.name in keep or p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    (out / MARKER).unlink(missing_ok=True)


def write_marker(out: Path, run_id: str, command: str) -> None:
    from shopmtl.train import checkpoint as ck

    marker = {"shopmtl_run": 1, "run_id": run_id, "command": command,
              "started": datetime.datetime.now(datetime.UTC).isoformat(),
              "shopmtl_version": ck.shopmtl_version()}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def start_run(out: Path, action: Action, *, command: str = "train",
              keep: tuple[str, ...] = (), checkpoints: Path | None = None) -> str:
    """Make ``out`` ready for the run ``check_output`` allowed and return its id: an
    overwritten folder is emptied (but ``keep``), a resumed one keeps its files and its run
    id (the marker's, else that of the latest checkpoint in ``checkpoints``); in every case
    the temp folders of writes killed earlier are removed and the marker is written."""
    from shopmtl.train import checkpoint as ck

    out.mkdir(parents=True, exist_ok=True)
    if action == "overwrite":
        clear(out, keep)
    ck.remove_stale_temps(out)
    if action == "resume":
        marker = read_marker(out)
        if marker is not None:
            return marker["run_id"]
        run_id = latest_run_id(checkpoints) if checkpoints is not None else None
    else:
        run_id = None
    run_id = run_id or new_run_id()
    write_marker(out, run_id, command)
    return run_id


def latest_run_id(checkpoints: Path) -> str | None:
    """The run id in the checkpoint the ``latest`` pointer of ``checkpoints`` names."""
    from shopmtl.train import checkpoint as ck

    pointer = checkpoints / "latest"
    if not pointer.is_file():
        return None
    return ck.checkpoint_run_id(checkpoints / pointer.read_text().strip())
