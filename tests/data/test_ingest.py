from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopmtl.config import DataConfig, SchemaConfig
from shopmtl.data.encoders import Encoded, Encoders
from shopmtl.data.ingest import BadRowLog, DataError, Parsed, read_chunks
from shopmtl.data.pipeline import prepare_data
from shopmtl.data.schema import FeatureSpec, Schema, TaskSpec

HEADER = ["user_id", "item_id", "price", "hist", "scenario", "click", "conversion", "ad_click"]

# A valid ad-slot row (click=1, conversion=1, ad_click=0); bad rows are variants of it. Every bad
# row carries "SECRET" in a cell so that messages can be checked not to echo cell values.
BASE = ["SECRET-u", "i1", "2.5", "i1|i2", "ad", "1", "1", "0"]
COL = {c: i for i, c in enumerate(HEADER)}


def variant(**cells: str) -> str:
    row = list(BASE)
    for name, value in cells.items():
        row[COL[name]] = value
    return ",".join(row)


# id -> (line text, column, reason)
BAD_CASES: dict[str, tuple[str, str, str]] = {
    "too_few_columns": ("SECRET-u,i1,2.5", "", "wrong column count: expected 8, got 3"),
    "too_many_columns": (
        ",".join([*BASE, "SECRET-extra"]),
        "",
        "wrong column count: expected 8, got 9",
    ),
    "non_numeric_feature": (
        variant(price="SECRET-price"),
        "price",
        "non-numeric value in a numeric feature",
    ),
    "nan_label": (variant(click="NaN"), "click", "missing or NaN label"),
    "empty_label": (variant(click=""), "click", "missing or NaN label"),
    "empty_conversion_after_click": (variant(conversion=""), "conversion", "missing or NaN label"),
    "empty_ad_click_in_ad_slot": (variant(ad_click=""), "ad_click", "missing or NaN label"),
    "label_not_binary": (variant(click="9.25"), "click", "binary label not 0 or 1"),
    "unknown_scenario": (variant(scenario="SECRET-moon"), "scenario", "unknown scenario"),
}

EXPECTED_COUNTS = {
    "wrong column count": 2,
    "non-numeric value in a numeric feature": 1,
    "missing or NaN label": 4,
    "binary label not 0 or 1": 1,
    "unknown scenario": 1,
}


def read_all(
    path: Path,
    schema: Schema,
    chunk_rows: int = 10_000,
    policy: str = "fail",
    max_fraction: float = 1.0,
) -> tuple[list[Parsed], BadRowLog]:
    log = BadRowLog(policy, max_fraction)
    return list(read_chunks(path, schema, chunk_rows, log)), log


def cat(parts: list[Parsed], name: str) -> np.ndarray:
    return np.concatenate([getattr(p, name) for p in parts])


def strings(parts: list[Parsed], kind: str, feature: str) -> list:
    return [v for p in parts for v in getattr(p, kind)[feature].to_pylist()]


def encode(parts: list[Parsed], schema: Schema) -> Encoded:
    enc = Encoders(schema)
    for p in parts:
        enc.partial_fit(p)
    enc.finish()
    return Encoded.concat([enc.transform(p) for p in parts])


def assert_encoded_equal(a: Encoded, b: Encoded) -> None:
    for name in Encoded.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def interleaved_bad_file(ecom, write_csv: Callable[..., Path]) -> tuple[Path, list, list[int]]:
    """ecom.rows with one of each bad case after every third good row.

    Returns the path, the expected quarantine entries (line, column, reason) and the file lines
    of the good rows.
    """
    content: list[tuple[str, object]] = []
    bad_iter = iter(BAD_CASES.values())
    for i, row in enumerate(ecom.rows):
        content.append(("good", row))
        if i % 3 == 1:
            case = next(bad_iter, None)
            if case is not None:
                content.append(("bad", case))
    assert sum(kind == "bad" for kind, _ in content) == len(BAD_CASES)
    expected_bad, good_lines, lines = [], [], []
    for idx, (kind, item) in enumerate(content):
        line = idx + 2  # header is line 1
        if kind == "bad":
            text, column, reason = item  # type: ignore[misc]
            expected_bad.append((line, column, reason))
            lines.append(text)
        else:
            good_lines.append(line)
            lines.append(item)
    return write_csv("bad.csv", lines), expected_bad, good_lines


# --- a valid file ---------------------------------------------------------------------------


def test_fixture_matches_this_module(ecom) -> None:
    assert ecom.header == HEADER
    assert ecom.path.read_text().splitlines()[0] == ",".join(HEADER)
    assert len(ecom.rows) == 30


