"""``shopmtl serve --workers 2``: the real supervisor and its two worker processes on one port.

Both workers answer (``X-Shopmtl-Worker``: 0 and 1 over fresh connections), ``/metrics`` of
either counts the whole service, a hot reload (``POST /admin/reload``, SIGHUP to the supervisor)
ends with every worker serving the new model and a tampered one is refused by all, a killed
worker is replaced, SIGTERM lets a request in flight finish, and no process is left behind.
A and B: the format-1 zoo model and a copy whose ``manifest.json`` is written with another
indent (the same files, so the same answers, but another version: ``X-Model-Version`` tells
which one a worker serves).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import shopmtl
from tests.serve.helpers import close, version_of
from tests.serve.server import Server, free_port, stop, wait_ready
from tests.serve.test_answers import recommend_body

KEY = "test-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORKERS = 2
MAX_TRIES = 400  # fresh connections to reach both workers (the kernel picks the acceptor)


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (its children, theirs, ...), from /proc."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:  # the process ended meanwhile
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it has ended, its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def workers_of(server: Server) -> set[int]:
    """The worker processes (multiprocessing's resource tracker is the supervisor's child too)."""
    return {p for p in descendants(server.proc.pid) if alive(p) and b"spawn_main" in
            Path(f"/proc/{p}/cmdline").read_bytes()}


def shared_dir(server: Server) -> Path:
    """The supervisor's private folder, as a worker's environment names it (the supervisor
    set it after its own start: its /proc environ does not show it)."""
    env = Path(f"/proc/{min(workers_of(server))}/environ").read_bytes().split(b"\0")
    opts = next(e for e in env if e.startswith(b"SHOPMTL_SERVE_WORKERS="))
    return Path(json.loads(opts.split(b"=", 1)[1])["shared"])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def start(model_dir: Path, log: Path, key_file: Path) -> Server:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shopmtl", "serve", str(model_dir), "--port", str(port),
             "--workers", str(WORKERS), "--max-in-flight", "4", "--admin-key-file",
             str(key_file)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Server(f"http://127.0.0.1:{port}", proc, log)


def stop_all(server: Server, seen: set[int]) -> None:
    """SIGTERM (then SIGKILL) the supervisor, then any process of it still running: every
    process the test started ends here, whatever the test did."""
    seen |= descendants(server.proc.pid)
    stop(server, timeout=60)
    deadline = time.monotonic() + 15  # the resource tracker ends once its pipe closes
    while any(alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in seen:
        if alive(p):
            os.kill(p, signal.SIGKILL)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path) -> tuple[Path, Path, Path]:
    """A (the zoo model), B (another version of it), and B tampered (one weight byte
    flipped, its manifest as it was)."""
    tmp = tmp_path_factory.mktemp("workers")
    b = shutil.copytree(zoo_dir, tmp / "b")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(manifest, indent=4))
    bad = shutil.copytree(b, tmp / "bad")
    weights = bytearray((bad / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(weights))
    assert version_of(zoo_dir) != version_of(b)
    return zoo_dir, b, bad


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("key") / "admin.key"
    f.write_text(KEY + "\n")
    return f


@pytest.fixture(scope="module")
def server(models: tuple[Path, Path, Path], key_file: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start(models[0], tmp_path_factory.mktemp("serve") / "workers.log", key_file)
    seen: set[int] = set()
    try:
        wait_ready(s)  # one worker is
        wait_for("both workers ready", lambda: metric(s, "shopmtl_ready") == WORKERS)
        seen |= descendants(s.proc.pid)
        yield s
    finally:
        stop_all(s, seen)


def fresh(server: Server, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request on a connection of its own (the kernel gives it to either worker)."""
    with server.client() as c:
        return c.request(method, path, **kw)


