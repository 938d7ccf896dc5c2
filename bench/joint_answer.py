"""What it costs to answer a joint model's tasks from raw requests, served by PyTorch.

The joint model is not exported yet (docs/DEPLOY.md): its service answers through
``shopmtl.load(dir).predict``, the path ``shopmtl predict --task`` and ``shopmtl serve`` share
(contract check, the source's ``encode``, the sentence encoder, the head, the answer). This
script measures that path per task on the model of ``examples/joint_tiny.yaml`` (trained into
``--run`` when absent, about a minute): the median milliseconds of one request and of a batch
of 32, once with texts the encoder has seen (their vectors come from the on-disk cache) and
once with new texts (MiniLM runs on CPU; the cost a first-seen utterance or query pays).

    .venv/bin/python bench/joint_answer.py --out bench/results/joint_answer.json

The tiny model's heads are small; the encoder and the Python around it dominate, so the
numbers hold for the full ``examples/joint.yaml`` model up to its heads' size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run_all import cpu_model, load_average  # noqa: E402

TEXT_FIELDS = {"intent": ("text",), "rating": ("title", "review"), "relevance": ("query",)}
TASKS = ("intent", "rating", "relevance", "demand_1d")


def ensure_run(run: Path) -> Path:
    model = run / "joint" / "model"
    if not (model / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "shopmtl", "train",
                        str(REPO / "examples" / "joint_tiny.yaml"), "--out", str(run),
                        "--overwrite"], check=True)
    return model


def fresh(request: dict[str, Any], task: str, salt: str) -> dict[str, Any]:
    """The request with its texts made new (a suffix no cache has seen)."""
    out = dict(request)
    for f in TEXT_FIELDS.get(task, ()):
        if out.get(f):
            out[f] = f"{out[f]} {salt}"
    return out


def median_ms(fn, repeats: int) -> float:
    fn()  # warm: the encoder is loaded, the cache opened
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure(model: Any, task: str, repeats: int) -> dict[str, float]:
    example = model.contract(task).example
    row: dict[str, float] = {}
    for n in (1, 32):
        batch = [example] * n
        row[f"cached_{n}"] = median_ms(lambda b=batch: model.predict(b, task=task), repeats)
        if task in TEXT_FIELDS:
            def new(n=n) -> None:
                salt = uuid.uuid4().hex[:8]
                model.predict([fresh(example, task, f"{salt}{i}") for i in range(n)],
                              task=task)
            row[f"new_{n}"] = median_ms(new, repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "bench-joint-tiny")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    import shopmtl

    torch.set_num_threads(1)
    model = shopmtl.load(ensure_run(args.run))
    load = [load_average()]
    rows = {t: measure(model, t, args.repeats) for t in TASKS}
    load.append(load_average())
    cols = ("cached_1", "cached_32", "new_1", "new_32")
    print("| task | " + " | ".join(f"{c.replace('_', ', batch ')} ms" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for t, r in rows.items():
        print(f"| {t} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols) + " |")
    result = {"env": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": 1,
                      "load_average": load, "torch": torch.__version__},
              "ms": rows, "repeats": args.repeats}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
