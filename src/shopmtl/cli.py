"""The `shopmtl` command line. Each subcommand is a thin wrapper over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

# never print local variables in a traceback: they can hold raw cell values of the user's data
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Multi-scenario multi-task learning for e-commerce.")

_DEBUG = False  # --debug / SHOPMTL_DEBUG=1: errors re-raised, with their traceback


def _print_version(value: bool) -> None:
    if value:
        import shopmtl

        typer.echo(f"shopmtl {shopmtl.__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", envvar="SHOPMTL_DEBUG",
        help="Show the traceback of an error (without local variables)")] = False,
        version: Annotated[bool, typer.Option(
            "--version", callback=_print_version, is_eager=True,
            help="Print the version and exit")] = False) -> None:
    """Multi-scenario multi-task learning for e-commerce."""
    global _DEBUG
    _DEBUG = debug
    from shopmtl.arrowpool import prefer_jemalloc

    # this process is the command: its Arrow allocator is shopmtl's choice (the Python API
    # leaves the importing process alone); set before anything allocates
    prefer_jemalloc()


def _one_line(message: str) -> str:
    """A message on one line: its lines joined."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) or "(no message)"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {_one_line(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _guard(fn):
    """Every failure becomes one line on stderr, never a traceback (unless --debug): a user
    error (bad config, bad data, a missing or unwritable file, a bad checkpoint) exits 2 and
    says what and where; anything else is a bug: exit 1, with the exception's type."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click
        import yaml

        from shopmtl.config import ConfigError
        from shopmtl.data.ingest import DataError
        from shopmtl.train.checkpoint import CheckpointError
        from shopmtl.train.loop import NonFiniteError
        from shopmtl.weighting import MissingDependencyError

        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer's own exits and usage errors
        except Exception as e:
            if _DEBUG:
                raise
            # a KeyError raised with a message ("unknown task 'x'; known: ..."); a bare missing
            # key (which could be a data value) is a bug, reported as such below
            if isinstance(e, KeyError) and e.args and " " in str(e.args[0]):
                _fail(str(e.args[0]))
            # OSError: a missing file, a directory, no permission, a full disk ("[Errno 28]
            # No space left on device"); MissingDependencyError: the pip line to run
            if isinstance(e, (ConfigError, DataError, CheckpointError, NonFiniteError,
                              MissingDependencyError, OSError)):
                _fail(str(e))
            if isinstance(e, yaml.YAMLError):
                from shopmtl.config import yaml_problem

                _fail(f"not valid YAML: {yaml_problem(e)}")
            _fail(f"internal error ({type(e).__name__}); rerun with --debug for the traceback",
                  code=1)

    return wrapper


Sets = Annotated[list[str] | None, typer.Option("--set", help="Override: key.path=value")]


@app.command()
@_guard
def quickstart(
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("runs/quickstart"),
    rows: Annotated[int, typer.Option(help="Impressions in the synthetic world")] = 4_000_000,
    seed: Annotated[int, typer.Option(help="Seed for the world and training")] = 0,
    baselines: Annotated[bool, typer.Option(help="Also train single-task baselines")] = True,
) -> None:
    """Generate the default synthetic world, train, evaluate against the oracle, report.
    Rerun on the same OUT, it replaces its own previous run; any other non-empty OUT is
    refused."""
    from shopmtl.run import quickstart as run_quickstart

    metrics = run_quickstart(out, rows, seed, progress=sys.stderr.isatty(), baselines=baselines)
    _summary(metrics)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


def _summary(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="test metrics (multi-task)")
    for col in ("task", "scenario", "n", "AUC", "oracle AUC", "efficiency", "logloss"):
        table.add_column(col)
    for task, per in metrics["test"].items():
        for scen, m in per.items():
            def f(k: str, m: dict = m) -> str:
                v = m.get(k)
                return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
            table.add_row(task, scen, f("n"), f("auc"), f("oracle_auc"), f("auc_efficiency"),
                          f("logloss"))
    Console().print(table)


@app.command()
@_guard
def synth(
    out: Annotated[Path, typer.Option(help="Output directory for the Parquet files")],
    rows: Annotated[int, typer.Option(help="Impressions to generate")] = 1_000_000,
    seed: Annotated[int, typer.Option()] = 0,
    sets: Sets = None,
) -> None:
    """Generate a synthetic world to Parquet (chunked: constant memory at any size)."""
    import yaml

    from shopmtl.config import ConfigError, from_dict, to_dict
    from shopmtl.data.synthetic import WorldConfig, generate

    raw = to_dict(WorldConfig(rows=rows, seed=seed))
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not key=value")
        k, v = item.split("=", 1)
        raw[k.removeprefix("world.")] = yaml.safe_load(v)
    cfg = from_dict(WorldConfig, raw, "world")
    diag = generate(cfg, out, progress=True)
    typer.echo(json.dumps({"rows": diag["rows"],
                           "latent_variance_share": round(diag["latent_variance_share"], 3),
                           "click_rate": {s: round(v["click_rate"], 4)
                                          for s, v in diag["scenarios"].items()}}, indent=1))
    typer.echo(f"wrote {out}/train.parquet, valid.parquet, test.parquet, items.parquet, world.json")


@app.command()
@_guard
def train(
    config: Annotated[Path, typer.Argument(help="Experiment YAML")],
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("runs/train"),
    sets: Sets = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the previous shopmtl run in OUT (a folder no shopmtl run made is refused)")
    ] = False,
    baselines: Annotated[bool, typer.Option(help="Also train single-task baselines")] = False,
    alone: Annotated[bool, typer.Option(
        help="Joint config: also train each source alone (same steps) for the comparison")
    ] = False,
) -> None:
    """Train (and evaluate) from a config file: bring your own data. A config with a top-level
    `sources` key is a heterogeneous joint run (examples/joint.yaml). OUT is locked for the
    whole run: a second run into the same OUT stops at once. A non-empty OUT needs --resume
    (continue it) or --overwrite (replace it)."""
    from shopmtl.api import run_training

    # the Python API's path (shopmtl.train): the same checks, the same files
    result = run_training(config, out, overrides=sets or [], resume=resume, overwrite=overwrite,
                          baselines=baselines, alone=alone, progress=sys.stderr.isatty())
    if not result.metrics:  # a torchrun rank other than 0: rank 0 reports
        return
    if result.kind == "joint":
        typer.echo((out / "report.md").read_text())
        typer.echo(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and "
                   f"{result.model_dir} (joint steps: {result.metrics['joint']['steps']})")
        return
    _summary(result.metrics)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


@app.command()
@_guard
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (OUT/model)")],
    data: Annotated[Path, typer.Argument(help="CSV or Parquet file with labels")],
    out: Annotated[Path | None, typer.Option(help="Write metrics JSON here")] = None,
) -> None:
    """Metrics per task x scenario of a saved model on a labelled file."""
    from shopmtl.jsonsafe import json_safe
    from shopmtl.modeldir import load

    metrics = json_safe(load(model_dir).evaluate_file(data))
    _summary({"test": metrics})
    if out is not None:
        out.write_text(json.dumps({"test": metrics}, indent=1))
        typer.echo(f"wrote {out}")


@app.command()
@_guard
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (OUT/model)")],
    data: Annotated[Path, typer.Argument(help="CSV or Parquet file (labels not needed)")],
    out: Annotated[Path, typer.Option(help="Output CSV of predictions")] = Path("predictions.csv"),
    task: Annotated[list[str] | None, typer.Option(help="Only these tasks")] = None,
) -> None:
    """Probabilities per task for every row of a file (joined back by line number).
    A joint model directory (``shopmtl train`` on a joint config) answers one ``--task``."""
    from shopmtl.modeldir import load

    # the directory's meta.json kind picks the loader (modeldir.KINDS); each kind's model
    # writes its own predictions (zoo: CSV; joint: the task's rows, one task at a time)
    n = load(model_dir).predict_file(data, out, task)
    typer.echo(f"wrote {n} rows to {out}")


@app.command()
@_guard
def models() -> None:
    """List the registered architectures."""
    from shopmtl.registry import MODELS

    for name, (cls, _config) in MODELS.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:16s} {doc}")


@app.command()
@_guard
def weightings() -> None:
    """List the loss weightings and gradient aggregators (config key `weighting.name`)."""
    from shopmtl.weighting import WEIGHTINGS

    for name, cls in WEIGHTINGS.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:14s} {doc}")


@app.command()
@_guard
def compare(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (data, budget, baseline model)")],
    seeds: Annotated[int, typer.Option(help="Training seeds: train.seed, +1, ... (same data)")] = 3,
    models: Annotated[str | None, typer.Option(help="Comma-separated models (default: the "
                                               "config's)")] = None,
    weightings: Annotated[str | None, typer.Option(help="Comma-separated weightings (default: "
                                                   "the config's)")] = None,
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("runs/compare"),
    sets: Sets = None,
    model_sets: Annotated[list[str] | None, typer.Option(
        "--model-set", help="One model's args: model.key=value (e.g. star.star=[64])")] = None,
    reuse: Annotated[bool, typer.Option(help="Reuse finished runs in OUT with the same "
                                        "config")] = True,
) -> None:
    """Single-task baselines vs model x weighting combinations over seeds: mean ± std test
    AUC per task x scenario, delta to single-task, Delta_m; writes compare.json/.md/.png."""
    import shlex

    from shopmtl.checks import load_experiment
    from shopmtl.compare import parse_model_sets, parse_names, run_compare

    cfg = load_experiment(config, sets or [])
    args = [str(config), "--seeds", str(seeds)]
    args += ["--models", models] if models else []
    args += ["--weightings", weightings] if weightings else []
    args += ["--out", str(out)] + [a for s in sets or [] for a in ("--set", s)]
    args += [a for s in model_sets or [] for a in ("--model-set", s)]
    command = "shopmtl compare " + shlex.join(args)
    result = run_compare(cfg, out, seeds=seeds,
                         models=parse_names(models, cfg.model.name),
                         weightings=parse_names(weightings, cfg.weighting.name),
                         model_sets=parse_model_sets(model_sets), command=command,
                         progress=sys.stderr.isatty(), reuse=reuse)
    for name, c in result["combinations"].items():
        dm = (c.get("delta_m") or {}).get("value")
        typer.echo(f"{name:28s} Delta_m {'-' if dm is None else f'{dm:+.2f}%'}")
    typer.echo(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")


if __name__ == "__main__":
    app()
