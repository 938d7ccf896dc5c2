"""Checkpoints: safetensors weights + JSON config, schema and encoders, written atomically.

A checkpoint directory describes itself (a model can be rebuilt from it alone) and carries a
SHA-256 manifest, checked on load: a truncated or edited file is refused with a clear error.
Directories are written under a temporary name and renamed into place; the ``latest`` pointer is
replaced atomically last, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT = 2  # meta.json's "format": 2 adds "kind", "shopmtl_version" and "tasks" to every kind


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir(
    target: Path, tensors: dict[str, dict[str, torch.Tensor]], jsons: dict[str, Any]
) -> Path:
    """Write ``{name}.safetensors`` and ``{name}.json`` files plus a manifest into ``target``
    atomically (temp dir + rename). ``target`` must not exist."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, tdict in tensors.items():
            save_file(
                {k: v.detach().contiguous() for k, v in tdict.items()},
                str(tmp / f"{name}.safetensors"),
            )
        for name, obj in jsons.items():
            (tmp / f"{name}.json").write_text(json.dumps(obj, indent=1, allow_nan=False))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {f: _sha256(tmp / f) for f in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def shopmtl_version() -> str:
    """``shopmtl.__version__`` where the package sets one, else the installed distribution's."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    own = getattr(sys.modules.get("shopmtl"), "__version__", None)
    if isinstance(own, str):
        return own
    try:
        return version("shopmtl")
    except PackageNotFoundError:
        return "unknown"


def model_meta(kind: str, tasks: list[str], **extra: Any) -> dict[str, Any]:
    """``meta.json`` of a model directory, the same keys for every kind (``shopmtl.modeldir``
    reads it): format, kind, the shopmtl version that wrote it, every task name; then the
    kind's own keys."""
    return {"format": FORMAT, "kind": kind, "shopmtl_version": shopmtl_version(),
            "tasks": list(tasks), **extra}


def verify_dir(path: Path) -> dict[str, str]:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}/{MANIFEST}: corrupt manifest") from None
    for name, digest in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file '{name}' listed in the manifest is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: file '{name}' is corrupt (SHA-256 mismatch)")
    return manifest


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(path) / f"{name}.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}/{name}.safetensors: unreadable ({e})") from None


def read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((Path(path) / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{name}.json: unreadable ({e})") from None


def write_pointer(directory: Path, name: str, value: str) -> None:
    """Atomically replace a small text file (the ``latest`` pointer)."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(value)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    _fsync_dir(directory)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (safetensors) + param groups as JSON (no pickle)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"state.{idx}.{k}"] = t
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]
    ]
    opt.load_state_dict({"state": state, "param_groups": groups})
