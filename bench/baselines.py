"""The simple baseline of every real-data source of the joint run, on its test split.

    .venv/bin/python bench/baselines.py [--datasets DIR] [--out bench/results/baselines.json]

Bitext: TF-IDF + logistic regression (intent, category). Reviews: TF-IDF + ridge (rating) and
+ logistic regression (recommend). Retail: the seasonal naive (same weekday last week; the last
week's sum), with a 0.1..0.9 interval from its training residuals. Each is scored by its
source's own ``metrics``, the function that scores the joint model, so the numbers compare.
Also prints a reference the brief did not ask for: the retail forecast "mean of the last 28
days" (read back from the ``mean_28`` feature), a stronger point forecast than the naive on
spiky daily demand. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from shopmtl.data.source import SPLITS, SourceData  # noqa: E402
from shopmtl.data.sources.bitext import BitextSource  # noqa: E402
from shopmtl.data.sources.retail import RetailDemandSource  # noqa: E402
from shopmtl.data.sources.reviews import ReviewsSource  # noqa: E402

RESULTS = REPO / "bench" / "results" / "baselines.json"


def mean_28_reference(src: RetailDemandSource, data: SourceData) -> dict[str, dict[str, float]]:
    """Point forecast: the mean scaled daily quantity of the last 28 days (x 6 for the week)."""
    names = data.meta["numeric"]
    k = names.index("mean_28")
    x = data.test.numeric[:, k].astype(np.float64)
    daily = np.expm1(x * data.meta["numeric_std"][k] + data.meta["numeric_mean"][k])
    return {"demand_1d": src.metrics(data, "test", "demand_1d", daily),
            "demand_7d": src.metrics(data, "test", "demand_7d", daily * data.meta["week"])}


def run(datasets: Path | None) -> dict[str, Any]:
    sources = {
        "bitext": BitextSource(datasets / "bitext_customer_support" if datasets else None),
        "reviews": ReviewsSource(datasets / "womens_ecommerce_reviews" if datasets else None),
        "retail": RetailDemandSource(datasets / "online_retail_uci" if datasets else None),
    }
    out: dict[str, Any] = {}
    for name, src in sources.items():
        t0 = time.perf_counter()
        data = src.load()
        t1 = time.perf_counter()
        metrics = src.baseline(data)
        t2 = time.perf_counter()
        out[name] = {"sizes": {s: len(data.split(s)) for s in SPLITS},
                     "tasks": {t.name: t.type for t in data.tasks},
                     "load_s": t1 - t0, "baseline_s": t2 - t1, "metrics": metrics}
        if isinstance(src, RetailDemandSource):
            t3 = time.perf_counter()
            ref = mean_28_reference(src, data)
            out["retail:mean_28"] = {"sizes": out[name]["sizes"], "tasks": out[name]["tasks"],
                                     "load_s": 0.0, "baseline_s": time.perf_counter() - t3,
                                     "metrics": ref}
    return out


def table(results: dict[str, Any]) -> str:
    lines = [f"{'source':<16} {'task':<10} {'metric':<12} {'value':>10} {'seconds':>8}"]
    for source, r in results.items():
        for task, metrics in r["metrics"].items():
            for metric, value in metrics.items():
                if metric == "n":
                    continue
                lines.append(f"{source:<16} {task:<10} {metric:<12} {value:>10.4f} "
                             f"{r['baseline_s']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=None,
                        help="folder holding the dataset folders (default: datasets_dir())")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = run(args.datasets)
    print(table(results))
    print("seconds: the baseline's fit and scoring (loads: "
          + ", ".join(f"{k} {v['load_s']:.2f}s" for k, v in results.items() if v["load_s"])
          + ")")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "results": results,
    }, indent=2, allow_nan=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
