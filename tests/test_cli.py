"""The command line as a user runs it: quickstart outputs, bad rows under both policies,
predict/evaluate on a saved model, listing commands, bad configs stopped at load in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
    assert proc.returncode == 2
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
    assert_one_error_line(proc, *needles)
    assert not out.exists()  # no world generated, nothing written


def test_misspelled_alpha_task_with_a_schema_stops_at_load(tmp_path: Path) -> None:
    """An explicit schema (the CSV config of the bad-rows tests): its own tasks are the valid
    names, and the CSV is never read."""
    cfg = _byo_config(tmp_path, "fail")  # its data has bad rows: reading it would fail
    out = tmp_path / "out"
    proc = cli("train", str(cfg), "--out", str(out), "--set", "train.alpha.clik=2")
    assert_one_error_line(proc, "train.alpha: unknown task 'clik'; tasks: click, conversion")
    assert not out.exists()
    proc = cli("compare", str(cfg), "--out", str(out), "--set", "train.alpha.clik=2")
    assert_one_error_line(proc, "train.alpha: unknown task 'clik'")
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
    assert_one_error_line(proc, "exp.yaml: not valid YAML", "line")


def _raiser(exc: BaseException):
    from shopmtl.cli import _guard

    @_guard
    def command() -> None:
        raise exc

    return command


@pytest.mark.parametrize(("exc", "code", "line"), [
    (OSError(28, "No space left on device"), 2, "error: [Errno 28] No space left on device"),
    (PermissionError(13, "Permission denied", "/x/out"), 2,
     "error: [Errno 13] Permission denied: '/x/out'"),
    (IsADirectoryError(21, "Is a directory", "/x"), 2, "error: [Errno 21] Is a directory: '/x'"),
    (KeyError("unknown task 'x'; known: ['click']"), 2,
     "error: unknown task 'x'; known: ['click']"),
    (KeyError("u123"), 1, "error: internal error (KeyError); rerun with --debug for the traceback"),
    (ValueError("bad\nvalue"), 1,
     "error: internal error (ValueError); rerun with --debug for the traceback"),
    (RuntimeError("cell value 0.123"), 1,
     "error: internal error (RuntimeError); rerun with --debug for the traceback"),
])
def test_every_error_is_one_line(exc: BaseException, code: int, line: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    with pytest.raises(typer.Exit) as info:
        _raiser(exc)()
    assert info.value.exit_code == code
    assert capsys.readouterr().err == line + "\n"


def test_debug_re_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import shopmtl.cli

    monkeypatch.setattr(shopmtl.cli, "_DEBUG", True)
    with pytest.raises(RuntimeError, match="boom"):
        _raiser(RuntimeError("boom"))()
