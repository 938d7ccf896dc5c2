"""ONNX export, two models: fp32 vs int8 vs pruned vs per-scenario sub-model; size, AUC per
task, parity, latency.

1. The quickstart model (SharedBottom), trained if ``--run`` holds none (``shopmtl quickstart
   --rows 300000 --no-baselines --out runs/bench-export``), measured on the run's test split
   (``OUT/data/test.parquet``). One more int8 variant leaves the embedding tables fp32 (dense
   layers only), to show what quantising the tables buys.
2. The census MMoE: ``examples/census.yaml`` with ``CENSUS_MMOE`` set (8 experts), trained into
   ``--census`` when it holds none (about 2 minutes here), measured on its test split, cut out of
   the one CSV as the run's pipeline cut it (``census_test``).
3. STAR on the quickstart world: ``examples/quickstart.yaml`` with ``STAR`` set (a smaller
   world, two epochs), trained into ``--star`` when it holds none, measured on its test split:
   the quickstart and census models have no per-scenario weights but their scenario embedding,
   STAR's star FC and partitioned norm are what ``--scenario`` slices to one scenario's copy.

Each is exported with ``shopmtl export``'s own code (``shopmtl.export.bundle.export_bundle``):
fp32, int8, ``--int8 --calibrate TRAIN`` (static int8, calibrated on 2,048 training rows;
with its batch invariance: the largest difference between a row scored alone and inside a
call of 100 rows, over 200 rows, for dynamic and static int8),
``--int8 --prune-ids 0.5`` (the quickstart and census tables), ``--prune 0.5``,
``--prune 0.5 --finetune TRAIN`` (one epoch on the run's training
rows: the quickstart's ``OUT/data/train.parquet``, the census run's training part cut out of
the CSV as its test part is, ``census_part``) and ``--scenario <first scenario>`` (whose AUC is
on that scenario's rows, its tasks only). Prints the tables that docs/DEPLOY.md holds and writes
``--out`` (JSON):

    .venv/bin/python bench/export.py --out bench/results/export.json
    .venv/bin/python bench/export.py --tables star --out bench/results/export_star.json
    .venv/bin/python bench/export.py --tables quickstart census --only-int8 \
        --out bench/results/export_static.json

``--only-int8`` measures the fp32, int8 and static int8 rows only (no pruning, no fine-tune:
a minute instead of several).

Latency is one onnxruntime call (one intra-op thread) on prepared inputs, p50 / p99 of 500
single-row calls and 200 calls of 100 rows; "pytorch" is the source model on the same tensors
with one thread. On a shared 2-core machine read the p99 as noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_all import cpu_model  # noqa: E402  (the machine line every bench writes)

DENSE_ONLY = ("MatMul", "Gemm")
PRUNE = 0.5
PRUNE_IDS = 0.5  # --prune-ids: the rarest half of each learnt vocabulary, with --int8
FINETUNE_EPOCHS = 1  # the pruned model's fine-tune (--finetune-epochs)
CENSUS = Path(__file__).resolve().parent.parent / "examples" / "census.yaml"
# the census MMoE: examples/census.yaml (a SharedBottom) with model MMoE, 8 experts as in the
# paper's census experiments (Ma et al., KDD 2018)
CENSUS_MMOE = ("model.name=mmoe", "model.args={embed_dim: 8, interaction: dot, n_experts: 8, "
               "expert: [64, 32], tower: [32], dropout: 0.1}")
# STAR on the quickstart world (examples/quickstart.yaml's data and training, 300,000 rows, two
# epochs: a few minutes here), STARConfig's default star FC (256, 128)
STAR = ("data.synthetic.rows=300000", "train.epochs=2", "model.name=star",
        "model.args={embed_dim: 16, interaction: dot, star: [256, 128], tower: [32], aux: [32]}")
QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
TABLES = ("quickstart", "census", "star")


def ensure_trained(run: Path, config: Path, sets: tuple[str, ...]) -> Path:
    """The model directory of ``run``: ``shopmtl train CONFIG --out RUN --set ...`` first when
    it holds none."""
    if not (run / "model" / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "shopmtl", "train", str(config), "--out", str(run)]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run / "model"


def ensure_star(run: Path) -> Path:
    """The STAR model directory of ``run``, trained first when absent (its world generated into
    ``run/data``; ``run/data/test.parquet`` is what the table measures)."""
    return ensure_trained(run, QUICKSTART, STAR)


def ensure_run(run: Path, rows: int) -> Path:
    """The quickstart model directory of ``run``, trained first when absent."""
    if not (run / "model" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "shopmtl", "quickstart", "--rows", str(rows),
                        "--no-baselines", "--out", str(run)], check=True)
    return run / "model"


def ensure_census(run: Path) -> Path:
    """The census MMoE's model directory in ``run``, trained first when absent (the config's
    own split: its test part is what the table measures, ``run/test.parquet``)."""
    return ensure_trained(run, CENSUS, CENSUS_MMOE)


def census_parts(data: dict[str, Any], n: int) -> dict[str, list[int]]:
    """The census run's training and test rows (indices into the CSV's rows): the config
    splits one CSV itself (``data.pipeline``): the test part first, ``split_indices(n,
    test_fraction, split_seed + 1)``, then validation out of the rest, ``split_indices(rest,
    valid_fraction / (1 - test_fraction), split_seed)``; training is what remains."""
    from shopmtl.data.dataset import split_indices

    rest, held = split_indices(n, data["test_fraction"], data["split_seed"] + 1)
    share = data["valid_fraction"] / (1 - data["test_fraction"])
    train, _ = split_indices(len(rest), share, data["split_seed"])
    return {"test": held.tolist(), "train": rest[train].tolist()}


def census_part(run: Path, part: str) -> Path:
    """The census run's ``part`` split (``test``: what the table measures; ``train``: the
    fine-tune rows) as a file, ``run/<part>.csv``, cut out of the one CSV as the run's
    pipeline cut it, as text. Checked: the PyTorch model's AUC on the test file is the test
    AUC of the run's metrics.json."""
    import csv

    import yaml

    out = run / f"{part}.csv"
    if out.is_file():
        return out
    data = yaml.safe_load(CENSUS.read_text())["data"]
    with (CENSUS.parent / data["train"]).open(newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows[i] for i in census_parts(data, len(rows))[part])
    return out


