"""Model directories are verified in full against their manifest (no file more, none less, no
name outside the folder); ``write_dir`` replaces a directory atomically and cleans what a killed
write left; ``shopmtl train`` locks its output folder; ``shopmtl --version``."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import shopmtl
from shopmtl.train import checkpoint as ck
from shopmtl.train.checkpoint import CheckpointError
from tests.helpers import assert_one_error_line, cli

FIX = Path(__file__).parent / "fixtures" / "format1"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _set_manifest(d: Path, manifest) -> None:
    (d / "manifest.json").write_text(json.dumps(manifest))


def _add_extra(d: Path) -> str:
    shutil.copy(d / "model.safetensors", d / "extra.safetensors")
    return "extra.safetensors"


def _drop_meta(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    del m["meta.json"]
    _set_manifest(d, m)
    return "meta.json"


def _outside(d: Path) -> str:
    (d.parent / "evil.json").write_text("{}")
    m = json.loads((d / "manifest.json").read_text())
    m["../evil.json"] = _sha(d.parent / "evil.json")
    _set_manifest(d, m)
    return "../evil.json"


def _absolute(d: Path) -> str:
    (d.parent / "evil.json").write_text("{}")
    m = json.loads((d / "manifest.json").read_text())
    m[str(d.parent / "evil.json")] = _sha(d.parent / "evil.json")
    _set_manifest(d, m)
    return str(d.parent / "evil.json")


def _subdir_name(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    m["sub/meta.json"] = m["meta.json"]
    _set_manifest(d, m)
    return "sub/meta.json"


def _listed_missing(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    m["ghost.json"] = "0" * 64
    _set_manifest(d, m)
    return "ghost.json"


def _empty(d: Path) -> str:
    _set_manifest(d, {})
    return "manifest.json"


def _not_object(d: Path) -> str:
    _set_manifest(d, ["meta.json"])
    return "manifest.json"


def _bad_digest(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    m["meta.json"] = 12
    _set_manifest(d, m)
    return "meta.json"


def _short_digest(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    m["meta.json"] = m["meta.json"][:40]
    _set_manifest(d, m)
    return "meta.json"


TAMPER = [_add_extra, _drop_meta, _outside, _absolute, _subdir_name, _listed_missing, _empty,
          _not_object, _bad_digest, _short_digest]


@pytest.mark.parametrize("tamper", TAMPER, ids=lambda f: f.__name__.strip("_"))
def test_every_tampering_is_refused_in_one_line(tamper, tmp_path: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(FIX / "zoo_model", d)
    ck.verify_dir(d)  # the committed fixture lists every file: it passes
    name = tamper(d)
    with pytest.raises(CheckpointError) as info:
        ck.verify_dir(d)
    msg = str(info.value)
    assert "\n" not in msg and str(d) in msg and name in msg, msg
    with pytest.raises(CheckpointError):
        shopmtl.load(d)


@pytest.mark.parametrize("tamper", [_add_extra, _outside, _empty])
def test_predict_on_a_tampered_copy_exits_1_in_one_line(tamper, tmp_path: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(FIX / "zoo_model", d)
    name = tamper(d)
    proc = cli("predict", str(d), str(FIX / "zoo_rows.csv"), "--out", str(tmp_path / "p.csv"))
    assert_one_error_line(proc, str(d), name, code=1)  # a corrupt model dir: runtime
    assert not (tmp_path / "p.csv").exists()


def test_both_fixtures_and_a_new_dir_pass(tmp_path: Path) -> None:
    for which in ("zoo_model", "joint_model"):
        ck.verify_dir(FIX / which)
    d = ck.write_dir(tmp_path / "m", {"model": {"w": torch.ones(3)}}, {"meta": {"a": 1}})
    assert sorted(ck.verify_dir(d)) == ["meta.json", "model.safetensors"]


# --- write_dir: atomic replace, stale siblings ------------------------------------------------

def _write(target: Path, value: float) -> Path:
    return ck.write_dir(target, {"model": {"w": torch.full((4,), value)}}, {"meta": {"v": value}})


def _value(target: Path) -> float:
    ck.verify_dir(target)
    return ck.read_json(target, "meta")["v"]


def test_stale_siblings_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    stale_tmp = tmp_path / ".model.tmp-abc123"
    stale_old = tmp_path / ".model.old-deadbeef"
    other = tmp_path / ".model2.tmp-abc123"  # another target's: left alone
    for p in (stale_tmp, stale_old, other):
        p.mkdir()
        (p / "half.safetensors").write_bytes(b"x")
    _write(tmp_path / "model", 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model2.tmp-abc123", "model"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_replacing_leaves_only_the_new_dir(exchange: bool, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    target = _write(tmp_path / "model", 1.0)
    _write(target, 2.0)
    assert _value(target) == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_reader_never_finds_the_target_missing_during_a_replace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every rename/exchange write_dir does while replacing, the target is a complete
    directory (old or new). Needs the atomic exchange, which Linux (CI's and the supported
    platform) has; elsewhere the rename-aside fallback is used and this test fails by design."""
    target = _write(tmp_path / "model", 1.0)
    assert ck._exchange(tmp_path / "model", tmp_path / "model"), (
        "no renameat2(RENAME_EXCHANGE) on this platform: write_dir falls back to rename-aside")
    seen: list[float] = []
    real_exchange, real_rename = ck._exchange, os.rename

    def exchange(a, b):
        ok = real_exchange(a, b)
        seen.append(_value(target))
        return ok

    def rename(a, b):
        real_rename(a, b)
        seen.append(_value(target))

    monkeypatch.setattr(ck, "_exchange", exchange)
    monkeypatch.setattr(ck.os, "rename", rename)
    _write(target, 2.0)
    assert seen == [2.0]  # one step, the exchange, after which the new one is complete
    assert _value(target) == 2.0 and [p.name for p in tmp_path.iterdir()] == ["model"]


