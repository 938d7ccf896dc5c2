"""Model x weighting comparisons against single-task baselines, over several training seeds.

``run_compare`` prepares the data once (a synthetic world is generated once: only the training
seed changes), then for every seed trains one single-task model per task (the config's model,
one task each, equal weighting) and every requested multi-task (model, weighting) combination
with the same training budget (``train``: epochs, batch size, lr, early stopping). It writes
``compare.json`` (every per-seed test AUC and the summaries below), ``compare.md`` and
``compare.png``.

Summaries, per task x scenario (``all`` = every row where the task exists):

* mean and sample standard deviation (ddof=1; 0 for one seed) of the test AUC over seeds;
* delta = mean(multi-task) - mean(single-task), and its spread
  ``delta_std = sqrt(std_multi^2 + std_single^2)`` (runs of different models are independent);
* ``worse``: delta < -delta_std, i.e. the task is worse than single-task by more than one std
  (null with a single seed);
* Delta_m (Maninis et al. 2019; Vandenhende et al. 2021), per combination, in %:
  ``100 * mean_i (M_i - S_i) / S_i`` over tasks i, with M_i, S_i the seed means of the test AUC
  on the task's ``all`` scope (higher is better, so no sign flip). ``per_seed`` pairs the runs of
  one seed; ``std`` is the spread of those.

Model arguments: the config's own model keeps ``model.args``; any other model gets
``ZOO_ARGS[name]`` (small, roughly matched widths) plus the config's ``COMMON_ARGS`` (embedding
size, interaction, dropout), then ``model_sets`` (``name.key=value``) on top. The arguments used
are recorded per combination.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shopmtl.config import (
    ConfigError,
    ExperimentConfig,
    SchemaConfig,
    WeightingConfig,
    apply_overrides,
    dump_config,
    to_dict,
)
from shopmtl.data.dataset import TensorTable
from shopmtl.data.pipeline import PreparedData, prepare_data
from shopmtl.data.schema import ALL
from shopmtl.deps import installed, note_skipped
from shopmtl.report import agg_figure

# task -> scenario -> value
Cells = dict[str, dict[str, float]]

COMMON_ARGS = ("embed_dim", "interaction", "cross_layers", "dropout")

# widths for a fair, CPU-friendly zoo: one hidden layer of 128 (or 4 experts / 2+1 experts of
# 64) under 32-wide towers, the quickstart's SharedBottom size
ZOO_ARGS: dict[str, dict[str, Any]] = {
    "shared_bottom": {"bottom": [128], "tower": [32]},
    "mmoe": {"n_experts": 4, "expert": [64], "tower": [32]},
    "ple": {"levels": 2, "specific_experts": 1, "shared_experts": 2, "expert": [64],
            "tower": [32]},
    "esmm": {"tower": [128, 32]},
    "aitm": {"tower": [128, 32], "head": [32]},
    "star": {"star": [128], "tower": [32], "aux": [32]},
    "pepnet": {"tower": [128, 32], "gate_hidden": 64},
    "m2m": {"n_experts": 4, "expert": [64], "scenario_dim": 16, "task_dim": 16,
            "attention_dim": 32, "meta_layers": 2},
}


@dataclass(frozen=True)
class Combination:
    model: str
    weighting: str

    @property
    def name(self) -> str:
        return f"{self.model}+{self.weighting}"


def parse_names(text: str | None, default: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (``default`` when empty), order kept, duplicates dropped."""
    names = [n.strip() for n in (text or default).split(",") if n.strip()]
    return list(dict.fromkeys(names))


def parse_model_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["star.tower=[64]"]`` -> ``{"star": {"tower": [64]}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key = item.split("=", 1)[0]
        if "." not in key:
            raise ConfigError(f"--model-set '{item}' is not of the form model.key=value")
        out = apply_overrides(out, [item])
    return out


def model_args(name: str, cfg: ExperimentConfig,
               model_sets: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The arguments model ``name`` runs with in a comparison (see the module docstring)."""
    if name == cfg.model.name:
        args = dict(cfg.model.args)
    else:
        args = dict(ZOO_ARGS.get(name, {}))
        args.update({k: v for k, v in cfg.model.args.items() if k in COMMON_ARGS})
    args.update((model_sets or {}).get(name, {}))
    return args


def combination_config(cfg: ExperimentConfig, combo: Combination, seed: int,
                       model_sets: dict[str, dict[str, Any]] | None = None) -> ExperimentConfig:
    """The config's data and training budget with another model, weighting and seed."""
    wargs = dict(cfg.weighting.args) if combo.weighting == cfg.weighting.name else {}
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=combo.model,
                                  args=model_args(combo.model, cfg, model_sets)),
        weighting=WeightingConfig(combo.weighting, wargs),
        train=dataclasses.replace(cfg.train, seed=seed),
    )


