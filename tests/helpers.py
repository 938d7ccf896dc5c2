"""Shared test helpers: a small synthetic world on disk and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from shopmtl.config import to_dict
from shopmtl.data.synthetic import WorldConfig, default_schema, generate

SMALL_WORLD = dict(n_users=300, n_items=200, chunk_rows=20_000)


def small_world(out: Path, rows: int = 20_000, seed: int = 0, **kw) -> WorldConfig:
    cfg = WorldConfig(rows=rows, seed=seed, **{**SMALL_WORLD, **kw})
    generate(cfg, out)
    return cfg


def world_config_yaml(data_dir: Path, path: Path, **train) -> Path:
    """An experiment YAML over a generated world, the way a user would write it."""
    schema = default_schema()
    raw = {
        "data": {
            "schema": {
                k: v
                for k, v in to_dict(schema).items()
                if k in ("features", "tasks", "scenario", "group")
            },
            "train": str(data_dir / "train.parquet"),
            "valid": str(data_dir / "valid.parquet"),
            "test": str(data_dir / "test.parquet"),
        },
        "model": {"name": "shared_bottom", "args": {"bottom": [32], "tower": [16], "embed_dim": 8}},
        "train": {"epochs": 2, "batch_size": 256, "threads": 1, "log_every": 10, **train},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "shopmtl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"shopmtl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def content_world(out: Path, rows: int = 6_000, content: tuple[str, ...] = ("title", "image")):
    """A tiny synthetic world with item content features, prepared (encoded) in memory."""
    from shopmtl.config import DataConfig
    from shopmtl.data.pipeline import prepare_data
    from shopmtl.data.synthetic import content_schema

    cfg = small_world(out, rows=rows, n_users=100, n_items=60, cold_start_share=0.3)
    schema = content_schema(cfg, out / "items.parquet", content)
    data_cfg = DataConfig(train=str(out / "train.parquet"), valid=str(out / "valid.parquet"),
                          test=str(out / "test.parquet"))
    return prepare_data(data_cfg, schema)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str, code: int) -> str:
    """The run failed with exit ``code`` (2: a usage error, 1: a runtime error; no default,
    so every test says which it expects) and said so in exactly one line ``error: ...`` on
    stderr (nothing on stdout, no traceback) that holds every one of ``needles``."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not proc.stdout.strip(), proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
