"""``shopmtl export``: a zoo model directory -> an ONNX bundle, checked, written atomically.

The bundle is a model directory of kind ``onnx`` (``modeldir.KINDS``), written by
``train.checkpoint.write_dir`` like every model directory, so ``shopmtl.load(BUNDLE)`` verifies
it the same way (a changed byte anywhere is refused) and scores it through the same reader and
encoders as its source (``predict.score_chunks`` with ``runtime.OnnxForward``)::

    model.onnx | model.int8.onnx   the graph (runtime.signature), weights inside
    config.json, schema.json, encoders.json   the source's, as it wrote them (a --scenario
                    sub-model's schema.json: its tasks, its one scenario)
    meta.json       kind onnx, precision, the graph's inputs and outputs, the source directory
                    and the SHA-256 of its manifest, the versions that wrote it, what int8
                    quantised, what pruning removed (``pruning``; the rare ids
                    dropped: ``id_pruning``, and encoders.json then holds the shortened
                    vocabularies; a static int8's calibration rows: ``quantization.calibration``),
                    the scenario kept
                    (``scenario``; its ``sliced``: the per-scenario weights cut to S's),
                    and every check measured at export (export.checks)
    manifest.json   SHA-256 of every other file (the format every model directory has)

Nothing is written unless every check ran and the fp32 graph matches its model.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl.config import ConfigError, to_dict
from shopmtl.data.encoders import Encoded
from shopmtl.data.ingest import BadRowLog, DataError
from shopmtl.data.schema import Schema
from shopmtl.deps import require, require_extra
from shopmtl.export.checks import (
    FP32_TOLERANCE,
    MIN_ROWS,
    ParityError,
    onnx_latency,
    parity,
    quality,
    reference,
    torch_latency,
)
from shopmtl.export.finetune import CRITERION, FineTune, check_finetune, finetune, training_rows
from shopmtl.export.graph import UnsupportedModel, export_onnx, exportable
from shopmtl.export.prune import check_ratio, prune
from shopmtl.export.prune_ids import check_fraction, prune_ids, reencode, shortened_encoders
from shopmtl.export.quantize import (
    MIN_CALIBRATION_ROWS,
    Calibration,
    calibration_batches,
    calibration_sample,
    check_calibration,
    quantize_int8,
    quantize_int8_static,
    read_calibration,
)
from shopmtl.export.runtime import OnnxForward, signature
from shopmtl.export.scenario import (
    ScenarioModel,
    scenario_index,
    scenario_rows,
    scenario_schema,
    select,
    sliced_parity,
    sub_model,
)
from shopmtl.jsonsafe import json_safe
from shopmtl.modeldir import ZooModel, load
from shopmtl.models.base import MultiTaskModel
from shopmtl.predict import read_encoded, torch_forward
from shopmtl.train import checkpoint as ck

KIND = "onnx"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
SOURCE_FILES = ("config", "schema", "encoders")  # copied from the source directory
PACKAGES = ("shopmtl", "torch", "onnx", "onnxruntime", "onnxscript")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_out(model_dir: Path, out: Path) -> None:
    """``out`` may be new, empty or a previous bundle (replaced atomically); never the source
    directory, a file, or a folder holding anything else (a run's output folder)."""
    if out.resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out}: that is the model directory itself")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            kind = ck.read_json(out, "meta").get("kind")
        except (ck.CheckpointError, AttributeError):
            kind = None
        if kind != KIND:
            raise ConfigError(f"--out {out}: exists and is not an ONNX bundle; refusing to "
                              "replace it (choose a new or empty folder)")


def load_source(model_dir: Path) -> ZooModel:
    """The zoo model to export (its manifest verified); anything else refused in one line."""
    source = load(model_dir)
    if not isinstance(source, ZooModel) or source.kind != "zoo":
        what = {"joint": "a joint model (joint export is not yet supported)",
                KIND: "an ONNX bundle already"}.get(source.kind, f"a {source.kind} model")
        raise UnsupportedModel(f"{model_dir}: {what}; `shopmtl export` takes a zoo model "
                               "directory")
    exportable(source.schema)
    return source