def single_task_config(cfg: ExperimentConfig, sub: PreparedData, task: str, seed: int,
                       model_sets: dict[str, dict[str, Any]] | None = None) -> ExperimentConfig:
    """As ``run_experiment``'s baselines: the config's model on one task, equal weighting."""
    from shopmtl.run import _single_es

    s = sub.schema
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, args=model_args(cfg.model.name, cfg, model_sets)),
        data=dataclasses.replace(cfg.data, schema=SchemaConfig(s.features, s.tasks, s.scenario,
                                                               s.group)),
        weighting=WeightingConfig(),
        train=dataclasses.replace(cfg.train, seed=seed, alpha={},
                                  early_stopping=_single_es(cfg, task)),
    )


def model_problem(name: str, args: dict[str, Any], data: PreparedData) -> str | None:
    """Why model ``name`` cannot be built on this data (e.g. ESMM without a ``given`` task)."""
    from shopmtl.registry import build_model

    try:
        build_model(name, args, data.schema, data.vocab_sizes)
    except (ConfigError, ValueError) as e:
        return str(e)
    return None


def check_combinations(cfg: ExperimentConfig, data: PreparedData, combos: list[Combination],
                       model_sets: dict[str, dict[str, Any]] | None = None) -> None:
    """Fail before any training when a model or weighting cannot run (a clear ConfigError)."""
    from shopmtl.weighting import MissingDependencyError, build_weighting

    for m in dict.fromkeys(c.model for c in combos):
        problem = model_problem(m, model_args(m, cfg, model_sets), data)
        if problem:
            raise ConfigError(f"model '{m}': {problem}")
    for w in dict.fromkeys(c.weighting for c in combos):
        wargs = dict(cfg.weighting.args) if w == cfg.weighting.name else {}
        try:
            build_weighting(w, wargs, data.schema.task_names)
        except MissingDependencyError as e:
            raise ConfigError(f"weighting '{w}': {e}") from None