def spread(server: Server, method: str, path: str, **kw: Any) -> list[httpx.Response]:
    """Fresh-connection requests, 4 at a time, until both workers answered (at least 20)."""
    got: list[httpx.Response] = []
    with ThreadPoolExecutor(4) as pool:
        while len(got) < MAX_TRIES:
            got += pool.map(lambda _: fresh(server, method, path, **kw), range(4))
            if len(got) >= 20 and {r.headers.get("x-shopmtl-worker") for r in got} == {"0", "1"}:
                return got
    raise AssertionError(f"{len(got)} fresh connections never reached both workers: "
                         f"{sorted({r.headers.get('x-shopmtl-worker') for r in got})}")


def metric(server: Server, sample: str) -> float:
    """One sample's value in ``/metrics`` (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def all_serve(server: Server, version: str) -> None:
    """Every fresh connection (both workers among them) answers ``version``."""
    versions = {r.headers["x-model-version"] for r in spread(server, "GET", "/readyz")}
    assert versions == {version}


def score_sample(endpoint: str = "/v1/score") -> str:
    return f'shopmtl_http_requests_total{{code="200",endpoint="{endpoint}"}}'


def test_both_workers_answer_and_metrics_count_the_whole_service(
        server: Server, zoo_model: shopmtl.Model, models: tuple[Path, Path, Path]) -> None:
    rows = [zoo_model.contract("click").example]
    want = zoo_model.predict(rows).to_pylist()
    before = metric(server, score_sample())
    answers = spread(server, "POST", "/v1/score", json={"rows": rows})
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == version_of(models[0])
        close(r.json()["predictions"], want)
    # each worker counts its own requests into the shared files; /metrics sums them
    wait_for("the counts", lambda: metric(server, score_sample()) >= before + len(answers), 10)
    assert metric(server, score_sample()) == before + len(answers)
    assert metric(server, "shopmtl_ready") == WORKERS  # livesum: the ready workers
    v = version_of(models[0])
    assert metric(server, f'shopmtl_model_info{{kind="zoo",version="{v}"}}') == WORKERS
    assert metric(server, "shopmtl_http_in_flight") == 0


def test_a_reload_reaches_every_worker_and_a_tampered_model_is_refused_by_all(
        server: Server, models: tuple[Path, Path, Path]) -> None:
    a, b, bad = models
    ok = metric(server, 'shopmtl_reloads_total{outcome="ok"}')
    r = fresh(server, "POST", "/admin/reload", json={"path": str(b)}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == version_of(b)
    assert r.json()["workers"] == {"total": WORKERS, "told": WORKERS - 1, "serving": WORKERS}
    all_serve(server, version_of(b))  # the reply came after every worker swapped
    assert metric(server, 'shopmtl_reloads_total{outcome="ok"}') == ok + WORKERS

    failed = metric(server, 'shopmtl_reloads_total{outcome="failed"}')
    r = fresh(server, "POST", "/admin/reload", json={"path": str(bad)}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "reload_failed", r.text
    assert r.headers["x-model-version"] == version_of(b)
    time.sleep(1)  # a publish would reach the other worker within the supervisor's 0.5 s
    all_serve(server, version_of(b))
    assert metric(server, 'shopmtl_reloads_total{outcome="failed"}') == failed + 1
    assert metric(server, f'shopmtl_model_info{{kind="zoo",version="{version_of(b)}"}}') == 2
    assert metric(server, f'shopmtl_model_info{{kind="zoo",version="{version_of(a)}"}}') == 0

    # a reload while another worker runs one (its lock held here): refused, nothing changes
    with (shared_dir(server) / "reload.lock").open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = fresh(server, "POST", "/admin/reload", json={"path": str(a)}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "reload_in_progress", r.text
    all_serve(server, version_of(b))

    # SIGHUP to the supervisor: the startup directory (A) again, on every worker
    server.proc.send_signal(signal.SIGHUP)
    wait_for("A on both workers", lambda: metric(
        server, f'shopmtl_model_info{{kind="zoo",version="{version_of(a)}"}}') == WORKERS)
    all_serve(server, version_of(a))
    assert "reloaded (published by a sibling worker)" in server.log_text()


def test_a_killed_worker_is_replaced_and_counts_survive(server: Server,
                                                        models: tuple[Path, Path, Path]) -> None:
    b = models[1]
    r = fresh(server, "POST", "/admin/reload", json={"path": str(b)}, headers=AUTH)
    assert r.status_code == 200, r.text
    pids = workers_of(server)
    assert len(pids) == WORKERS
    count = metric(server, score_sample())
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for("a new worker", lambda: len(workers_of(server)) == WORKERS
             and victim not in workers_of(server))
    # the new worker loads the published model (B, not the startup directory A) and warms up
    wait_for("both ready", lambda: metric(server, "shopmtl_ready") == WORKERS)
    all_serve(server, version_of(b))
    assert metric(server, score_sample()) == count  # the dead worker's counts are kept
    assert metric(server, f'shopmtl_model_info{{kind="zoo",version="{version_of(b)}"}}') == 2


def test_sigterm_finishes_the_request_in_flight_and_leaves_no_process(
        models: tuple[Path, Path, Path], key_file: Path, zoo_model: shopmtl.Model,
        tmp_path: Path) -> None:
    """A request whose body is half sent when the supervisor gets SIGTERM: the workers stop
    accepting, the one holding it reads the rest and answers 200, then every process ends."""
    body = json.dumps(recommend_body(zoo_model, 50)).encode()
    go = threading.Event()

    def upload() -> Iterator[bytes]:  # chunked: the second half waits for the shutdown
        yield body[:len(body) // 2]
        go.wait(60)
        yield body[len(body) // 2:]

    answer: list[httpx.Response] = []
    server = start(models[0], tmp_path / "serve.log", key_file)
    seen: set[int] = set()
    try:
        wait_ready(server)
        wait_for("both workers ready", lambda: metric(server, "shopmtl_ready") == WORKERS)
        seen |= descendants(server.proc.pid)

        def ask() -> None:
            with server.client() as c:
                answer.append(c.post("/v1/recommend", content=upload(),
                                     headers={"content-type": "application/json"}))

        thread = threading.Thread(target=ask)
        thread.start()
        try:
            wait_for("the request in flight",
                     lambda: metric(server, "shopmtl_http_in_flight") == 1)
            server.proc.terminate()
            wait_for("the shutdown", lambda: server.log_text().count("Shutting down") == 2)
            with pytest.raises(httpx.TransportError):  # no new connection is accepted
                httpx.get(f"{server.url}/livez", timeout=5)
            assert server.proc.poll() is None  # still answering the one in flight
        finally:
            go.set()
            thread.join(60)
        assert server.proc.wait(60) == 0, server.log_text()
        # the workers and multiprocessing's resource tracker end with the supervisor
        wait_for("no process left", lambda: not any(alive(p) for p in seen), 15)
    finally:
        stop_all(server, seen)
    assert answer and answer[0].status_code == 200, server.log_text()
    assert len(answer[0].json()["items"]) == 50
    log = server.log_text()
    assert log.index("Shutting down") < log.index("POST /v1/recommend 200"), log
    assert len(seen) > WORKERS  # the workers and the tracker were seen, and all ended


def test_what_the_workers_cannot_serve_is_refused_before_any_starts(tmp_path: Path) -> None:
    """No worker is spawned for what every worker would fail at (a restart loop otherwise):
    a folder without a manifest, neither a model nor an experiment, a bad admin key; nothing
    is left in /tmp (an experiment's store of another experiment: test_workers_experiment)."""
    from shopmtl.serve.workers import run_workers

    before = set(Path(tempfile.gettempdir()).glob("shopmtl-serve-*"))
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        run_workers(tmp_path, workers=2)
    with pytest.raises(ValueError, match="a model directory, an experiment, or both"):
        run_workers(None, workers=2)
    with pytest.raises(ValueError, match="2 or more workers"):
        run_workers(tmp_path, workers=1)
    short = tmp_path / "short.key"
    short.write_text("short")
    with pytest.raises(ValueError, match="admin key"):
        run_workers(Path(__file__).parents[1] / "fixtures" / "format1" / "zoo_model",
                    workers=2, admin_key_file=short)
    assert set(Path(tempfile.gettempdir()).glob("shopmtl-serve-*")) == before
