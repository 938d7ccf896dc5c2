"""Static int8: which form of onnxruntime's ``quantize_static`` the export uses, measured.

For the quickstart model and the census MMoE (the models bench/export.py trains: it must have
run first), the fp32 graph is quantised with the export's own calibration sample (2,048
training rows, ``export.quantize.calibration_sample``) in several forms: QDQ or QOperator,
uint8 or int8 activations, per-tensor or per-channel weights, MinMax / Percentile / Entropy
ranges; dynamic int8 beside them. Per form: file size, AUC per task, the error against the
fp32 graph over every test row (max, 99th percentile, mean), and p50 latency of 1 and 100 rows
(one onnxruntime thread; ``export.checks.onnx_latency``). A form onnxruntime refuses to run is
reported with its error's first line::

    .venv/bin/python bench/export_int8_forms.py --out bench/results/export_int8_forms.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.export import census_part  # noqa: E402
from bench.run_all import cpu_model  # noqa: E402

# (name, quantize_static keyword arguments by name; resolved against onnxruntime below)
FORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("QDQ, uint8 act, MinMax (the export's)", {}),
    ("QDQ, int8 act, MinMax", {"activation_type": "QInt8"}),
    ("QOperator, uint8 act, MinMax", {"quant_format": "QOperator"}),
    ("QOperator, int8 act, MinMax", {"quant_format": "QOperator", "activation_type": "QInt8"}),
    ("QDQ, uint8 act, MinMax, per-channel", {"per_channel": True}),
    ("QDQ, uint8 act, Percentile", {"calibrate_method": "Percentile"}),
    ("QDQ, uint8 act, Entropy", {"calibrate_method": "Entropy"}),
)


def resolved(q, args: dict[str, Any]) -> dict[str, Any]:
    """``FORMS``' names as onnxruntime's enums, over the export's defaults."""
    out = {"quant_format": q.QuantFormat.QDQ, "activation_type": q.QuantType.QUInt8,
           "weight_type": q.QuantType.QInt8, "calibrate_method": q.CalibrationMethod.MinMax,
           "per_channel": False}
    for k, v in args.items():
        enum = {"quant_format": q.QuantFormat, "activation_type": q.QuantType,
                "calibrate_method": q.CalibrationMethod}.get(k)
        out[k] = getattr(enum, v) if enum is not None else v
    return out


def measure(graph: Path, schema, enc, ref: dict) -> dict[str, Any]:
    """Size, AUC per task, error against the fp32 graph's answers ``ref``, p50 latency."""
    import numpy as np

    from shopmtl.export.checks import onnx_latency, quality
    from shopmtl.export.runtime import OnnxForward

    try:
        out = OnnxForward(graph, schema, threads=1)(enc)
    except Exception as e:  # onnxruntime refuses some forms at run time: reported, not fatal
        return {"size_bytes": graph.stat().st_size,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    err = np.concatenate([np.abs(out[t] - ref[t]) for t in ref])
    lat = onnx_latency(graph, schema, enc)
    return {"size_bytes": graph.stat().st_size,
            "auc": {t: q.get("auc") for t, q in quality(schema, enc, out).items()},
            "error_vs_fp32": {"max": float(err.max()), "p99": float(np.percentile(err, 99)),
                              "mean": float(err.mean())},
            "p50_ms": {b: v["p50_ms"] for b, v in lat.items()}}


def forms(model_dir: Path, data: Path, train: Path) -> dict[str, Any]:
    """Every form of ``FORMS`` and dynamic int8, on one model."""
    import onnx
    from onnxruntime import quantization as q

    from shopmtl.export.bundle import held_out_rows, load_source
    from shopmtl.export.graph import export_onnx
    from shopmtl.export.quantize import (
        OP_TYPES,
        Calibration,
        _quiet,
        calibration_batches,
        calibration_reader,
        calibration_sample,
        quantize_int8,
        read_calibration,
    )
    from shopmtl.export.runtime import OnnxForward, signature

    source = load_source(model_dir)
    schema, enc = source.schema, held_out_rows(source, data)
    cal = Calibration(train)
    sample, record = calibration_sample(
        read_calibration(schema, source.encoders, source.cfg.data.chunk_rows, cal), schema, cal)
    batches = calibration_batches(signature(schema), sample)
    result: dict[str, Any] = {"calibration": record, "forms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fp32 = export_onnx(source.model.eval(), schema, t / "model.onnx")
        ref = OnnxForward(fp32, schema, threads=1)(enc)
        result["fp32_size_bytes"] = fp32.stat().st_size
        quantize_int8(fp32, t / "dynamic.onnx")
        result["forms"]["dynamic (quantize_dynamic)"] = measure(t / "dynamic.onnx", schema,
                                                                enc, ref)
        plain = onnx.load(str(fp32))
        del plain.graph.value_info[:]  # as quantize_int8_static does (its module docstring)
        onnx.save(plain, str(t / "plain.onnx"))
        for name, args in FORMS:
            graph = t / "static.onnx"
            with _quiet():
                q.quantize_static(str(t / "plain.onnx"), str(graph),
                                  calibration_reader(q, batches),
                                  op_types_to_quantize=list(OP_TYPES), **resolved(q, args))
            result["forms"][name] = measure(graph, schema, enc, ref)
            print(name, json.dumps(result["forms"][name]), flush=True)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| form | x fp32 | AUC per task | error max / p99 / mean | p50 ms, 1 / 100 rows |",
             "|---|---|---|---|---|"]
    for name, r in result["forms"].items():
        ratio = f"{r['size_bytes'] / result['fp32_size_bytes']:.3f}"
        if "error" in r:
            lines.append(f"| {name} | {ratio} | refused: {r['error']} | - | - |")
            continue
        e, p = r["error_vs_fp32"], r["p50_ms"]
        lines.append(f"| {name} | {ratio} | "
                     + " / ".join(f"{v:.4f}" for v in r["auc"].values() if v is not None)
                     + f" | {e['max']:.3f} / {e['p99']:.4f} / {e['mean']:.5f} | "
                     f"{p['batch_1']:.3f} / {p['batch_100']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-export"),
                    help="the quickstart run bench/export.py trained")
    ap.add_argument("--census", type=Path, default=Path("runs/bench-census"),
                    help="the census MMoE run bench/export.py trained")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_int8_forms.json"))
    args = ap.parse_args(argv)
    for run in (args.run, args.census):
        if not (run / "model" / "manifest.json").is_file():
            raise SystemExit(f"{run}: no trained model; run bench/export.py first")
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {
        "quickstart": forms(args.run / "model", args.run / "data" / "test.parquet",
                            args.run / "data" / "train.parquet"),
        "census": forms(args.census / "model", census_part(args.census, "test"),
                        census_part(args.census, "train"))}
    result["env"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                     "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0]}
    result["command"] = "python bench/export_int8_forms.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in ("quickstart", "census"):
        print(name)
        print(markdown(result[name]))
    print(f"load {load_before:.1f} -> {result['env']['load_average_after']:.1f}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
