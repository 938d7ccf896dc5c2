"""``shopmtl export --prune-ids F``: the embedding rows of the rarest ids dropped.

One small SharedBottom (a 20,000-row synthetic world, one epoch; its ``brand`` hashed into 16
buckets) is exported by the CLI with half of every learnt vocabulary dropped, and once as it is
in process. The tests check the report and the shortened encoders.json against the source's
vocabularies, the file size, that the graph is the pruned model on rows encoded with the
shortened encoders (recomputed here), that a dropped value scores exactly as a value never
seen, that the unpruned AUC is the source's, and the refusals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shopmtl
from shopmtl.config import ConfigError
from shopmtl.export.bundle import export_bundle, held_out_rows, load_source, variant
from shopmtl.export.checks import FP32_TOLERANCE
from shopmtl.export.prune import n_params
from shopmtl.predict import predict_in_memory
from tests.export.world import trained_zoo
from tests.helpers import assert_one_error_line, cli

TASKS = ("click", "conversion", "ad_click")
HASHED = "brand"
LEARNT = ("user_id", "item_id", "segment", "age_bucket", "gender", "top_category",
          "leaf_category", "position")


@dataclass
class Pruned:
    model: Path  # the zoo model directory
    test: Path  # its held-out rows (--data)
    full: Path  # exported as it is
    bundle: Path  # exported with --prune-ids 0.5
    printed: str


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Pruned:
    root = tmp_path_factory.mktemp("prune_ids")

    def hashed(raw: dict) -> None:
        for f in raw["data"]["schema"]["features"]:
            if f["name"] == HASHED:
                f.update(vocab="hash", buckets=16)

    model, test = trained_zoo(root, hashed), root / "w" / "test.parquet"
    export_bundle(model, root / "full", test)
    proc = cli("export", str(model), "--out", str(root / "ids"), "--data", str(test),
               "--prune-ids", "0.5", check=True)
    return Pruned(model, test, root / "full", root / "ids", proc.stdout)


def read(bundle: Path, name: str) -> dict:
    return json.loads((bundle / f"{name}.json").read_text())


def max_diff(a: pa.Table, b: pa.Table) -> float:
    return max(float(np.abs(a.column(t).to_numpy() - b.column(t).to_numpy()).max())
               for t in TASKS)


def test_half_of_each_learnt_vocabulary_is_dropped(pruned: Pruned) -> None:
    report = read(pruned.bundle, "meta")["id_pruning"]
    source = read(pruned.model, "encoders")["categorical"]
    short = read(pruned.bundle, "encoders")["categorical"]
    assert report["fraction"] == 0.5 and "rarest" in report["criterion"]
    rows_after = 16 + 1  # brand: its 16 buckets and the OOV row, kept whole
    for name in LEARNT:
        n = len(source[name]["vocabulary"])
        kept = n - n // 2 if n > 1 else 1
        assert report["vocabularies"][name] == {"ids_before": n, "ids_after": kept} | (
            {"kept_whole": "too few ids to drop one"} if kept == n else {})
        # the most frequent values, in the stored order: the rarest tail is gone
        assert short[name]["vocabulary"] == source[name]["vocabulary"][:kept]
        rows_after += kept + 1
    assert "hashed" in report["vocabularies"][HASHED]["kept_whole"]
    assert short[HASHED] == source[HASHED] and "vocabulary" not in short[HASHED]
    assert report["embedding_rows"]["after"] == rows_after
    assert report["embedding_rows"]["before"] > rows_after + 200  # users and items halved
    dim = 8  # world_config_yaml's embed_dim
    p = report["params"]
    assert p["before"] - p["after"] == dim * (report["embedding_rows"]["before"] - rows_after)
    assert p["before"] == n_params(shopmtl.load(pruned.model).model)
    assert "pruned ids 0.5: embedding rows" in pruned.printed
    assert "pytorch_fp32_pruned" in pruned.printed


def test_the_file_is_smaller(pruned: Pruned) -> None:
    report = read(pruned.bundle, "meta")["id_pruning"]
    full = (pruned.full / "model.onnx").stat().st_size
    small = (pruned.bundle / "model.onnx").stat().st_size
    saved = 4 * 8 * (report["embedding_rows"]["before"] - report["embedding_rows"]["after"])
    assert full - small == pytest.approx(saved, rel=0.05)


def test_the_graph_is_the_pruned_model_on_the_shortened_encoding(pruned: Pruned) -> None:
    checks = read(pruned.bundle, "meta")["checks"]
    assert 0 <= checks["parity_fp32"]["max"] <= FP32_TOLERANCE
    source = load_source(pruned.model)
    before = n_params(source.model)
    v = variant(source, held_out_rows(source, pruned.test), prune_ids_fraction=0.5)
    assert n_params(source.model) == before  # a copy was pruned, not the source
    bundle = shopmtl.load(pruned.bundle)
    rows = pq.read_table(pruned.test)
    got = bundle.predict(rows)
    twin = predict_in_memory(v.model, bundle.schema, bundle.encoders, rows, None, "fail", ())
    assert max_diff(got, twin) <= FP32_TOLERANCE
    # the rows the export measured on are what the shortened encoders read
    short = held_out_rows(bundle, pruned.test)
    assert np.array_equal(short.cat, v.enc.cat) and np.array_equal(short.seq, v.enc.seq)
    assert (v.enc.cat == 0).sum() > (v.unpruned_enc.cat == 0).sum()
    # the unpruned AUC beside is the source's own on --data; the pruned one the bundle's
    quality = checks["quality"]
    full = read(pruned.full, "meta")["checks"]["quality"]
    for t in TASKS:
        assert quality["pytorch_fp32_unpruned"][t]["auc"] == pytest.approx(
            full["pytorch_fp32"][t]["auc"])
        assert quality["onnx_fp32"][t]["auc"] == pytest.approx(quality["pytorch_fp32"][t]["auc"],
                                                               abs=1e-4)


def test_a_dropped_id_scores_as_an_unknown_one(pruned: Pruned) -> None:
    vocab = read(pruned.model, "encoders")["categorical"]["user_id"]["vocabulary"]
    kept = read(pruned.bundle, "meta")["id_pruning"]["vocabularies"]["user_id"]["ids_after"]
    rows = pq.read_table(pruned.test).slice(0, 50)
    col = rows.schema.get_field_index("user_id")

    def as_user(value: str) -> pa.Table:  # the vocabulary holds the ids as strings
        values = pa.array([int(value)] * len(rows), rows.column(col).type)
        return rows.set_column(col, "user_id", values)

    bundle, full = shopmtl.load(pruned.bundle), shopmtl.load(pruned.full)
    dropped, unknown, known = vocab[-1], "987654321", vocab[kept - 1]
    assert unknown not in vocab
    assert max_diff(bundle.predict(as_user(dropped)), bundle.predict(as_user(unknown))) == 0.0
    # while it still had its own row, that id did not score as unknown, and a kept one does not
    assert max_diff(full.predict(as_user(dropped)), full.predict(as_user(unknown))) > 1e-6
    assert max_diff(bundle.predict(as_user(known)), bundle.predict(as_user(unknown))) > 1e-6


def test_it_combines_with_units_fine_tune_int8_and_a_scenario(pruned: Pruned, tmp_path: Path
                                                              ) -> None:
    """``--prune-ids`` with ``--prune``, ``--finetune`` and ``--int8`` in one export, and with
    ``--scenario``: each bundle records every part, passes the fp32 parity check and scores
    raw rows; the scenario's sub-bundle answers as the id-pruned full bundle on its rows."""
    import pyarrow.compute as pc

    from shopmtl.export.finetune import FineTune

    train = pruned.test.parent / "train.parquet"
    every = export_bundle(pruned.model, tmp_path / "every", pruned.test, int8=True,
                          prune_ratio=0.5, fine=FineTune(train, 1), prune_ids_fraction=0.5)
    assert "finetune" in every["pruning"] and every["id_pruning"]["fraction"] == 0.5
    assert every["checks"]["parity_fp32"]["max"] <= FP32_TOLERANCE
    rows = pq.read_table(pruned.test).slice(0, 2_000)
    got = shopmtl.load(tmp_path / "every").predict(rows)
    for t in TASKS:
        p = got.column(t).to_numpy()
        assert len(p) == rows.num_rows and np.all((p >= 0) & (p <= 1))
    # the test split has under 1,000 rows of any scenario: the training rows are the
    # scenario export's checked rows (its parity and size are what this test reads)
    counts = pc.value_counts(pq.read_table(train, columns=["scenario"]).column(0))
    biggest = max(counts.to_pylist(), key=lambda c: c["counts"])["values"]
    sub = export_bundle(pruned.model, tmp_path / "sub", train, scenario=biggest,
                        prune_ids_fraction=0.5)
    assert sub["scenario"]["name"] == biggest and sub["id_pruning"]["fraction"] == 0.5
    assert sub["checks"]["parity_fp32"]["max"] <= FP32_TOLERANCE
    home = rows.filter(pc.equal(rows.column("scenario"), biggest))
    one, full = shopmtl.load(tmp_path / "sub"), shopmtl.load(pruned.bundle)
    a, b = one.predict(home), full.predict(home)
    assert home.num_rows > 100 and one.tasks
    assert max(float(np.abs(a.column(t).to_numpy() - b.column(t).to_numpy()).max())
               for t in one.tasks) <= FP32_TOLERANCE


@pytest.mark.parametrize("value", ["0", "1"])
def test_a_fraction_out_of_range_is_one_line(pruned: Pruned, tmp_path: Path, value: str
                                             ) -> None:
    proc = cli("export", str(pruned.model), "--out", str(tmp_path / "b"), "--data",
               str(pruned.test), "--prune-ids", value)
    assert_one_error_line(proc, f"--prune-ids {value}", "strictly between 0 and 1", code=2)
    assert not (tmp_path / "b").exists()


def test_a_negative_fraction_is_refused_before_any_work(pruned: Pruned, tmp_path: Path
                                                        ) -> None:
    with pytest.raises(ConfigError, match=r"--prune-ids -0.5: .* strictly between 0 and 1"):
        export_bundle(pruned.model, tmp_path / "b", tmp_path / "missing.parquet",
                      prune_ids_fraction=-0.5)
