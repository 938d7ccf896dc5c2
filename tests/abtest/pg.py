"""A throwaway PostgreSQL cluster for the event-store tests: Debian's server binaries
(/usr/lib/postgresql/*/bin, the ``postgresql`` package; .ci/run installs it), ``initdb`` into a
fresh temporary folder, the server on a free loopback port with password (SCRAM) login, always
stopped and removed afterwards.

PostgreSQL refuses to run as root, and CI runs as root: then every server command runs as the
``postgres`` OS user (``runuser -u postgres``), which owns the folder. Durability is off
(fsync, synchronous_commit, full_page_writes): the cluster lives for one test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.serve.server import free_port

USER = "shop"  # the cluster's superuser (initdb -U)
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",  # TCP only: no socket file in a shared /tmp or /run
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "40",
    "shared_buffers": "16MB",
}


def pg_bin() -> Path:
    """The newest installed server's bin folder; a clear failure (never a skip) without one."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/"
                           "initdb): apt-get install -y --no-install-recommends postgresql")
    return found[-1].parent


@dataclass(frozen=True)
class Cluster:
    root: Path
    port: int
    password: str

    def url(self, db: str = "postgres", password: str | None = "") -> str:
        """A URL of database ``db``; ``password``: "" the cluster's, None none (PGPASSWORD)."""
        secret = self.password if password == "" else password
        login = USER if secret is None else f"{USER}:{secret}"
        return f"postgresql://{login}@127.0.0.1:{self.port}/{db}"

    def restart(self) -> None:
        """Stop the server (fast: every connection cut) and start it again."""
        _run([str(pg_bin() / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w",
              "-t", "60", "-l", str(self.root / "server.log"), "restart"], "pg_ctl restart")

    def create_database(self, name: str) -> str:
        """A new empty database (its URL, the password in it)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')  # a test's own name, never a user's
        return self.url(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}")


@contextlib.contextmanager
def cluster(password: str = "pg-test-secret-5e1f", durable: bool = False) -> Iterator[Cluster]:
    """A running cluster; stopped (pg_ctl stop, else SIGKILL of its postmaster) and its folder
    removed in every case. ``durable``: PostgreSQL's own defaults for fsync, synchronous_commit
    and full_page_writes (a benchmark's honest commit cost), else off (a test's speed)."""
    bin_ = pg_bin()
    root = Path(tempfile.mkdtemp(prefix="shopmtl-pg-"))
    data = root / "data"
    try:
        (root / "pw").write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(root / "pw", "postgres", "postgres")
        _run([str(bin_ / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(root / "pw"),
              "--auth=scram-sha-256", "--no-sync", "--no-instructions", "--locale=C",
              "--encoding=UTF8"], "initdb")
        port = free_port()
        with (data / "postgresql.conf").open("a") as f:
            settings = {k: v for k, v in SETTINGS.items() if not durable or v != "off"}
            f.write("".join(f"{k} = {v}\n" for k, v in {**settings, "port": str(port)}.items()))
        try:
            _run([str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                  "-t", "60", "start"], "pg_ctl start")
            yield Cluster(root, port, password)
        finally:
            _stop(bin_, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stop(bin_: Path, data: Path) -> None:
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        _run([str(bin_ / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30",
              "stop"], "pg_ctl stop")
    except (RuntimeError, subprocess.TimeoutExpired):
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)
