"""ONNX export of the quickstart model: fp32 vs int8, size, AUC per task, parity, latency.

Trains the quickstart model if ``--run`` holds none (``shopmtl quickstart --rows 300000
--no-baselines --out runs/bench-export``), then exports it with ``shopmtl export``'s own code
(``shopmtl.export.bundle.export_bundle``) to an fp32 and an int8 bundle, measured on the run's
test split (``OUT/data/test.parquet``). One more int8 variant leaves the embedding tables fp32
(dense layers only), to show what quantising the tables buys. Prints the table that
docs/DEPLOY.md holds and writes ``--out`` (JSON):

    .venv/bin/python bench/export.py --out bench/results/export.json

Latency is one onnxruntime call (one intra-op thread) on prepared inputs, p50 / p99 of 500
single-row calls and 200 calls of 100 rows; "pytorch" is the source model on the same tensors
with one thread. On a shared 2-core machine read the p99 as noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DENSE_ONLY = ("MatMul", "Gemm")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ensure_run(run: Path, rows: int) -> Path:
    """The quickstart model directory of ``run``, trained first when absent."""
    if not (run / "model" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "shopmtl", "quickstart", "--rows", str(rows),
                        "--no-baselines", "--out", str(run)], check=True)
    return run / "model"


def row(name: str, size: int | None, fp32_size: int, quality: dict, parity: float | None,
        latency: dict) -> dict[str, Any]:
    """One variant of the table."""
    return {"variant": name, "size_bytes": size,
            "size_ratio": None if size is None else size / fp32_size,
            "auc": {t: q.get("auc") for t, q in quality.items()},
            "logloss": {t: q.get("logloss") for t, q in quality.items()},
            "max_abs_parity": parity,
            "latency_ms": {b: {k: v for k, v in lat.items() if k != "calls"}
                           for b, lat in latency.items()}}


def dense_only(model_dir: Path, data: Path, fp32: Path, tmp: Path) -> dict[str, Any]:
    """int8 dense layers, fp32 embedding tables: measured by the checks of the export."""
    from shopmtl.export.bundle import held_out_rows, load_source, measure, variant
    from shopmtl.export.quantize import quantize_int8

    source = load_source(model_dir)
    graph = tmp / "dense.int8.onnx"
    info = quantize_int8(fp32, graph, DENSE_ONLY)
    checks = measure(variant(source, held_out_rows(source, data)), fp32, graph, "int8")
    return {"checks": checks, "quantization": info}


def run(model_dir: Path, data: Path) -> dict[str, Any]:
    from shopmtl.export.bundle import export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fp32 = export_bundle(model_dir, t / "fp32", data)
        int8 = export_bundle(model_dir, t / "int8", data, int8=True)
        dense = dense_only(model_dir, data, t / "fp32" / "model.onnx", t)
    c32, c8, cd = fp32["checks"], int8["checks"], dense["checks"]
    size = c32["size_bytes"]["fp32"]
    rows = [
        row("pytorch fp32", None, size, c32["quality"]["pytorch_fp32"], None,
            c32["latency"]["pytorch_fp32"]),
        row("onnx fp32", size, size, c32["quality"]["onnx_fp32"], c32["parity_fp32"]["max"],
            c32["latency"]["onnx_fp32"]),
        row("onnx int8", c8["size_bytes"]["int8"], size, c8["quality"]["onnx_int8"],
            c8["parity_int8"]["max"], c8["latency"]["onnx_int8"]),
        row("onnx int8, fp32 tables", cd["size_bytes"]["int8"], size,
            cd["quality"]["onnx_int8"], cd["parity_int8"]["max"], cd["latency"]["onnx_int8"]),
    ]
    return {"rows": c32["rows"], "tasks": fp32["tasks"], "variants": rows,
            "quantization": {"int8": int8["quantization"], "int8_dense_only":
                             dense["quantization"]},
            "versions": int8["versions"]}


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    head = ["variant", "file MB", "x fp32", *(f"{t} AUC" for t in tasks), "max abs parity",
            "p50 / p99 ms, 1 row", "p50 / p99 ms, 100 rows"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["variants"]:
        lat = r["latency_ms"]
        cells = [r["variant"],
                 "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f}",
                 "-" if r["size_ratio"] is None else f"{r['size_ratio']:.2f}",
                 *(f"{r['auc'][t]:.4f}" for t in tasks),
                 "-" if r["max_abs_parity"] is None else f"{r['max_abs_parity']:.1e}",
                 f"{lat['batch_1']['p50_ms']:.3f} / {lat['batch_1']['p99_ms']:.3f}",
                 f"{lat['batch_100']['p50_ms']:.3f} / {lat['batch_100']['p99_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-export"),
                    help="a quickstart output folder (trained when it has no model)")
    ap.add_argument("--rows", type=int, default=300_000, help="the quickstart's --rows")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    model_dir = ensure_run(args.run, args.rows)
    result = run(model_dir, args.run / "data" / "test.parquet")
    result["env"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                     "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0],
                     "quickstart_rows": args.rows}
    result["command"] = "python bench/export.py " + " ".join(argv or sys.argv[1:])
    table = markdown(result)
    result["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table)
    print(f"test rows {result['rows']}; load {load_before:.1f} -> "
          f"{result['env']['load_average_after']:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
