from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shopmtl.data.dataset import Batch, StreamingSource, TensorTable
from shopmtl.data.encoders import Encoded, Encoders
from shopmtl.data.ingest import BadRowLog, read_chunks
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec

N = 23


def id_table(n: int = N) -> TensorTable:
    """Row r carries r in every field, so any batch can be traced back to its rows."""
    r = np.arange(n)
    return TensorTable(
        Encoded(
            cat=np.stack([r, r * 10], 1).astype(np.int64),
            num=(r[:, None] + 0.5).astype(np.float32),
            seq=np.repeat(r[:, None, None], 2, axis=2).astype(np.int64),
            scenario=(r % 3).astype(np.int64),
            labels=np.stack([r % 2, (r + 1) % 2], 1).astype(np.float32),
            mask=np.stack([np.ones(n, bool), r % 4 == 0], 1),
            oracle=(r[:, None] / n).astype(np.float32),
            group=r.astype(np.int64),
        )
    )


def row_ids(batches: list[Batch]) -> list[int]:
    return [int(v) for b in batches for v in b.cat[:, 0]]


def assert_rows_consistent(b: Batch) -> None:
    r = b.cat[:, 0]
    assert torch.equal(b.cat[:, 1], r * 10)
    assert torch.equal(b.num[:, 0], r.float() + 0.5)
    assert torch.equal(b.seq[:, 0, 1], r)
    assert torch.equal(b.scenario, r % 3)
    assert torch.equal(b.labels[:, 0], (r % 2).float())
    assert torch.equal(b.mask[:, 1], r % 4 == 0)
    assert b.group is not None and torch.equal(b.group, r)
    assert b.oracle is not None


