"""Deployment mode on loopback: a SuperLink and 2 SuperNodes as real processes (insecure,
free ports), ``shopmtl federate --deployment`` submits 2 rounds of the tiny model through
``flwr run``; metrics.json and the model are written, and every Flower process is gone
afterwards (process groups killed in the fixture's finally, checked in /proc by psutil)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from tests.federated.conftest import tiny_raw

BIN = Path(sys.executable).parent
# 2 silos (2 scenarios each): 2 SuperNodes
TWO_SILOS = {"by": "scenario", "groups": {"feeds": ["home_feed", "search"],
                                          "ads": ["ad_slot", "product_page"]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, f"the process on port {port} exited {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {seconds} s")


def world_config(world: Path, **federated: object) -> dict:
    """The tiny run's config reading the tiny world's files (generated once)."""
    from shopmtl.config import config_from_dict, to_dict
    from shopmtl.data.pipeline import resolve_synthetic

    raw = tiny_raw(**federated)
    fed = raw.pop("federated")
    exp, _ = resolve_synthetic(config_from_dict(raw), world / "data", lambda s: None)
    out = to_dict(exp)
    out["data"]["synthetic"] = None
    return {**out, "federated": fed}


def flower_env(home: Path) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[2]
    # PATH: the SuperLink and SuperNodes start flower-superexec from it
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # the SuperExecs look for a new ServerApp / ClientApp to start every 0.2 s
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)])}


class Procs:
    """Started processes, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pids: set[int] = set()

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with log.open("wb") as f:
            p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def tree(self) -> set[int]:
        """Every live pid the started processes and their descendants have."""
        out = set()
        for p in self.procs:
            try:
                ps = psutil.Process(p.pid)
                out |= {ps.pid} | {c.pid for c in ps.children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to each started process's group and to every descendant
        (Flower starts its SuperExec detached, in a session of its own)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = self.tree()
            self.pids |= live
            for p in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            for pid in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_alive(pid) for pid in live):
                time.sleep(0.1)
        for p in self.procs:
            p.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def procs() -> Iterator[Procs]:
    started = Procs()
    try:
        yield started
    finally:
        started.stop()


def test_superlink_and_two_supernodes_run_two_rounds(tiny_world: Path, tmp_path: Path,
                                                     procs: Procs) -> None:
    from shopmtl.cli import app

    out = tmp_path / "run"
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(yaml.safe_dump(world_config(tiny_world, silos=TWO_SILOS, rounds=2,
                                               local_epochs=0.25), sort_keys=False))
    env = flower_env(tmp_path / "flwr_home")
    link = free_port()
    superlink = procs.start([str(BIN / "flower-superlink"), "--insecure", "--port", str(link)],
                            env, tmp_path / "superlink.log")
    wait_port(link, superlink)
    for k in range(2):
        node_cfg = f"partition-id={k} federation='{out / 'federation.json'}'"
        procs.start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                     f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config",
                     node_cfg], env, tmp_path / f"supernode{k}.log")
    try:
        res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(out),
                                       "--deployment", f"127.0.0.1:{link}", "--insecure"],
                                 env=env)
    finally:
        procs.stop()
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.log")}
    assert res.exit_code == 0, (res.output[-3000:], logs)
    back = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in back["rounds"]] == [1, 2]
    assert set(back["rounds"][-1]["silos"]) == {"feeds", "ads"}
    assert back["rounds"][-1]["pooled"]["click"]["all"] > 0.55
    assert (out / "model" / "model.safetensors").is_file()
    assert "pooled test AUC click" in res.output
    # every Flower process (SuperLink, SuperNodes, the ServerApp and ClientApp processes they
    # spawned) is gone
    assert procs.pids, "no process was seen running"
    assert [pid for pid in procs.pids if _alive(pid)] == []


@pytest.mark.parametrize("flags, needle", [
    ([], "give --root-certificates"),
    (["--insecure", "--root-certificates", "ca.crt"], "exclude each other"),
    (["--root-certificates", "missing.crt"], "--root-certificates: no file"),
])
def test_deployment_needs_tls_or_insecure(tmp_path: Path, flags: list[str],
                                          needle: str) -> None:
    from shopmtl.cli import app

    cfg = tmp_path / "fed.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw()))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["federate", str(cfg), "--out", str(out), "--deployment",
                                   "127.0.0.1:9", *flags])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not out.exists()  # refused before anything was written
