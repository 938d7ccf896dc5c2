"""docs/BENCHMARKS.md from bench/results/peers.json (``render``): tables of mean ± std over seeds,
per-seed ratios (contenders of a seed ran back to back), the ceilings, the live profile, the
hand-written findings in bench/peers/findings.md, and last the scaling block rendered from
bench/results/scaling.json (written by bench/scaling.py) so that regenerating keeps it."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

FINDINGS = Path(__file__).with_name("findings.md")
SCALING = Path(__file__).resolve().parents[1] / "results" / "scaling.json"
ORDER = ["shopmtl", "shopmtl (default: dot)", "torch-rechub", "deepctr-torch", "minimal"]
PEERS = ["torch-rechub", "deepctr-torch"]
MODELS = ["shared_bottom", "mmoe", "ple", "esmm"]



def _lr_scaling_note(hp: dict[str, Any]) -> str:
    """shopmtl's large-batch learning-rate rule, when the run used one (not matched: said so)."""
    rule = hp.get("shopmtl_lr_scaling")
    if not rule or rule.get("rule") != "sqrt":
        return ""
    base = rule["base_batch"]
    return (f" **Learning rate, not matched at batch 2048:** the peers and the minimal model "
            f"train at lr {hp['lr']} at every batch size; shopmtl runs its large-batch rule "
            f"(`train.lr_scaling: sqrt`, `lr_base_batch: {base}`): lr {hp['lr']} at batch "
            f"{base}, lr × sqrt(B / {base}) = {hp['lr'] * (2048 / base) ** 0.5:.5f} at batch "
            "2048 (the issue's \"tune the defaults so that they are good at both\"). The peers "
            "have no such rule; torch-rechub at the scaled rate is in the findings "
            "(`bench/peers/scaled_lr.py`).")

def label(run: dict[str, Any]) -> str:
    if run["library"] == "shopmtl" and run.get("variant") == "default":
        return "shopmtl (default: dot)"
    return run["library"]


def ms(values: list[float], fmt: str = "{:,.0f}") -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def _cells(runs: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[int, dict[str, Any]]]]:
    """(dataset, model, batch) -> library label -> seed -> run (successful runs only)."""
    cells: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(dict))
    for r in runs:
        if "error" not in r:
            cells[(r["dataset"], r["model"], r["batch"])][label(r)][r["seed"]] = r
    return cells


def _sorted_keys(cells: dict) -> list[tuple]:
    ds_order = {"census": 0, "movielens": 1}
    return sorted(cells, key=lambda k: (ds_order.get(k[0], 9), -k[2], MODELS.index(k[1])
                                        if k[1] in MODELS else 9))


def ratios(a: dict[int, dict], b: dict[int, dict], key: str) -> list[float]:
    """Per-seed a/b of ``key`` (only seeds both have)."""
    return [a[s][key] / b[s][key] for s in sorted(set(a) & set(b)) if b[s].get(key)]


def best_peer_auc(libs: dict[str, dict[int, dict]], task: str) -> tuple[float, str]:
    best, who = -1.0, "-"
    for lib in PEERS:
        if lib in libs:
            m = statistics.mean(r["auc"][task] for r in libs[lib].values())
            if m > best:
                best, who = m, lib
    return best, who


