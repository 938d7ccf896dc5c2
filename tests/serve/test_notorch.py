"""An ONNX bundle is loaded and served without torch (issue #19).

Each check runs in a subprocess whose ``sitecustomize`` sets ``sys.modules["torch"] = None``,
so any ``import torch`` there raises ImportError (the environment variable carries the block
to every process the server might start). In such a process ``shopmtl.load(BUNDLE)`` scores
rows, and the real ``shopmtl serve BUNDLE`` (uvicorn on a loopback port, a feature snapshot,
an admin key) answers /readyz, /v1/score, /v1/recommend by ids and /metrics, and hot-reloads
another bundle, with the answers of the bundle loaded here (torch imported). The block is
shown to bite in the same processes: loading the PyTorch model directory the bundles came
from fails there (in the server: a refused reload, the bundle still serving). The PyTorch
model directory, served normally, says it loaded torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

import shopmtl
from shopmtl.export.bundle import export_bundle
from shopmtl.serve.features import (
    QUICKSTART_ITEM_COLUMNS,
    QUICKSTART_USER_COLUMNS,
    FeatureFill,
    SnapshotStore,
    Spec,
    write_snapshot,
)
from tests.export.world import trained_zoo
from tests.serve.helpers import close, full_row, post, version_of
from tests.serve.server import Server, serving

# every `import torch` of a process started with this on its path raises ImportError
BLOCK = 'import sys\n\nsys.modules["torch"] = None\n'
KEY = "test-admin-key-notorch-0123456789"
RELOAD = "/admin/reload"
ROWS = 20  # test rows scored


@dataclass(frozen=True)
class Bundles:
    source: Path  # the PyTorch model directory both bundles were exported from
    int8: Path
    fp32: Path
    snapshot: Path  # `shopmtl features` of the training file
    test: Path  # the labelled test split


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("notorch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine
    try:
        source = trained_zoo(root)
        test = root / "w" / "test.parquet"
        export_bundle(source, root / "int8", test, int8=True)
        export_bundle(source, root / "fp32", test)
    finally:
        torch.set_num_threads(before)
    spec = Spec({"user": "user_id", "item": "item_id"},
                {"user": QUICKSTART_USER_COLUMNS, "item": QUICKSTART_ITEM_COLUMNS})
    write_snapshot(root / "w" / "train.parquet", root / "snap", spec)
    return Bundles(source, root / "int8", root / "fp32", root / "snap", test)


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python processes cannot import torch."""
    block = tmp_path_factory.mktemp("no_torch")
    (block / "sitecustomize.py").write_text(BLOCK)
    path = [str(block), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def rows_of(bundle: Path, test: Path, n: int = ROWS) -> list[dict[str, Any]]:
    """``n`` test rows as a client sends them: the contract's fields, ids as text."""
    fields = [f.name for f in shopmtl.load(bundle).contract("click").inputs]
    raw = pq.read_table(test).slice(0, n).select(fields).to_pylist()
    return [{k: (v if k == "price" or v is None else str(v)) for k, v in r.items()}
            for r in raw]


def predictions(model_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The reference: ``shopmtl.load(model_dir).predict`` in this process (torch loaded)."""
    return shopmtl.load(model_dir).predict(rows).to_pylist()


# the child: scores the rows of argv[2] (JSON) with the bundle argv[1], then tries to load the
# PyTorch model directory argv[3]; prints what it saw as JSON
CHILD = """
import json, sys
import shopmtl
bundle, rows, source = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
m = shopmtl.load(bundle)
out = {"kind": m.kind, "predictions": m.predict(rows).to_pylist(),
       "torch": repr(sys.modules.get("torch", "absent"))}
try:
    shopmtl.load(source)
    out["source"] = "loaded"
except ImportError as e:
    out["source"] = type(e).__name__
print(json.dumps(out))
"""


def test_load_scores_a_bundle_in_a_process_without_torch(bundles: Bundles,
                                                         no_torch: dict[str, str]) -> None:
    rows = rows_of(bundles.int8, bundles.test)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundles.int8), json.dumps(rows),
                           str(bundles.source)], capture_output=True, text=True, timeout=120,
                          env=no_torch)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["kind"] == "onnx" and got["torch"] == "None"  # blocked, never imported
    close(got["predictions"], predictions(bundles.int8, rows))
    # the block bites: the PyTorch model directory needs torch and cannot load there
    assert got["source"] == "ModuleNotFoundError"


def recommend_reference(bundle: Path, snapshot: Path, context: dict[str, Any],
                        cands: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each candidate's predictions as this process computes them: the rows filled from the
    snapshot, scored by the bundle loaded here."""
    m = shopmtl.load(bundle)
    contract = m.contract("click")
    filled = FeatureFill(SnapshotStore(snapshot), contract).fill(
        [{**context, **c} for c in cands])
    fields = [f.name for f in contract.inputs]
    return m.predict([full_row(fields, r) for r in filled]).to_pylist()


def model_info(server: Server) -> str:
    with server.client() as c:
        text = c.get("/metrics").text
    return next(line for line in text.splitlines() if line.startswith("shopmtl_model_info"))


def test_serve_answers_a_bundle_without_torch(bundles: Bundles, no_torch: dict[str, str],
                                              tmp_path: Path) -> None:
    key = tmp_path / "admin.key"
    key.write_text(KEY + "\n")
    rows = rows_of(bundles.int8, bundles.test)
    users = [r["user_id"] for r in rows[:2]]
    items = [r["item_id"] for r in rows[2:8]]
    auth = {"Authorization": f"Bearer {KEY}"}
    with serving(bundles.int8, tmp_path / "serve.log", "--features", str(bundles.snapshot),
                 "--admin-key-file", str(key), env=no_torch) as server:
        with server.client() as c:
            ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["model_version"] == version_of(bundles.int8)
        close(post(server, "/v1/score", {"rows": rows})["predictions"],
              predictions(bundles.int8, rows))
        # by ids: the snapshot fills the user's and the items' columns
        context = {"user_id": users[0], "scenario": "home_feed"}
        cands = [{"item_id": it} for it in items]
        got = post(server, "/v1/recommend", {"context": context, "candidates": cands})
        by_cand = [it["predictions"] for it in sorted(got["items"],
                                                      key=lambda it: it["candidate"])]
        close(by_cand, recommend_reference(bundles.int8, bundles.snapshot, context, cands))
        assert model_info(server) == (
            f'shopmtl_model_info{{kind="onnx",version="{version_of(bundles.int8)}"}} 1.0')

        # a hot reload of another bundle (fp32): its answers from then on
        with server.client() as c:
            r = c.post(RELOAD, json={"path": str(bundles.fp32)}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "onnx"
        assert r.json()["model_version"] == version_of(bundles.fp32)
        close(post(server, "/v1/score", {"rows": rows})["predictions"],
              predictions(bundles.fp32, rows))
        # the block bites in the server too: the PyTorch source cannot load there, refused,
        # and the fp32 bundle keeps serving
        with server.client() as c:
            r = c.post(RELOAD, json={"path": str(bundles.source)}, headers=auth)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "reload_failed"
        assert "ModuleNotFoundError" in r.json()["error"]["message"]
        assert model_info(server) == (
            f'shopmtl_model_info{{kind="onnx",version="{version_of(bundles.fp32)}"}} 1.0')
    log = server.log_text()
    assert "answered the warm-up on 3 endpoints (kind onnx; torch not loaded)" in log
    assert f"-> {version_of(bundles.fp32)} in" in log
    assert "(kind onnx; torch not loaded)" in log.split("reloaded (admin)")[1]


def test_the_pytorch_model_directory_is_served_with_torch(bundles: Bundles,
                                                          tmp_path: Path) -> None:
    rows = rows_of(bundles.int8, bundles.test, 5)
    with serving(bundles.source, tmp_path / "serve.log") as server:
        close(post(server, "/v1/score", {"rows": rows})["predictions"],
              predictions(bundles.source, rows))
    assert "answered the warm-up on 3 endpoints (kind zoo; torch loaded)" in server.log_text()
