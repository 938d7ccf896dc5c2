"""Human report of a run: metric table with the oracle, negative-transfer table, curves plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from shopmtl.data.schema import ALL
from shopmtl.deps import install_hint, installed, note_skipped


def _f(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def metric_table(test: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    has_oracle = any("oracle_auc" in m for per in test.values() for m in per.values())
    head = ["task", "scenario", "n", "AUC", "GAUC", "logloss", "calibration"]
    if has_oracle:
        head += ["oracle AUC", "AUC efficiency", "oracle logloss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, per in test.items():
        for scen, m in per.items():
            row = [task, scen, str(m.get("n", "")), _f(m.get("auc")), _f(m.get("gauc")),
                   _f(m.get("logloss")), _f(m.get("calibration"), 3)]
            if has_oracle:
                row += [_f(m.get("oracle_auc")), _f(m.get("auc_efficiency"), 3),
                        _f(m.get("oracle_logloss"))]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def negative_transfer(multi: dict[str, dict[str, dict[str, float]]],
                      single: dict[str, dict[str, dict[str, float]]]
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """Multi-task minus single-task AUC per task x scenario (negative = the task was hurt)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, per in multi.items():
        if task not in single:
            continue
        out[task] = {}
        for scen, m in per.items():
            s = single[task].get(scen)
            if s is None:
                continue
            out[task][scen] = {"multi_task_auc": m["auc"], "single_task_auc": s["auc"],
                               "delta_auc": _minus(m["auc"], s["auc"]),
                               "delta_logloss": _minus(m["logloss"], s["logloss"])}
    return out


def _minus(a: float | None, b: float | None) -> float:
    """a - b, NaN when either is missing (an AUC on a one-class slice)."""
    if a is None or b is None:
        return math.nan
    return a - b


def _signed(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.4f}"


def transfer_table(nt: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| task | scenario | multi-task AUC | single-task AUC | delta AUC | delta logloss |",
             "|---|---|---|---|---|---|"]
    for task, per in nt.items():
        for scen, d in per.items():
            delta = d["delta_auc"]
            flag = " (hurt)" if delta is not None and delta < -0.002 else ""
            lines.append(f"| {task} | {scen} | {_f(d['multi_task_auc'])} | "
                         f"{_f(d['single_task_auc'])} | {_signed(delta)}{flag} | "
                         f"{_signed(d['delta_logloss'])} |")
    return lines


def agg_figure(**kwargs: Any) -> Any:
    """A matplotlib figure drawn by the Agg canvas, outside pyplot: no backend is chosen for
    the process (a user's interactive backend stays), and no figure is kept in pyplot's list
    (nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Validation AUC and training loss per epoch, one line per run x task."""
    fig = agg_figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for run, hist in histories.items():
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist]
        for task in hist[0]["valid_auc"]:
            style = "-" if run == "multi_task" else "--"
            axes[0].plot(epochs, [h["valid_auc"][task] for h in hist], style, marker="o",
                         label=f"{run}: {task}")
            axes[1].plot(epochs, [h["train_loss"][task] for h in hist], style, marker="o",
                         label=f"{run}: {task}")
    axes[0].set_title("validation AUC")
    axes[1].set_title("training loss (epoch mean)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(out_dir: Path, title: str, metrics: dict[str, Any],
                 histories: dict[str, list[dict[str, Any]]], notes: list[str] | None = None
                 ) -> Path:
    out_dir = Path(out_dir)
    lines = [f"# {title}", ""]
    lines += notes or []
    lines += ["", "## Test metrics (multi-task model)", ""]
    lines += metric_table(metrics["test"])
    for name, per_task in (metrics.get("slices") or {}).items():
        lines += ["", f"## Test metrics on the slice `{name}` == 1", "",
                  "The same model, evaluated only on the test rows where this column is 1 "
                  "(is_new_item: cold-start items, unseen in training).", ""]
        lines += metric_table(per_task)
    if metrics.get("negative_transfer"):
        lines += ["", "## Negative transfer: multi-task minus single-task", "",
                  "Negative delta AUC means sharing hurt the task (flagged below -0.002).", ""]
        lines += transfer_table(metrics["negative_transfer"])
    if histories:
        lines += ["", "## Training curves", ""]
        if installed("matplotlib"):
            plot_curves(histories, out_dir / "curves.png")
            lines += ["![curves](curves.png)"]
        else:  # the report without its figure
            note_skipped("the training-curves figure (curves.png)", "matplotlib", "viz")
            lines += [f"No figure: matplotlib is not installed ({install_hint('viz')})."]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["ALL", "negative_transfer", "write_report"]