# --- TensorTable --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5, 23, 64])
def test_every_row_exactly_once_per_epoch(batch_size: int, seed: int) -> None:
    t = id_table()
    for epoch in range(3):
        batches = list(t.batches(batch_size, epoch=epoch, seed=seed))
        assert len(batches) == t.num_batches(batch_size) == -(-N // batch_size)
        assert sorted(row_ids(batches)) == list(range(N))
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        for b in batches:
            assert_rows_consistent(b)


def test_order_is_a_function_of_seed_and_epoch(seed: int) -> None:
    t = id_table()
    first = row_ids(list(t.batches(5, epoch=1, seed=seed)))
    torch.manual_seed(999)  # the global RNG plays no part
    assert row_ids(list(t.batches(5, epoch=1, seed=seed))) == first
    assert row_ids(list(id_table().batches(5, epoch=1, seed=seed))) == first
    assert row_ids(list(t.batches(5, epoch=2, seed=seed))) != first
    assert row_ids(list(t.batches(5, epoch=1, seed=seed + 1))) != first
    assert first != list(range(N))  # actually shuffled


def test_unshuffled_batches_are_in_file_order() -> None:
    t = id_table()
    batches = list(t.batches(5, epoch=3, seed=7, shuffle=False))
    assert row_ids(batches) == list(range(N))
    for b in batches:
        assert_rows_consistent(b)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("skip", [0, 1, 3, 5, 9])
def test_skip_yields_the_suffix(skip: int, shuffle: bool) -> None:
    t = id_table()
    full = list(t.batches(5, epoch=2, seed=3, shuffle=shuffle))
    rest = list(t.batches(5, epoch=2, seed=3, shuffle=shuffle, skip=skip))
    assert len(rest) == max(0, len(full) - skip)
    assert [row_ids([b]) for b in rest] == [row_ids([b]) for b in full[skip:]]


def test_split_is_a_seeded_partition() -> None:
    t = id_table(100)
    rest, held = t.split(0.2, seed=5)
    assert len(held) == 20 and len(rest) == 80
    ids_rest, ids_held = rest.group.tolist(), held.group.tolist()
    assert sorted(ids_rest + ids_held) == list(range(100))
    assert ids_rest == sorted(ids_rest)  # kept in file order
    again = t.split(0.2, seed=5)[1].group.tolist()
    assert again == ids_held
    assert t.split(0.2, seed=6)[1].group.tolist() != ids_held
    for b in held.batches(7, seed=1):
        assert_rows_consistent(b)


# --- StreamingSource over Parquet ---------------------------------------------------------------

STREAM_ROWS = 53


def stream_schema() -> Schema:
    return Schema(
        features=(
            FeatureSpec("row_id", "categorical"),
            FeatureSpec("price", "numeric"),
            FeatureSpec("hist", "sequence", vocab_from="row_id", max_len=2),
        ),
        tasks=(TaskSpec("click"), TaskSpec("ad_click", scenarios=("ad",))),
        scenario=ScenarioSpec("scenario", ("home", "ad")),
    )


@pytest.fixture
def stream_file(tmp_path: Path) -> Path:
    r = np.arange(STREAM_ROWS)
    path = tmp_path / "stream.parquet"
    pq.write_table(
        pa.table(
            {
                "row_id": [f"r{i}" for i in r],
                "price": r.astype(float),
                "hist": [f"r{max(i - 1, 0)}|r{i}" for i in r],
                "scenario": ["ad" if i % 3 == 0 else "home" for i in r],
                "click": (r % 2).astype(np.int64),
                "ad_click": pa.array([int(i % 5 == 0) if i % 3 == 0 else None for i in r]),
            }
        ),
        path,
        row_group_size=10,
    )
    return path


def make_stream(path: Path, chunk_rows: int = 6, buffer_chunks: int = 2) -> StreamingSource:
    s = stream_schema()
    enc = Encoders(s)
    rows = 0
    for p in read_chunks(path, s, chunk_rows, BadRowLog("fail", 0.0)):
        enc.partial_fit(p)
        rows += p.n
    src = StreamingSource(path, s, enc.finish(), chunk_rows, buffer_chunks)
    src.rows = rows
    return src


def source_rows(src: StreamingSource, batches: list[Batch]) -> list[int]:
    """Batch rows -> the row numbers written in the file (via the row_id vocabulary)."""
    vocab = src.encoders.categorical["row_id"].vocabulary_
    return [int(vocab[int(i) - 1][1:]) for i in row_ids(batches)]


@pytest.mark.parametrize(
    ("chunk_rows", "buffer_chunks", "batch_size"),
    [(6, 2, 4), (7, 1, 5), (100, 4, 8), (3, 3, 53), (6, 2, 100)],
)
def test_stream_yields_every_row_once_per_epoch(
    stream_file: Path, chunk_rows: int, buffer_chunks: int, batch_size: int
) -> None:
    src = make_stream(stream_file, chunk_rows, buffer_chunks)
    assert src.rows == STREAM_ROWS
    for epoch in range(2):
        batches = list(src.batches(batch_size, epoch=epoch, seed=11))
        assert len(batches) == src.num_batches(batch_size)
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        rows = source_rows(src, batches)
        assert sorted(rows) == list(range(STREAM_ROWS))
        labels = torch.cat([b.labels for b in batches])
        mask = torch.cat([b.mask for b in batches])
        assert labels[:, 0].sum().item() == STREAM_ROWS // 2  # clicks on odd rows
        assert mask[:, 1].sum().item() == len(range(0, STREAM_ROWS, 3))
        # row-aligned: each row's fields belong together
        r = torch.tensor(rows)
        assert torch.equal(labels[:, 0], (r % 2).float())
        assert torch.equal(torch.cat([b.scenario for b in batches]), (r % 3 == 0).long())
        price = src.encoders.numeric["price"]
        num = torch.cat([b.num for b in batches])[:, 0].double()
        np.testing.assert_allclose(num * price.std_ + price.mean_, r.double(), atol=1e-4)


def test_stream_order_is_deterministic_for_a_seed(stream_file: Path) -> None:
    src = make_stream(stream_file)
    first = source_rows(src, list(src.batches(4, epoch=0, seed=5)))
    torch.manual_seed(12345)
    assert source_rows(src, list(src.batches(4, epoch=0, seed=5))) == first
    fresh = make_stream(stream_file)
    assert source_rows(fresh, list(fresh.batches(4, epoch=0, seed=5))) == first
    assert source_rows(src, list(src.batches(4, epoch=1, seed=5))) != first
    assert source_rows(src, list(src.batches(4, epoch=0, seed=6))) != first
    assert first != list(range(STREAM_ROWS))


def test_stream_unshuffled_is_file_order(stream_file: Path) -> None:
    src = make_stream(stream_file)
    assert source_rows(src, list(src.batches(4, shuffle=False))) == list(range(STREAM_ROWS))


@pytest.mark.parametrize("skip", [0, 1, 4, 13, 14])
def test_stream_skip_yields_the_suffix(stream_file: Path, skip: int) -> None:
    src = make_stream(stream_file)
    full = list(src.batches(4, epoch=1, seed=2))
    rest = list(src.batches(4, epoch=1, seed=2, skip=skip))
    assert [source_rows(src, [b]) for b in rest] == [source_rows(src, [b]) for b in full[skip:]]


def test_stream_quietly_drops_bad_rows(tmp_path: Path, stream_file: Path) -> None:
    table = pq.read_table(stream_file)
    clicks = table.column("click").to_pylist()
    clicks[7] = None  # a missing required label: a bad row
    table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(clicks))
    path = tmp_path / "with_bad.parquet"
    pq.write_table(table, path)
    s = stream_schema()
    log = BadRowLog("quarantine", 1.0)
    enc = Encoders(s)
    for p in read_chunks(path, s, 6, log):
        enc.partial_fit(p)
    src = StreamingSource(path, s, enc.finish(), 6, 2)
    src.rows = STREAM_ROWS - 1
    assert [b.line for b in log.rows] == [8]
    batches = list(src.batches(4, seed=0))
    assert len(batches) == src.num_batches(4)
    assert sorted(source_rows(src, batches)) == [i for i in range(STREAM_ROWS) if i != 7]


def test_stream_tables_are_the_file_in_order_and_labels_only_drops_the_features(
    stream_file: Path,
) -> None:
    from shopmtl.data.dataset import concat_tables, labels_only

    src = make_stream(stream_file, chunk_rows=6)
    chunks = list(src.tables())
    # at most chunk_rows each (a chunk never spans two of the file's 10-row row groups)
    assert [len(c) for c in chunks] == [6, 4] * (STREAM_ROWS // 10) + [3]
    whole = concat_tables(chunks)
    (ordered,) = list(src.batches(STREAM_ROWS, shuffle=False))
    assert torch.equal(whole.cat, ordered.cat) and torch.equal(whole.labels, ordered.labels)
    kept = concat_tables([labels_only(c) for c in chunks])
    assert kept.cat.shape == (STREAM_ROWS, 0) and kept.num.shape == (STREAM_ROWS, 0)
    assert kept.seq.shape[:2] == (STREAM_ROWS, 0)
    for name in ("labels", "mask", "scenario", "group", "slices"):
        assert torch.equal(getattr(kept, name), getattr(whole, name))
