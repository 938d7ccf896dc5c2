"""Regenerate the model x weighting table of docs/MODELS.md (test AUC, mean ± std over seeds).

    .venv/bin/python bench/models_table.py            # the full table (~20 min on 2 cores)
    .venv/bin/python bench/models_table.py --quick --out /tmp/MODELS.md   # a tiny smoke version

Grid: every model with equal weighting, plus every weighting on SharedBottom (and on MMoE in the
synthetic world); ``cagrad`` and ``nash_mtl`` are left out (their torchjd extras, which bring
cvxpy, are not installed), and ``dwa`` where it would equal ``equal`` (fewer than 3 epochs).
Datasets: the default synthetic world (fewer rows), UCI Census-Income (examples/census.yaml)
and MovieLens ml-latest-small (examples/movielens.yaml), each with a smaller training budget
than its example config so that the whole grid fits. Models that cannot run on a dataset (ESMM
needs a ``given`` task) are listed as such. Runs go through ``shopmtl.compare.run_compare``
(data prepared once per dataset; single-task baselines; Delta_m).

Only the part of the output file between the two marker comments is replaced, so hand-written
sections around the table survive a regeneration.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from shopmtl.compare import Combination, model_args, model_problem, prepare_once, run_compare
from shopmtl.config import (
    DataConfig,
    EarlyStopping,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from shopmtl.data.schema import ALL
from shopmtl.data.sources import EXAMPLES
from shopmtl.run import QUICKSTART_MODEL

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- models-table:start -->", "<!-- models-table:end -->"

MODELS = ["shared_bottom", "mmoe", "ple", "esmm", "aitm", "star", "pepnet", "m2m"]
WEIGHTINGS = ["equal", "uncertainty", "gradnorm", "dwa", "rlw", "upgrad", "mgda", "pcgrad",
              "imtl_g", "aligned_mtl"]
NOT_RUN = {"cagrad": "needs `torchjd[cagrad]` (cvxpy), not installed",
           "nash_mtl": "needs `torchjd[nash-mtl]` (cvxpy), not installed"}
DATASETS = ["synthetic", "census_income_kdd", "movielens_latest_small"]


@dataclasses.dataclass(frozen=True)
class Budget:
    synthetic_rows: int
    epochs: dict[str, int]  # dataset -> training epochs
    seeds: int
    models: tuple[str, ...]
    weightings: tuple[str, ...]
    weighted_models: dict[str, tuple[str, ...]]  # dataset -> the models that get every weighting
    # train.prior_guard: the quick budget's one short epoch leaves weak tasks (synthetic
    # conversion) at chance by design, which the guard would turn into an error
    prior_guard: bool = True


FULL = Budget(100_000, {"synthetic": 2, "census_income_kdd": 3, "movielens_latest_small": 2}, 3,
              tuple(MODELS), tuple(WEIGHTINGS),
              {"synthetic": ("shared_bottom", "mmoe"), "census_income_kdd": ("shared_bottom",),
               "movielens_latest_small": ("shared_bottom",)})
QUICK = Budget(20_000, dict.fromkeys(DATASETS, 1), 2, ("shared_bottom", "mmoe"),
               ("equal", "uncertainty"), dict.fromkeys(DATASETS, ("shared_bottom",)),
               prior_guard=False)


def grid(b: Budget, dataset: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(model, weighting) pairs to run, and the weightings left out with the reason."""
    skipped = {}
    if b.epochs[dataset] < 3 and "dwa" in b.weightings:
        skipped["dwa"] = ("equal weighting by construction with fewer than 3 epochs (it starts "
                          "after two finished epochs).")
    out = [(m, "equal") for m in b.models]
    out += [(m, w) for m in b.weighted_models[dataset] for w in b.weightings
            if w != "equal" and w not in skipped]
    return out, skipped


def dataset_config(name: str, b: Budget, work: Path) -> ExperimentConfig:
    """Each dataset's config with the benchmark's budget (one thread: small models)."""
    if name == "synthetic":
        return ExperimentConfig(
            data=DataConfig(synthetic={"rows": b.synthetic_rows, "seed": 0}),
            model=ModelConfig("shared_bottom", dict(QUICKSTART_MODEL)),
            train=TrainConfig(epochs=b.epochs[name], batch_size=2048, lr=2e-3, threads=1,
                              embedding_weight_decay=1e-2, prior_guard=b.prior_guard,
                              early_stopping=EarlyStopping("valid.all_tasks.auc", "max", 2)))
    if name == "census_income_kdd":
        return load_config(EXAMPLES / "census.yaml", [
            f"train.epochs={b.epochs[name]}", "train.batch_size=512", "train.threads=1",
            f"train.prior_guard={str(b.prior_guard).lower()}"])
    if name == "movielens_latest_small":
        from shopmtl.data.sources import require_dataset
        from shopmtl.data.sources.movielens import prepare_movielens

        prepared = prepare_movielens(require_dataset(name), work / "movielens_data")
        return load_config(EXAMPLES / "movielens.yaml", [
            f"data.train={prepared}", f"train.epochs={b.epochs[name]}", "train.threads=1",
            f"train.prior_guard={str(b.prior_guard).lower()}"])
    raise ValueError(f"unknown dataset '{name}'; valid: {DATASETS}")


def run_dataset(name: str, b: Budget, work: Path, reuse: bool = True) -> dict[str, Any]:
    cfg = dataset_config(name, b, work)
    out = work / name
    prepared = prepare_once(cfg, out, log=lambda *_: None)
    cfg, data, _ = prepared
    pairs, skipped = grid(b, name)
    skipped.update({m: problem for m in dict.fromkeys(m for m, _ in pairs)
                    if (problem := model_problem(m, model_args(m, cfg), data))})
    combos = [Combination(m, w) for m, w in pairs if m not in skipped]
    result = run_compare(cfg, out, seeds=b.seeds, combinations=combos, prepared=prepared,
                         reuse=reuse, log=lambda line: print(f"[{name}] {line}", flush=True))
    return {**result, "skipped": skipped, "config": cfg}


