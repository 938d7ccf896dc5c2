"""One reader for every command: what a raw CSV export can throw at ``shopmtl predict`` (and
``train``), one test per failure class. Each run either fails in one line naming file, line and
column (exit ``DATA_ERROR_CODE``, no traceback) or accounts for every row (rows in = predicted
+ set aside, blank lines counted); no run ever prints a cell (``SECRET`` is in every row).

The must-show test trains with ``bad_rows: quarantine`` on a raw file, predicts that same file
and checks the predictions against the model's own evaluation split, row by row."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

import shopmtl
from shopmtl.data.dataset import split_indices
from shopmtl.data.ingest import BadRowLog, read_chunks
from shopmtl.data.pipeline import prepare_data
from shopmtl.train.evaluate import predict_table
from tests.adversarial.common import HEADER, SECRET, assert_clean_failure, config, good_row
from tests.helpers import cli

# exit code of a data error (a bad row, a file that cannot be read); usage errors are apart.
# One place to change should data errors move to another code.
DATA_ERROR_CODE = 1  # a data error is a runtime error (cli.EXIT_CODES)
TASKS = ("click", "conversion")
COL = {c: i for i, c in enumerate(HEADER)}


def row(i: int, **cells: str) -> str:
    """Good row ``i`` of the scaffold with some cells replaced (text as written in the file)."""
    values = good_row(i)
    for name, value in cells.items():
        values[COL[name]] = value
    return ",".join(values)


def write_records(path: Path, records: list[str], header: str = ",".join(HEADER),
                  newline: str = "\n", prefix: bytes = b"") -> dict[int, int]:
    """Write the header and ``records`` (a record may hold a quoted line break; "" is a blank
    line); returns record index -> the physical line it starts on."""
    starts, line = {}, 2
    for k, rec in enumerate(records):
        starts[k] = line
        line += 1 + rec.count("\n")
    path.write_bytes(prefix + newline.join([header, *records]).encode() + newline.encode())
    return starts


def raw_export() -> tuple[list[str], dict[str, list[int]]]:
    """The must-show file: 160 good rows, some in the formats a reader gets wrong (a quoted
    item id over two lines, NA/null/007 ids, quoted cells), a blank line, and bad rows of the
    kinds both training and prediction refuse. Returns the records and the record indices of
    each kind."""
    records = [row(i) for i in range(160)]
    records[5] = row(5, item_id='"i3\nsecond line"')
    records[12] = row(12, item_id="NA")
    records[13] = row(13, item_id="null")
    records[14] = row(14, item_id="007")
    records[15] = row(15, item_id='"i4, boxed"')
    records[30] = row(30, scenario="moon")  # outside the configured scenarios
    records[31] = row(31, price="cheap")
    records[70] = row(70, scenario="checkout")
    records[90] = ",".join(good_row(90)[:4])  # a row cut short
    records.insert(40, "")  # a blank line
    kinds = {"bad": [30, 31, 71, 91], "blank": [40]}
    return records, kinds


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A zoo model trained (``shopmtl train``, quarantine) on the raw export; price without a
    transform, so a huge price reaches the encoder as it is."""
    root = tmp_path_factory.mktemp("reader")
    records, kinds = raw_export()
    lines = write_records(root / "shop.csv", records)
    path = config(root)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["schema"]["features"][2]["transform"] = "none"
    path.write_text(yaml.safe_dump(cfg))
    cli("train", str(path), "--out", str(root / "run"), check=True)
    return {"root": root, "model": root / "run" / "model", "data": root / "shop.csv",
            "records": records, "lines": lines, "kinds": kinds}