# --- output-folder lock -----------------------------------------------------------------------

def test_a_second_train_into_a_locked_out_exits_1_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {train: nowhere.parquet}\nmodel: {name: no_such_model}\n")
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        # the lock is taken before the config is read: a runtime refusal, not a usage error
        line = assert_one_error_line(cli("train", str(cfg), "--out", str(out)), code=1)
        assert line == f"error: {out} is in use by another shopmtl run (pid 4242)"
    finally:
        os.close(fd)  # releases the lock
    # released: the same command gets past the lock and fails on its config instead
    line = assert_one_error_line(cli("train", str(cfg), "--out", str(out)), code=2)
    assert "in use" not in line
    # and released the lock on that error: this process can take it again
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_the_lock_is_held_for_the_run_and_released(tmp_path: Path) -> None:
    from shopmtl.train.outlock import OutputInUseError, locked_output

    out = tmp_path / "o"
    with locked_output(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        code = ("import sys; from shopmtl.train.outlock import locked_output\n"
                f"with locked_output({str(out)!r}): pass\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "OutputInUseError" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
    with locked_output(out):  # released at the end of the block
        pass
    with pytest.raises(RuntimeError), locked_output(out):  # and on an error
        raise RuntimeError("boom")
    with locked_output(out):
        pass
    assert not out.exists()  # created here and left empty: removed again
    with locked_output(out):
        (out / "metrics.json").write_text("{}")
    # the lock file this call created goes with it; the run's files stay
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    (out / ".lock").write_text("4242\n")  # a dead run's: no lock, and kept (not this call's)
    with locked_output(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.json"]
    assert issubclass(OutputInUseError, OSError)


# --- checkpoint retention: this run's checkpoints only --------------------------------------

def _save(cp, tag: str) -> None:
    cp.save(tag, {"weights": {"x": torch.ones(2)}}, {"tag": tag})


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_checkpoint_order_is_stage_then_step_with_a_stage_end_last() -> None:
    from shopmtl.train.stages import checkpoint_order, expired

    names = ["ckpt-01-000000002", "ckpt-00-end", "ckpt-00-000000010", "ckpt-00-000000009"]
    assert sorted(names, key=checkpoint_order) == [  # type: ignore[arg-type]
        "ckpt-00-000000009", "ckpt-00-000000010", "ckpt-00-end", "ckpt-01-000000002"]
    assert checkpoint_order("ckpt-foo-bar") is None and checkpoint_order("latest") is None
    assert expired(names, newest="ckpt-01-000000002") == ["ckpt-00-000000009",
                                                          "ckpt-00-000000010"]
    # the one just written is kept even where it is not the last in order (a rewound run)
    assert expired(names, newest="ckpt-00-000000009") == ["ckpt-00-000000010", "ckpt-00-end"]


def test_retention_deletes_only_checkpoints_of_the_current_run(tmp_path: Path) -> None:
    from shopmtl.train.stages import Checkpointer

    d = tmp_path / "checkpoints"
    old = Checkpointer(d, run_id="old-run")
    for step in (100, 200):
        _save(old, f"00-{step:09d}")
    (d / "ckpt-foo-bar").mkdir()  # a user's folder, named like a checkpoint
    (d / "ckpt-foo-bar" / "notes.txt").write_text("mine")
    new = Checkpointer(d, run_id="new-run")
    for step in (1, 2, 3, 4):  # fewer steps than the old run: all before its checkpoints
        _save(new, f"00-{step:09d}")
    assert _names(d) == ["ckpt-00-000000003", "ckpt-00-000000004", "ckpt-00-000000100",
                         "ckpt-00-000000200", "ckpt-foo-bar", "latest"]
    assert (d / "latest").read_text() == "ckpt-00-000000004"
    # a resume continues the run that wrote the latest checkpoint: its id, its retention
    resumed = Checkpointer(d)
    latest = resumed.latest()
    assert latest is not None
    _, meta = resumed.load(latest)
    assert resumed.run_id == "new-run" == meta["run_id"]
    _save(resumed, "00-end")
    assert _names(d) == ["ckpt-00-000000004", "ckpt-00-000000100", "ckpt-00-000000200",
                         "ckpt-00-end", "ckpt-foo-bar", "latest"]
    assert (d / "ckpt-foo-bar" / "notes.txt").read_text() == "mine"
    assert ck.checkpoint_run_id(d / "ckpt-00-000000200") == "old-run"
    # a checkpointer without an id that starts afresh gets a new one
    fresh = Checkpointer(tmp_path / "other")
    _save(fresh, "00-000000001")
    assert fresh.run_id not in (None, "old-run", "new-run")


def test_stale_temps_are_found_anywhere_and_only_they(tmp_path: Path) -> None:
    keep = [tmp_path / "model", tmp_path / "checkpoints" / "ckpt-00-000000001",
            tmp_path / ".hidden-but-mine", tmp_path / "data" / "model.tmp-notmine"]
    gone = [tmp_path / ".model.tmp-k2j_9", tmp_path / "checkpoints" / ".ckpt-00-end.old-ab12",
            tmp_path / "a" / "b" / ".model.tmp-x1"]
    for p in keep + gone:
        p.mkdir(parents=True)
        (p / "f").write_text("x")
    (tmp_path / "checkpoints" / ".latest.tmp").write_text("ckpt-00-000000001")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "f").write_text("elsewhere")
    (tmp_path / ".link.tmp-abc").symlink_to(tmp_path / "target")  # not followed, not removed
    removed = ck.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([*gone, tmp_path / "checkpoints" / ".latest.tmp"])
    assert all(p.is_dir() for p in keep) and not any(p.exists() for p in gone)
    assert (tmp_path / ".link.tmp-abc").is_symlink()
    assert (tmp_path / "target" / "f").read_text() == "elsewhere"


# --- version ----------------------------------------------------------------------------------

def test_version() -> None:
    assert shopmtl.__version__ == version("shopmtl")
    assert ck.model_meta("zoo", ["a"])["shopmtl_version"] == shopmtl.__version__
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"shopmtl {shopmtl.__version__}\n"
    assert not proc.stderr


def test_version_falls_back_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert shopmtl._version() == "0+unknown"


def test_license_is_apache_2() -> None:
    text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