def test_valid_csv_parses_every_row(ecom, ecom_csv: Path, schema: Schema) -> None:
    parts, log = read_all(ecom_csv, schema, policy="fail")
    assert sum(p.n for p in parts) == len(ecom.rows)
    assert log.rows == [] and log.seen == len(ecom.rows)
    np.testing.assert_array_equal(cat(parts, "lines"), np.arange(2, len(ecom.rows) + 2))
    labels, mask = ecom.expected(ecom.rows)
    np.testing.assert_array_equal(cat(parts, "labels"), labels)
    np.testing.assert_array_equal(cat(parts, "mask"), mask)
    scen = [("home", "search", "ad").index(r[4]) for r in ecom.rows]
    np.testing.assert_array_equal(cat(parts, "scenario"), scen)
    prices = np.concatenate([p.numeric["price"] for p in parts])
    np.testing.assert_allclose(prices, [float(r[2]) for r in ecom.rows])
    assert strings(parts, "categorical", "user_id") == [r[0] for r in ecom.rows]
    assert strings(parts, "sequence", "hist")[1] == ["i1"]
    assert strings(parts, "sequence", "hist")[4] == ["i4", "i5", "i6", "i7"]


def test_conditional_labels_empty_are_masked_not_bad(ecom, ecom_csv: Path, schema: Schema) -> None:
    parts, log = read_all(ecom_csv, schema, policy="quarantine")
    assert log.rows == []
    mask = cat(parts, "mask")
    labels = cat(parts, "labels")
    no_click = np.array([r[5] == "0" for r in ecom.rows])
    not_ad = np.array([r[4] != "ad" for r in ecom.rows])
    assert no_click.any() and not_ad.any()
    assert not mask[no_click, 1].any()  # conversion masked without a click
    assert not mask[not_ad, 2].any()  # ad_click masked outside the ad slot
    assert mask[~no_click, 1].all() and mask[~not_ad, 2].all()
    assert (labels[~mask] == 0).all()


def test_labels_present_outside_their_condition_are_masked(
    write_csv: Callable[..., Path], schema: Schema
) -> None:
    rows = [
        ["u1", "i1", "1", "", "home", "0", "1", "1"],  # conversion without click; ad_click at home
        ["u2", "i2", "1", "", "ad", "1", "0", "1"],
    ]
    parts, log = read_all(write_csv("x.csv", rows), schema)
    assert log.rows == []
    np.testing.assert_array_equal(cat(parts, "mask"), [[True, False, False], [True, True, True]])
    np.testing.assert_array_equal(cat(parts, "labels")[1], [1, 0, 1])


# --- bad rows under 'fail' ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_fail_policy_names_file_line_column_reason_but_not_the_value(
    ecom, case: str, write_csv: Callable[..., Path], schema: Schema
) -> None:
    text, column, reason = BAD_CASES[case]
    rows = [*ecom.rows[:5], text, *ecom.rows[5:10]]  # the bad row is on file line 7
    path = write_csv("bad.csv", rows)
    with pytest.raises(DataError) as info:
        read_all(path, schema, chunk_rows=4, policy="fail")
    msg = str(info.value)
    assert "bad.csv: line 7" in msg
    assert reason in msg
    if column:
        assert f"column '{column}'" in msg
    assert "SECRET" not in msg
    assert "9.25" not in msg


def test_fail_policy_reports_the_first_bad_row(
    ecom, write_csv: Callable[..., Path], schema: Schema
) -> None:
    rows = [
        *ecom.rows[:2],
        BAD_CASES["label_not_binary"][0],  # line 4
        *ecom.rows[2:4],
        BAD_CASES["too_few_columns"][0],  # line 7
    ]
    with pytest.raises(DataError, match=r"line 4, column 'click'"):
        read_all(write_csv("bad.csv", rows), schema, policy="fail")


# --- bad rows under 'quarantine' ------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [4, 7, 10_000])
def test_quarantine_sets_aside_exactly_the_bad_rows(
    ecom, chunk_rows: int, write_csv: Callable[..., Path], schema: Schema, tmp_path: Path
) -> None:
    path, expected_bad, good_lines = interleaved_bad_file(ecom, write_csv)
    parts, log = read_all(path, schema, chunk_rows=chunk_rows, policy="quarantine")

    # every good row is kept, at its own line, with its own labels
    assert sum(p.n for p in parts) == len(ecom.rows) == len(good_lines)
    np.testing.assert_array_equal(cat(parts, "lines"), good_lines)
    labels, mask = ecom.expected(ecom.rows)
    np.testing.assert_array_equal(cat(parts, "labels"), labels)
    np.testing.assert_array_equal(cat(parts, "mask"), mask)
    assert strings(parts, "categorical", "user_id") == [r[0] for r in ecom.rows]
    assert log.seen == len(ecom.rows) + len(BAD_CASES)

    qfile = log.write(tmp_path / "q")
    assert qfile == tmp_path / "q" / "quarantine.csv"
    with qfile.open(newline="") as f:
        got = list(csv.DictReader(f))
    assert [(int(r["line"]), r["column"], r["reason"]) for r in got] == expected_bad
    assert all(r["file"] == "bad.csv" for r in got)
    assert all("SECRET" in r["raw"] for r in got)  # the quarantine file keeps the raw rows

    summary = json.loads((tmp_path / "q" / "quarantine.json").read_text())
    assert summary["bad_rows"] == len(BAD_CASES)
    assert summary["rows_read"] == len(ecom.rows) + len(BAD_CASES)
    assert summary["per_reason"] == EXPECTED_COUNTS