def census_test(run: Path) -> Path:
    """The census run's test split as a file (``census_part``)."""
    return census_part(run, "test")


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


def base_rows(c32: dict, c8: dict, size: int) -> list[dict[str, Any]]:
    """pytorch fp32, onnx fp32, onnx int8: the rows every table has."""
    return [
        row("pytorch fp32", None, size, c32["quality"]["pytorch_fp32"], None,
            c32["latency"]["pytorch_fp32"]),
        row("onnx fp32", size, size, c32["quality"]["onnx_fp32"], c32["parity_fp32"]["max"],
            c32["latency"]["onnx_fp32"]),
        row("onnx int8", c8["size_bytes"]["int8"], size, c8["quality"]["onnx_int8"],
            c8["parity_int8"]["max"], c8["latency"]["onnx_int8"]),
    ]


def variant_row(name: str, meta: dict[str, Any], size: int) -> dict[str, Any]:
    """A pruned or per-scenario fp32 bundle: parity against its own PyTorch model (the
    sliced one; the full model on the scenario's rows), AUC of its graph."""
    c = meta["checks"]
    r = row(name, c["size_bytes"]["fp32"], size, c["quality"]["onnx_fp32"],
            c["parity_fp32"]["max"], c["latency"]["onnx_fp32"])
    r["rows"] = c["rows"]
    if "pruning" in meta:
        p = meta["pruning"]
        r["pruning"] = {"params": p["params"], "experts": p.get("experts"),
                        "units_bottom": p.get("units_bottom"),
                        "units_towers": p["units_towers"], "kept_whole": p["kept_whole"]}
        r["auc_unpruned"] = {t: q.get("auc") for t, q in
                             c["quality"]["pytorch_fp32_unpruned"].items()}
        if "finetune" in p:
            r["finetune"] = p["finetune"]
    if "scenario" in meta:
        r["scenario"] = meta["scenario"]
    return r


def ids_row(name: str, meta: dict[str, Any], size: int) -> dict[str, Any]:
    """The int8 bundle with its rarest ids dropped: its graph's size, AUC, parity (against
    its own pruned PyTorch model), latency; the vocabularies before / after."""
    c, p = meta["checks"], meta["id_pruning"]
    r = row(name, c["size_bytes"]["int8"], size, c["quality"]["onnx_int8"],
            c["parity_int8"]["max"], c["latency"]["onnx_int8"])
    r["id_pruning"] = {k: p[k] for k in ("params", "embedding_rows", "vocabularies")}
    r["auc_unpruned"] = {t: q.get("auc") for t, q in
                         c["quality"]["pytorch_fp32_unpruned"].items()}
    return r


