"""An exported ONNX bundle (``shopmtl export --int8``) is served like the model directory it
came from: the same endpoints, the answers of ``shopmtl.load(bundle).predict`` (onnxruntime
behind the one reader and encoders), its own version header."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

import shopmtl
from tests.helpers import cli, small_world, world_config_yaml
from tests.serve.helpers import close, post, version_of
from tests.serve.server import serving


def test_an_int8_bundle_serves_its_own_answers(tmp_path: Path) -> None:
    small_world(tmp_path / "w", rows=20_000)
    cfg = world_config_yaml(tmp_path / "w", tmp_path / "zoo.yaml", epochs=1)
    cli("train", str(cfg), "--out", str(tmp_path / "run"), check=True)
    test = tmp_path / "w" / "test.parquet"
    bundle = tmp_path / "int8"
    cli("export", str(tmp_path / "run" / "model"), "--out", str(bundle), "--data", str(test),
        "--int8", check=True)
    m = shopmtl.load(bundle)
    fields = [f.name for f in m.contract("click").inputs]
    raw = pq.read_table(test).slice(0, 20).select(fields).to_pylist()
    rows = [{k: (v if k == "price" or v is None else str(v)) for k, v in r.items()}
            for r in raw]
    want = m.predict(rows).to_pylist()
    torch_answers = shopmtl.load(tmp_path / "run" / "model").predict(rows).to_pylist()
    # int8 weights: the bundle's own answers, near (not equal to) the PyTorch model's
    assert max(abs(a[t] - b[t]) for a, b in zip(want, torch_answers, strict=True)
               for t in m.tasks) < 0.05
    with serving(bundle, tmp_path / "serve.log") as server:
        got = post(server, "/v1/score", {"rows": rows})["predictions"]
        close(got, want)
        with server.client() as c:
            r = c.get("/readyz")
        assert r.headers["x-model-version"] == version_of(bundle)
