"""shopmtl against torch-rechub 0.9.0 and DeepCTR-Torch 0.3.0 on real data, plus the practical
(tensor-resident minimal MMoE) and physical (sustained matmul) ceilings. The one command:

    .venv/bin/python bench/run_all.py [--quick]

Needs the peers venv (once): ``python3 -m venv bench/.venv-peers &&
bench/.venv-peers/bin/pip install torch==2.13.0 -r bench/requirements-peers.txt``
(``--no-peers`` runs the shopmtl side alone). Every run is its own subprocess (peak RSS from
``os.wait4`` on the child); contenders of one (seed, dataset, batch, model) cell run back to back
in a rotating order, so load drift hits them alike. Writes bench/results/peers.json and
regenerates docs/BENCHMARKS.md (``--render`` only regenerates the doc from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import common as C  # noqa: E402
from bench.peers.report import render  # noqa: E402

PEERS_PY = REPO / "bench" / ".venv-peers" / "bin" / "python"
MAIN_PY = Path(sys.executable)
RESULTS = REPO / "bench" / "results" / "peers.json"
DOCS = REPO / "docs" / "BENCHMARKS.md"

# library -> (module, interpreter, variant)
CONTENDERS: dict[str, tuple[str, str, str]] = {
    "shopmtl": ("bench.peers.run_shopmtl", "main", "matched"),
    "shopmtl-default": ("bench.peers.run_shopmtl", "main", "default"),
    "torch-rechub": ("bench.peers.run_rechub", "peers", "matched"),
    "deepctr-torch": ("bench.peers.run_deepctr", "peers", "matched"),
    "minimal": ("bench.peers.run_minimal", "main", "matched"),
}


def _tier(dataset: str, model: str, batch: int, seed: int) -> int:
    """Priority: MMoE/PLE at 2048 seed 0; census MMoE/PLE at 256 seed 0; MMoE/PLE at 2048 other
    seeds; MovieLens MMoE/PLE at 256 seed 0; SharedBottom/ESMM seed 0; the rest."""
    core = model in ("mmoe", "ple")
    if core and batch == 2048:
        return 0 if seed == 0 else 2
    if core and seed == 0:
        return 1 if dataset == "census" else 3
    return 4 if seed == 0 else 5


def plan(quick: bool, seeds: int, peers: bool) -> list[dict[str, Any]]:
    """The runs, in execution order, cell by cell (a cell = dataset, model, batch, seed; its
    contenders run back to back, the first one rotating). Full: every model at batch 2048, MMoE
    and PLE (the throughput targets) also at 256, ``seeds`` seeds; shopmtl's default (dot
    bottom) at 2048; the minimal reference for MMoE. Ordered by priority so that a run cut by
    --budget-min keeps the headline first (see ``_tier``). Quick: MMoE at 2048, one seed,
    MovieLens for one epoch."""
    cells = []
    for seed in range(1 if quick else seeds):
        for dataset, info in C.DATASETS.items():
            for batch in (2048,) if quick else (2048, 256):
                for model in ["mmoe"] if quick else info["models"]:
                    if batch == 256 and model not in ("mmoe", "ple"):
                        continue
                    cells.append((_tier(dataset, model, batch, seed), seed, dataset, batch,
                                  model))
    cells.sort(key=lambda c: c[:2])  # stable: datasets, batches, models keep their order
    runs = []
    for k, (_, seed, dataset, batch, model) in enumerate(cells):
        libs = ["shopmtl", "torch-rechub", "deepctr-torch"]
        if batch == 2048:
            libs.insert(1, "shopmtl-default")
        if model == "mmoe":
            libs.append("minimal")
        if not peers:
            libs = [lib for lib in libs if lib not in ("torch-rechub", "deepctr-torch")]
        r = k % len(libs)
        epochs = 1 if quick and dataset == "movielens" else C.DATASETS[dataset]["epochs"]
        for lib in libs[r:] + libs[:r]:  # rotate who goes first
            runs.append({"library": lib.removesuffix("-default"), "key": lib, "cell": k,
                         "variant": CONTENDERS[lib][2], "model": model, "dataset": dataset,
                         "batch": batch, "seed": seed, "epochs": epochs})
    return runs


def run_child(cmd: list[str], log: Path, timeout: float,
              env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """(exit code, peak RSS MB of the child from wait4, wall seconds); env: C.child_env()."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or C.child_env(),
                             cwd=log.parent)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
            time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024.0, time.perf_counter() - t0


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_version(py: Path) -> str:
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, env=C.child_env())
    return out.stdout.strip() or "unavailable"


