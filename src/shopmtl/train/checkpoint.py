"""Checkpoints: safetensors weights + JSON config, schema and encoders, written atomically.

A checkpoint directory describes itself (a model can be rebuilt from it alone) and carries a
SHA-256 manifest, checked on load: a truncated or edited file is refused with a clear error.
Directories are written under a temporary name and renamed into place; the ``latest`` pointer is
replaced atomically last, so a crash at any point leaves the previous checkpoint usable.

torch is imported by the functions that read or write tensors (``write_dir`` with tensors,
``read_tensors``, the optimizer's state) and nowhere else: verifying a directory's manifest and
reading its JSON need none, which is what lets ``shopmtl.load`` open an ONNX bundle (and
``shopmtl serve`` serve it) in a process that never imports torch.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
FORMAT = 2  # meta.json's "format": 2 adds "kind", "shopmtl_version" and "tasks" to every kind


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (the digest every manifest holds)."""
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform, the C library or the file system does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _stale_siblings(target: Path) -> list[Path]:
    """Temp dirs (``.<name>.tmp-*``) and set-aside old dirs (``.<name>.old-*``) of ``target``
    left by a write that was killed."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[A-Za-z0-9_]+")
    return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]


# what a killed write leaves: ``write_dir``'s ``.<name>.tmp-*`` / ``.<name>.old-*`` folders
# (also a retired checkpoint renamed aside before its removal, ``train.stages``) and
# ``write_pointer``'s ``.<name>.tmp`` file
_STALE_TEMP = re.compile(r"\..+\.(tmp|old)-[A-Za-z0-9_]+|\..+\.tmp")


def is_stale_temp(name: str) -> bool:
    return _STALE_TEMP.fullmatch(name) is not None


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove every temp file and folder a killed write left anywhere under ``root`` (a run's
    output folder, at the start of the next run there: its lock is held, so no write of
    another run is in flight). Symbolic links are neither followed nor removed. Returns what
    was removed."""
    removed = []
    for parent, dirs, files in os.walk(root):
        here = Path(parent)
        for name in [d for d in dirs if is_stale_temp(d)]:
            dirs.remove(name)  # not walked into: it is going
            if not (here / name).is_symlink():
                shutil.rmtree(here / name, ignore_errors=True)
                removed.append(here / name)
        for name in files:
            if is_stale_temp(name) and not (here / name).is_symlink():
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
    return removed


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file  # torch: module docstring

    # CPU copies: a model trained on a GPU is written (and read back) the same
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_dir(
    target: Path, tensors: dict[str, dict[str, torch.Tensor]], jsons: dict[str, Any],
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``{name}.safetensors`` and ``{name}.json`` files, and ``files`` (file name ->
    bytes, written as they are: an exported ONNX graph), plus a manifest into ``target``
    atomically: into a temp dir ``.<name>.tmp-*`` beside it, then renamed into place.

    An existing ``target`` is replaced so that a reader finds, at every instant, either the
    old or the new complete directory: on Linux the two are swapped in one step
    (``renameat2(RENAME_EXCHANGE)``), then the old one (now under the temp name) is removed.
    Elsewhere the old one is renamed aside (``.<name>.old-*``), the new one renamed into place,
    then the old one removed; a crash between those two renames leaves ``target`` missing and
    the previous complete directory under ``.<name>.old-*``. Stale ``.<name>.tmp-*`` and
    ``.<name>.old-*`` siblings of a killed write are removed when the next write of the same
    target starts (writes into one output folder are serialised by its lock,
    ``shopmtl.train.outlock``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(target):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, tdict in tensors.items():
            _write_tensors(tdict, tmp / f"{name}.safetensors")
        for name, obj in jsons.items():
            (tmp / f"{name}.json").write_text(json.dumps(obj, indent=1, allow_nan=False))
        for name, data in (files or {}).items():
            if Path(name).name != name or name == MANIFEST or (tmp / name).exists():
                raise ValueError(f"write_dir: {name!r} is not a new plain file name")
            (tmp / name).write_bytes(data)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {f: sha256_file(tmp / f) for f in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):
            old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
            os.rename(target, old)
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old directory
    return target


def shopmtl_version() -> str:
    """``shopmtl.__version__`` (the root package is always imported before this module)."""
    return sys.modules["shopmtl"].__version__


def model_meta(kind: str, tasks: list[str], **extra: Any) -> dict[str, Any]:
    """``meta.json`` of a model directory, the same keys for every kind (``shopmtl.modeldir``
    reads it): format, kind, the shopmtl version that wrote it, every task name; then the
    kind's own keys."""
    return {"format": FORMAT, "kind": kind, "shopmtl_version": shopmtl_version(),
            "tasks": list(tasks), **extra}


_HEX64 = re.compile(r"[0-9a-f]{64}")


def verify_dir(path: Path) -> dict[str, str]:
    """Check a directory against its manifest, in full: the manifest is a JSON object of file
    name -> SHA-256 (64 lowercase hex digits); every name is a plain file name inside the
    directory; it lists every file of the directory but itself, no more, no less, and each
    file's digest matches. Anything else raises ``CheckpointError`` (one line naming the
    directory and the file)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}/{MANIFEST}: corrupt manifest") from None
    if not isinstance(manifest, dict) or not manifest:
        raise CheckpointError(f"{path}/{MANIFEST}: corrupt manifest (not a non-empty object of "
                              "file name -> SHA-256)")
    for name, digest in manifest.items():
        if (not name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name
                or os.sep in name or (os.altsep and os.altsep in name) or "\0" in name):
            raise CheckpointError(f"{path}/{MANIFEST}: file {name!r} is not a plain file name "
                                  "inside the directory")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise CheckpointError(f"{path}/{MANIFEST}: file {name!r} has no valid SHA-256 "
                                  "(64 hex digits)")
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    unlisted = sorted(present - set(manifest))
    if unlisted:
        raise CheckpointError(f"{path}: file '{unlisted[0]}' is not listed in the manifest")
    for name, digest in manifest.items():
        f = path / name
        if f.is_symlink():
            raise CheckpointError(f"{path}: file '{name}' is a symbolic link (not allowed)")
        if not f.is_file():
            raise CheckpointError(f"{path}: file '{name}' listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path}: file '{name}' is corrupt (SHA-256 mismatch)")
    return manifest


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # torch: module docstring

    try:
        return load_file(str(Path(path) / f"{name}.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}/{name}.safetensors: unreadable ({e})") from None


def read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((Path(path) / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{name}.json: unreadable ({e})") from None


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint ``path`` (its ``run.json``'s ``run_id``); None
    for anything else: a checkpoint from before run ids, a folder a user made, an unreadable
    file."""
    try:
        meta = json.loads((Path(path) / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    run_id = meta.get("run_id") if isinstance(meta, dict) else None
    return run_id if isinstance(run_id, str) else None


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
    import torch  # module docstring: why here

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