def predict(trained: dict, data: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("predict", str(trained["model"]), str(data), "--out", str(out), *args)


def assert_clean_success(proc: subprocess.CompletedProcess, out: Path, scored: int,
                         bad: int = 0, blank: int = 0) -> None:
    """Exit 0, the one line of counts, no cell value anywhere, and the rows accounted for."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {scored} rows to {out}"), lines
    assert (f"{bad} bad rows set aside" in lines[0]) == bool(bad)
    assert (f"{blank} blank lines skipped" in lines[0]) == bool(blank)
    assert len(read_csv(out)) == scored
    qjson = out.with_name(f"{out.stem}.quarantine.json")
    if qjson.exists():
        summary = json.loads(qjson.read_text())
        assert summary["rows_read"] == summary["scored"] + summary["bad_rows"] == scored + bad
        assert summary["blank_lines_skipped"] == blank


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(newline="")))


def quarantined(out: Path) -> list[tuple[int, str, str]]:
    rows = read_csv(out.with_name(f"{out.stem}.quarantine.csv"))
    return [(int(r["line"]), r["column"], r["reason"]) for r in rows]


# --- the must-show: train on a raw export, predict that file, match the evaluation split ---


def test_predict_the_training_file_matches_the_runs_own_evaluation(trained: dict,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    proc = predict(trained, trained["data"], out, "--bad-rows", "quarantine", "--id-columns",
                   "user_id,item_id")
    records, kinds, starts = trained["records"], trained["kinds"], trained["lines"]
    good = [k for k in range(len(records)) if k not in kinds["bad"] + kinds["blank"]]
    assert_clean_success(proc, out, scored=len(good), bad=len(kinds["bad"]), blank=1)

    # every good row predicted, named by the line it starts on, its ids as written
    rows = read_csv(out)
    assert list(rows[0]) == ["line", "user_id", "item_id", *TASKS]
    assert [int(r["line"]) for r in rows] == [starts[k] for k in good]
    written = {starts[k]: next(csv.reader([records[k]])) for k in good}
    assert [(r["user_id"], r["item_id"]) for r in rows] == [
        (written[int(r["line"])][0], written[int(r["line"])][1]) for r in rows]
    assert rows[good.index(5)]["item_id"] == "i3\nsecond line"
    assert [rows[good.index(k)]["item_id"] for k in (12, 13, 14)] == ["NA", "null", "007"]

    # the bad rows: the lines training set aside, each kept as written
    train_q = read_csv(trained["root"] / "run" / "quarantine" / "quarantine.csv")
    assert [int(r["line"]) for r in train_q] == [starts[k] for k in kinds["bad"]]
    assert [line for line, _, _ in quarantined(out)] == [starts[k] for k in kinds["bad"]]
    pred_q = read_csv(out.with_name("p.quarantine.csv"))
    assert [r["raw"] for r in pred_q] == [r["raw"] for r in train_q] == [
        records[k] for k in kinds["bad"]]

    # the model's own evaluation split, in process: training's rows (Parsed.lines, file
    # order), split as TensorTable.split splits them, scored by the saved model
    m = shopmtl.load(trained["model"])
    data_cfg = m.cfg.data
    lines = np.concatenate([p.lines for p in read_chunks(
        trained["data"], m.schema, data_cfg.chunk_rows, BadRowLog("quarantine", 1.0))])
    data = prepare_data(data_cfg, m.schema, encoders=m.encoders)
    share = data_cfg.valid_fraction / (1 - data_cfg.test_fraction)
    _, held = split_indices(len(lines), share, data_cfg.split_seed)
    valid_lines = lines[held.numpy()]
    assert len(valid_lines) == len(data.valid) > 10
    expected = predict_table(m.model, data.valid)
    by_line = {int(r["line"]): r for r in rows}
    for t in TASKS:
        got = [float(by_line[int(line)][t]) for line in valid_lines]
        np.testing.assert_allclose(got, expected[t], atol=1e-6, rtol=0)


# --- one test per failure class ----------------------------------------------------------------


def test_blank_lines_and_multiline_fields_keep_every_line_true(trained: dict,
                                                               tmp_path: Path) -> None:
    records = [row(0), "", row(1, item_id='"i2\r\nover\r\nthree"'), "", "", row(2),
               row(3, price="cheap"), row(4, item_id='"i1\n"'), row(5, price="1e309")]
    starts = write_records(tmp_path / "lines.csv", records, newline="\r\n")
    out = tmp_path / "p.csv"
    proc = predict(trained, tmp_path / "lines.csv", out, "--bad-rows", "quarantine")
    assert_clean_success(proc, out, scored=4, bad=2, blank=3)
    assert [int(r["line"]) for r in read_csv(out)] == [starts[k] for k in (0, 2, 5, 7)]
    assert quarantined(out) == [
        (starts[6], "price", "non-numeric value in a numeric feature"),
        (starts[8], "price", "infinite value in a numeric feature")]
    # the first bad row under fail: its true line (10), not its row number (5) nor its
    # record number (7, blank lines counted)
    proc = predict(trained, tmp_path / "lines.csv", tmp_path / "f.csv")
    assert starts[6] == 10
    assert_clean_failure(proc, "lines.csv: line 10, column 'price': non-numeric value",
                         "(2 bad rows in all)", code=DATA_ERROR_CODE)
    assert not (tmp_path / "f.csv").exists()


def test_text_cells_parse_as_in_training_whatever_the_quoting(trained: dict,
                                                              tmp_path: Path) -> None:
    """NA, null and 007 are the categories training learnt (not nulls, not 7); a BOM, quoted
    header names, quoted cells and CRLF change nothing."""
    cells = [good_row(i) for i in range(6)]
    cells[0][1], cells[1][1], cells[2][1], cells[3][1] = "NA", "null", "007", ""
    plain = tmp_path / "plain.csv"
    write_records(plain, [",".join(c) for c in cells])
    quoted = tmp_path / "quoted.csv"
    write_records(quoted, [",".join(f'"{v}"' for v in c) for c in cells],
                  header=",".join(f'"{h}"' for h in HEADER), newline="\r\n",
                  prefix=b"\xef\xbb\xbf")
    outs = []
    for data in (plain, quoted):
        out = tmp_path / f"{data.stem}.out.csv"
        assert_clean_success(predict(trained, data, out, "--id-columns", "item_id"), out, 6)
        outs.append(read_csv(out))
    assert outs[0] == outs[1]
    assert [r["item_id"] for r in outs[0]] == ["NA", "null", "007", "", "i11", "i1"]
    # the same rows in memory, every cell a string as in the file
    m = shopmtl.load(trained["model"])
    table = pa.table({h: [c[j] or None for c in cells] for j, h in enumerate(HEADER)})
    in_memory = m.predict(table)
    for t in TASKS:
        np.testing.assert_allclose([float(r[t]) for r in outs[0]],
                                   in_memory.column(t).to_numpy(), atol=1e-6, rtol=0)
    # and they are the learnt categories: as nulls (or as 7) they would score otherwise
    as_null = m.predict(table.set_column(1, "item_id", pa.array([None, None, "7", None,
                                                                 "i11", "i1"])))
    assert not np.allclose(as_null.column("click").to_numpy()[:3],
                           in_memory.column("click").to_numpy()[:3])


def test_a_bad_byte_makes_only_its_row_bad(trained: dict, tmp_path: Path) -> None:
    data = tmp_path / "bytes.csv"
    body = [row(0).encode(), row(1, item_id="caf\udce9").encode("utf-8", "surrogateescape"),
            row(2).encode()]
    data.write_bytes(b"\n".join([",".join(HEADER).encode(), *body]) + b"\n")
    out = tmp_path / "p.csv"
    proc = predict(trained, data, out, "--bad-rows", "quarantine")
    assert_clean_success(proc, out, scored=2, bad=1)
    assert quarantined(out) == [(3, "item_id", "invalid UTF-8")]
    proc = predict(trained, data, tmp_path / "f.csv")
    assert_clean_failure(proc, "bytes.csv: line 3, column 'item_id': invalid UTF-8",
                         code=DATA_ERROR_CODE)


def test_a_huge_price_is_a_bad_row_in_predict_and_train(trained: dict, tmp_path: Path) -> None:
    """1e308 once crashed training (OverflowError in the encoder's moments); 1e40 passes a
    float64 check but overflows float32 once the saved encoder standardises it."""
    records = [row(i) for i in range(40)]
    records[3] = row(3, price="1e308")
    records[7] = row(7, price="1e40")
    write_records(tmp_path / "shop.csv", records)
    out = tmp_path / "p.csv"
    proc = predict(trained, tmp_path / "shop.csv", out, "--bad-rows", "quarantine")
    assert_clean_success(proc, out, scored=38, bad=2)
    assert quarantined(out) == [(5, "price", "numeric value out of range"),
                                (9, "price", "numeric value out of range")]
    proc = predict(trained, tmp_path / "shop.csv", tmp_path / "f.csv")
    assert_clean_failure(proc, "shop.csv: line 5, column 'price': numeric value out of range",
                         code=DATA_ERROR_CODE)
    # training, under both policies
    cfg = yaml.safe_load(config(tmp_path, policy="fail").read_text())
    cfg["data"]["schema"]["features"][2]["transform"] = "none"
    for policy in ("fail", "quarantine"):
        cfg["data"]["bad_rows"] = policy
        path = tmp_path / f"{policy}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = cli("train", str(path), "--out", str(tmp_path / policy))
        if policy == "fail":
            assert_clean_failure(proc, "shop.csv: line 5, column 'price': numeric value out "
                                       "of range", code=DATA_ERROR_CODE)
            continue
        assert proc.returncode == 0 and SECRET not in proc.stdout + proc.stderr, proc.stderr
        train_q = read_csv(tmp_path / policy / "quarantine" / "quarantine.csv")
        assert [(int(r["line"]), r["reason"]) for r in train_q] == [
            (5, "numeric value out of range")]  # 1e40 trains: the moments hold it


def test_a_headerless_csv_is_refused_without_printing_its_first_row(trained: dict,
                                                                    tmp_path: Path) -> None:
    data = tmp_path / "nohead.csv"
    data.write_text("\n".join(row(i) for i in range(5)) + "\n")
    proc = predict(trained, data, tmp_path / "p.csv")
    line = assert_clean_failure(proc, "nohead.csv: missing column(s) ['user_id', 'item_id'",
                                "line 1 must name the columns", code=DATA_ERROR_CODE)
    assert "i0" not in line and "feed" not in line  # nothing of the first line
    path = config(tmp_path, data="nohead.csv")
    proc = cli("train", str(path), "--out", str(tmp_path / "o"))
    assert_clean_failure(proc, "nohead.csv: missing column(s)", code=DATA_ERROR_CODE)


def test_predict_under_fail_names_file_line_and_column(trained: dict, tmp_path: Path) -> None:
    records = [row(i) for i in range(20)]
    records[4] = row(4, price="cheap")
    records[9] = row(9, scenario="moon")
    write_records(tmp_path / "shop.csv", records)
    out = tmp_path / "p.csv"
    proc = predict(trained, tmp_path / "shop.csv", out, "--id-columns", "user_id")
    assert_clean_failure(proc, "bad row: shop.csv: line 6, column 'price': non-numeric value "
                               "in a numeric feature (2 bad rows in all)", code=DATA_ERROR_CODE)
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))  # nothing half-written
    assert not out.with_name("p.quarantine.csv").exists()
    # the in-memory API: the same rule, rows numbered from 0
    m = shopmtl.load(trained["model"])
    rows = [dict(zip(HEADER, next(csv.reader([r])), strict=True)) for r in records]
    with pytest.raises(ValueError, match=r"rows: row 4, column 'price'.*2 bad rows in all"):
        m.predict(rows)
    kept = m.predict(rows, bad_rows="quarantine", id_columns=["user_id"])
    assert kept.column_names == ["line", "user_id", *TASKS]
    assert kept.column("line").to_pylist() == [i for i in range(20) if i not in (4, 9)]
    meta = json.loads(kept.schema.metadata[b"shopmtl.bad_rows"])
    assert (meta["rows_read"], meta["bad_rows"]) == (20, 2)
    assert [(b["line"], b["column"]) for b in meta["rows"]] == [(4, "price"), (9, "scenario")]

