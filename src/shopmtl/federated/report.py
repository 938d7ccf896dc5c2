"""A federated run's ``report.md``: the silos, the bytes on the wire, AUC per round per silo
(each on its own test rows) and on the pooled test split, and ``auc_rounds.png`` (the same
curves) when the viz extra's matplotlib is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shopmtl.data.schema import ALL
from shopmtl.deps import install_hint, installed, note_skipped
from shopmtl.report import agg_figure


def _f(x: Any) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def round_table(metrics: dict[str, Any]) -> list[str]:
    """One row per round: the validation score (``federated.select``), pooled AUC per task,
    then each silo's AUC per task (all scopes)."""
    tasks, silos = metrics["tasks"], list(metrics["silos"])
    head = ["round", "valid score", *(f"pooled {t}" for t in tasks),
            *(f"{s} {t}" for s in silos for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in metrics["rounds"]:
        row = [str(r["round"]), _f(r.get("valid_score")),
               *(_f(r["pooled"].get(t, {}).get(ALL)) for t in tasks)]
        row += [_f(r["silos"].get(s, {}).get(t, {}).get(ALL)) for s in silos for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot_rounds(metrics: dict[str, Any], path: Path) -> Path:
    tasks = metrics["tasks"]
    fig = agg_figure(figsize=(4 * len(tasks), 3.6))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    rounds = [r["round"] for r in metrics["rounds"]]
    for ax, task in zip(axes, tasks, strict=True):
        pooled = [r["pooled"].get(task, {}).get(ALL) for r in metrics["rounds"]]
        ax.plot(rounds, [float("nan") if v is None else v for v in pooled], "k-o",
                label="pooled test")
        for k, silo in enumerate(metrics["silos"]):  # one colour per silo on every panel
            vals = [r["silos"].get(silo, {}).get(task, {}).get(ALL) for r in metrics["rounds"]]
            if any(v is not None for v in vals):
                ax.plot(rounds, [float("nan") if v is None else v for v in vals], "--",
                        marker=".", color=f"C{k}", label=silo)
        ax.set_title(f"{task}: test AUC")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_federated_report(out: Path, metrics: dict[str, Any]) -> Path:
    fed = metrics["federated"]
    lines = ["# shopmtl federated run", "",
             f"Model `{metrics['model']}`, strategy `{fed['strategy']}`, {fed['rounds']} rounds "
             f"of {fed['local_epochs']} local epochs, shared: {', '.join(fed['share'])}; "
             f"{metrics['seconds']:.1f}s on Flower's simulation engine.", "",
             "## Silos", "", "| silo | train | valid | test | tasks |", "|---|---|---|---|---|"]
    for s, n in metrics["silos"].items():
        lines.append(f"| {s} | {n['train']:,} | {n['valid']:,} | {n['test']:,} | "
                     f"{', '.join(metrics['silo_tasks'][s])} |")
    final = metrics.get("final") or {}
    lines += ["", f"Each client sends {metrics['shared_bytes_per_client']:,} bytes a round "
              "(and receives as many).", ""]
    if final.get("bytes_sent"):
        lines += ["| silo | bytes sent, last round |", "|---|---|"]
        lines += [f"| {s} | {b:,} |" for s, b in final["bytes_sent"].items()]
    lines += ["", "## Test AUC per round", "",
              "Pooled: the global model on the pooled test split (unshared pieces unknown to the "
              "server). Per silo: the global model with the silo's own pieces, on its test rows.",
              ""]
    lines += round_table(metrics)
    sel = metrics.get("selected")
    if sel:  # a joint run's metrics have none
        lines += ["", f"`model/` holds round {sel['round']}'s global model (select: "
                  f"{sel['rule']}; valid score: the silos' mean task AUC on their own "
                  f"validation rows, weighted by those rows; best: round "
                  f"{sel['best_round'] if sel['best_round'] is not None else '-'})."]
    if installed("matplotlib"):
        plot_rounds(metrics, out / "auc_rounds.png")
        lines += ["", "![AUC per round](auc_rounds.png)"]
    else:
        note_skipped("the AUC-per-round figure", "matplotlib", "viz")
        lines += ["", f"No figure: matplotlib is not installed ({install_hint('viz')})."]
    lines += dropped_table(metrics)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def dropped_table(metrics: dict[str, Any]) -> list[str]:
    """The clients left out of a round and why (``federated.faults``); nothing when none
    was."""
    rows = [f"| {r['round']} | {who} | {why} |" for r in metrics["rounds"]
            for who, why in sorted(r.get("dropped", {}).items())]
    if not rows:
        return []
    return ["", "## Clients dropped from a round", "", "| round | client | reason |",
            "|---|---|---|", *rows]
