"""The command line as a user runs it: quickstart outputs, bad rows under both policies,
predict/evaluate on a saved model, listing commands, bad configs stopped at load in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import assert_one_error_line, cli

TASKS = ("click", "conversion", "ad_click")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qs")
    cli("quickstart", "--out", str(out), "--rows", "150000", "--seed", "3", check=True)
    return out


def test_quickstart_writes_metrics_report_and_model(quick: Path) -> None:
    m = json.loads((quick / "metrics.json").read_text())
    scenarios = ("home_feed", "search", "ad_slot", "product_page")
    for task in TASKS:
        for scen in ("all", *(scenarios if task != "ad_click" else ("ad_slot",))):
            cell = m["test"][task][scen]
            assert cell["n"] > 0
            assert 0.0 <= cell["logloss"] < 1.0
            assert "oracle_logloss" in cell
    for scen in ("all", *scenarios):  # enough clicks everywhere for an AUC
        assert 0.5 < m["test"]["click"][scen]["oracle_auc"] < 1.0
    # ad click exists only in the ad slot: no other scenario is reported for it
    assert set(m["test"]["ad_click"]) == {"all", "ad_slot"}
    assert m["availability"]["ad_click"]["home_feed"] is False
    # click on this small world is learnable: better than chance everywhere
    assert m["test"]["click"]["all"]["auc"] > 0.58
    assert set(m["single_task"]) == set(TASKS)
    nt = m["negative_transfer"]["click"]["all"]
    assert nt["delta_auc"] == pytest.approx(nt["multi_task_auc"] - nt["single_task_auc"])
    report = (quick / "report.md").read_text()
    assert "oracle AUC" in report and "Negative transfer" in report
    assert (quick / "curves.png").stat().st_size > 10_000
    assert (quick / "model" / "model.safetensors").is_file()
    assert list((quick / "tb").glob("events.out.tfevents.*"))
    world = m["world"]
    assert world["latent_variance_share"] >= 1 / 3


def test_predict_and_evaluate_from_the_saved_model(quick: Path, tmp_path: Path) -> None:
    test_file = quick / "data" / "test.parquet"
    out = tmp_path / "preds.csv"
    proc = cli("predict", str(quick / "model"), str(test_file), "--out", str(out),
               "--task", "click", check=True)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["line", "click"]
    assert all(0.0 < float(r["click"]) < 1.0 for r in rows)
    assert f"wrote {len(rows)} rows" in proc.stdout
    ev = tmp_path / "eval.json"
    cli("evaluate", str(quick / "model"), str(test_file), "--out", str(ev), check=True)
    saved = json.loads((quick / "metrics.json").read_text())["test"]["click"]["all"]["auc"]
    assert json.loads(ev.read_text())["test"]["click"]["all"]["auc"] == pytest.approx(saved)
    bad = cli("predict", str(quick / "model"), str(test_file), "--task", "refund")
    assert bad.returncode == 2 and "unknown task" in bad.stderr


def test_predict_works_without_label_columns(quick: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(quick / "data" / "test.parquet").slice(0, 50)
    table = table.drop_columns(["click", "conversion", "ad_click", "true_click",
                                "true_conversion", "true_ad_click"])
    pq.write_table(table, tmp_path / "unlabelled.parquet")
    cli("predict", str(quick / "model"), str(tmp_path / "unlabelled.parquet"), "--out",
        str(tmp_path / "p.csv"), check=True)
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 50


HEADER = ["user_id", "item_id", "price", "scenario", "click", "conversion"]
GOOD = [
    ["u1", "i1", "10.5", "feed", "1", "0"],
    ["u2", "i2", "3.0", "search", "0", ""],
    ["u3", "i1", "7.25", "feed", "1", "1"],
    ["u1", "i3", "1.0", "search", "0", ""],
]
BAD = {  # line in the file -> (raw line, column, reason prefix)
    3: ("u9,i9,5.0,feed,1", "", "wrong column count"),
    5: ("u8,i8,cheap,feed,0,", "price", "non-numeric value"),
    7: ("u7,i7,2.0,feed,NaN,", "click", "missing or NaN label"),
    9: ("u6,i6,2.0,checkout,0,", "scenario", "unknown scenario"),
}


def _bad_csv(path: Path) -> Path:
    lines = [",".join(HEADER)]
    good = iter(GOOD * 20)
    for line_no in range(2, 60):
        lines.append(BAD[line_no][0] if line_no in BAD else ",".join(next(good)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _byo_config(tmp_path: Path, policy: str) -> Path:
    cfg = {
        "data": {
            "train": "shop.csv", "bad_rows": policy, "max_bad_fraction": 0.2,
            "valid_fraction": 0.2, "test_fraction": 0.0,
            "schema": {
                "features": [{"name": "user_id", "kind": "categorical"},
                             {"name": "item_id", "kind": "categorical"},
                             {"name": "price", "kind": "numeric", "transform": "log1p"}],
                "tasks": [{"name": "click"}, {"name": "conversion", "given": "click"}],
                "scenario": {"column": "scenario", "values": ["feed", "search"]},
                "group": "user_id",
            },
        },
        "model": {"name": "shared_bottom", "args": {"bottom": [8], "tower": [4],
                                                   "embed_dim": 4}},
        "train": {"epochs": 1, "batch_size": 16, "threads": 1},
    }
    path = tmp_path / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _bad_csv(tmp_path / "shop.csv")
    return path


def test_bad_rows_fail_policy_names_file_line_column_reason(tmp_path: Path) -> None:
    proc = cli("train", str(_byo_config(tmp_path, "fail")), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1  # bad data: a runtime error
    assert "Traceback" not in proc.stderr
    assert "shop.csv: line 3" in proc.stderr and "wrong column count" in proc.stderr
    assert "u9" not in proc.stderr  # the offending cells are not echoed


def test_bad_rows_quarantine_policy_sets_exactly_them_aside(tmp_path: Path) -> None:
    out = tmp_path / "o"
    cli("train", str(_byo_config(tmp_path, "quarantine")), "--out", str(out), check=True)
    rows = list(csv.DictReader((out / "quarantine" / "quarantine.csv").open()))
    assert [int(r["line"]) for r in rows] == sorted(BAD)
    for r in rows:
        raw, column, reason = BAD[int(r["line"])]
        assert r["column"] == column and r["reason"].startswith(reason)
        assert r["raw"] == raw
    summary = json.loads((out / "quarantine" / "quarantine.json").read_text())
    assert summary["bad_rows"] == 4
    assert summary["per_reason"] == {
        "wrong column count": 1, "non-numeric value in a numeric feature": 1,
        "missing or NaN label": 1, "unknown scenario": 1}
    assert summary["rows_read"] == 58  # every data line accounted for: 54 kept + 4 set aside


def test_other_scenario_trains_saves_and_predicts_an_unseen_value(tmp_path: Path) -> None:
    """`scenario: {values: [feed], other: rest}`: the search rows train the `rest` scenario
    (they are not bad rows), the model directory keeps it, and predict scores a row from a
    scenario never seen at all."""
    raw = yaml.safe_load(_byo_config(tmp_path, "fail").read_text())
    (tmp_path / "shop.csv").write_text(  # good rows only
        "\n".join([",".join(HEADER), *(",".join(r) for r in GOOD * 20)]) + "\n")
    raw["data"]["test_fraction"] = 0.2
    raw["data"]["schema"]["scenario"] = {"column": "scenario", "values": ["feed"],
                                         "other": "rest"}
    cfg = tmp_path / "other.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "o"
    cli("train", str(cfg), "--out", str(out), check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scenarios"] == ["feed", "rest"]
    assert set(metrics["test"]["click"]) == {"all", "feed", "rest"}
    saved = json.loads((out / "model" / "schema.json").read_text())
    assert saved["scenario"] == {"column": "scenario", "values": ["feed"], "other": "rest"}
    rows = tmp_path / "new.csv"
    rows.write_text(",".join(HEADER) + "\nu1,i1,10.5,checkout,,\nu2,i2,3.0,feed,,\n")
    preds = tmp_path / "p.csv"
    cli("predict", str(out / "model"), str(rows), "--out", str(preds), check=True)
    got = list(csv.DictReader(preds.open()))
    assert [r["line"] for r in got] == ["2", "3"]
    assert all(0.0 < float(r["click"]) < 1.0 for r in got)


def test_unknown_model_lists_valid_names(tmp_path: Path) -> None:
    cfg = _byo_config(tmp_path, "quarantine")
    out = ("--out", str(tmp_path / "o"))
    proc = cli("train", str(cfg), *out, "--set", "model.name=transformer9000")
    assert proc.returncode == 2 and "valid:" in proc.stderr and "mmoe" in proc.stderr
    proc = cli("train", str(cfg), *out, "--set", "weighting.name=magic")
    assert proc.returncode == 2 and "upgrad" in proc.stderr
    proc = cli("train", str(cfg), *out, "--set", "train.epochz=3")
    assert proc.returncode == 2 and "epochz" in proc.stderr
    assert not (tmp_path / "o").exists()  # each stopped at load: nothing written


def test_listing_commands() -> None:
    models = cli("models", check=True).stdout
    for name in ("shared_bottom", "mmoe", "ple", "esmm", "aitm", "star", "pepnet", "m2m"):
        assert name in models
    weightings = cli("weightings", check=True).stdout
    for name in ("equal", "uncertainty", "gradnorm", "dwa", "rlw", "upgrad", "mgda", "pcgrad"):
        assert name in weightings


# -- a bad config stops at load: one line, nothing prepared ------------------------------------

SYNTHETIC_TASKS = "tasks: click, conversion, ad_click"


@pytest.mark.parametrize(("sets", "needles"), [
    (["train.alpha.clik=2"], ["train.alpha: unknown task 'clik'", SYNTHETIC_TASKS]),
    (["train.early_stopping.metric=valid.clik.all.auc"],
     ["train.early_stopping.metric: 'valid.clik.all.auc' names unknown task 'clik'",
      SYNTHETIC_TASKS]),
    (["weighting.name=upgrd"],
     ["weighting.name: unknown weighting 'upgrd'; valid: equal, static, uncertainty"]),
])
def test_bad_names_in_a_synthetic_config_stop_at_load(tmp_path: Path, sets: list[str],
                                                      needles: list[str]) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"synthetic": {"rows": 2000}}}))
    out = tmp_path / "out"
    proc = cli("train", str(cfg), "--out", str(out), *[a for s in sets for a in ("--set", s)])
    assert_one_error_line(proc, *needles, code=2)
    assert not out.exists()  # no world generated, nothing written


def test_misspelled_alpha_task_with_a_schema_stops_at_load(tmp_path: Path) -> None:
    """An explicit schema (the CSV config of the bad-rows tests): its own tasks are the valid
    names, and the CSV is never read."""
    cfg = _byo_config(tmp_path, "fail")  # its data has bad rows: reading it would fail
    out = tmp_path / "out"
    proc = cli("train", str(cfg), "--out", str(out), "--set", "train.alpha.clik=2")
    assert_one_error_line(proc, "train.alpha: unknown task 'clik'; tasks: click, conversion",
                          code=2)
    assert not out.exists()
    proc = cli("compare", str(cfg), "--out", str(out), "--set", "train.alpha.clik=2")
    assert_one_error_line(proc, "train.alpha: unknown task 'clik'", code=2)
    assert not out.exists()


def test_debug_shows_the_traceback_without_locals(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"synthetic": {"rows": 2000}},
                                   "train": {"alpha": {"clik": 2.0}}}))
    args = ("train", str(cfg), "--out", str(tmp_path / "o"))
    runs = [cli("--debug", *args)]
    monkeypatch.setenv("SHOPMTL_DEBUG", "1")
    runs.append(cli(*args))
    for proc in runs:
        assert proc.returncode != 0
        assert "Traceback" in proc.stderr and "unknown task 'clik'" in proc.stderr
        assert "─ locals ─" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data: {synthetic: {rows: 2000}\ntrain: [\n")
    proc = cli("train", str(cfg), "--out", str(tmp_path / "o"))
    assert_one_error_line(proc, "exp.yaml: not valid YAML", "line", code=2)


def _raiser(exc: BaseException):
    from shopmtl.cli import _guard

    @_guard
    def command() -> None:
        raise exc

    return command


def _errors() -> list[tuple[BaseException, int, str]]:
    """One exception of every row of the exit-code table, and what the user sees."""
    import yaml

    from shopmtl.config import ConfigError
    from shopmtl.data.ingest import DataError
    from shopmtl.predict import OptionError
    from shopmtl.train.checkpoint import CheckpointError
    from shopmtl.train.loop import DivergenceError, NonFiniteError
    from shopmtl.train.outlock import OutputInUseError
    from shopmtl.weighting import MissingDependencyError

    internal = "rerun with --debug for the traceback"
    return [
        # usage errors: 2
        (ConfigError("train.batch_size: must be >= 1, got -5"), 2,
         "error: train.batch_size: must be >= 1, got -5"),
        (OptionError("--task: unknown task(s) ['x']"), 2, "error: --task: unknown task(s) ['x']"),
        (yaml.YAMLError("bad"), 2, "error: not valid YAML: bad"),
        (KeyError("unknown task 'x'; known: ['click']"), 2,
         "error: unknown task 'x'; known: ['click']"),
        # runtime errors: 1
        (DataError("shop.csv: line 3, column 'price': non-numeric value"), 1,
         "error: shop.csv: line 3, column 'price': non-numeric value"),
        (CheckpointError("/m: file 'x' is corrupt"), 1, "error: /m: file 'x' is corrupt"),
        (NonFiniteError("non-finite loss"), 1, "error: non-finite loss"),
        (DivergenceError("training diverged"), 1, "error: training diverged"),
        (MissingDependencyError("run: pip install x"), 1, "error: run: pip install x"),
        (OutputInUseError("/o is in use by another shopmtl run (pid 1)"), 1,
         "error: /o is in use by another shopmtl run (pid 1)"),
        (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
        (PermissionError(13, "Permission denied", "/x/out"), 1,
         "error: [Errno 13] Permission denied: '/x/out'"),
        (IsADirectoryError(21, "Is a directory", "/x"), 1,
         "error: [Errno 21] Is a directory: '/x'"),
        # internal errors: 1, the type only (the message could hold a data value)
        (KeyError("u123"), 1, f"error: internal error (KeyError); {internal}"),
        (ValueError("bad\nvalue"), 1, f"error: internal error (ValueError); {internal}"),
        (RuntimeError("cell value 0.123"), 1, f"error: internal error (RuntimeError); {internal}"),
    ]


@pytest.mark.parametrize(("exc", "code", "line"), _errors(),
                         ids=[f"{type(e).__name__}-{c}" for e, c, _ in _errors()])
def test_every_error_is_one_line_with_its_exit_code(exc: BaseException, code: int, line: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    with pytest.raises(typer.Exit) as info:
        _raiser(exc)()
    assert info.value.exit_code == code
    assert capsys.readouterr().err == line + "\n"


def test_the_exit_code_table_is_documented() -> None:
    """Every row of EXIT_CODES is named in the module docstring and described in --help."""
    import shopmtl.cli

    for where, code, _ in shopmtl.cli.EXIT_CODES:
        assert where.split(":")[1] in shopmtl.cli.__doc__, where
        assert f"{code}, a {'usage' if code == 2 else 'runtime'} error" in shopmtl.cli.__doc__
    help_text = " ".join(cli("--help", check=True).stdout.split())  # rich wraps the epilog
    for _, _, what in shopmtl.cli.EXIT_CODES:
        assert what in help_text, what
    assert "2 usage error" in help_text and "1 runtime error" in help_text


def test_debug_re_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import shopmtl.cli

    monkeypatch.setattr(shopmtl.cli, "_DEBUG", True)
    with pytest.raises(RuntimeError, match="boom"):
        _raiser(RuntimeError("boom"))()


# -- predict/evaluate: output formats, id columns, bad rows (the format-1 zoo fixture) ---------

FIX = Path(__file__).parent / "fixtures" / "format1"
ZOO_TASKS = ("click", "conversion", "ad_click")


def _read_output(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        return list(csv.DictReader(path.open(newline="")))
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("out_name,fmt", [("p.csv", None), ("p.parquet", None),
                                          ("p.jsonl", None), ("p.out", "parquet")])
def test_predict_writes_each_format_with_the_ids_as_read(tmp_path: Path, out_name: str,
                                                         fmt: str | None) -> None:
    out = tmp_path / out_name
    args = ["--format", fmt] if fmt else []
    proc = cli("predict", str(FIX / "zoo_model"), str(FIX / "zoo_rows.csv"), "--out", str(out),
               "--id-columns", "user_id,item_id", *args, check=True)
    assert proc.stdout.strip() == f"wrote 8 rows to {out}"
    rows = _read_output(out)
    assert list(rows[0]) == ["line", "user_id", "item_id", *ZOO_TASKS]
    source = list(csv.DictReader((FIX / "zoo_rows.csv").open(newline="")))
    old = json.loads((FIX / "zoo_predictions.json").read_text())  # what the old code wrote
    assert [int(r["line"]) for r in rows] == [r["line"] for r in old] == list(range(2, 10))
    # ids pass through as the CSV's text, whatever the format
    assert [(r["user_id"], r["item_id"]) for r in rows] == [(s["user_id"], s["item_id"])
                                                            for s in source]
    for t in ZOO_TASKS:
        np.testing.assert_allclose([float(r[t]) for r in rows], [r[t] for r in old], atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary sibling was renamed into place


def _zoo_rows_with_trouble(tmp_path: Path) -> Path:
    """The fixture rows with a blank line, an unknown scenario and a non-numeric price."""
    lines = (FIX / "zoo_rows.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    bad_scenario = rows[2].replace('"home_feed"', '"moon"')
    bad_price = rows[4].replace(",9.71,", ",cheap,")
    body = [rows[0], "", rows[1], bad_scenario, rows[3], bad_price, *rows[5:]]
    path = tmp_path / "trouble.csv"
    path.write_text("\n".join([header, *body]) + "\n")
    return path  # data lines 2..10 minus blank line 3: bad on lines 5 and 7


def test_predict_quarantine_sets_bad_rows_aside_next_to_out(tmp_path: Path) -> None:
    data = _zoo_rows_with_trouble(tmp_path)
    out = tmp_path / "sub" / "preds.csv"
    proc = cli("predict", str(FIX / "zoo_model"), str(data), "--out", str(out),
               "--bad-rows", "quarantine", "--id-columns", "user_id", check=True)
    qcsv, qjson = out.with_name("preds.quarantine.csv"), out.with_name("preds.quarantine.json")
    assert proc.stdout.strip() == (f"wrote 6 rows to {out}; 2 bad rows set aside in {qcsv} "
                                   "(counts per reason in preds.quarantine.json); 1 blank lines "
                                   "skipped")
    assert [int(r["line"]) for r in _read_output(out)] == [2, 4, 6, 8, 9, 10]
    bad = list(csv.DictReader(qcsv.open(newline="")))
    assert [(int(b["line"]), b["column"], b["reason"]) for b in bad] == [
        (5, "scenario", "unknown scenario"), (7, "price", "non-numeric value in a numeric feature")]
    assert [b["raw"] for b in bad] == [data.read_text().splitlines()[i] for i in (4, 6)]
    summary = json.loads(qjson.read_text())
    assert summary["rows_read"] == 8 == summary["scored"] + summary["bad_rows"]
    assert summary["blank_lines_skipped"] == 1
    # the same file under fail: one line naming the first bad row and the count, no output
    out2 = tmp_path / "fail.csv"
    proc = cli("predict", str(FIX / "zoo_model"), str(data), "--out", str(out2))
    assert_one_error_line(proc, "bad row: trouble.csv: line 5, column 'scenario': unknown "
                                "scenario (2 bad rows in all)", code=1)
    assert not out2.exists() and not list(tmp_path.glob(".fail.csv*"))


def test_evaluate_quarantine_writes_next_to_out_and_needs_it(tmp_path: Path) -> None:
    data = _zoo_rows_with_trouble(tmp_path)
    proc = cli("evaluate", str(FIX / "zoo_model"), str(data), "--bad-rows", "quarantine")
    assert_one_error_line(proc, "--bad-rows quarantine needs --out", code=2)
    out = tmp_path / "eval.json"
    # the fixture model's run allows 5% of bad rows; 2 of 8 is past it
    proc = cli("evaluate", str(FIX / "zoo_model"), str(data), "--out", str(out),
               "--bad-rows", "quarantine")
    assert_one_error_line(proc, "2 of 8 rows are bad", "max_bad_fraction", code=1)
    bad = list(csv.DictReader((tmp_path / "eval.quarantine.csv").open(newline="")))
    assert [int(b["line"]) for b in bad] == [5, 7]
    proc = cli("evaluate", str(FIX / "zoo_model"), str(data))
    assert_one_error_line(proc, "bad row: trouble.csv: line 5, column 'scenario'", code=1)


def test_id_columns_are_checked(tmp_path: Path) -> None:
    model, rows = str(FIX / "zoo_model"), str(FIX / "zoo_rows.csv")
    proc = cli("predict", model, rows, "--out", str(tmp_path / "p.csv"), "--id-columns", "click")
    assert_one_error_line(proc, "--id-columns: ['click'] would clash", code=2)
    proc = cli("predict", model, rows, "--out", str(tmp_path / "p.csv"), "--id-columns",
               "order_id")
    assert_one_error_line(proc, "zoo_rows.csv: missing column(s) ['order_id']", code=1)
