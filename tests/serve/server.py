"""The real service as a subprocess: ``python -m shopmtl serve MODEL_DIR`` on a free loopback
port, ready once ``/readyz`` answers 200, always stopped (SIGTERM, then wait)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_S = 180  # seconds to load the model and answer the warm-up, on a loaded 2-core machine


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path  # the server's stdout and stderr

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(server: Server, timeout: float = READY_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"the server exited ({server.proc.returncode}):\n"
                                 f"{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready after {timeout} s:\n{server.log_text()}")


def stop(server: Server, timeout: float = 30) -> int:
    """SIGTERM, then wait (SIGKILL after ``timeout``): the exit status."""
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout)
    return server.proc.returncode


@contextmanager
def serving(model_dir: Path, log: Path, *args: str, env: Mapping[str, str] | None = None
            ) -> Iterator[Server]:
    """The service of ``model_dir`` (extra CLI ``args``), ready; stopped on exit, always.
    ``env``: the server's environment (default: this process's)."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shopmtl", "serve", str(model_dir), "--port", str(port),
             *args], stdout=out, stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)
