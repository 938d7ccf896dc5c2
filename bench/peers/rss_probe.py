"""Peak memory of each contender below the benchmark's ~480 MB floor, with a breakdown.

``bench/run_all.py`` reads each child's peak RSS from ``wait4``. Every child is forked from the
harness (~480 MB) before ``exec``, and Linux keeps the pre-``exec`` high-water mark in
``ru_maxrss``, so no figure below the harness's size can be resolved. This runs the same
children (same runner modules, specs, splits and interpreters) under a wrapper that reads the
kernel's ``VmHWM`` of the *new* program image (``/proc/self/status``, reset by ``exec``), at
three points: after ``import torch``, after the library's imports, and at exit. The differences
say where a library's memory goes: torch itself, the library and its dependencies, the run.

    .venv/bin/python -m bench.peers.rss_probe [--cells census:mmoe movielens:mmoe]

Linux only. Writes bench/results/rss_probe.json; prints MB per contender.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.peers import common as C
from bench.peers.prepare import prepare
from bench.run_all import CONTENDERS, MAIN_PY, PEERS_PY

# the modules each runner imports inside main(): measured before the run starts (DeepCTR-Torch
# needs the runner's own import shim first, so it is measured with the run)
LIBRARIES = {
    "shopmtl": ["shopmtl.data.pipeline", "shopmtl.train.evaluate", "shopmtl.train.trainer"],
    "torch-rechub": ["torch_rechub.models.multi_task", "torch_rechub.trainers",
                     "torch_rechub.utils.data"],
}

# run inside each child: VmHWM after torch, after the library's imports, at exit
WRAPPER = """
import atexit, importlib, json, runpy, sys
from bench.peers.common import vmhwm_mb as hwm  # numpy + stdlib: imports in either venv
marks = {}
atexit.register(lambda: print("RSS_PROBE " + json.dumps(marks), flush=True))
import torch  # noqa: E401
marks["torch"] = hwm()
mod, spec, libs = sys.argv[1], sys.argv[2], sys.argv[3:]
importlib.import_module(mod)
for lib in libs:  # the library's own modules, which the runner imports inside main()
    importlib.import_module(lib)
marks["imports"] = hwm()
sys.argv = [mod, spec]
try:
    runpy.run_module(mod, run_name="__main__")
finally:
    marks["peak"] = hwm()
"""


def probe(python: Path, module: str, spec_path: Path, libs: list[str]) -> dict[str, float]:
    proc = subprocess.run([str(python), "-c", WRAPPER, module, str(spec_path), *libs],
                          capture_output=True, text=True, env=C.child_env(), timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS_PROBE ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{module} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RSS_PROBE "))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=["census:mmoe", "movielens:mmoe"],
                    help="dataset:model at batch 2048, seed 0")
    ap.add_argument("--out", type=Path, default=Path("bench/results/rss_probe.json"))
    args = ap.parse_args(argv)
    if not Path("/proc/self/status").is_file():
        raise SystemExit("rss_probe reads /proc/self/status: Linux only")
    rows = []
    with tempfile.TemporaryDirectory(prefix="shopmtl-rss-") as tmp:
        work = Path(tmp)
        for cell in args.cells:
            ds, model = cell.split(":")
            if not (work / ds).is_dir():
                prepare(ds, work)
            for key in ("shopmtl", "shopmtl-default", "torch-rechub", "deepctr-torch",
                        "minimal"):
                module, interp, variant = CONTENDERS[key]
                spec = {"library": key.removesuffix("-default"), "variant": variant,
                        "model": model, "dataset": ds, "batch": 2048, "seed": 0,
                        "epochs": C.DATASETS[ds]["epochs"], "data_dir": str(work / ds),
                        "out": str(work / f"{key}-{ds}-{model}.json")}
                spec_path = work / f"{key}-{ds}-{model}.spec.json"
                spec_path.write_text(json.dumps(spec))
                marks = probe(MAIN_PY if interp == "main" else PEERS_PY, module, spec_path,
                              LIBRARIES.get(key.removesuffix("-default"), []))
                row = {"dataset": ds, "model": model, "contender": key, **marks}
                result = json.loads(Path(spec["out"]).read_text())
                if "vmhwm_mb" in result:  # shopmtl's runner marks its own stages
                    row["stages"] = result["vmhwm_mb"]
                rows.append(row)
                print(f"{ds:9s} {model:5s} {key:16s} VmHWM MB: after import torch "
                      f"{marks['torch']:6.0f} | after the library's imports {marks['imports']:6.0f}"
                      f" | peak {marks['peak']:6.0f}"
                      + ("" if "stages" not in row else " | stages: " + ", ".join(
                          f"{k} {v:.0f}" for k, v in row["stages"].items())), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