# -- markdown ---------------------------------------------------------------------------------

def _pm(mean: float | None, std: float | None) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}"


def dataset_table(name: str, r: dict[str, Any], b: Budget) -> list[str]:
    cfg: ExperimentConfig = r["config"]
    tasks = r["tasks"]
    head = ["model", "weighting", *tasks, "Delta_m %", "s / run"]
    lines = [f"### {name}", "",
             f"{_describe(name, cfg)} Budget: {cfg.train.epochs} epoch(s), batch "
             f"{cfg.train.batch_size}, lr {cfg.train.lr}, early stopping on "
             f"`{cfg.train.early_stopping.metric}`; {len(r['seeds'])} seeds; test AUC of each "
             f"task on all its rows; {_train_minutes(r):.1f} min of training for this "
             "dataset (sum over its runs).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if r.get("oracle"):
        row = ["oracle (true probabilities)", "-"] + [
            f"{r['oracle'][t][ALL]:.4f}" for t in tasks] + ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    single = r["single_task"]
    if single:
        n = len(r["seeds"]) * len(tasks)
        row = [f"single-task ({single['model']}, one per task)", "-"] + [
            _pm(single["mean"][t][ALL], single["std"][t][ALL]) for t in tasks] + [
            "0", f"{single['seconds'] / n:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    for c in r["combinations"].values():
        cells = []
        for t in tasks:
            cell = _pm(c["mean"][t][ALL], c["std"][t][ALL])
            if (c.get("worse") or {}).get(t, {}).get(ALL):
                cell += " ▼"
            cells.append(cell)
        dm = c.get("delta_m") or {}
        dms = "-" if dm.get("value") is None else f"{dm['value']:+.2f} ± {dm['std']:.2f}"
        row = [c["model"], c["weighting"], *cells, dms,
               f"{c['seconds'] / len(r['seeds']):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    for m, why in r["skipped"].items():
        lines += ["", f"Not in this table: `{m}`: {why}"]
    return lines


def _train_minutes(r: dict[str, Any]) -> float:
    runs = [c["seconds"] for c in r["combinations"].values()]
    return (sum(runs) + (r["single_task"] or {}).get("seconds", 0.0)) / 60


def _describe(name: str, cfg: ExperimentConfig) -> str:
    if name == "synthetic":
        return (f"The default synthetic world with {cfg.data.synthetic['rows']:,} impressions "
                "(time split: 24 train / 3 valid / 3 test days).")
    if name == "census_income_kdd":
        return "`examples/census.yaml` (19,953 rows, seeded 80/10/10 split, scenario = sex)."
    return "`examples/movielens.yaml` (100,004 ratings, 80/10/10, scenario = genre group)."


def render(results: dict[str, dict[str, Any]], b: Budget, command: str, minutes: float,
           jobs: int, fresh: bool) -> str:
    lines = [START, "", "Regenerate (overwrites only this block; runs already in "
             "`runs/models_table` with the same config are reused, `--fresh` retrains):", "",
             "```bash", command, "```", "",
             f"Last regeneration: {minutes:.1f} min wall clock on this machine with "
             f"`--jobs {jobs}` (datasets in parallel, one thread each)"
             + (", `--fresh` (every run retrained)." if fresh else
                ", reusing the runs already in the work directory."), "",
             "Test AUC, mean ± sample std over seeds (training seed only; the data is fixed). "
             "Delta_m = 100 · mean over tasks of (AUC - single-task AUC) / single-task AUC, "
             "± its std over seeds. ▼: worse than single-task by more than "
             "sqrt(std² + std_single²). Models other than SharedBottom use "
             "`shopmtl.compare.ZOO_ARGS` with the config's embedding size and interaction. "
             "Not run: " + "; ".join(f"`{k}` ({v})" for k, v in NOT_RUN.items()) + ".", ""]
    for name, r in results.items():
        lines += [*dataset_table(name, r, b), ""]
    lines += [END]
    return "\n".join(lines)


def write(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (text or "# Models\n\n") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run_all(names: list[str], b: Budget, work: Path, jobs: int, reuse: bool
            ) -> dict[str, dict[str, Any]]:
    """Every dataset's comparison; with jobs > 1 the datasets run in parallel processes (one
    thread each), the synthetic world (the longest) first."""
    if jobs <= 1 or len(names) <= 1:
        return {n: run_dataset(n, b, work, reuse) for n in names}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started threads
    with ProcessPoolExecutor(min(jobs, len(names)), mp_context=ctx) as pool:
        futures = {n: pool.submit(run_dataset, n, b, work, reuse) for n in names}
        return {n: f.result() for n, f in futures.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny grid and data (smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "MODELS.md")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "models_table",
                   help="run directories (finished runs with the same config are reused)")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--jobs", type=int, default=2, help="datasets trained in parallel")
    p.add_argument("--fresh", action="store_true", help="retrain runs that are already in WORK")
    args = p.parse_args(argv)
    b = QUICK if args.quick else FULL
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    t0 = time.perf_counter()
    results = run_all(names, b, args.work, args.jobs, not args.fresh)
    minutes = (time.perf_counter() - t0) / 60
    cmd = [".venv/bin/python", "bench/models_table.py"] + (["--quick"] if args.quick else [])
    if args.datasets != ",".join(DATASETS):
        cmd += ["--datasets", args.datasets]
    write(args.out, render(results, b, shlex.join(cmd), minutes, args.jobs, args.fresh))
    print(f"wrote {args.out} ({minutes:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
