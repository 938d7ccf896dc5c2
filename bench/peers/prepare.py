"""Fixed seeded 80/10/10 splits of the two real datasets, written as files (what shopmtl reads,
through its own pipeline) and as encoded arrays (what the peers and the minimal reference read).

Runs in the project venv. The split is a numpy PCG64 permutation of the row ids (census:
``source_row``; MovieLens: the 0-based line of ratings.csv) with seed ``SPLIT_SEED``; the first
10% is test, the next 10% valid, the rest train, each kept in file order. Its checksum is the
sha256 of the sorted row ids of each split, one decimal id per line.

The encoded arrays come from shopmtl's encoders fit on the train split (ids by training
frequency, 0 = OOV or rare; numerics log1p'd where the example config says so, then
standardised), so every library sees the same ids and values. Schemas are those of
examples/census.yaml and examples/movielens.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
# the staged real datasets (SHOPMTL_BENCH_DATASETS overrides, e.g. on another machine)
DATASETS = Path(os.environ.get("SHOPMTL_BENCH_DATASETS", REPO.parent / "shared" / "datasets"))
SPLIT_SEED = 0
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1


def split_ids(n: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_valid = round(TEST_FRACTION * n), round(VALID_FRACTION * n)
    return {"test": np.sort(perm[:n_test]), "valid": np.sort(perm[n_test:n_test + n_valid]),
            "train": np.sort(perm[n_test + n_valid:])}


def checksum(ids: np.ndarray) -> str:
    return hashlib.sha256("\n".join(str(int(i)) for i in np.sort(ids)).encode()).hexdigest()


def schema_config(name: str) -> Any:
    from shopmtl.config import load_config

    return load_config(REPO / "examples" / f"{name}.yaml").data.schema


def _write_census(out: Path) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    src = DATASETS / "census_income_kdd" / "census_income_kdd_test_every5th.csv"
    header = src.open().readline().strip().split(",")
    table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=False))
    row_ids = np.asarray(table.column("source_row").to_pylist(), dtype=np.int64)
    parts = split_ids(table.num_rows)
    files = {}
    for split, pos in parts.items():
        files[split] = out / f"{split}.csv"
        pacsv.write_csv(table.take(pa.array(pos)), files[split],
                        pacsv.WriteOptions(quoting_style="needed"))
    return files, {s: row_ids[p] for s, p in parts.items()}


def _write_movielens(out: Path) -> tuple[dict[str, Path], dict[str, np.ndarray]]:
    from shopmtl.data.sources.movielens import prepare_movielens

    joined = pq.read_table(prepare_movielens(DATASETS / "movielens_latest_small", out / "raw"))
    parts = split_ids(joined.num_rows)  # row i of the joined file = line i of ratings.csv
    files = {}
    for split, pos in parts.items():
        files[split] = out / f"{split}.parquet"
        pq.write_table(joined.take(pa.array(pos)), files[split])
    return files, parts


def prepare(name: str, workdir: str | Path) -> dict[str, Any]:
    """Write ``workdir/name/{train,valid,test}.*``, ``arrays.npz`` and ``meta.json``."""
    from shopmtl.config import DataConfig
    from shopmtl.data.pipeline import prepare_data

    out = Path(workdir) / name
    out.mkdir(parents=True, exist_ok=True)
    files, ids = (_write_census if name == "census" else _write_movielens)(out)
    sc = schema_config(name)
    schema = sc.build()
    data = prepare_data(DataConfig(schema=sc, train=str(files["train"]),
                                   valid=str(files["valid"]), test=str(files["test"])), schema)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "valid", "test"):
        t = getattr(data, split)
        if len(t) != len(ids[split]):
            raise RuntimeError(f"{name}/{split}: shopmtl kept {len(t)} of {len(ids[split])} rows")
        if not bool(t.mask.all()):
            raise RuntimeError(f"{name}/{split}: a label is missing")
        arrays[f"{split}_cat"] = t.cat.numpy()
        arrays[f"{split}_scenario"] = t.scenario.numpy()
        arrays[f"{split}_num"] = t.num.numpy()
        arrays[f"{split}_seq"] = t.seq.numpy()
        arrays[f"{split}_labels"] = t.labels.numpy()
    np.savez(out / "arrays.npz", **arrays)
    cats = schema.of_kind("categorical")
    seqs = schema.of_kind("sequence")
    meta = {
        "dataset": name,
        "files": {s: str(p) for s, p in files.items()},
        "rows": {s: len(v) for s, v in ids.items()},
        "split_sha256": {s: checksum(v) for s, v in ids.items()},
        "split_seed": SPLIT_SEED,
        "tasks": list(schema.task_names),
        "cat": [f.name for f in cats],
        "cat_vocab": [data.encoders.vocab_size(f) for f in cats],
        "num": [f.name for f in schema.of_kind("numeric")],
        "seq": [f.name for f in seqs],
        "seq_vocab": [data.encoders.vocab_size(f) for f in seqs],
        "seq_len": [f.max_len for f in seqs],
        "scenario": schema.scenario.column if schema.scenario else None,
        "scenario_vocab": len(schema.scenario_names),
        "positives": {t: float(arrays["train_labels"][:, j].mean())
                      for j, t in enumerate(schema.task_names)},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def esmm_schema(sc: Any) -> Any:
    """MovieLens for ESMM: love (rating >= 4.5) is nested in like (>= 4), so it is declared
    ``given: like``; shopmtl's ESMM then trains pCTCVR = pCTR * pCVR on every row."""
    tasks = tuple(dataclasses.replace(t, given="like") if t.name == "love" else t
                  for t in sc.tasks)
    return dataclasses.replace(sc, tasks=tasks)


if __name__ == "__main__":
    import sys

    wd = sys.argv[1] if len(sys.argv) > 1 else "/tmp/shopmtl-bench"
    for ds in ("census", "movielens"):
        m = prepare(ds, wd)
        print(ds, m["rows"], {k: v[:12] for k, v in m["split_sha256"].items()})