def static_row(name: str, meta: dict[str, Any], size: int) -> dict[str, Any]:
    """The static int8 bundle: its graph's size, AUC, parity, latency; its calibration."""
    c = meta["checks"]
    r = row(name, c["size_bytes"]["int8"], size, c["quality"]["onnx_int8"],
            c["parity_int8"]["max"], c["latency"]["onnx_int8"])
    r["calibration"] = meta["quantization"]["calibration"]
    return r


def solo_vs_batch(bundle: Path, model_dir: Path, data: Path, rows: int = 200,
                  batch: int = 100) -> float:
    """The largest difference, over the first ``rows`` rows of ``data`` and every task,
    between a row scored alone and the same row scored first in a call of ``batch`` rows (the
    server combines concurrent requests into one call): 0 when answers are batch-invariant."""
    from shopmtl.export.bundle import held_out_rows, load_source
    from shopmtl.export.runtime import OnnxForward, feeds, signature

    source = load_source(model_dir)
    enc, inputs = held_out_rows(source, data), signature(source.schema)
    forward = OnnxForward(bundle / "model.int8.onnx", source.schema, threads=1)
    worst = 0.0
    for i in range(rows):
        solo = forward.run(feeds(inputs, enc, i, i + 1))
        shared = forward.run(feeds(inputs, enc, i, i + batch))
        worst = max(worst, *(float(abs(a[0] - b[0])) for a, b in zip(solo, shared, strict=True)))
    return worst


def control(model_dir: Path, data: Path, train: Path) -> dict[str, Any]:
    """The unpruned model given the same fine-tune as the pruned one (a copy; nothing is
    exported): what the extra epoch alone does, so that "pruned + fine-tune" can be read.
    The export's own ``finetuned`` on the export's own rows; its ``auc_after`` per task."""
    import copy

    from shopmtl.export.bundle import finetuned, held_out_rows, load_source
    from shopmtl.export.finetune import FineTune, training_rows

    source = load_source(model_dir)
    rows = training_rows(source.schema, source.encoders, source.cfg, train)
    return finetuned(source, copy.deepcopy(source.model), held_out_rows(source, data),
                     FineTune(train, FINETUNE_EPOCHS), rows)