def test_no_quarantine_file_without_bad_rows(
    ecom_csv: Path, schema: Schema, tmp_path: Path
) -> None:
    _, log = read_all(ecom_csv, schema, policy="quarantine")
    assert log.write(tmp_path / "q") is None
    assert not (tmp_path / "q").exists()


def test_max_bad_fraction_boundary(ecom, write_csv: Callable[..., Path], schema: Schema) -> None:
    bad = BAD_CASES["unknown_scenario"][0]
    good = ecom.rows + ecom.rows[:8]  # 38 good rows
    _, log = read_all(
        write_csv("two.csv", [*good, bad, bad]), schema, policy="quarantine", max_fraction=0.05
    )
    log.check_fraction()  # 2 / 40 = 5%: not past the limit
    _, log = read_all(
        write_csv("three.csv", [*good, bad, bad, bad]),
        schema,
        policy="quarantine",
        max_fraction=0.05,
    )
    with pytest.raises(DataError, match="max_bad_fraction"):
        log.check_fraction()  # 3 / 41


def _data_config(s: Schema, train: Path, valid: Path, **kw: object) -> DataConfig:
    return DataConfig(
        schema=SchemaConfig(s.features, s.tasks, s.scenario, s.group),
        train=str(train),
        valid=str(valid),
        test_fraction=0.0,
        **kw,  # type: ignore[arg-type]
    )


def test_prepare_data_raises_past_max_bad_fraction(
    ecom, write_csv: Callable[..., Path], ecom_csv: Path, schema: Schema, tmp_path: Path
) -> None:
    path, _, _ = interleaved_bad_file(ecom, write_csv)  # 9 bad of 39 (+30 valid rows)
    cfg = _data_config(schema, path, ecom_csv, bad_rows="quarantine", max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"9 of 69 rows are bad.*max_bad_fraction"):
        prepare_data(cfg, schema, out_dir=tmp_path / "run")


def test_prepare_data_quarantine_within_limit(
    ecom, write_csv: Callable[..., Path], ecom_csv: Path, schema: Schema, tmp_path: Path
) -> None:
    path, expected_bad, _ = interleaved_bad_file(ecom, write_csv)
    cfg = _data_config(schema, path, ecom_csv, bad_rows="quarantine", max_bad_fraction=0.5)
    data = prepare_data(cfg, schema, out_dir=tmp_path / "run")
    assert len(data.train) == len(ecom.rows)
    assert len(data.valid) == len(ecom.rows)
    assert data.bad_rows == EXPECTED_COUNTS
    assert data.quarantine_file == tmp_path / "run" / "quarantine" / "quarantine.csv"
    with data.quarantine_file.open(newline="") as f:
        assert [int(r["line"]) for r in csv.DictReader(f)] == [b[0] for b in expected_bad]


def test_prepare_data_fail_policy_raises(
    ecom, write_csv: Callable[..., Path], ecom_csv: Path, schema: Schema
) -> None:
    path, expected_bad, _ = interleaved_bad_file(ecom, write_csv)
    with pytest.raises(DataError, match=rf"bad.csv: line {expected_bad[0][0]}\b"):
        prepare_data(_data_config(schema, path, ecom_csv, bad_rows="fail"), schema)


# --- chunking ---------------------------------------------------------------------------------


def test_chunk_size_does_not_change_the_encoded_arrays(ecom_csv: Path, schema: Schema) -> None:
    small, _ = read_all(ecom_csv, schema, chunk_rows=7)
    whole, _ = read_all(ecom_csv, schema, chunk_rows=10_000)
    assert [p.n for p in small] == [7, 7, 7, 7, 2]
    assert len(whole) == 1
    np.testing.assert_array_equal(cat(small, "lines"), cat(whole, "lines"))
    assert_encoded_equal(encode(small, schema), encode(whole, schema))


def test_line_numbers_across_csv_blocks(tmp_path: Path, schema: Schema) -> None:
    """A file over 1 MiB is read in several pyarrow blocks; line numbers must still be right."""
    n = 36_000
    bad = {
        3: "u,i,1",
        20_000: "u,i,1,,home,1,1,0,extra",
        30_001: "u,i,zz,,home,1,1,",
        n + 1: "u,i,1,,home,",
    }
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write(",".join(HEADER) + "\n")
        for line in range(2, n + 2):
            f.write(bad.get(line, f"u{line},i{line % 50},{line % 9}.25,i1|i2|i3,home,0,,") + "\n")
    assert path.stat().st_size > 1 << 20
    parts, log = read_all(path, schema, chunk_rows=5000, policy="quarantine")
    assert [b.line for b in sorted(log.rows, key=lambda b: b.line)] == sorted(bad)
    kept = cat(parts, "lines")
    expected = np.array([ln for ln in range(2, n + 2) if ln not in bad])
    np.testing.assert_array_equal(kept, expected)
    # each kept row is the row written on that line
    users = strings(parts, "categorical", "user_id")
    assert users == [f"u{ln}" for ln in expected]
    assert log.seen == n