def train_and_score(cfg: ExperimentConfig, data: PreparedData, run_dir: Path,
                    progress: bool = False, reuse: bool = True,
                    keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train one run and return its test ``auc`` and ``oracle_auc`` per task x scenario.

    ``run_dir/scores.json`` caches the result; it is reused when the run's config and the data
    files (size, mtime) are unchanged (an interrupted comparison resumes where it stopped).
    """
    from shopmtl.jsonsafe import json_safe
    from shopmtl.train.evaluate import metrics_by_scenario, predict_split
    from shopmtl.train.trainer import train_model

    cache = run_dir / "scores.json"
    key = json_safe(to_dict(cfg))
    files = data_fingerprint(cfg)
    if reuse and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("config") == key and saved.get("data_files") == files:
            return saved
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    model, state = train_model(cfg, data, run_dir, progress=progress, tensorboard=False)
    table = data.test if data.test is not None else data.valid
    preds, scored = predict_split(model, table)
    metrics = metrics_by_scenario(data.schema, scored, preds)
    scores = {
        "config": key,
        "data_files": files,
        "auc": {t: {s: m.get("auc", math.nan) for s, m in per.items()}
                for t, per in metrics.items()},
        "oracle_auc": {t: {s: m["oracle_auc"] for s, m in per.items() if "oracle_auc" in m}
                       for t, per in metrics.items()},
        "best_epoch": state.best_epoch,
        "seconds": time.perf_counter() - t0,
    }
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    scores = json_safe(scores)
    cache.write_text(json.dumps(scores, indent=1))
    return scores


def data_fingerprint(cfg: ExperimentConfig) -> dict[str, list[int] | None]:
    """Size and modification time of each data file: a regenerated world or an edited file
    invalidates cached runs even when the config reads the same."""
    out: dict[str, list[int] | None] = {}
    for p in (cfg.data.train, cfg.data.valid, cfg.data.test):
        if p is not None:
            st = Path(p).stat() if Path(p).exists() else None
            out[p] = None if st is None else [st.st_size, st.st_mtime_ns]
    return out


# -- statistics -------------------------------------------------------------------------------

def _num(x: float | None) -> float:
    return math.nan if x is None else float(x)


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) over the finite values."""
    v = np.array([_num(x) for x in values], float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def stack_seeds(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """Per-run ``auc`` cells -> one list over runs per task x scenario."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for r in runs:
        for t, per in r["auc"].items():
            for s, v in per.items():
                out.setdefault(t, {}).setdefault(s, []).append(v)
    return out


def delta_m(multi: dict[str, float], single: dict[str, float]) -> float:
    """100 * mean over tasks of (M_i - S_i) / S_i (higher-is-better metrics), finite pairs only."""
    rel = [(_num(multi[t]) - _num(single[t])) / _num(single[t]) for t in single
           if t in multi and math.isfinite(_num(multi[t])) and math.isfinite(_num(single[t]))
           and _num(single[t]) != 0]
    return 100.0 * float(np.mean(rel)) if rel else math.nan


def summarise(per_seed: dict[str, dict[str, list[float | None]]],
              single: dict[str, dict[str, list[float | None]]] | None) -> dict[str, Any]:
    """Mean/std per cell and, against single-task: delta, delta_std, worse, Delta_m."""
    mean: Cells = {}
    std: Cells = {}
    for t, per in per_seed.items():
        for s, vals in per.items():
            mean.setdefault(t, {})[s], std.setdefault(t, {})[s] = mean_std(vals)
    out: dict[str, Any] = {"auc": per_seed, "mean": mean, "std": std}
    if single is None:
        return out
    ref = summarise(single, None)
    n_runs = min(len(v) for per in per_seed.values() for v in per.values())
    delta: Cells = {}
    delta_std: Cells = {}
    worse: dict[str, dict[str, bool | None]] = {}
    for t, per in mean.items():
        for s, m in per.items():
            if t not in ref["mean"] or s not in ref["mean"][t]:
                continue
            d = m - ref["mean"][t][s]
            sd = math.sqrt(std[t][s] ** 2 + ref["std"][t][s] ** 2)
            delta.setdefault(t, {})[s] = d
            delta_std.setdefault(t, {})[s] = sd
            # undefined with one seed (no spread to compare against)
            worse.setdefault(t, {})[s] = (bool(math.isfinite(d) and d < -sd)
                                          if n_runs > 1 else None)
    tasks = [t for t in per_seed if t in single and ALL in per_seed[t] and ALL in single[t]]
    n_seeds = min(len(per_seed[t][ALL]) for t in tasks) if tasks else 0
    paired = [delta_m({t: _num(per_seed[t][ALL][k]) for t in tasks},
                      {t: _num(single[t][ALL][k]) for t in tasks}) for k in range(n_seeds)]
    value = delta_m({t: mean[t][ALL] for t in tasks}, {t: ref["mean"][t][ALL] for t in tasks})
    out.update(delta=delta, delta_std=delta_std, worse=worse,
               delta_m={"value": value, "per_seed": paired, "std": mean_std(paired)[1],
                        "tasks": tasks})
    return out


# -- the comparison ---------------------------------------------------------------------------

def prepare_once(cfg: ExperimentConfig, out: Path, log: Any = print
                 ) -> tuple[ExperimentConfig, PreparedData, dict | None]:
    """Resolve a synthetic world (generated once into OUT/data) and encode every split once."""
    from shopmtl.data.pipeline import resolve_synthetic

    cfg, world = resolve_synthetic(cfg, out / "data", log)
    data = prepare_data(cfg.data, cfg.data.schema.build(), out)
    if not isinstance(data.train, TensorTable):
        raise ConfigError("compare needs in-memory data (data.streaming: false)")
    return cfg, data, world


def run_compare(cfg: ExperimentConfig, out_dir: str | Path, *, seeds: int = 3,
                models: list[str] | None = None, weightings: list[str] | None = None,
                combinations: list[Combination] | None = None,
                model_sets: dict[str, dict[str, Any]] | None = None, command: str | None = None,
                progress: bool = False, reuse: bool = True, log: Any = None,
                prepared: tuple[ExperimentConfig, PreparedData, dict | None] | None = None,
                ) -> dict[str, Any]:
    """Train single-task baselines and every model x weighting combination (or the explicit
    ``combinations``) for ``seeds`` training seeds (``train.seed``, ``train.seed + 1``, ...);
    write compare.json/.md/.png. ``prepared`` skips the data preparation (from prepare_once)."""
    from shopmtl.jsonsafe import json_safe
    from shopmtl.run import restrict

    log = log or _print
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    cfg, data, world = prepared or prepare_once(cfg, out, log)
    dump_config(cfg, out / "config.yaml")
    combos = combinations or [Combination(m, w) for m in models or [cfg.model.name]
                              for w in weightings or [cfg.weighting.name]]
    check_combinations(cfg, data, combos, model_sets)
    seed_list = [cfg.train.seed + k for k in range(seeds)]
    tasks = list(data.schema.task_names)
    single_runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    combo_runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in combos}
    t_start = time.perf_counter()
    for seed in seed_list:
        for task in tasks if len(tasks) > 1 else []:
            sub = restrict(data, (task,))
            r = train_and_score(single_task_config(cfg, sub, task, seed, model_sets), sub,
                                out / "runs" / "single_task" / task / f"seed{seed}", progress,
                                reuse)
            single_runs[task].append(r)
            log(f"seed {seed} single-task {task}: auc {_fmt(r['auc'][task].get(ALL))} "
                f"({r['seconds']:.0f}s)")
        for c in combos:
            r = train_and_score(combination_config(cfg, c, seed, model_sets), data,
                                out / "runs" / c.name / f"seed{seed}", progress, reuse)
            combo_runs[c.name].append(r)
            log(f"seed {seed} {c.name}: " + ", ".join(
                f"{t} {_fmt(r['auc'][t].get(ALL))}" for t in tasks) + f" ({r['seconds']:.0f}s)")
    single = None
    if len(tasks) > 1:
        single = {t: stack_seeds(single_runs[t])[t] for t in tasks}
    any_run = next(iter(combo_runs.values()))[0]
    result: dict[str, Any] = {
        "command": command,
        "metric": "test AUC",
        "test_split": "test" if data.test is not None else "valid",
        "seeds": seed_list,
        "tasks": tasks,
        "scenarios": list(data.schema.scenario_names),
        "world": world,
        "config": to_dict(cfg),
        "oracle": any_run["oracle_auc"] if any(any_run["oracle_auc"].values()) else None,
        "single_task": None if single is None else {
            "model": cfg.model.name, "model_args": dict(cfg.model.args),
            **summarise(single, None),
            "seconds": sum(r["seconds"] for rs in single_runs.values() for r in rs)},
        "combinations": {},
        "seconds_total": time.perf_counter() - t_start,
    }
    for c in combos:
        runs = combo_runs[c.name]
        result["combinations"][c.name] = {
            "model": c.model, "weighting": c.weighting,
            "model_args": runs[0]["config"]["model"]["args"],
            "weighting_args": runs[0]["config"]["weighting"]["args"],
            **summarise(stack_seeds(runs), single),
            "best_epochs": [r["best_epoch"] for r in runs],
            "seconds": sum(r["seconds"] for r in runs),
        }
    result = json_safe(result)
    (out / "compare.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    write_markdown(out, result)
    return result


def _print(line: str) -> None:
    print(line, flush=True)  # progress lines show up at once in a redirected log


# -- report -----------------------------------------------------------------------------------

def _fmt(x: float | None, nd: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _pm(m: float | None, s: float | None, nd: int = 4) -> str:
    if m is None or not math.isfinite(m):
        return "-"
    return f"{m:.{nd}f} ± {_fmt(s, nd)}"


def cells(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, scenario) pairs in report order: ``all`` first, then the scenarios."""
    out: list[tuple[str, str]] = []
    for c in result["combinations"].values():
        for t, per in c["mean"].items():
            out += [(t, s) for s in per if (t, s) not in out]
    return out


def markdown_tables(result: dict[str, Any]) -> list[str]:
    """The summary table (Delta_m per combination) and the per task x scenario table."""
    combos = result["combinations"]
    single = result["single_task"]
    oracle = result["oracle"] or {}
    lines = ["| combination | Delta_m % (± std over seeds) | cells worse than single-task "
             "| seconds |", "|---|---|---|---|"]
    for name, c in combos.items():
        dm = c.get("delta_m") or {}
        worse = [f"{t}/{s}" for t, per in (c.get("worse") or {}).items()
                 for s, w in per.items() if w]
        lines.append(f"| {name} | {_sgn(dm.get('value'), 2)} ± {_fmt(dm.get('std'), 2)} | "
                     f"{', '.join(worse) or 'none'} | {c['seconds']:.0f} |")
    head = ["task", "scenario"] + (["oracle"] if oracle else [])
    head += (["single-task"] if single else []) + list(combos)
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, s in cells(result):
        row = [t, s] + ([_fmt(oracle.get(t, {}).get(s))] if oracle else [])
        if single:
            row.append(_pm(single["mean"].get(t, {}).get(s), single["std"].get(t, {}).get(s)))
        for c in combos.values():
            cell = _pm(c["mean"].get(t, {}).get(s), c["std"].get(t, {}).get(s))
            if single and s in (c.get("delta") or {}).get(t, {}):
                flag = " **worse**" if c["worse"][t].get(s) else ""
                cell += f" ({_sgn(c['delta'][t][s])}{flag})"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _sgn(x: float | None, nd: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.{nd}f}"


def write_markdown(out: Path, result: dict[str, Any]) -> Path:
    seeds = result["seeds"]
    lines = ["# shopmtl compare", ""]
    if result.get("command"):
        lines += ["```bash", result["command"], "```", ""]
    lines += [
        f"Test AUC on the {result['test_split']} split, mean ± sample std over "
        f"{len(seeds)} training seed(s) {seeds} (the data is the same for every run). "
        "In brackets: delta to the single-task baselines "
        f"(`{(result['single_task'] or {}).get('model', '-')}`, one model per task, same "
        "budget); **worse** marks delta < -sqrt(std_multi² + std_single²). Delta_m = "
        "100 · mean over tasks of (M - S) / S on each task's `all` AUC.",
        "",
    ]
    lines += markdown_tables(result)
    if result["single_task"] is not None and not installed("matplotlib"):
        note_skipped("the delta figure (compare.png)", "matplotlib", "viz")
    elif result["single_task"] is not None and plot_deltas(result, out / "compare.png"):
        lines += ["", "![delta AUC to single-task](compare.png)"]
    lines += ["", "Model arguments:", ""]
    for name, c in result["combinations"].items():
        lines.append(f"- `{name}`: model args `{json.dumps(c['model_args'])}`, weighting args "
                     f"`{json.dumps(c['weighting_args'])}`, best epochs {c['best_epochs']}")
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_deltas(result: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars: delta AUC to single-task per task x scenario, one bar per combination,
    error bars = delta_std."""
    pairs = [(t, s) for t, s in cells(result)
             if any(math.isfinite(_num((c.get("delta") or {}).get(t, {}).get(s)))
                    for c in result["combinations"].values())]
    if not pairs:
        return None
    combos = result["combinations"]
    width = 0.8 / max(len(combos), 1)
    fig = agg_figure(figsize=(min(16.0, max(6.0, 0.35 * len(pairs) * (len(combos) + 1))), 4.5))
    ax = fig.subplots()
    x = np.arange(len(pairs))
    for k, (name, c) in enumerate(combos.items()):
        d = [_num(c["delta"].get(t, {}).get(s)) for t, s in pairs]
        e = [_num(c["delta_std"].get(t, {}).get(s)) for t, s in pairs]
        ax.bar(x + (k - (len(combos) - 1) / 2) * width, d, width, yerr=e, capsize=2, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [f"{t}\n{s}" for t, s in pairs], fontsize=7)
    ax.set_ylabel("AUC - single-task AUC")
    ax.set_title(f"delta test AUC to single-task (mean ± std over {len(result['seeds'])} seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(combos) // 6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