def run(model_dir: Path, data: Path, train: Path, dense: bool = True, ids: bool = True,
        only_int8: bool = False) -> dict[str, Any]:
    """The table of one model: fp32, int8 (and int8 with fp32 tables when ``dense``; int8
    with the rarest half of the ids dropped when ``ids``), pruned by half, pruned by half and
    fine-tuned ``FINETUNE_EPOCHS`` on ``train`` (the run's training rows), and
    the sub-model of its first scenario when it has several; static int8 calibrated on
    ``train`` in every table (only fp32, int8 and static int8 when ``only_int8``)."""
    from shopmtl.export.bundle import export_bundle, load_source
    from shopmtl.export.finetune import FineTune
    from shopmtl.export.quantize import Calibration

    if only_int8:
        dense = ids = False

    schema = load_source(model_dir).schema
    first = schema.scenario.values[0] if schema.scenario is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fp32 = export_bundle(model_dir, t / "fp32", data)
        int8 = export_bundle(model_dir, t / "int8", data, int8=True)
        static = export_bundle(model_dir, t / "static", data, int8=True,
                               calibrate=Calibration(train))
        invariance = {name: solo_vs_batch(t / name, model_dir, data)
                      for name in ("int8", "static")}
        d = dense_only(model_dir, data, t / "fp32" / "model.onnx", t) if dense else None
        few = (export_bundle(model_dir, t / "ids", data, int8=True, prune_ids_fraction=PRUNE_IDS)
               if ids else None)
        pruned = (None if only_int8 else
                  export_bundle(model_dir, t / "pruned", data, prune_ratio=PRUNE))
        tuned = (None if only_int8 else
                 export_bundle(model_dir, t / "tuned", data, prune_ratio=PRUNE,
                               fine=FineTune(train, FINETUNE_EPOCHS)))
        sub = (export_bundle(model_dir, t / "scenario", data, scenario=first)
               if first is not None and len(schema.scenario_names) > 1 and not only_int8
               else None)
    c32, c8 = fp32["checks"], int8["checks"]
    size = c32["size_bytes"]["fp32"]
    rows = base_rows(c32, c8, size)
    rows.append(static_row("onnx int8 static (calibrated)", static, size))
    if d is not None:
        cd = d["checks"]
        rows.append(row("onnx int8, fp32 tables", cd["size_bytes"]["int8"], size,
                        cd["quality"]["onnx_int8"], cd["parity_int8"]["max"],
                        cd["latency"]["onnx_int8"]))
    if few is not None:
        rows.append(ids_row(f"onnx int8, pruned ids {PRUNE_IDS:.0%}", few, size))
    if pruned is not None and tuned is not None:
        rows.append(variant_row(f"onnx fp32, pruned {PRUNE:.0%}", pruned, size))
        rows.append(variant_row(f"onnx fp32, pruned {PRUNE:.0%} + fine-tune "
                                f"{FINETUNE_EPOCHS} epoch", tuned, size))
    if sub is not None:
        rows.append(variant_row(f"onnx fp32, scenario {first}", sub, size))
    return {"rows": c32["rows"], "tasks": fp32["tasks"], "model": fp32["model"],
            "variants": rows, "solo_vs_batch_max_abs": invariance,
            "control_unpruned_finetune": (None if only_int8 else
                                          control(model_dir, data, train)),
            "quantization": {"int8": int8["quantization"], "int8_static": static["quantization"],
                             **({"int8_dense_only": d["quantization"]} if d else {})},
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
                 *(f"{r['auc'][t]:.4f}" if r["auc"].get(t) is not None else "-"
                   for t in tasks),
                 "-" if r["max_abs_parity"] is None else f"{r['max_abs_parity']:.1e}",
                 f"{lat['batch_1']['p50_ms']:.3f} / {lat['batch_1']['p99_ms']:.3f}",
                 f"{lat['batch_100']['p50_ms']:.3f} / {lat['batch_100']['p99_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-export"),
                    help="a quickstart output folder (trained when it has no model)")
    ap.add_argument("--census", type=Path, default=Path("runs/bench-census"),
                    help="the census MMoE's run folder (trained when it has no model)")
    ap.add_argument("--rows", type=int, default=300_000, help="the quickstart's --rows")
    ap.add_argument("--star", type=Path, default=Path("runs/bench-star"),
                    help="the STAR run folder (trained when it has no model)")
    ap.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                    help="which tables to measure (default: all)")
    ap.add_argument("--only-int8", action="store_true",
                    help="only the fp32, int8 and static int8 rows (no pruning, no fine-tune)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {}
    if "quickstart" in args.tables:
        model_dir = ensure_run(args.run, args.rows)
        result["quickstart"] = run(model_dir, args.run / "data" / "test.parquet",
                                   args.run / "data" / "train.parquet",
                                   only_int8=args.only_int8)
    if "census" in args.tables:
        census_dir = ensure_census(args.census)
        census = run(census_dir, census_test(args.census), census_part(args.census, "train"),
                     dense=False, only_int8=args.only_int8)
        ran = json.loads((args.census / "metrics.json").read_text())["test"]
        for t, v in census["variants"][0]["auc"].items():  # the split cut out is the run's
            assert abs(v - ran[t]["all"]["auc"]) < 1e-6, (t, v, ran[t]["all"]["auc"])
        result["census"] = census
    if "star" in args.tables:
        result["star"] = run(ensure_star(args.star), args.star / "data" / "test.parquet",
                             args.star / "data" / "train.parquet", dense=False, ids=False,
                             only_int8=args.only_int8)
    tables = [name for name in TABLES if name in result]
    result["env"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                     "load_average_before": load_before,
                     "load_average_after": os.getloadavg()[0],
                     "quickstart_rows": args.rows}
    result["command"] = "python bench/export.py " + " ".join(argv or sys.argv[1:])
    for name in tables:
        result[name]["markdown"] = markdown(result[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in tables:
        print(f"{name} ({result[name]['model']}, {result[name]['rows']} test rows)")
        print(result[name]["markdown"])
        inv = result[name]["solo_vs_batch_max_abs"]
        print(f"a row alone vs first in a call of 100 rows, max abs over 200 rows: dynamic "
              f"int8 {inv['int8']:.1e}, static int8 {inv['static']:.1e}")
        ctl = result[name]["control_unpruned_finetune"]
        if ctl is None:
            continue
        print(f"control, the unpruned model + the same fine-tune ({ctl['epochs']} epoch, "
              f"{ctl['steps']} steps): AUC " + ", ".join(
                  f"{t} {ctl['auc_before'][t]:.4f} -> {ctl['auc_after'][t]:.4f}"
                  for t in ctl["auc_after"]))
    print(f"load {load_before:.1f} -> "
          f"{result['env']['load_average_after']:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