# --- Parquet --------------------------------------------------------------------------------


def rows_to_parquet(rows: list[list[str]], path: Path, **kw: object) -> Path:
    def opt_int(v: str) -> int | None:
        return None if v == "" else int(v)

    table = pa.table(
        {
            "user_id": pa.array([r[0] for r in rows], pa.string()),
            "item_id": pa.array([r[1] for r in rows], pa.string()),
            "price": pa.array([float(r[2]) for r in rows], pa.float64()),
            "hist": pa.array([r[3] or None for r in rows], pa.string()),
            "scenario": pa.array([r[4] for r in rows], pa.string()),
            "click": pa.array([int(r[5]) for r in rows], pa.int64()),
            "conversion": pa.array([opt_int(r[6]) for r in rows], pa.int64()),
            "ad_click": pa.array([opt_int(r[7]) for r in rows], pa.int64()),
        }
    )
    pq.write_table(table, path, **kw)
    return path


def test_parquet_and_csv_parse_the_same(
    ecom, ecom_csv: Path, schema: Schema, tmp_path: Path
) -> None:
    pq_path = rows_to_parquet(ecom.rows, tmp_path / "ecom.parquet", row_group_size=8)
    from_csv, _ = read_all(ecom_csv, schema, chunk_rows=7)
    from_pq, log = read_all(pq_path, schema, chunk_rows=7)
    assert log.rows == []
    for name in ("labels", "mask", "scenario"):
        np.testing.assert_array_equal(cat(from_pq, name), cat(from_csv, name), err_msg=name)
    labels, mask = ecom.expected(ecom.rows)
    np.testing.assert_array_equal(cat(from_pq, "labels"), labels)
    np.testing.assert_array_equal(cat(from_pq, "mask"), mask)
    # Parquet rows are numbered from 1 (no header)
    np.testing.assert_array_equal(cat(from_pq, "lines"), np.arange(1, len(ecom.rows) + 1))
    for kind, feature in [
        ("categorical", "user_id"),
        ("categorical", "item_id"),
        ("sequence", "hist"),
    ]:
        assert strings(from_pq, kind, feature) == strings(from_csv, kind, feature)
    assert_encoded_equal(encode(from_pq, schema), encode(from_csv, schema))


def test_parquet_numeric_ids_match_csv_text_ids(tmp_path: Path, write_csv) -> None:
    """3 (int), 3.0 (float, as pandas writes an int column with nulls) and "3" are one category."""
    s = Schema((FeatureSpec("item", "categorical"),), (TaskSpec("click"),))
    csv_path = write_csv("ids.csv", [["3", "1"], ["", "0"], ["12", "1"]], header=["item", "click"])
    pq.write_table(
        pa.table({"item": pa.array([3.0, None, 12.0]), "click": pa.array([True, False, True])}),
        tmp_path / "f.parquet",
    )
    pq.write_table(
        pa.table({"item": pa.array([3, None, 12], pa.int64()), "click": [1, 0, 1]}),
        tmp_path / "i.parquet",
    )
    want = [["3", None, "12"]]
    for path in (csv_path, tmp_path / "f.parquet", tmp_path / "i.parquet"):
        parts, _ = read_all(path, s)
        assert [strings(parts, "categorical", "item")] == want, path.name
        np.testing.assert_array_equal(cat(parts, "labels")[:, 0], [1, 0, 1])


def test_parquet_bad_row_is_named_by_row_number(ecom, tmp_path: Path, schema: Schema) -> None:
    rows = [list(r) for r in ecom.rows[:6]]
    rows[4][4] = "SECRET-moon"
    path = rows_to_parquet(rows, tmp_path / "bad.parquet")
    with pytest.raises(DataError) as info:
        read_all(path, schema, chunk_rows=4)
    msg = str(info.value)
    assert "bad.parquet: row 5, column 'scenario': unknown scenario" in msg
    assert "SECRET" not in msg


def test_parquet_null_label_where_defined_is_bad(ecom, tmp_path: Path, schema: Schema) -> None:
    table = pq.read_table(rows_to_parquet(ecom.rows[:6], tmp_path / "a.parquet"))
    clicks = table.column("click").to_pylist()
    clicks[2] = None
    table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(clicks))
    pq.write_table(table, tmp_path / "b.parquet")
    parts, log = read_all(tmp_path / "b.parquet", schema, policy="quarantine")
    assert [(b.line, b.column, b.reason) for b in log.rows] == [
        (3, "click", "missing or NaN label")
    ]
    assert sum(p.n for p in parts) == 5