def matmul(work: Path) -> dict[str, Any]:
    out = work / "matmul.json"
    la = load_average()
    rc, _, _ = run_child([str(MAIN_PY), "-m", "bench.peers.run_minimal", "--matmul", str(out)],
                         work / "matmul.log", 120)
    res = json.loads(out.read_text()) if rc == 0 else {"error": rc}
    return {**res, "load_average": la}


def save(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MMoE, batch 2048, 1 seed (< 5 min)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-peers", action="store_true", help="shopmtl and the minimal model only")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--peers-python", type=Path, default=PEERS_PY,
                    help="interpreter with torch-rechub and deepctr-torch (default: %(default)s)")
    ap.add_argument("--cpus", default=None,
                    help="pin this process and its runs to these CPUs, e.g. 0,1 (a quiet "
                         "2-core slice of a larger machine)")
    ap.add_argument("--render", action="store_true", help="only regenerate the doc from --out")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--budget-min", type=float, default=0,
                    help="start no cell (dataset, model, batch, seed: its contenders back to "
                         "back) that the last one's duration says would end past this many "
                         "minutes (0: no limit); cells run in priority order")
    args = ap.parse_args()
    if args.render:
        args.docs.write_text(render(json.loads(args.out.read_text())))
        print(f"wrote {args.docs}")
        return
    peers = not args.no_peers
    peers_py = args.peers_python
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if peers and shutil.which(str(peers_py)) is None:
        sys.exit(f"{peers_py} not found; create it with: python3 -m venv bench/.venv-peers && "
                 "bench/.venv-peers/bin/pip install torch==2.13.0 -r "
                 "bench/requirements-peers.txt  (or pass --no-peers)")
    from bench.peers.prepare import prepare

    started = time.time()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shopmtl-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "bench/run_all.py" + (" --quick" if args.quick else "") + (
        " --no-peers" if not peers else "") + (
        f" --seeds {args.seeds}" if args.seeds != 3 and not args.quick else "") + (
        f" --budget-min {args.budget_min:g}" if args.budget_min else "")
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": C.THREADS,
           "python": platform.python_version(), "torch_main": torch_version(MAIN_PY),
           "torch_peers": torch_version(peers_py) if peers else None,
           "cpus_pinned": args.cpus,
           "load_average_start": load_average(), "command": f".venv/bin/python {command}",
           "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"CPU {env['cpu']} | {env['cores']} cores | torch threads {C.THREADS} | "
          f"load average {env['load_average_start']}")
    meta = {}
    for ds in C.DATASETS:
        m = prepare(ds, work)
        meta[ds] = {k: m[k] for k in ("rows", "split_sha256", "split_seed", "tasks", "positives")}
        print(f"{ds}: rows {m['rows']} | split sha256 "
              + " ".join(f"{s}={h[:16]}" for s, h in m["split_sha256"].items()))
    doc: dict[str, Any] = {"env": env, "datasets": meta, "hyperparameters": {
        "embed_dim": C.EMBED_DIM, "n_experts": C.N_EXPERTS, "expert": C.EXPERT,
        "tower": C.TOWER, "ple": {"levels": C.PLE_LEVELS, "shared": C.PLE_SHARED,
                                  "specific": C.PLE_SPECIFIC},
        "esmm_tower": C.ESMM_TOWER, "optimizer": "adam", "lr": C.LR, "dropout": 0.0,
        "shopmtl_lr_scaling": {"rule": C.SHOPMTL_LR_SCALING, "base_batch": C.LR_BASE_BATCH},
        "epochs": {d: i["epochs"] for d, i in C.DATASETS.items()}},
        "ceiling": {"matmul_start": matmul(work)}, "runs": []}
    print(f"matmul 2048^3 fp32: {doc['ceiling']['matmul_start'].get('gflops', 0):.0f} GFLOP/s")
    runs = plan(args.quick, args.seeds, peers)
    cell_started = time.time()
    for i, r in enumerate(runs):
        if i and runs[i - 1]["cell"] != r["cell"]:  # a cell is complete
            now, last = time.time(), time.time() - cell_started
            cell_started = now
            if args.budget_min and now - started + last > args.budget_min * 60:
                env["stopped_before_cell"] = f"{r['cell']} of {runs[-1]['cell'] + 1}"
                print(f"--budget-min {args.budget_min:g}: the next cell would not fit; "
                      f"stopping after {r['cell']} of {runs[-1]['cell'] + 1} cells")
                break
        mod, interp, _ = CONTENDERS[r["key"]]
        tag = f"{r['key']}-{r['dataset']}-{r['model']}-b{r['batch']}-s{r['seed']}"
        spec = {k: r[k] for k in ("library", "variant", "model", "dataset", "batch", "seed",
                                  "epochs")}
        spec.update(data_dir=str(work / r["dataset"]), out=str(work / f"{tag}.json"))
        spec_path = work / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        py = MAIN_PY if interp == "main" else peers_py
        la0 = load_average()
        rc, rss, wall = run_child([str(py), "-m", mod, str(spec_path)], work / f"{tag}.log",
                                  args.timeout)
        la1 = load_average()
        if rc == 0:
            rec = json.loads(Path(spec["out"]).read_text())
        else:
            tail = (work / f"{tag}.log").read_text()[-2000:]
            rec = {k: spec[k] for k in ("library", "variant", "model", "dataset", "batch",
                                        "seed")}
            rec["error"] = f"exit {rc}: {tail}"
        # peak_rss_mb: the child's own VmHWM where it reported one, else wait4's ru_maxrss
        # (whose floor is this harness's peak, inherited across the fork)
        rec.update(peak_rss_mb=rec.get("peak_vmhwm_mb") or rss, peak_rss_wait4_mb=rss,
                   wall_seconds=wall, load_average=[la0, la1])
        doc["runs"].append(rec)
        save(doc, args.out)
        aucs = " / ".join(f"{v:.3f}" for v in rec.get("auc", {}).values())
        print(f"[{i + 1}/{len(runs)}] {tag}: "
              + (f"train {rec['train_samples_per_s']:,.0f}/s "
                 f"(all {rec['train_samples_per_s_all_epochs']:,.0f}) "
                 f"infer {rec['infer_samples_per_s']:,.0f}/s auc {aucs} "
                 f"rss {rec['peak_rss_mb']:.0f}MB "
                 if rc == 0 else f"FAILED ({rc}) ")
              + f"wall {wall:.0f}s load {la0}-{la1}", flush=True)
    doc["ceiling"]["matmul_end"] = matmul(work)
    if not args.no_profile:
        prof_out = work / "profile.json"
        rc, _, wall = run_child([str(MAIN_PY), "-m", "bench.peers.profile_step", "--out",
                                 str(prof_out), "--data-dir", str(work / "census")],
                                work / "profile.log", 600)
        doc["profile"] = (json.loads(prof_out.read_text()) if rc == 0
                          else {"error": (work / "profile.log").read_text()[-2000:]})
    env["load_average_end"] = load_average()
    env["minutes"] = round((time.time() - started) / 60, 1)
    save(doc, args.out)
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(render(doc))
    print(f"wrote {args.out} and {args.docs} in {env['minutes']} min")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