def held_out_rows(source: ZooModel, data: Path) -> Encoded:
    """Every row of ``data`` (labelled, held out), read and encoded as evaluation reads it; a
    bad row stops the export (it must be measured on the rows it names)."""
    log = BadRowLog("fail", 1.0, stop_at_first=False)
    enc = read_encoded(source.schema, source.encoders, data, log, source.cfg.data.chunk_rows)
    log.raise_if_bad()
    n = 0 if enc is None else len(enc)
    if enc is None or n < MIN_ROWS:
        raise DataError(f"--data {data.name}: {n} usable rows; the export checks need at least "
                        f"{MIN_ROWS} held-out labelled rows")
    return enc


def manifest_sha256(path: Path) -> str:
    """The SHA-256 of a model directory's manifest: one hash that pins every file of it."""
    return hashlib.sha256((path / ck.MANIFEST).read_bytes()).hexdigest()


@dataclass
class Variant:
    """What is exported: ``model`` (the source's, pruned and/or fixed to one scenario) on
    ``schema`` (the bundle's), measured on ``enc`` (encoded as the bundle's reader encodes);
    ``unpruned``, when pruned, the same model before pruning (its AUC reported beside), on
    ``unpruned_enc`` when ids were pruned (the rows as the source's encoders read them);
    ``keep_ids`` the real ids each vocabulary keeps when ids were pruned (``export.prune_ids``);
    ``info`` the meta.json entries that say what was done (``pruning``, ``id_pruning``,
    ``scenario``)."""

    model: MultiTaskModel
    schema: Schema
    enc: Encoded
    unpruned: MultiTaskModel | None = None
    info: dict[str, Any] = field(default_factory=dict)
    unpruned_enc: Encoded | None = None
    keep_ids: dict[str, int] | None = None


def measure(v: Variant, fp32: Path, graph: Path, precision: str) -> dict[str, Any]:
    """Every check of ``export.checks`` for ``graph`` (the fp32 graph or its int8 form);
    raises ``ParityError`` when the fp32 graph is not its model."""
    schema, model, enc = v.schema, v.model, v.enc
    checks: dict[str, Any] = {"rows": len(enc)}
    ref = reference(model, enc)
    checks["parity_fp32"] = parity(ref, lambda b: OnnxForward(fp32, schema, batch_size=b), enc)
    worst = checks["parity_fp32"]["max"]
    if not worst <= FP32_TOLERANCE:
        raise ParityError(f"the fp32 ONNX graph differs from the PyTorch model by {worst:.3g} "
                          f"(max abs, probabilities; at most {FP32_TOLERANCE:g} allowed): "
                          "nothing written")
    if precision != "fp32":
        checks[f"parity_{precision}"] = parity(
            ref, lambda b: OnnxForward(graph, schema, batch_size=b), enc)
    checks["quality"] = {"pytorch_fp32": quality(schema, enc, torch_forward(model)(enc)),
                         f"onnx_{precision}": quality(schema, enc, OnnxForward(graph, schema)(enc))}
    if v.unpruned is not None:
        raw = enc if v.unpruned_enc is None else v.unpruned_enc
        checks["quality"]["pytorch_fp32_unpruned"] = quality(
            schema, raw, torch_forward(v.unpruned)(raw))
    checks["size_bytes"] = {"fp32": fp32.stat().st_size, precision: graph.stat().st_size}
    checks["latency"] = {"pytorch_fp32": torch_latency(model, schema, enc),
                         f"onnx_{precision}": onnx_latency(graph, schema, enc)}
    return checks


def auc_of(schema: Schema, enc: Encoded, model: MultiTaskModel) -> dict[str, float | None]:
    """Per task, ``model``'s AUC on ``enc`` (None for a task without one)."""
    return {t: q.get("auc") for t, q in quality(schema, enc, torch_forward(model)(enc)).items()}


def finetuned(source: ZooModel, model: MultiTaskModel, enc: Encoded, fine: FineTune,
              rows: Encoded) -> dict[str, Any]:
    """Fine-tune the pruned ``model`` in place on ``rows`` (``export.finetune``); the record
    of it, with the AUC on the held-out ``enc`` before and after."""
    before = auc_of(source.schema, enc, model)
    record = finetune(model, source.cfg, source.schema, rows, fine.epochs)
    return {"file": fine.path.name, **record, "auc_before": before,
            "auc_after": auc_of(source.schema, enc, model)}