def test_truncated_parquet_raises_data_error(ecom, tmp_path: Path, schema: Schema) -> None:
    path = rows_to_parquet(ecom.rows, tmp_path / "cut.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet"):
        read_all(path, schema)


def test_corrupt_parquet_pages_raise_data_error(tmp_path: Path) -> None:
    """Footer intact, data pages garbage: the error surfaces mid-iteration, still a DataError."""
    s = Schema((FeatureSpec("u", "categorical"), FeatureSpec("x", "numeric")), (TaskSpec("y"),))
    n = 2000
    path = tmp_path / "bad.parquet"
    table = pa.table(
        {"u": [f"u{i}" for i in range(n)], "x": np.arange(n, dtype=float), "y": np.arange(n) % 2}
    )
    pq.write_table(table, path, row_group_size=250, compression="snappy")
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    lo = footer_start // 2
    data[lo : lo + 256] = b"\xa5" * 256
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.parquet"):
        read_all(path, s, chunk_rows=100)


def test_not_a_parquet_file_raises_data_error(tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("user_id,click\nu1,1\n")
    with pytest.raises(DataError, match=r"x\.parquet"):
        read_all(path, schema)


# --- structural problems -----------------------------------------------------------------------


def test_missing_csv_column_is_listed(ecom, write_csv: Callable[..., Path], schema: Schema) -> None:
    header = [c for c in HEADER if c not in ("ad_click", "price")]
    rows = [[v for c, v in zip(HEADER, r, strict=True) if c in header] for r in ecom.rows]
    path = write_csv("m.csv", rows, header=header)
    with pytest.raises(DataError, match=r"m.csv: missing column\(s\) \['price', 'ad_click'\]"):
        read_all(path, schema)


def test_missing_parquet_column_is_listed(ecom, tmp_path: Path, schema: Schema) -> None:
    path = rows_to_parquet(ecom.rows, tmp_path / "m.parquet")
    pq.write_table(pq.read_table(path).drop_columns(["conversion"]), path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['conversion'\]"):
        read_all(path, schema)


def test_duplicate_csv_column_raises(ecom, write_csv: Callable[..., Path], schema: Schema) -> None:
    path = write_csv("d.csv", [[*r, "x"] for r in ecom.rows], header=[*HEADER, "price"])
    with pytest.raises(DataError, match=r"duplicate column\(s\) \['price'\]"):
        read_all(path, schema)


def test_missing_file_raises(tmp_path: Path, schema: Schema) -> None:
    with pytest.raises(DataError, match="not found"):
        read_all(tmp_path / "nope.csv", schema)


def test_extra_columns_are_ignored(ecom, write_csv: Callable[..., Path], schema: Schema) -> None:
    path = write_csv("e.csv", [["junk", *r] for r in ecom.rows], header=["note", *HEADER])
    parts, log = read_all(path, schema)
    assert sum(p.n for p in parts) == len(ecom.rows) and log.rows == []


def test_gzipped_csv_reads_like_plain_csv(
    ecom, ecom_csv: Path, schema: Schema, tmp_path: Path
) -> None:
    gz = tmp_path / "ecom.csv.gz"
    gz.write_bytes(gzip.compress(ecom_csv.read_bytes()))
    plain, _ = read_all(ecom_csv, schema, chunk_rows=7)
    zipped, _ = read_all(gz, schema, chunk_rows=7)
    assert_encoded_equal(encode(zipped, schema), encode(plain, schema))
    np.testing.assert_array_equal(cat(zipped, "lines"), cat(plain, "lines"))


def test_gzipped_csv_bad_row_names_line(ecom, tmp_path: Path, schema: Schema) -> None:
    text = (
        ",".join(HEADER)
        + "\n"
        + "\n".join([",".join(ecom.rows[0]), BAD_CASES["label_not_binary"][0]])
        + "\n"
    )
    gz = tmp_path / "b.csv.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError, match=r"b.csv.gz: line 3, column 'click'"):
        read_all(gz, schema)


def test_csv_with_utf8_bom_header(ecom, tmp_path: Path, schema: Schema, ecom_csv: Path) -> None:
    """Spreadsheet exports start with a byte-order mark; it is not part of the first name."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ecom_csv.read_bytes())
    parts, _ = read_all(path, schema)
    assert strings(parts, "categorical", "user_id") == [r[0] for r in ecom.rows]


def test_numeric_fill_and_log1p(write_csv: Callable[..., Path]) -> None:
    s = Schema(
        (FeatureSpec("a", "numeric", fill=-0.5, transform="log1p"), FeatureSpec("b", "numeric")),
        (TaskSpec("click"),),
    )
    path = write_csv(
        "n.csv", [["0", "1", "1"], ["", "2", "0"], ["3", "", "1"]], header=["a", "b", "click"]
    )
    parts, log = read_all(path, s, policy="quarantine")
    # empty 'a' is filled (then log1p'd); empty 'b' has no fill: a bad row
    np.testing.assert_allclose(parts[0].numeric["a"], np.log1p([0.0, -0.5]))
    np.testing.assert_allclose(parts[0].numeric["b"], [1.0, 2.0])
    assert [(b.line, b.column) for b in log.rows] == [(4, "b")]
    assert log.rows[0].reason.startswith("missing value in a numeric feature")


# --- known bugs, documented (see the report) -------------------------------------------------


def test_line_numbers_after_a_blank_line(ecom, tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / "blank.csv"
    lines = [
        ",".join(HEADER),
        ",".join(ecom.rows[0]),
        "",
        ",".join(ecom.rows[1]),
        BAD_CASES["unknown_scenario"][0],
    ]
    path.write_text("\n".join(lines) + "\n")
    parts, log = read_all(path, schema, policy="quarantine")
    assert [b.line for b in log.rows] == [5]
    np.testing.assert_array_equal(cat(parts, "lines"), [2, 4])


def test_na_like_category_strings_are_kept(write_csv: Callable[..., Path]) -> None:
    s = Schema((FeatureSpec("country", "categorical"),), (TaskSpec("click"),))
    path = write_csv("na.csv", [["NA", "1"], ["null", "0"]], header=["country", "click"])
    parts, _ = read_all(path, s)
    assert strings(parts, "categorical", "country") == ["NA", "null"]


def test_masked_labels_are_zero(write_csv: Callable[..., Path], schema: Schema) -> None:
    rows = [["u1", "i1", "1", "", "home", "0", "1", "1"]]  # conversion and ad_click both masked
    parts, _ = read_all(write_csv("x.csv", rows), schema)
    np.testing.assert_array_equal(cat(parts, "mask"), [[True, False, False]])
    np.testing.assert_array_equal(cat(parts, "labels"), [[0, 0, 0]])


# --- the one reader: exact lines, raw records, encodings, numeric range ----------------------

SMALL = Schema(
    (FeatureSpec("user_id", "categorical"), FeatureSpec("note", "categorical"),
     FeatureSpec("price", "numeric")),
    (TaskSpec("click"),),
)


def _bytes_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def _physical_line(data: bytes, offset: int) -> int:
    """A reference independent of the scan: line breaks (\\n, \\r\\n, lone \\r) before
    ``offset``, plus one."""
    import re

    return len(re.findall(rb"\r\n|\r|\n", data[:offset])) + 1


TRICKY = (
    b"user_id,note,price,click\r\n"
    b"u1,plain,1.5,1\r\n"  # line 2
    b"\r\n"  # 3: blank
    b'u2,"two\r\nlines",2.5,0\r\n'  # 4-5: a quoted field with a CRLF inside
    b'u3,"a ""quoted"" word",3.5,1\n'  # 6: escaped quotes, LF ending
    b"u4,short\n"  # 7: too few columns
    b',,,\n'  # 8: delimiters only (a spreadsheet's empty row)
    b'u5,"x\ny\nz",cheap,1\n'  # 9-11: a non-numeric price after a two-newline field
    b'u6,12" screen,4.5,0\n'  # 12: a literal quote inside an unquoted field
    b"\n\n"  # 13, 14: blank
    b"u7,last,5.5,1"  # 15: no final line break
)


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz"])
@pytest.mark.parametrize("chunk_rows", [1, 2, 10_000])
def test_csv_rows_are_named_by_their_physical_line(tmp_path: Path, name: str,
                                                   chunk_rows: int) -> None:
    path = _bytes_file(tmp_path, name, TRICKY)
    parts, log = read_all(path, SMALL, chunk_rows=chunk_rows, policy="quarantine")
    assert cat(parts, "lines").tolist() == [2, 4, 6, 12, 15]
    assert strings(parts, "categorical", "user_id") == ["u1", "u2", "u3", "u6", "u7"]
    assert strings(parts, "categorical", "note") == [
        "plain", "two\r\nlines", 'a "quoted" word', '12" screen', "last"]
    # each good row's line is where its user id is written in the file
    for line, user in zip([2, 4, 6, 12, 15], ["u1", "u2", "u3", "u6", "u7"], strict=True):
        assert _physical_line(TRICKY, TRICKY.index(user.encode())) == line
    bad = sorted(log.rows, key=lambda b: b.line)
    assert [(b.line, b.column, b.reason.split(":")[0]) for b in bad] == [
        (7, "", "wrong column count"), (9, "price", "non-numeric value in a numeric feature")]
    # the quarantine keeps each bad record exactly as written, its inner line breaks too
    assert [b.raw for b in bad] == ["u4,short", 'u5,"x\ny\nz",cheap,1']
    # rows in = kept + bad; blank lines (and the delimiters-only row) counted apart
    assert log.seen == 7 and log.blank_lines == 4


def test_the_line_map_agrees_with_pyarrow_on_random_files(tmp_path: Path) -> None:
    """Seeded random files of quotes, escaped quotes, delimiters and every line break: the
    records the scan finds are pyarrow's rows (same count, same cells) and each starts on the
    physical line a regex count gives."""
    import io
    import random

    import pyarrow.csv as pacsv

    from shopmtl.data.csvlines import scan_records

    def parse(data: bytes) -> list[dict]:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=["a", "b", "c"]),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys("abc", pa.binary())),
        ).to_pylist()

    rng = random.Random(7)
    pieces = [b"a", b'"', b"\n", b"\r", b"\r\n", b'""', b'"q,\n"', b"7"]
    checked = 0
    while checked < 150:
        records = [b",".join(b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))
                             for _ in range(3)) for _ in range(rng.randint(1, 5))]
        data = rng.choice([b"\n", b"\r\n", b"\r"]).join(records) + rng.choice([b"", b"\n"])
        chunks = list(scan_records(io.BytesIO(data).read, ",", 2, block_bytes=rng.choice([3, 64])))
        found = [(c, i) for c in chunks for i in range(len(c))]
        if any(c.unterminated for c in chunks) or any(
                c.fields[i] != 3 and c.ends[i] > c.starts[i] for c, i in found):
            continue  # a malformed file: pyarrow refuses it whole
        rows = parse(data)
        assert len(rows) == len(found), data
        offset = 0
        for row, (c, i) in zip(rows, found, strict=True):
            if c.ends[i] > c.starts[i]:
                assert parse(c.data[c.starts[i]:c.ends[i]]) == [row], data
            assert c.lines[i] == _physical_line(data, offset + int(c.starts[i])), data
            if i == len(c) - 1:
                offset += len(c.data)
        checked += 1


def test_training_lines_after_a_multiline_field(tmp_path: Path, schema: Schema, ecom) -> None:
    """The rows after a quoted field holding line breaks keep their true lines in training's
    quarantine too (the reader numbered records, not lines, before)."""
    cells = [list(r) for r in ecom.rows[:4]]
    cells[1][1] = f'"{cells[1][1]}\nsecond line"'  # an item id over two lines
    rows = [",".join(r) for r in cells]
    bad = BAD_CASES["unknown_scenario"][0]
    path = tmp_path / "m.csv"
    path.write_text("\n".join([",".join(HEADER), *rows, bad]) + "\n")
    parts, log = read_all(path, schema, policy="quarantine")
    assert cat(parts, "lines").tolist() == [2, 3, 5, 6]
    assert [(b.line, b.reason) for b in log.rows] == [(7, "unknown scenario")]


def test_a_bad_byte_makes_only_its_row_bad(tmp_path: Path) -> None:
    data = (b"user_id,note,price,click\n"
            b"u1,fine,1.0,1\n"
            b"u2,caf\xe9 latin-1,2.0,0\n"  # line 3: not UTF-8
            b"u3,caf\xc3\xa9 utf-8,3.0,1\n")
    path = _bytes_file(tmp_path, "enc.csv", data)
    parts, log = read_all(path, SMALL, policy="quarantine")
    assert strings(parts, "categorical", "note") == ["fine", "café utf-8"]
    assert [(b.line, b.column, b.reason) for b in log.rows] == [(3, "note", "invalid UTF-8")]
    assert log.rows[0].raw == "u2,caf\ufffd latin-1,2.0,0"  # the record, leniently decoded
    with pytest.raises(DataError, match=r"enc.csv: line 3, column 'note': invalid UTF-8"):
        read_all(path, SMALL, policy="fail")


def test_a_bad_byte_in_an_unread_column_is_harmless(tmp_path: Path) -> None:
    data = b"user_id,note,price,click,comment\nu1,a,1.0,1,\xff\xfe\n"
    parts, log = read_all(_bytes_file(tmp_path, "x.csv", data), SMALL)
    assert sum(p.n for p in parts) == 1 and not log.rows


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
def test_numeric_overflow_is_a_bad_row_not_a_crash(tmp_path: Path, policy: str) -> None:
    """1e308 made the encoder's moments overflow (OverflowError in NumericEncoder.finish)."""
    rows = [["u1", "a", "1e308", "1"], ["u2", "b", "2.0", "0"], ["u3", "c", "-1e200", "1"],
            ["u4", "d", "3.0", "1"]]
    path = tmp_path / "o.csv"
    path.write_text("user_id,note,price,click\n" + "\n".join(",".join(r) for r in rows) + "\n")
    if policy == "fail":
        with pytest.raises(DataError, match=r"o.csv: line 2, column 'price': numeric value out "
                                            "of range"):
            read_all(path, SMALL, policy=policy)
        return
    parts, log = read_all(path, SMALL, policy=policy)
    assert [(b.line, b.reason) for b in log.rows] == [(2, "numeric value out of range"),
                                                      (4, "numeric value out of range")]
    enc = Encoders(SMALL)
    for p in parts:
        enc.partial_fit(p)
    enc.finish()  # finite moments now
    assert np.isfinite([enc.numeric["price"].mean_, enc.numeric["price"].std_]).all()


def test_values_the_fitted_encoder_cannot_standardise_are_bad(tmp_path: Path) -> None:
    """A held-out value far outside the training range overflows float32 once standardised:
    read with the fitted encoders' bounds it is a bad row (the training rows never are)."""
    train = tmp_path / "train.csv"
    train.write_text("user_id,note,price,click\nu1,a,1.0,1\nu2,b,2.0,0\nu3,c,3.0,1\n")
    parts, _ = read_all(train, SMALL)
    enc = Encoders(SMALL)
    for p in parts:
        enc.partial_fit(p)
    enc.finish()
    held = tmp_path / "held.csv"
    held.write_text("user_id,note,price,click\nu1,a,1e40,1\nu2,b,1e30,0\n")
    log = BadRowLog("quarantine", 1.0)
    kept = list(read_chunks(held, SMALL, 100, log, bounds=enc.numeric_bounds()))
    assert [(b.line, b.reason) for b in log.rows] == [(2, "numeric value out of range")]
    assert np.isfinite(enc.transform(kept[0]).num).all()
    again = BadRowLog("quarantine", 1.0)
    assert sum(p.n for p in read_chunks(train, SMALL, 100, again,
                                        bounds=enc.numeric_bounds())) == 3


def test_a_headerless_csv_names_the_missing_columns_only(tmp_path: Path, schema: Schema,
                                                         ecom) -> None:
    path = tmp_path / "nohead.csv"
    path.write_text("\n".join(",".join(r) for r in ecom.rows) + "\n")
    with pytest.raises(DataError) as info:
        read_all(path, schema)
    msg = str(info.value)
    assert msg.startswith("nohead.csv: missing column(s) ['user_id', 'item_id', 'price'")
    assert "line 1 must name the columns" in msg
    assert ecom.rows[0][0] not in msg and ecom.rows[0][2] not in msg  # no cell of line 1


def test_quoted_header_and_bom_and_text_cells(tmp_path: Path) -> None:
    """A spreadsheet export: BOM, quoted header names, ids with leading zeros, NA/null
    categories. Every cell is text; only an empty cell is missing."""
    data = ('\ufeff"user_id","note","price","click"\r\n'
            '"007",NA,1.0,1\r\n'
            '"0070",null,2.0,0\r\n'
            '"",,3.0,1\r\n').encode()
    parts, log = read_all(_bytes_file(tmp_path, "q.csv", data), SMALL)
    assert not log.rows
    assert strings(parts, "categorical", "user_id") == ["007", "0070", None]
    assert strings(parts, "categorical", "note") == ["NA", "null", None]


def test_an_unterminated_quote_is_one_bad_row(tmp_path: Path) -> None:
    data = b'user_id,note,price,click\nu1,a,1.0,1\nu2,"open,2.0,0\nu3,b,3.0,1\n'
    parts, log = read_all(_bytes_file(tmp_path, "u.csv", data), SMALL, policy="quarantine")
    assert cat(parts, "lines").tolist() == [2]
    assert [(b.line, b.reason) for b in log.rows] == [(3, "unterminated quoted field")]
    assert log.rows[0].raw == 'u2,"open,2.0,0\nu3,b,3.0,1\n'
    assert log.seen == 2


def test_tsv_gz_is_tab_separated(tmp_path: Path) -> None:
    data = b"user_id\tnote\tprice\tclick\nu1\ta,b\t1.0\t1\n"
    parts, _ = read_all(_bytes_file(tmp_path, "t.tsv.gz", data), SMALL)
    assert strings(parts, "categorical", "note") == ["a,b"]


def test_parquet_bad_rows_keep_the_row_as_json(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "note": ["a", None],
                             "price": [1.0, float("inf")], "click": [1, 0]}), path)
    _, log = read_all(path, SMALL, policy="quarantine")
    assert [(b.line, b.column) for b in log.rows] == [(2, "price")]
    assert json.loads(log.rows[0].raw) == {"user_id": "u2", "note": None, "price": None,
                                           "click": 0}


def test_in_memory_rows_are_read_by_the_same_reader() -> None:
    table = pa.table({"user_id": ["u1", "u2", "u3"], "note": ["a", "b", "c"],
                      "price": ["1.5", "cheap", "2"], "click": [1, 0, 1]})
    log = BadRowLog("quarantine", 1.0)
    parts = list(read_chunks(table, SMALL, 2, log, passthrough=["user_id"]))
    assert cat(parts, "lines").tolist() == [0, 2]  # in-memory rows are numbered from 0
    assert [b.describe() for b in log.rows] == [
        "rows: row 1, column 'price': non-numeric value in a numeric feature"]
    assert [v for p in parts for v in p.passthrough["user_id"].to_pylist()] == ["u1", "u3"]