def headline(cells: dict, tasks: dict[str, list[str]]) -> list[str]:
    out = ["| dataset | model | batch | shopmtl train samples/s | × torch-rechub | "
           "× DeepCTR-Torch | × minimal | shopmtl AUC (t1 / t2) | best peer AUC (t1 / t2) | "
           "ΔAUC vs best peer | targets |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in _sorted_keys(cells):
        ds, model, batch = key
        libs = cells[key]
        if "shopmtl" not in libs:
            continue
        s = libs["shopmtl"]
        r_rh = ratios(s, libs.get("torch-rechub", {}), "train_samples_per_s")
        r_dc = ratios(s, libs.get("deepctr-torch", {}), "train_samples_per_s")
        r_mn = ratios(s, libs.get("minimal", {}), "train_samples_per_s")
        t = tasks[ds]
        mine = [statistics.mean(r["auc"][x] for r in s.values()) for x in t]
        peers = [best_peer_auc(libs, x) for x in t]
        deltas = [m - p[0] for m, p in zip(mine, peers, strict=True) if p[0] >= 0]
        checks = []
        if model in ("mmoe", "ple") and batch == 2048:
            if r_rh:
                checks.append(("≥4× rechub", statistics.mean(r_rh) >= 4))
            if r_dc:
                checks.append(("≥1× DeepCTR", statistics.mean(r_dc) >= 1))
            if r_mn:
                checks.append(("≥0.9× minimal", statistics.mean(r_mn) >= 0.9))
        if deltas:
            checks.append(("AUC ≥ best peer − 0.002", min(deltas) >= -0.002))
        verdict = "; ".join(f"{n} {'✓' if ok else '✗'}" for n, ok in checks) or "-"
        out.append(
            f"| {ds} | {model} | {batch} | {ms([r['train_samples_per_s'] for r in s.values()])} "
            f"| {ms(r_rh, '{:.2f}')} | {ms(r_dc, '{:.2f}')} | {ms(r_mn, '{:.2f}')} | "
            + " / ".join(f"{v:.3f}" for v in mine) + " | "
            + " / ".join(f"{p[0]:.3f}" if p[0] >= 0 else "-" for p in peers) + " | "
            + " / ".join(f"{d:+.3f}" for d in deltas) + f" | {verdict} |")
    return out


def detail(cells: dict, tasks: dict[str, list[str]]) -> list[str]:
    out = ["| dataset | model | batch | library | train samples/s (fastest epoch) | "
           "train samples/s (all epochs) | infer samples/s @2048 | AUC t1 | AUC t2 | "
           "logloss t1 | logloss t2 | peak RSS MB | params | seeds |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in _sorted_keys(cells):
        ds, model, batch = key
        t1, t2 = tasks[ds]
        for lib in ORDER:
            runs = list(cells[key].get(lib, {}).values())
            if not runs:
                continue
            out.append(
                f"| {ds} | {model} | {batch} | {lib} | "
                f"{ms([r['train_samples_per_s'] for r in runs])} | "
                f"{ms([r['train_samples_per_s_all_epochs'] for r in runs])} | "
                f"{ms([r['infer_samples_per_s'] for r in runs])} | "
                f"{ms([r['auc'][t1] for r in runs], '{:.4f}')} | "
                f"{ms([r['auc'][t2] for r in runs], '{:.4f}')} | "
                f"{ms([r['logloss'][t1] for r in runs], '{:.4f}')} | "
                f"{ms([r['logloss'][t2] for r in runs], '{:.4f}')} | "
                f"{ms([r['peak_rss_mb'] for r in runs])} | {runs[0]['params']:,} | "
                f"{len(runs)} |")
    return out


def ratio_table(cells: dict) -> list[str]:
    out = ["| dataset | model | batch | library | train × rechub | train × minimal | "
           "infer × rechub | peak RSS × rechub |", "|---|---|---|---|---|---|---|---|"]
    for key in _sorted_keys(cells):
        libs = cells[key]
        rh, mn = libs.get("torch-rechub", {}), libs.get("minimal", {})
        for lib in ORDER:
            if lib not in libs or lib == "torch-rechub":
                continue
            a = libs[lib]
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {lib} | "
                       f"{ms(ratios(a, rh, 'train_samples_per_s'), '{:.2f}')} | "
                       f"{ms(ratios(a, mn, 'train_samples_per_s'), '{:.2f}') if mn else '-'} | "
                       f"{ms(ratios(a, rh, 'infer_samples_per_s'), '{:.2f}')} | "
                       f"{ms(ratios(a, rh, 'peak_rss_mb'), '{:.2f}')} |")
    return out


def ceiling(doc: dict[str, Any], cells: dict) -> list[str]:
    c = doc.get("ceiling", {})
    g = [c[k]["gflops"] for k in ("matmul_start", "matmul_end") if "gflops" in c.get(k, {})]
    if not g:
        return ["(matmul measurement missing)"]
    gf = max(g)
    out = [f"Sustained 2048×2048 fp32 matmul on {doc['env']['threads']} threads: "
           + " and ".join(f"{x:.0f}" for x in g)
           + f" GFLOP/s (start and end of the run; load average "
           f"{c.get('matmul_start', {}).get('load_average')} and "
           f"{c.get('matmul_end', {}).get('load_average')}). The bound below uses the larger.",
           "", "| dataset | model | batch | library | dense training MFLOP/sample | bound "
           "samples/s | achieved (fastest epoch) | share of bound |",
           "|---|---|---|---|---|---|---|---|"]
    for key in _sorted_keys(cells):
        if key[1] != "mmoe":
            continue
        for lib in ("shopmtl", "torch-rechub", "deepctr-torch", "minimal"):
            runs = list(cells[key].get(lib, {}).values())
            if not runs:
                continue
            f = runs[0]["flops_per_sample"]
            bound = gf * 1e9 / f
            got = statistics.mean(r["train_samples_per_s"] for r in runs)
            out.append(f"| {key[0]} | mmoe | {key[2]} | {lib} | {f / 1e6:.3f} | {bound:,.0f} | "
                       f"{got:,.0f} | {got / bound:.1%} |")
    return out


def profile(doc: dict[str, Any]) -> list[str]:
    p = doc.get("profile")
    if not p or "error" in p:
        return [f"(profile not run{': ' + p['error'][-300:] if p else ''})"]
    ph, mn = p["phases_ms"], p["minimal_phases_ms"]
    out = [f"Setup: {p['setup']}" + (f"; measured on {p['where']}" if p.get("where") else "")
           + f"; load average {p['load_average'][0]}–{p['load_average'][1]} while profiling "
           "(under load absolute ms are inflated; compare shares).", "",
           "| phase (median ms/step) | shopmtl Trainer.step | minimal MMoE |", "|---|---|---|"]
    rows = [("batch slicing (TensorTable.take / tensor[idx])", "slice", "slice"),
            ("forward", "forward", "forward"), ("task losses", "loss", None),
            ("zero_grad", "zero_grad", None), ("backward", "backward", "backward"),
            ("Adam step", "adam", "adam"),
            ("rest of Trainer.step (checks, weighting, bookkeeping)", "step_overhead", None),
            ("whole step", "step_total", "step_total")]
    for name, a, b in rows:
        out.append(f"| {name} | {ph[a]:.2f} | {mn[b]:.2f} |" if b else
                   f"| {name} | {ph[a]:.2f} | - |")
    out += ["", f"Adam split (same gradients, separate optimizers): embedding table "
            f"({ph['embedding_rows']} rows, {ph['params_embedding']:,} values) "
            f"{ph['adam_embedding_table']:.2f} ms, dense weights ({ph['params_dense']:,} values) "
            f"{ph['adam_dense']:.2f} ms.", "",
            "Top operators by self CPU time (torch.profiler, per step):", "",
            "| operator | self ms/step | share | calls/step |", "|---|---|---|---|"]
    for o in p["operators"][:14]:
        out.append(f"| `{o['op']}` | {o['self_ms_per_step']:.2f} | {o['share']:.1%} | "
                   f"{o['calls_per_step']:.0f} |")
    py = p["python"]
    out += ["", f"Top Python functions by own time (cProfile, {py['total_ms_per_step']:.1f} ms "
            "per profiled step; cProfile itself adds overhead):", "",
            "| function | own ms/step | cumulative ms/step | calls/step |", "|---|---|---|---|"]
    for o in py["top"][:12]:
        out.append(f"| `{o['function']}` | {o['own_ms_per_step']:.2f} | "
                   f"{o['cum_ms_per_step']:.2f} | {o['calls_per_step']:.0f} |")
    return out + inference_profile(doc)


def _one(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def inference_profile(doc: dict[str, Any]) -> list[str]:
    """shopmtl's predict path on census MMoE and PLE (profile_step's view 4) beside the
    peers' predict time per batch of the same size, from this run's results."""
    inf = doc["profile"].get("inference")
    if not inf:
        return []
    rows = [r for r in doc["runs"] if "error" not in r and r["dataset"] == "census"
            and r["batch"] == 2048 and r.get("variant", "matched") == "matched"]
    out = ["", "### The predict path (inference)", "",
           "shopmtl's `predict_table` at batch 2048 over the census training split, after 3 "
           "training steps: median ms per batch of 5 passes, the GEMMs' share of the operator "
           "time (torch.profiler), and each library's predict time per batch of 2048 in this "
           "run's results (2048 / mean inference samples/s over its seeds). *GEMM-bound ratio*: "
           "torch-rechub's ms per batch over shopmtl's GEMM ms alone, the ratio shopmtl would "
           "reach if everything but its matrix products took no time.", "",
           "| model | shopmtl ms/batch | GEMM share | GEMM ms/batch | forward MFLOP/sample | "
           "torch-rechub ms/batch | DeepCTR-Torch ms/batch | ratio × rechub (this profile) "
           "| GEMM-bound ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for model, p in inf.items():
        def per_batch(lib: str, model: str = model) -> float | None:
            rates = [r["infer_samples_per_s"] for r in rows
                     if r["library"] == lib and r["model"] == model]
            return 2048 / statistics.mean(rates) * 1000 if rates else None
        rh, dc = per_batch("torch-rechub"), per_batch("deepctr-torch")
        gemm_ms = p["ms_per_batch"] * p["gemm_share"]
        out.append(f"| {model} | {p['ms_per_batch']:.2f} | {p['gemm_share']:.0%} | "
                   f"{gemm_ms:.2f} | {p['forward_mflop_per_sample']:.3f} | {_one(rh)} | "
                   f"{_one(dc)} | {_one(rh / p['ms_per_batch'] if rh else None)} | "
                   f"{_one(rh / gemm_ms if rh else None)} |")
    for model, p in inf.items():
        out += ["", f"{model}: top operators of the predict path (self ms per batch, share):",
                "", "| operator | self ms/batch | share |", "|---|---|---|"]
        for o in p["operators"]:
            out.append(f"| `{o['op']}` | {o['self_ms_per_batch']:.2f} | {o['share']:.1%} |")
    return out


def quiet(doc: dict[str, Any], tasks: dict[str, list[str]]) -> list[str]:
    """The calibration runs on a quiet 2-core slice of another machine, when attached."""
    q = doc.get("quiet_slice")
    if not q:
        return []
    e = q["env"]
    mm = q.get("ceiling", {}).get("matmul_start", {}).get("gflops")
    cells = _cells(q["runs"])
    return ["### The same cells on a quiet 2-core slice (calibration)", "",
            f"`{e['command']} --cpus {e.get('cpus_pinned')} --peers-python python3` on "
            f"{e['cpu']} ({e['cores']} cores, pinned to 2), torch {e['torch_main']}, load "
            f"average {e['load_average_start']}–{e.get('load_average_end')}, matmul "
            f"{mm:.0f} GFLOP/s; {len(q['runs'])} runs (seed 0 of the headline cells). Another "
            "CPU and torch: read the ratios.", "", *headline(cells, tasks), ""]


def render(doc: dict[str, Any]) -> str:
    env = doc["env"]
    runs = doc.get("runs", [])
    cells = _cells(runs)
    tasks = {d: m["tasks"] for d, m in doc["datasets"].items()}
    loads = [x for r in runs for x in r.get("load_average", [])]
    failed = [r for r in runs if "error" in r]
    hp = doc["hyperparameters"]
    lines = [
        "# Benchmarks: shopmtl against torch-rechub 0.9.0 and DeepCTR-Torch 0.3.0",
        "",
        "<!-- generated by bench/run_all.py from bench/results/peers.json; edit "
        "bench/peers/report.py or bench/peers/findings.md, not this file -->",
        "",
        "Regenerate (numbers, tables and this file) with:",
        "",
        "```bash",
        "python3 -m venv bench/.venv-peers && bench/.venv-peers/bin/pip install torch==2.13.0 "
        "-r bench/requirements-peers.txt   # once",
        ".venv/bin/python bench/run_all.py   # --quick: a < 5 min smoke run; "
        "--budget-min N: stop between cells",
        "```",
        "",
        f"This run: `{env['command']}`, started {env['started']}, "
        f"{env.get('minutes', '?')} min. CPU: {env['cpu']}, {env['cores']} cores; torch "
        f"threads {env['threads']}; torch {env['torch_main']} (project venv) / "
        f"{env.get('torch_peers')} (peers venv); Python {env['python']}. "
        f"Load average (1 min) at start {env['load_average_start']}, at end "
        f"{env.get('load_average_end', '?')}, over the runs "
        f"{min(loads) if loads else '?'}–{max(loads) if loads else '?'} "
        f"(median {statistics.median(loads) if loads else '?'}): "
        + ("**the machine was shared and loaded; absolute samples/s are depressed and noisy, "
           "ratios between contenders of the same seed (run back to back) are the figures to "
           "read.**" if loads and statistics.median(loads) > env["cores"] * 0.75 else
           "the machine was quiet enough for absolute figures to be indicative.")
        + (" **Quick run: MMoE at batch 2048, one seed, MovieLens for one epoch; not the "
           "protocol.**" if env.get("quick") else "")
        + (f" **Cut short: cells ran up to cell {env['stopped_before_cell']}**; the 'seeds' "
           "column says how many seeds each figure has." if env.get("stopped_before_cell")
           else ""),
        "",
        "## Protocol",
        "",
        "- Data: census = UCI Census-Income (KDD), every 5th row of the test split "
        "(shared/datasets/census_income_kdd), tasks income > 50K / never married, the feature set "
        "of `examples/census.yaml` (sex is shopmtl's scenario and a sparse feature for the "
        "others); movielens = ml-latest-small (2016), tasks like = rating ≥ 4 / love = rating ≥ "
        "4.5, the features of `examples/movielens.yaml` (genre group as scenario / sparse "
        "feature).",
        "- Fixed seeded 80/10/10 splits of the row ids (numpy PCG64, seed "
        f"{doc['datasets'][next(iter(doc['datasets']))]['split_seed']}); sha256 of each split's "
        "sorted row ids:",
        "",
    ]
    for ds, m in doc["datasets"].items():
        lines.append(f"  - {ds} (rows {m['rows']}): "
                     + ", ".join(f"{s} `{h}`" for s, h in m["split_sha256"].items()))
    lines += [
        "",
        "- Same encoded inputs for everyone: shopmtl's encoders fit on train (ids by frequency, "
        "0 = OOV/rare; numerics log1p'd as in the example configs, then standardised). shopmtl "
        "reads the split files through its own pipeline; the peers and the minimal model read "
        "the identical arrays.",
        f"- Matched hyperparameters: embedding {hp['embed_dim']}; SharedBottom bottom "
        f"{hp['expert']} + towers {hp['tower']}; MMoE {hp['n_experts']} experts {hp['expert']}, "
        f"softmax gates without hidden layer, towers {hp['tower']}; PLE {hp['ple']['levels']} "
        f"levels × ({hp['ple']['shared']} shared + {hp['ple']['specific']} specific) experts "
        f"{hp['expert']}, towers {hp['tower']}; ESMM towers {hp['esmm_tower']} (MovieLens, "
        "love nested in like: CTR = like, CTCVR = love); Adam lr "
        f"{hp['lr']}, no weight decay or L2, no dropout; epochs {hp['epochs']}; batch 2048 "
        "(every model) and 256 (MMoE and PLE, the throughput targets); seeds 0..2."
        + _lr_scaling_note(hp),
        "- **shopmtl runs with `interaction: none`** so that its bottom reads the plain "
        "concatenation of fields, like the peers' MLPs; the row *shopmtl (default: dot)* is "
        "its default dot-interaction bottom (and default embedding L2 1e-6), batch 2048 only. "
        "shopmtl embeds numeric features as fields (value × vector), the peers append the raw "
        "values, so shopmtl's first layers are wider (census 624 vs 519 inputs). shopmtl keeps "
        "its default LayerNorm on the bottom input (`input_norm: layer`).",
        "- Each library through its own training and predict path, each run in its own "
        "process: shopmtl `prepare_data` → `train_model` (validates each epoch, checkpoints, "
        "TensorBoard, reloads the best epoch) → `predict_table`; torch-rechub "
        "`DataGenerator` → `MTLTrainer.fit` (validates each epoch; keeps the last epoch) → "
        "`MTLTrainer.predict`; DeepCTR-Torch `compile` → `fit(verbose=0)` (no validation; last "
        "epoch) → `predict`; minimal = plain torch on resident tensors.",
        "- Figures: test AUC / logloss per task (one implementation for all, on each library's "
        "probabilities; ESMM's love = pCTR·pCVR); training samples/s of the fastest epoch and "
        "over all epochs (training loop only, validation excluded); inference samples/s of the "
        "predict path at batch 2048 over the training split (median of 3 passes after a "
        "warm-up); peak RSS of the child process: its "
        "`VmHWM` at exit (`/proc/self/status`; reset by `exec`, so the ~480 MB harness it was "
        "forked from does not count, as it would in `os.wait4`'s `ru_maxrss`, kept in "
        "peers.json as `peak_rss_wait4_mb`); parameter count. Ratios are per seed (contenders "
        "of one seed and cell ran "
        "back to back, in rotating order), then mean ± std.",
        "- Library traits kept as they are (their users get them): torch-rechub puts BatchNorm "
        "after every Linear (gates too), trains sigmoid outputs with BCELoss, initialises "
        "embeddings N(0, 1e-4), and its ESMM silently drops dense features (movie_age); "
        "DeepCTR-Torch initialises Linear and embedding weights N(0, 1e-4), sums the loss over "
        "the batch and casts inputs to float32; its import-time version check is stubbed out "
        "(no network).",
        "",
        "## Headline: shopmtl (matched) against the peers",
        "",
        "Ratios are shopmtl's training samples/s (fastest epoch) over the contender's, per seed. "
        "ΔAUC is shopmtl's mean test AUC minus the best peer's, per task.",
        "",
        *headline(cells, tasks),
        "",
        *quiet(doc, tasks),
        "## All figures (mean ± std over seeds)",
        "",
        *detail(cells, tasks),
        "",
        "## Ratios against torch-rechub and the tensor-resident reference",
        "",
        *ratio_table(cells),
        "",
        "## Ceilings",
        "",
        *ceiling(doc, cells),
        "",
        "## Profile of shopmtl's training step",
        "",
        *profile(doc),
        "",
    ]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['library']} {r['dataset']} {r['model']} b{r['batch']} s{r['seed']}: "
                  f"`{r['error'][:200]!r}`" for r in failed]
        lines.append("")
    if FINDINGS.is_file():
        lines += [FINDINGS.read_text().rstrip(), ""]
    if SCALING.is_file():  # bench/scaling.py's section, between its markers
        from bench.scaling import render_block

        lines += [render_block(json.loads(SCALING.read_text())), ""]
    return "\n".join(lines)