def variant(source: ZooModel, enc: Encoded, prune_ratio: float | None = None,
            scenario: str | None = None, fine: FineTune | None = None,
            fine_rows: Encoded | None = None, prune_ids_fraction: float | None = None
            ) -> Variant:
    """The model to export: the source's as it is, its rarest ids dropped by
    ``prune_ids_fraction`` (a copy; ``enc`` and ``fine_rows`` re-encoded to match), pruned by
    ``prune_ratio`` (a copy; gate weights averaged over the rows it will serve) and then
    fine-tuned on ``fine_rows`` when ``fine`` says so, and/or fixed to ``scenario`` (its tasks,
    its rows of ``enc``)."""
    model, schema, info = source.model, source.schema, {}
    raw_enc, keep_ids = None, None
    if scenario is not None:
        index = scenario_index(schema, scenario)
        rows = scenario_rows(enc, index)
        if len(rows) < MIN_ROWS:
            raise DataError(f"--data: {len(rows)} rows of scenario {scenario}; the export "
                            f"checks need at least {MIN_ROWS} held-out labelled rows")
        enc = select(enc, rows, schema)
    unpruned = None
    if prune_ids_fraction is not None:  # first: the gate means and fine-tune see pruned ids
        unpruned, model = model, copy.deepcopy(model)
        keep_ids, info["id_pruning"] = prune_ids(model, schema, source.encoders.to_json(),
                                                 prune_ids_fraction)
        raw_enc, enc = enc, reencode(enc, schema, keep_ids)
        if fine_rows is not None:
            fine_rows = reencode(fine_rows, schema, keep_ids)
    if prune_ratio is not None:
        if unpruned is None:
            unpruned, model = model, copy.deepcopy(model)
        info["pruning"] = prune(model, enc, prune_ratio)
        if fine is not None and fine_rows is not None:
            report = info["pruning"]  # its criteria: prune.CRITERIA itself, not a copy
            report["criteria"] = {**report["criteria"],
                                  "fine_tune": CRITERION.format(epochs=fine.epochs)}
            report["finetune"] = finetuned(source, model, enc, fine, fine_rows)
    if scenario is not None:
        sub = scenario_schema(schema, scenario)
        enc_sub = select(enc, np.arange(len(enc)), source.schema, sub)
        if raw_enc is not None:
            raw_enc = select(raw_enc, np.arange(len(raw_enc)), source.schema, sub)
        full = ScenarioModel(model, sub, index).eval()  # every scenario's weights
        model, sliced = sub_model(model, sub, index)  # S's only
        sliced["parity_with_full"] = sliced_parity(full, model.eval(), enc_sub)
        unpruned = None if unpruned is None else sub_model(unpruned, sub, index)[0]
        info["scenario"] = {"name": scenario, "index_in_source": index, "rows": len(enc),
                            "tasks": list(sub.task_names),
                            "dropped_tasks": [t for t in schema.task_names
                                              if t not in sub.task_names],
                            "scenario_input": "none: fixed inside the graph; rows of other "
                                              "scenarios are bad rows (unknown scenario)",
                            "sliced": sliced}
        enc, schema = enc_sub, sub
    return Variant(model.eval(), schema, enc, unpruned, info, raw_enc, keep_ids)


def calibration_rows(source: ZooModel, v: Variant, cal: Calibration
                     ) -> tuple[Encoded, dict[str, Any]]:
    """The calibration sample of ``v``: the file's rows as the bundle's reader encodes them
    (its rarest ids dropped, its one scenario's rows), then sampled
    (``quantize.calibration_sample``); with the record meta.json keeps."""
    enc = read_calibration(source.schema, source.encoders, source.cfg.data.chunk_rows, cal)
    if v.keep_ids is not None:
        enc = reencode(enc, source.schema, v.keep_ids)
    if "scenario" in v.info:
        index = v.info["scenario"]["index_in_source"]
        enc = select(enc, scenario_rows(enc, index), source.schema, v.schema)
    if len(enc) < MIN_CALIBRATION_ROWS:  # only S's rows count for a sub-model
        raise DataError(f"--calibrate {cal.path.name}: {len(enc)} rows of scenario "
                        f"{v.info['scenario']['name']}; calibration needs at least "
                        f"{MIN_CALIBRATION_ROWS}")
    return calibration_sample(enc, v.schema, cal)


