"""``shopmtl export``: a zoo model as an ONNX bundle, fp32 and int8 (``shopmtl.export``).

One small zoo model (a 20,000-row synthetic world, one epoch) is trained and exported twice by
the CLI, fp32 and int8, once per module. The tests check the graphs with onnx's checker,
recompute parity through ``shopmtl.load`` (the bundle scores through the same reader and
encoders as its source), compare sizes and AUC, tamper with a byte, and run the refusals: a
joint model, too few rows, an output folder that is not a bundle, an fp32 graph that is not
its model, a core install without the extra.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import shopmtl
from shopmtl.export.checks import FP32_TOLERANCE, MIN_ROWS, ParityError
from shopmtl.train.checkpoint import CheckpointError
from tests.helpers import assert_one_error_line, cli, small_world, world_config_yaml
from tests.test_extras import MISSING_EXTRA_CODE, cli_without

JOINT = Path(__file__).parent / "fixtures" / "format1" / "joint_model"
TASKS = ("click", "conversion", "ad_click")


@dataclass
class Exported:
    model: Path  # the zoo model directory
    test: Path  # its held-out labelled rows
    fp32: Path  # the bundles
    int8: Path
    printed: str  # what `shopmtl export --int8` printed


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("export")
    small_world(root / "w", rows=20_000)
    cfg = world_config_yaml(root / "w", root / "zoo.yaml", epochs=1)
    cli("train", str(cfg), "--out", str(root / "run"), check=True)
    model, test = root / "run" / "model", root / "w" / "test.parquet"
    cli("export", str(model), "--out", str(root / "fp32"), "--data", str(test), check=True)
    proc = cli("export", str(model), "--out", str(root / "int8"), "--data", str(test), "--int8",
               check=True)
    return Exported(model, test, root / "fp32", root / "int8", proc.stdout)


def meta(bundle: Path) -> dict:
    return json.loads((bundle / "meta.json").read_text())


def max_diff(a, b, tasks=TASKS) -> float:
    return max(float(np.abs(a.column(t).to_numpy() - b.column(t).to_numpy()).max())
               for t in tasks)


def test_the_graphs_pass_the_checker_and_name_their_inputs(exported: Exported) -> None:
    import onnx

    for bundle, graph in ((exported.fp32, "model.onnx"), (exported.int8, "model.int8.onnx")):
        assert sorted(p.name for p in bundle.iterdir()) == sorted(
            ["config.json", "encoders.json", "manifest.json", "meta.json", "schema.json", graph])
        model = onnx.load(str(bundle / graph))
        onnx.checker.check_model(model, full_check=True)
        names = [i.name for i in model.graph.input]
        assert names == ["categorical", "numeric", "seq_hist_leaf", "scenario"]
        assert [o.name for o in model.graph.output] == list(TASKS)
        # one symbolic batch axis, shared by every input and output
        axes = {v.type.tensor_type.shape.dim[0].dim_param
                for v in (*model.graph.input, *model.graph.output)}
        assert len(axes) == 1 and axes != {""}, axes
        m = meta(bundle)
        assert (m["kind"], m["model_file"], m["tasks"]) == ("onnx", graph, list(TASKS))
        assert [i["name"] for i in m["inputs"]] == names
        assert set(m["versions"]) >= {"shopmtl", "torch", "onnx", "onnxruntime", "opset"}
        source = (exported.model / "manifest.json").read_bytes()
        assert m["source"]["manifest_sha256"] == hashlib.sha256(source).hexdigest()
    assert "onnx_int8" in exported.printed and "click auc" in exported.printed


def test_fp32_parity_in_the_manifest_and_recomputed(exported: Exported) -> None:
    checks = meta(exported.fp32)["checks"]
    par = checks["parity_fp32"]
    assert par["rows"] >= MIN_ROWS and par["batches"] == [1, 7, 512]
    assert 0 <= par["max"] <= FP32_TOLERANCE
    assert set(par["by_batch"]) == {"1", "7", "512"}
    rows = pq.read_table(exported.test)
    assert rows.num_rows >= MIN_ROWS
    source, bundle = shopmtl.load(exported.model), shopmtl.load(exported.fp32)
    assert bundle.kind == "onnx" and bundle.tasks == TASKS
    assert max_diff(bundle.predict(rows), source.predict(rows)) <= FP32_TOLERANCE
    # the int8 graph is a different computation, close to the model but not equal
    int8 = max_diff(shopmtl.load(exported.int8).predict(rows), source.predict(rows))
    assert 1e-6 < int8 < 0.02, int8


def test_int8_is_smaller_and_keeps_auc(exported: Exported) -> None:
    """Measured: the int8 file is 0.47x the fp32 one here (31 KB vs 67 KB: the embedding
    tables and every dense layer int8, the graph itself a large share of so small a model;
    0.28x for the quickstart model, bench/export.py). The AUC drop on this tiny test split
    (131 conversion labels) was at most 0.003."""
    fp32 = (exported.fp32 / "model.onnx").stat().st_size
    int8 = (exported.int8 / "model.int8.onnx").stat().st_size
    assert int8 < 0.6 * fp32, (int8, fp32)
    m = meta(exported.int8)
    assert m["checks"]["size_bytes"] == {"fp32": fp32, "int8": int8}
    assert m["quantization"]["quantized"]["Gather"] >= 1  # the embedding tables
    assert m["quantization"]["quantized"]["Gemm"] >= 1  # the dense layers
    quality = m["checks"]["quality"]
    source, _ = shopmtl.load(exported.model).evaluate_file(exported.test)
    bundle, _ = shopmtl.load(exported.int8).evaluate_file(exported.test)
    for t in TASKS:
        assert quality["pytorch_fp32"][t]["auc"] == pytest.approx(source[t]["all"]["auc"])
        assert quality["onnx_int8"][t]["auc"] == pytest.approx(bundle[t]["all"]["auc"])
        assert abs(bundle[t]["all"]["auc"] - source[t]["all"]["auc"]) <= 0.01, t
    for v in ("pytorch_fp32", "onnx_int8"):
        for b in ("batch_1", "batch_100"):
            lat = m["checks"]["latency"][v][b]
            assert 0 < lat["p50_ms"] <= lat["p99_ms"]


def test_predict_writes_the_same_columns_as_the_model_dir(exported: Exported,
                                                          tmp_path: Path) -> None:
    for d, name in ((exported.model, "zoo.csv"), (exported.fp32, "fp32.csv")):
        cli("predict", str(d), str(exported.test), "--out", str(tmp_path / name),
            "--id-columns", "user_id", check=True)
    zoo = list(csv.DictReader((tmp_path / "zoo.csv").open()))
    onnx = list(csv.DictReader((tmp_path / "fp32.csv").open()))
    assert list(onnx[0]) == list(zoo[0]) == ["line", "user_id", *TASKS]
    assert [(r["line"], r["user_id"]) for r in onnx] == [(r["line"], r["user_id"]) for r in zoo]
    for t in TASKS:
        np.testing.assert_allclose([float(r[t]) for r in onnx], [float(r[t]) for r in zoo],
                                   atol=FP32_TOLERANCE, rtol=0)


def test_a_tampered_bundle_is_refused_in_one_line(exported: Exported, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported.fp32, bad)
    graph = bad / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'model\.onnx' is corrupt") as e:
        shopmtl.load(bad)
    assert "\n" not in str(e.value)
    assert_one_error_line(cli("predict", str(bad), str(exported.test), "--out",
                              str(tmp_path / "p.csv")), "model.onnx", "corrupt", code=1)
    assert not (tmp_path / "p.csv").exists()


def test_refusals_are_one_line(exported: Exported, tmp_path: Path) -> None:
    out = str(tmp_path / "b")
    joint = cli("export", str(JOINT), "--out", out, "--data", str(exported.test))
    assert_one_error_line(joint, "joint export is not yet supported", code=2)
    again = cli("export", str(exported.fp32), "--out", out, "--data", str(exported.test))
    assert_one_error_line(again, "an ONNX bundle already", "takes a zoo model directory", code=2)
    few = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(exported.test).slice(0, MIN_ROWS - 1), few)
    assert_one_error_line(cli("export", str(exported.model), "--out", out, "--data", str(few)),
                          f"{MIN_ROWS - 1} usable rows", f"at least {MIN_ROWS}", code=1)
    run = exported.model.parent  # a run's output folder is never replaced by a bundle
    before = sorted(p.name for p in run.iterdir())
    assert_one_error_line(cli("export", str(exported.model), "--out", str(run), "--data",
                              str(exported.test)), "is not an ONNX bundle", code=2)
    assert sorted(p.name for p in run.iterdir()) == before
    assert not Path(out).exists()


def test_an_fp32_graph_that_is_not_its_model_is_refused(exported: Exported) -> None:
    """The exported graph of the model (which passed: the fixture), checked against the same
    model with its weights moved by 1e-3."""
    from shopmtl.export.bundle import held_out_rows, load_source, measure, variant

    source = load_source(exported.model)
    graph = exported.fp32 / "model.onnx"
    enc = held_out_rows(source, exported.test)
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(1e-3)
    with pytest.raises(ParityError, match=r"at most 1e-05 allowed\): nothing written"):
        measure(variant(source, enc), graph, graph, "fp32")


@pytest.mark.parametrize("blocked", ["onnx", "onnxscript"])
def test_export_without_the_extra_is_one_line(exported: Exported, tmp_path: Path,
                                              blocked: str) -> None:
    proc = cli_without([blocked], "export", str(exported.model), "--out", str(tmp_path / "b"),
                       "--data", str(exported.test))
    line = assert_one_error_line(proc, f"{blocked} is not installed", code=MISSING_EXTRA_CODE)
    assert "this needs the 'export' extra: pip install 'shopmtl[export]'" in line
    assert not (tmp_path / "b").exists()


def test_a_bundle_without_onnxruntime_is_one_line(exported: Exported, tmp_path: Path) -> None:
    proc = cli_without(["onnxruntime"], "predict", str(exported.fp32), str(exported.test),
                       "--out", str(tmp_path / "p.csv"))
    assert_one_error_line(proc, "an ONNX bundle: onnxruntime is not installed",
                          "pip install 'shopmtl[export]'", code=MISSING_EXTRA_CODE)


def test_bad_rows_are_handled_as_for_the_model_dir(exported: Exported) -> None:
    """The bundle reads rows with the model directory's reader: the same bad row named the
    same way, the same rows kept under quarantine."""
    from shopmtl.data.ingest import DataError

    rows = pq.read_table(exported.test).slice(0, 5).to_pylist()
    rows[2]["price"] = "cheap"
    source, bundle = shopmtl.load(exported.model), shopmtl.load(exported.fp32)
    errors = []
    for m in (source, bundle):
        with pytest.raises(DataError) as e:
            m.predict(rows)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "price" in errors[0]
    kept = [m.predict(rows, bad_rows="quarantine") for m in (source, bundle)]
    assert kept[0].column("line").to_pylist() == kept[1].column("line").to_pylist() == [0, 1, 3, 4]
    assert max_diff(kept[0], kept[1]) <= FP32_TOLERANCE


# -- --prune and --scenario on a small MMoE ----------------------------------------------------

MMOE_ARGS = "model.args={n_experts: 4, expert: [32, 16], tower: [16], embed_dim: 8}"
SCENARIO = "home_feed"  # ad_click is not defined there


@dataclass
class Variants:
    model: Path  # a small MMoE
    test: Path
    fp32: Path  # its bundles: as it is, pruned by half, home_feed's sub-model
    pruned: Path
    scenario: Path
    printed: str  # what `shopmtl export --prune 0.5` printed


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Variants:
    """A 40,000-row world (its test split has ~1,800 home_feed rows: the checks need 1,000 of
    the scenario), an MMoE of 4 experts trained one epoch, exported three ways."""
    root = tmp_path_factory.mktemp("variants")
    small_world(root / "w", rows=40_000)
    cfg = world_config_yaml(root / "w", root / "mmoe.yaml", epochs=1)
    cli("train", str(cfg), "--out", str(root / "run"), "--set", "model.name=mmoe", "--set",
        MMOE_ARGS, check=True)
    model, test = root / "run" / "model", root / "w" / "test.parquet"
    common = ("export", str(model), "--data", str(test), "--out")
    cli(*common, str(root / "fp32"), check=True)
    printed = cli(*common, str(root / "pruned"), "--prune", "0.5", check=True).stdout
    cli(*common, str(root / "scenario"), "--scenario", SCENARIO, check=True)
    return Variants(model, test, root / "fp32", root / "pruned", root / "scenario", printed)


def mmoe_params(model_dir: Path, **args) -> int:
    """Parameters of an MMoE of the fixture's vocabularies with ``args`` changed: what the
    pruned model must count if exactly the expected experts and units went."""
    from shopmtl.registry import build_model
    from shopmtl.train.trainer import read_model_files

    cfg, schema, encoders, _ = read_model_files(model_dir)
    sizes = {f.name: encoders.vocab_size(f) for f in schema.features if f.kind != "numeric"}
    model = build_model(cfg.model.name, {**cfg.model.args, **args}, schema, sizes)
    return sum(p.numel() for p in model.parameters())


def test_prune_removes_half_the_experts_and_tower_units(variants: Variants) -> None:
    report = meta(variants.pruned)["pruning"]
    level = report["experts"]["levels"][0]["experts"]
    assert (level["before"], level["after"]) == (4, 2)
    weights = level["mean_gate_weight"]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # a mean of softmax rows
    assert level["kept"] == sorted(np.argsort(weights)[-2:].tolist())  # the two most used
    assert {t: [(u["before"], u["after"]) for u in v]
            for t, v in report["units_towers"].items()} == {t: [(16, 8)] for t in TASKS}
    expect = mmoe_params(variants.model, n_experts=2, tower=[8])
    assert report["params"] == {"before": mmoe_params(variants.model),
                                "after": expect}
    assert expect < 0.7 * report["params"]["before"]
    assert report["criteria"]["fine_tune"] == "none" and "pruned 0.5" in variants.printed
    # the tower units kept are those with the largest outgoing weights (the output Linear's
    # columns), read from the source's weights
    state = shopmtl.load(variants.model).model.state_dict()
    for t in TASKS:
        norms = state[f"towers.{t}.2.weight"].norm(dim=0)
        kept = sorted(torch.topk(norms, 8).indices.tolist())
        assert report["units_towers"][t][0]["kept"] == kept, t


def sliced_by_hand(variants: Variants) -> torch.nn.Module:
    """The source MMoE's weights cut to the kept experts and units named in meta.json, loaded
    into a fresh MMoE of 2 experts and towers of 8: what the pruned graph must compute,
    built without the pruning code."""
    from shopmtl.registry import build_model
    from shopmtl.train.trainer import read_model_files

    source = shopmtl.load(variants.model)
    report = meta(variants.pruned)["pruning"]
    experts = torch.tensor(report["experts"]["levels"][0]["experts"]["kept"])
    state = source.model.state_dict()
    h0 = 32
    rows = (experts[:, None] * h0 + torch.arange(h0)).flatten()
    cut = dict(state)
    cut["experts.first.weight"] = state["experts.first.weight"][rows]
    cut["experts.first.bias"] = state["experts.first.bias"][rows]
    cut["experts.weights.0"] = state["experts.weights.0"][experts]
    cut["experts.biases.0"] = state["experts.biases.0"][experts]
    for t in TASKS:
        cut[f"gates.{t}.linear.weight"] = state[f"gates.{t}.linear.weight"][experts]
        cut[f"gates.{t}.linear.bias"] = state[f"gates.{t}.linear.bias"][experts]
        units = torch.tensor(report["units_towers"][t][0]["kept"])
        cut[f"towers.{t}.0.weight"] = state[f"towers.{t}.0.weight"][units]
        cut[f"towers.{t}.0.bias"] = state[f"towers.{t}.0.bias"][units]
        cut[f"towers.{t}.2.weight"] = state[f"towers.{t}.2.weight"][:, units]
    cfg, schema, encoders, _ = read_model_files(variants.model)
    sizes = {f.name: encoders.vocab_size(f) for f in schema.features if f.kind != "numeric"}
    model = build_model("mmoe", {**cfg.model.args, "n_experts": 2, "tower": [8]}, schema, sizes)
    model.load_state_dict(cut)
    return model.eval()


def test_the_pruned_graph_is_the_sliced_model(variants: Variants) -> None:
    from shopmtl.predict import predict_in_memory

    rows = pq.read_table(variants.test)
    par = meta(variants.pruned)["checks"]["parity_fp32"]
    assert par["rows"] >= MIN_ROWS and 0 <= par["max"] <= FP32_TOLERANCE
    bundle = shopmtl.load(variants.pruned)
    got = bundle.predict(rows)
    hand = predict_in_memory(sliced_by_hand(variants), bundle.schema, bundle.encoders, rows,
                             None, "fail", ())
    assert max_diff(got, hand) <= FP32_TOLERANCE
    # and not merely close to the unpruned model: half its experts are gone
    assert max_diff(got, shopmtl.load(variants.model).predict(rows)) > 1e-3


def test_pruned_auc_is_reported_beside_the_unpruned(variants: Variants) -> None:
    quality = meta(variants.pruned)["checks"]["quality"]
    assert set(quality) == {"pytorch_fp32_unpruned", "pytorch_fp32", "onnx_fp32"}
    full, _ = shopmtl.load(variants.model).evaluate_file(variants.test)
    pruned, _ = shopmtl.load(variants.pruned).evaluate_file(variants.test)
    for t in TASKS:
        assert quality["pytorch_fp32_unpruned"][t]["auc"] == pytest.approx(full[t]["all"]["auc"])
        assert quality["onnx_fp32"][t]["auc"] == pytest.approx(pruned[t]["all"]["auc"])
        assert quality["pytorch_fp32"][t]["auc"] == pytest.approx(quality["onnx_fp32"][t]["auc"],
                                                                  abs=1e-4)
    assert "pytorch_fp32_unpr" in variants.printed  # the CLI's table shows both


def test_shared_bottom_and_ple_prune_and_export(exported: Exported, tmp_path: Path) -> None:
    """SharedBottom: its bottom's units too (the towers' first layers read them); PLE: its
    shared experts per level (2 -> 1; one task-specific expert each is kept: a group keeps at
    least one). Each pruned model counts what a model built that small counts, and its graph
    computes what it does."""
    from shopmtl.export.bundle import held_out_rows, load_source
    from shopmtl.export.checks import max_abs
    from shopmtl.export.graph import export_onnx
    from shopmtl.export.prune import n_params, prune
    from shopmtl.export.runtime import OnnxForward
    from shopmtl.predict import torch_forward
    from shopmtl.registry import build_model

    source = load_source(exported.model)
    enc = held_out_rows(source, exported.test)
    sizes = {f.name: source.encoders.vocab_size(f) for f in source.schema.features
             if f.kind != "numeric"}
    args = source.cfg.model.args  # bottom [32], tower [16]
    cases = [(source.model, {**args, "bottom": [16], "tower": [8]}, "shared_bottom"),
             (build_model("ple", {"tower": [16]}, source.schema, sizes).eval(),
              {"tower": [8], "shared_experts": 1}, "ple")]
    reports = {}
    for model, small, name in cases:
        reports[name] = prune(model, enc, 0.5)
        want = n_params(build_model(name, small, source.schema, sizes))
        assert reports[name]["params"]["after"] == n_params(model) == want, name
        graph = export_onnx(model, source.schema, tmp_path / f"{name}.onnx")
        diff = max_abs(torch_forward(model)(enc), OnnxForward(graph, source.schema)(enc))
        assert max(diff.values()) <= FP32_TOLERANCE, (name, diff)
    assert [(u["before"], u["after"]) for u in reports["shared_bottom"]["units_bottom"]] == [
        (32, 16)]
    for level in reports["ple"]["experts"]["levels"]:  # 2 levels by default
        assert (level["shared"]["before"], level["shared"]["after"]) == (2, 1)
        assert [(g["before"], g["after"]) for g in level["specific"]] == [(1, 1)] * len(TASKS)


def test_the_scenario_sub_model_answers_its_tasks_only(variants: Variants) -> None:
    import onnx

    m = meta(variants.scenario)
    kept = ("click", "conversion")
    assert m["tasks"] == m["outputs"] == list(kept)
    assert m["scenario"]["name"] == SCENARIO and m["scenario"]["dropped_tasks"] == ["ad_click"]
    graph = onnx.load(str(variants.scenario / "model.onnx"))
    assert [i.name for i in graph.graph.input] == ["categorical", "numeric", "seq_hist_leaf"]
    assert [o.name for o in graph.graph.output] == list(kept)
    full = (variants.fp32 / "model.onnx").stat().st_size
    assert (variants.scenario / "model.onnx").stat().st_size < full  # ad_click's tower gone
    schema = json.loads((variants.scenario / "schema.json").read_text())
    assert schema["scenario"]["values"] == [SCENARIO]
    assert [t["name"] for t in schema["tasks"]] == list(kept)
    # scored and checked on the scenario's rows only, against the full model there
    rows = pq.read_table(variants.test)
    mine = rows.filter(pc.equal(rows.column("scenario"), SCENARIO))
    assert m["checks"]["rows"] == m["scenario"]["rows"] == mine.num_rows >= MIN_ROWS
    assert 0 <= m["checks"]["parity_fp32"]["max"] <= FP32_TOLERANCE
    sub = shopmtl.load(variants.scenario)
    assert sub.tasks == kept
    got = sub.predict(mine)
    assert max_diff(got, shopmtl.load(variants.model).predict(mine), kept) <= FP32_TOLERANCE


def test_the_scenario_bundle_refuses_other_scenarios_rows(variants: Variants,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert_one_error_line(cli("predict", str(variants.scenario), str(variants.test), "--out",
                              str(out)), "column 'scenario': unknown scenario", code=1)
    proc = cli("predict", str(variants.scenario), str(variants.test), "--out", str(out),
               "--bad-rows", "quarantine", check=True)
    rows = pq.read_table(variants.test)
    scenarios = rows.column("scenario").to_pylist()
    mine = [i for i, s in enumerate(scenarios) if s == SCENARIO]
    written = list(csv.DictReader(out.open()))
    assert list(written[0]) == ["line", "click", "conversion"]
    assert [int(r["line"]) for r in written] == [i + 1 for i in mine]  # 1-based data lines
    assert f"wrote {len(mine)} rows" in proc.stdout
    assert f"{len(scenarios) - len(mine)} bad rows" in proc.stdout


@pytest.mark.parametrize(("option", "value", "needles"), [
    ("--prune", "0", ("--prune 0", "strictly between 0 and 1")),
    ("--prune", "1", ("--prune 1", "strictly between 0 and 1")),
    ("--prune", "-0.5", ("--prune -0.5", "strictly between 0 and 1")),
    ("--prune", "1.5", ("--prune 1.5", "strictly between 0 and 1")),
    ("--scenario", "moon_base", ("--scenario moon_base", "unknown scenario", "home_feed")),
])
def test_bad_prune_and_scenario_values_are_one_line(exported: Exported, tmp_path: Path,
                                                    option: str, value: str,
                                                    needles: tuple[str, ...]) -> None:
    out = tmp_path / "b"
    proc = cli("export", str(exported.model), "--out", str(out), "--data", str(exported.test),
               option, value)
    assert_one_error_line(proc, *needles, code=2)
    assert not out.exists()


def test_mmoe_int8_quantises_the_experts_and_gates(variants: Variants, tmp_path: Path) -> None:
    """MMoE's experts' first layer and its gates are one GEMM over weights concatenated at each
    call (``nn.moe.read_once``); the export folds that Concat into one stored weight so the int8
    quantiser sees it: every Gemm of the graph int8 (before the fold, the census MMoE's int8
    file was 0.97x its fp32 one)."""
    import onnx

    from shopmtl.export.quantize import quantize_int8

    fp32 = variants.fp32 / "model.onnx"
    graph = onnx.load(str(fp32))
    weights = {i.name for i in graph.graph.initializer}
    assert not [n for n in graph.graph.node
                if n.op_type == "Concat" and all(i in weights for i in n.input)]
    gemms = sum(n.op_type == "Gemm" for n in graph.graph.node)
    info = quantize_int8(fp32, tmp_path / "int8.onnx")
    assert info["quantized"]["Gemm"] == gemms == 1 + len(TASKS) * 2
    assert (tmp_path / "int8.onnx").stat().st_size < 0.5 * fp32.stat().st_size


def test_prune_touches_only_what_slices_safely(exported: Exported, tmp_path: Path) -> None:
    """STAR: its plain-MLP towers are pruned, its star FC (per-scenario weights multiplied
    with shared ones) and partitioned norm are kept whole and named; PEPNet, whose towers scale
    every layer's input by a gate, has nothing safe to prune: refused in one line."""
    from shopmtl.config import ConfigError
    from shopmtl.export.bundle import held_out_rows, load_source
    from shopmtl.export.checks import max_abs
    from shopmtl.export.graph import export_onnx
    from shopmtl.export.prune import n_params, prune
    from shopmtl.export.runtime import OnnxForward
    from shopmtl.predict import torch_forward
    from shopmtl.registry import build_model

    source = load_source(exported.model)
    enc = held_out_rows(source, exported.test)
    sizes = {f.name: source.encoders.vocab_size(f) for f in source.schema.features
             if f.kind != "numeric"}
    star = build_model("star", {"tower": [16]}, source.schema, sizes).eval()
    report = prune(star, enc, 0.5)
    assert report["params"]["after"] == n_params(
        build_model("star", {"tower": [8]}, source.schema, sizes)) == n_params(star)
    assert {"embed", "norm", "star", "aux"} <= set(report["kept_whole"])
    graph = export_onnx(star, source.schema, tmp_path / "star.onnx")
    diff = max_abs(torch_forward(star)(enc), OnnxForward(graph, source.schema)(enc))
    assert max(diff.values()) <= FP32_TOLERANCE, diff
    pepnet = build_model("pepnet", {}, source.schema, sizes).eval()
    before = n_params(pepnet)
    with pytest.raises(ConfigError, match="nothing of a PEPNet model can be pruned safely"):
        prune(pepnet, enc, 0.5)
    assert n_params(pepnet) == before