def export_bundle(model_dir: str | Path, out: str | Path, data: str | Path, int8: bool = False,
                  prune_ratio: float | None = None, scenario: str | None = None,
                  fine: FineTune | None = None, prune_ids_fraction: float | None = None,
                  calibrate: Calibration | None = None) -> dict[str, Any]:
    """Export the zoo model in ``model_dir`` to an ONNX bundle at ``out`` (fp32, or int8 with
    ``int8``; pruned by ``prune_ratio``, ``export.prune``, then fine-tuned as ``fine`` says,
    ``export.finetune``; one ``scenario``'s sub-model, ``export.scenario``), checked on the
    labelled rows of ``data`` (the run's test split); the rarest ids dropped by
    ``prune_ids_fraction`` (``export.prune_ids``: the bundle's encoders shortened); int8
    with fixed activation scales when ``calibrate`` names training rows (static, ``export.
    quantize``); returns the bundle's meta.json (its ``checks`` the measurements)."""
    model_dir, out, data = Path(model_dir), Path(out), Path(data)
    if prune_ratio is not None:
        check_ratio(prune_ratio)
    if prune_ids_fraction is not None:
        check_fraction(prune_ids_fraction)
    check_finetune(fine, prune_ratio, data)
    check_calibration(calibrate, int8, data)
    require_extra("export", "shopmtl export")  # before any work: one line naming the extra
    check_out(model_dir, out)
    source = load_source(model_dir)
    if scenario is not None:
        scenario_index(source.schema, scenario)  # before the rows are read
    enc = held_out_rows(source, data)
    fine_rows = None if fine is None else training_rows(source.schema, source.encoders,
                                                        source.cfg, fine.path)
    v = variant(source, enc, prune_ratio, scenario, fine, fine_rows, prune_ids_fraction)
    cal_rows, cal_record = (None, None) if calibrate is None else calibration_rows(
        source, v, calibrate)
    onnx = require("onnx", "export", "shopmtl export")
    precision = "int8" if int8 else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(v.model, v.schema, Path(tmp) / MODEL_FILES["fp32"])
        graph, quantization = fp32, None
        if int8:
            graph = Path(tmp) / MODEL_FILES["int8"]
            if cal_rows is None:
                quantization = quantize_int8(fp32, graph)
            else:
                quantization = quantize_int8_static(
                    fp32, graph, calibration_batches(signature(v.schema), cal_rows))
                quantization["calibration"] = cal_record
        checks = measure(v, fp32, graph, precision)
        opset = {o.domain or "ai.onnx": o.version for o in onnx.load(str(graph)).opset_import}
        meta = ck.model_meta(
            KIND, list(v.schema.task_names), model=source.cfg.model.name, precision=precision,
            model_file=MODEL_FILES[precision],
            inputs=[i.describe() for i in signature(v.schema)],
            outputs=list(v.schema.task_names), **v.info,
            source={"path": str(model_dir), "manifest_sha256": manifest_sha256(model_dir),
                    "meta": source.meta},
            versions={**{p: _version(p) for p in PACKAGES}, "opset": opset},
            quantization=quantization, checks={"data": data.name, **checks})
        meta = json_safe(meta)
        jsons = {name: ck.read_json(model_dir, name) for name in SOURCE_FILES}
        if "scenario" in v.info:  # the sub-model's tasks and scenario: what its reader checks
            jsons["schema"] = to_dict(v.schema)
        if v.keep_ids is not None:  # the dropped values read as unknown (id 0)
            jsons["encoders"] = shortened_encoders(source.schema, jsons["encoders"], v.keep_ids)
        ck.write_dir(out, {}, {**jsons, "meta": meta},
                     files={MODEL_FILES[precision]: graph.read_bytes()})
    return meta
