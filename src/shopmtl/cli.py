"""The `shopmtl` command line. Each subcommand is a thin wrapper over the Python API.

Every failure is one line on stderr, ``error: ...``, never a traceback (``--debug`` shows it,
without local variables), and the exit status says whose move it is (``EXIT_CODES``):

- 2, a usage error: the command as typed cannot work. A bad config (ConfigError: an unknown
  key or name, a wrong type, a value out of its range; a config file that does not exist),
  invalid YAML (YAMLError), a bad option value (``--task`` naming a task the model lacks:
  predict.OptionError, a ConfigError; a KeyError with a message, "unknown task ..."); bad
  arguments (click's own usage errors). Fix the command or the config and rerun.
- 1, a runtime error: the command was fine but the run failed. Bad data (DataError, a missing
  data file included), a corrupt or missing checkpoint or model directory (CheckpointError),
  training that went non-finite or diverged or never beat its label prior (NonFiniteError,
  DivergenceError, NoBetterThanPriorError), the output
  folder in use by another run (OutputInUseError), the system refusing (OSError: a full disk,
  no permission), an optional package missing (MissingDependencyError), an exported ONNX graph
  that does not compute what its model does (ParityError, ``shopmtl export``), and any other
  exception: an internal error, a bug ("internal error (Type); rerun with --debug").
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

USAGE, RUNTIME = 2, 1
# handled error -> exit status, the first match wins (a subclass before its base); anything
# else is an internal error (RUNTIME). Classes are named, not imported, so that `shopmtl
# --help` stays fast; the third column is the --help epilog's and the module docstring's line.
EXIT_CODES: tuple[tuple[str, int, str], ...] = (
    ("shopmtl.config:ConfigError", USAGE, "a bad or missing config, --set or option value"),
    ("yaml:YAMLError", USAGE, "invalid YAML"),
    ("builtins:KeyError", USAGE, "an unknown name"),
    ("shopmtl.data.ingest:DataError", RUNTIME, "bad or missing data"),
    ("shopmtl.train.checkpoint:CheckpointError", RUNTIME, "a corrupt or missing checkpoint"),
    ("shopmtl.train.loop:NonFiniteError", RUNTIME, "a non-finite or diverging run, or one no "
     "better than its label prior"),
    ("shopmtl.deps:MissingDependencyError", RUNTIME,
     "a missing optional package"),
    ("shopmtl.export.checks:ParityError", RUNTIME, "an exported graph that is not its model"),
    ("builtins:OSError", RUNTIME, "a full disk, no permission, OUT in use"),
)


def _epilog() -> str:
    """The ``--help`` epilog: ``EXIT_CODES`` in words."""
    def what(code: int) -> str:
        return ", ".join(doc for _, c, doc in EXIT_CODES if c == code)

    return (f"Exit status: 0 success; {USAGE} usage error (fix the command or the config: "
            f"{what(USAGE)}); {RUNTIME} runtime error ({what(RUNTIME)}, an internal error). "
            "--debug shows the traceback.")


# never print local variables in a traceback: they can hold raw cell values of the user's data
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Multi-scenario multi-task learning for e-commerce.", epilog=_epilog())

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


def _fail(message: str, code: int = USAGE) -> None:
    typer.secho(f"error: {_one_line(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def exit_code(e: BaseException) -> int | None:
    """The exit status of a handled error (``EXIT_CODES``), None for an internal one. A bare
    KeyError (``KeyError('u123')``, possibly a data value) is internal: only one raised with a
    sentence ("unknown task 'x'; known: ...") is a usage error."""
    import importlib

    for where, code, _ in EXIT_CODES:
        module, name = where.split(":")
        if module not in sys.modules and module != "builtins":
            continue  # never imported: nothing of it can have been raised
        cls = getattr(importlib.import_module(module), name)
        if isinstance(e, cls):
            if cls is KeyError and not (e.args and " " in str(e.args[0])):
                return None
            return code
    return None


def _message(e: BaseException) -> str:
    import yaml

    if isinstance(e, yaml.YAMLError):
        from shopmtl.config import yaml_problem

        return f"not valid YAML: {yaml_problem(e)}"
    if isinstance(e, KeyError):
        return str(e.args[0])  # str(KeyError) would quote it
    return str(e)


def _peer_lost(e: BaseException) -> str | None:
    """In a torchrun job, a collective that failed because another rank died or stopped
    answering (gloo: the connection closed, NCCL/gloo: the ``train.dist_timeout`` passed) is
    no bug of this rank: say so in one line and leave naming the rank to torchrun's summary.
    None outside a job or for any other error."""
    dist = sys.modules.get("shopmtl.train.distributed")
    if dist is None or dist.current() is None or not isinstance(e, RuntimeError):
        return None
    import torch

    text = str(e).lower()
    if not (isinstance(e, torch.distributed.DistError)
            or any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout"))):
        return None
    me = dist.current()
    return (f"rank {me.rank} of {me.world}: a collective failed ({type(e).__name__}): another "
            "process of the torchrun job died or stopped answering; torchrun's summary names "
            "the rank that failed")


def _guard(fn):
    """Every failure becomes one line on stderr, never a traceback (unless --debug), and exits
    with its ``EXIT_CODES`` status: 2 for a usage error, 1 for a runtime one; an unhandled
    exception is a bug: exit 1 with its type only (its message could hold a data value)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer's own exits and usage errors (exit 2)
        except Exception as e:
            if _DEBUG:
                raise
            code = exit_code(e)
            lost = _peer_lost(e) if code is None else None
            if lost:
                _fail(lost, code=RUNTIME)
            if code is None:
                _fail(f"internal error ({type(e).__name__}); rerun with --debug for the "
                      "traceback", code=RUNTIME)
            _fail(_message(e), code=code)

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


class BadRows(StrEnum):
    fail = "fail"
    quarantine = "quarantine"


class OutFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"
    jsonl = "jsonl"


BadRowsOption = Annotated[BadRows, typer.Option(
    "--bad-rows", help="fail: the first bad row (file:line, column, reason) and the count stop "
    "the run; quarantine: bad rows are set aside next to OUT, in OUT's stem + .quarantine.csv "
    "(file, line, column, reason, the raw row) and .quarantine.json (counts per reason), e.g. "
    "p.csv -> p.quarantine.csv, p.quarantine.json")]


@app.command()
@_guard
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (OUT/model)")],
    data: Annotated[Path, typer.Argument(help="CSV or Parquet file with labels")],
    out: Annotated[Path | None, typer.Option(help="Write metrics JSON here")] = None,
    bad_rows: BadRowsOption = BadRows.fail,
) -> None:
    """Metrics per task x scenario of a saved model on a labelled file, read as training reads
    it. Under --bad-rows quarantine the metrics are over the good rows (up to the run's
    data.max_bad_fraction of bad rows)."""
    from shopmtl.config import ConfigError
    from shopmtl.jsonsafe import json_safe
    from shopmtl.modeldir import load

    if bad_rows is BadRows.quarantine and out is None:
        raise ConfigError("--bad-rows quarantine needs --out: the quarantine file is written "
                          "next to it")
    metrics, report = load(model_dir).evaluate_file(data, bad_rows.value, out)
    metrics = json_safe(metrics)
    if out is not None:  # written before the table: a failed write (a full disk) is the only
        rows = {"read": report.rows_read, "scored": report.scored, "bad": report.bad_rows,
                "blank_lines_skipped": report.blank_lines, "per_reason": report.per_reason}
        out.write_text(json.dumps({"test": metrics, "rows": rows}, indent=1))  # output
    _summary({"test": metrics})
    if out is not None:
        typer.echo(f"wrote {out}{report.describe()}")


@app.command()
@_guard
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (OUT/model)")],
    data: Annotated[Path, typer.Argument(help="CSV or Parquet rows (labels not needed); a "
                                         "joint task's requests: JSON lines, CSV or Parquet")],
    out: Annotated[Path, typer.Option(
        help="Predictions: line, the id columns, the answer's columns; .csv, .parquet or "
        ".jsonl by its extension (CSV otherwise)")] = Path("predictions.csv"),
    task: Annotated[list[str] | None, typer.Option(help="Only these tasks")] = None,
    bad_rows: BadRowsOption = BadRows.fail,
    id_columns: Annotated[str | None, typer.Option(
        "--id-columns", help="Comma-separated columns copied to the output as read (a CSV "
        "cell as text), after line: a,b")] = None,
    fmt: Annotated[OutFormat | None, typer.Option(
        "--format", help="Output format, instead of OUT's extension")] = None,
    top_k: Annotated[int, typer.Option(
        "--top-k", help="Multiclass tasks: the K most likely labels with their probabilities",
        min=1)] = 1,
    all_classes: Annotated[bool, typer.Option(
        "--all-classes", help="Multiclass tasks: also one probability column per label")
    ] = False,
) -> None:
    """Answers per task for every row of a file, read as training reads it; each row is named
    by `line` (the line it starts on, or the Parquet row from 1). Every data row read is
    answered or (under --bad-rows quarantine) set aside; blank lines are skipped and counted.
    A joint model directory (``shopmtl train`` on a joint config) answers one ``--task``,
    reading the raw fields ``shopmtl describe`` lists (JSON lines, CSV or Parquet)."""
    from shopmtl.modeldir import load

    # the directory's meta.json kind picks the loader (modeldir.KINDS); each kind's model
    # writes its predictions through predict.TableWriter
    ids = [c for c in (id_columns or "").split(",") if c.strip()]
    report = load(model_dir).predict_file(data, out, task, bad_rows.value, ids,
                                          None if fmt is None else fmt.value, top_k=top_k,
                                          all_classes=all_classes)
    typer.echo(f"wrote {report.scored} rows to {out}{report.describe()}")


@app.command()
@_guard
def export(
    model_dir: Annotated[Path, typer.Argument(help="A zoo model directory (OUT/model)")],
    out: Annotated[Path, typer.Option(help="The bundle directory to write (new, empty, or a "
                                      "previous bundle, replaced atomically)")],
    data: Annotated[Path, typer.Option(help="Held-out labelled rows (CSV or Parquet, e.g. "
                                       "OUT/data/test.parquet): the checks, at least 1,000")],
    int8: Annotated[bool, typer.Option("--int8", help="Weights int8 (onnxruntime dynamic "
                                       "quantisation, embedding tables included)")] = False,
    prune: Annotated[float | None, typer.Option(
        "--prune", help="Structured pruning, 0 < R < 1: the fraction R of the experts with the "
        "least mean gate weight on --data, and of each hidden MLP layer's units with the "
        "smallest outgoing-weight L2 norm (fine-tuned after when --finetune is given)")] = None,
    scenario: Annotated[str | None, typer.Option(
        "--scenario", help="A sub-model for one scenario: its tasks only, the scenario fixed "
                           "(no scenario input); checked on that scenario's rows of --data")
    ] = None,
    finetune: Annotated[Path | None, typer.Option(
        "--finetune", help="With --prune: train the pruned model a little more on this "
        "labelled file (CSV or Parquet, training rows, not --data) with the model's own train "
        "config; the fine-tuned model is exported and measured")] = None,
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", help="Epochs of the --finetune file")] = 1,
    prune_ids: Annotated[float | None, typer.Option(
        "--prune-ids", help="0 < F < 1: drop the embedding rows of the rarest F of each "
        "learnt vocabulary (by training frequency); those values then read as unknown (id 0). "
        "Hashed vocabularies are kept whole")] = None,
    calibrate: Annotated[Path | None, typer.Option(
        "--calibrate", help="With --int8: static quantisation, the activation ranges fixed on "
        "a sample of this labelled file (CSV or Parquet, training rows, not --data); a row's "
        "answer then does not depend on the other rows of its call")] = None,
    calibration_rows: Annotated[int, typer.Option(
        "--calibration-rows", help="Rows of --calibrate used (a seeded sample of a larger "
        "file)")] = 2048,
) -> None:
    """Export a zoo model to an ONNX bundle (fp32, or int8), loadable by `shopmtl predict` and
    `shopmtl.load`. Measured on --data and written into the bundle's meta.json: parity with
    the PyTorch model at batch 1, 7 and 512 (an fp32 graph off by more than 1e-5 is refused),
    AUC and logloss per task, file size, latency of 1 and 100 rows. Needs the 'export' extra."""
    from shopmtl.export.bundle import export_bundle
    from shopmtl.export.finetune import FineTune, summary_line
    from shopmtl.export.prune import summary
    from shopmtl.export.prune_ids import summary as ids_summary
    from shopmtl.export.quantize import Calibration

    fine = None if finetune is None else FineTune(finetune, finetune_epochs)
    cal = None if calibrate is None else Calibration(calibrate, calibration_rows)
    meta = export_bundle(model_dir, out, data, int8=int8, prune_ratio=prune, scenario=scenario,
                         fine=fine, prune_ids_fraction=prune_ids, calibrate=cal)
    _checks_table(meta)
    if "id_pruning" in meta:
        typer.echo(ids_summary(meta["id_pruning"]))
    if "pruning" in meta:
        typer.echo(summary(meta["pruning"]))
        if "finetune" in meta["pruning"]:
            typer.echo(summary_line(meta["pruning"]["finetune"]))
    if "scenario" in meta:
        sc = meta["scenario"]
        typer.echo(f"scenario {sc['name']}: tasks {', '.join(sc['tasks'])} "
                   f"(dropped: {', '.join(sc['dropped_tasks']) or 'none'})")
    if (c := (meta.get("quantization") or {}).get("calibration")) is not None:
        typer.echo(f"static int8, calibrated on {c['rows']:,} of {c['rows_in_file']:,} rows of "
                   f"{c['file']} ({c['method']})")
    typer.echo(f"wrote {out} ({meta['model_file']}, {meta['precision']})")


def _pruned_name(meta: dict) -> str:
    return ("pytorch_fp32_pruned_finetuned" if "finetune" in meta.get("pruning", {})
            else "pytorch_fp32_pruned")


def _checks_table(meta: dict) -> None:
    """The export checks of a bundle's meta.json, as ``shopmtl export`` prints them: one
    column per variant (the PyTorch model, the graph written), one row per measure."""
    from rich.console import Console
    from rich.table import Table

    checks, precision = meta["checks"], meta["precision"]
    graph = f"onnx_{precision}"
    table = Table(title=f"export checks on {checks['data']} ({checks['rows']} rows)")
    variants = ["pytorch_fp32", graph]
    if "pytorch_fp32_unpruned" in checks["quality"]:
        variants.insert(0, "pytorch_fp32_unpruned")
    table.add_column("measure")
    for col in variants:
        table.add_column(col.replace("pytorch_fp32", _pruned_name(meta))
                         if ("pruning" in meta or "id_pruning" in meta)
                         and col == "pytorch_fp32" else col)
    dash = ["-"] * (len(variants) - 1)
    table.add_row("file size (MB)", *dash, f"{checks['size_bytes'][precision] / 1e6:.3f}")
    table.add_row("max |p - p_pytorch|", *dash, f"{checks[f'parity_{precision}']['max']:.2e}")
    for rows in ("1", "100"):
        for p in ("p50", "p99"):
            table.add_row(f"latency {p}, {rows} row{'s' * (rows != '1')} (ms)",
                          *dash[1:], *(f"{checks['latency'][v][f'batch_{rows}'][f'{p}_ms']:.3f}"
                                       for v in ("pytorch_fp32", graph)))
    for t in meta["tasks"]:
        for k in ("auc", "logloss"):
            got = [checks["quality"][v].get(t, {}).get(k) for v in variants]
            table.add_row(f"{t} {k}", *("-" if g is None else f"{g:.4f}" for g in got))
    Console().print(table)


@app.command()
@_guard
def describe(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (OUT/model)")],
    task: Annotated[list[str] | None, typer.Option(help="Only these tasks")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of text")] = False,
) -> None:
    """What each task reads and answers: its input fields (type, unit, range), its output
    columns, and a ready example request with the command that answers it."""
    from shopmtl import describe as d
    from shopmtl.modeldir import load

    model = load(model_dir)
    tasks = list(task) if task else list(model.tasks)
    if as_json:
        typer.echo(json.dumps([d.task_info(model, t) for t in tasks], indent=1))
    else:
        typer.echo(d.text(model, tasks))


@app.command()
@_guard
def serve(
    model_dir: Annotated[Path | None, typer.Argument(help="A model directory (OUT/model, "
                                                     "OUT/joint/model); optional with "
                                                     "--experiment")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default)")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on", min=1, max=65535)] = 8000,
    max_in_flight: Annotated[int, typer.Option(
        "--max-in-flight", help="Model requests answered at once; more get 429 with "
        "Retry-After", min=1)] = 8,
    max_body: Annotated[int, typer.Option(
        "--max-body", help="Largest request body in bytes (413 beyond)", min=1)] = 1 << 20,
    admin_key_file: Annotated[Path | None, typer.Option(
        "--admin-key-file", help="A file holding the admin key of POST /admin/reload "
        "(default: the SHOPMTL_ADMIN_KEY environment variable; neither: admin endpoints "
        "disabled)")] = None,
    features: Annotated[Path | None, typer.Option(
        "--features", help="A feature snapshot folder (`shopmtl features`), held in memory: "
        "a request may give only the user and item ids, the rest is filled from it")] = None,
    features_redis: Annotated[str | None, typer.Option(
        "--features-redis", help="Instead of --features: a Redis URL "
        "(redis://127.0.0.1:6379/0) holding the features (`shopmtl features ... "
        "--to-redis URL`), read per request")] = None,
    experiment: Annotated[Path | None, typer.Option(
        "--experiment", help="An experiment config (YAML, docs/ABTEST.md): its arms rank "
        "on POST /v1/experiments/NAME/rank, clicks and conversions come to POST "
        "/v1/feedback, every event goes to its SQLite store")] = None,
    batch_rows: Annotated[int, typer.Option(
        "--batch-rows", help="Most table rows of concurrent requests scored in one model "
        "call (/v1/score, /v1/recommend, /v1/ads/ctr); 0: each request alone", min=0)
    ] = 4096,
    workers: Annotated[int, typer.Option(
        "--workers", help="Worker processes on the one port (each loads the model and, "
        "with --experiment, writes its own events; --max-in-flight is per worker); 1: one "
        "process", min=1)] = 1,
) -> None:
    """Serve a model over HTTP (the serve extra): one JSON endpoint per subsystem the model
    has (/v1/score, /v1/recommend, /v1/ads/ctr, /v1/search, /v1/support/intent,
    /v1/reviews/rating, /v1/demand), /livez, /readyz, /metrics and /openapi.json
    (docs/DEPLOY.md). Stops on SIGTERM or Ctrl-C once in-flight requests are answered; SIGHUP
    or POST /admin/reload (with the admin key) hot-reloads the model."""
    from shopmtl.deps import require_extra

    require_extra("serve", "shopmtl serve")
    from shopmtl.serve.app import run

    if features is not None and features_redis is not None:
        from shopmtl.config import ConfigError

        raise ConfigError("give --features or --features-redis, not both")
    if model_dir is None and experiment is None:
        from shopmtl.config import ConfigError

        raise ConfigError("give a model directory, --experiment CONFIG, or both")
    if workers > 1:
        from shopmtl.serve.workers import run_workers

        run_workers(model_dir, workers=workers, host=host, port=port,
                    max_in_flight=max_in_flight, max_body=max_body,
                    admin_key_file=admin_key_file, features=features,
                    features_redis=features_redis, batch_rows=batch_rows,
                    experiment=experiment)
        return
    run(model_dir, host=host, port=port, max_in_flight=max_in_flight, max_body=max_body,
        admin_key_file=admin_key_file, features=features, features_redis=features_redis,
        experiment=experiment, batch_rows=batch_rows)


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


@app.command("features")
@_guard
def features_cmd(
    source: Annotated[Path, typer.Argument(help="A data file of the training table (Parquet "
                                           "or CSV, e.g. OUT/data/train.parquet), or a "
                                           "snapshot folder to load into --to-redis")],
    out: Annotated[Path | None, typer.Option(help="The snapshot folder to write (replaced "
                                             "atomically if it is one already)")] = None,
    user_key: Annotated[str, typer.Option("--user-key", help="The user id column")
                        ] = "user_id",
    item_key: Annotated[str, typer.Option("--item-key", help="The item id column")
                        ] = "item_id",
    user_columns: Annotated[str, typer.Option(
        "--user-columns", help="Comma-separated user feature columns (default: the "
        "quickstart world's)")] = ",".join(("segment", "age_bucket", "gender", "hist_leaf")),
    item_columns: Annotated[str, typer.Option(
        "--item-columns", help="Comma-separated item feature columns (default: the "
        "quickstart world's)")] = ",".join(("top_category", "leaf_category", "brand",
                                            "price")),
    order_by: Annotated[str | None, typer.Option(
        "--order-by", help="The latest row per id is the one with the largest value of this "
        "column (e.g. day), ties in file order (default: the last in file order)")] = None,
    to_redis: Annotated[str | None, typer.Option(
        "--to-redis", help="Also load the snapshot into Redis at this URL "
        "(redis://127.0.0.1:6379/0) for `shopmtl serve --features-redis`")] = None,
) -> None:
    """A feature snapshot for `shopmtl serve --features`: the latest value per user of the
    user columns and per item of the item columns, from a data file (docs/DEPLOY.md,
    "Features by id"); with --to-redis also loaded into Redis."""
    from shopmtl.config import ConfigError
    from shopmtl.serve.features import Spec, push_snapshot, write_snapshot

    if source.is_dir():
        if out is not None or to_redis is None:
            raise ConfigError(f"{source} is a folder: give --to-redis URL to load this "
                              "snapshot into Redis (--out needs a data file)")
        snapshot = source
    else:
        if out is None:
            raise ConfigError("give --out SNAPSHOT (the folder to write)")
        spec = Spec({"user": user_key, "item": item_key},
                    {"user": _columns(user_columns), "item": _columns(item_columns)})
        manifest = write_snapshot(source, out, spec, order_by=order_by)
        typer.echo(f"wrote {out}: {manifest['user']['rows']} users "
                   f"({', '.join(manifest['user']['columns'])}), {manifest['item']['rows']} "
                   f"items ({', '.join(manifest['item']['columns'])})")
        snapshot = out
    if to_redis is not None:
        counts = push_snapshot(snapshot, to_redis)
        typer.echo(f"loaded {counts['user']} users and {counts['item']} items into Redis")


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


@app.command()
@_guard
def federate(
    config: Annotated[Path, typer.Argument(help="Federated YAML (examples/federated.yaml)")],
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("runs/federated"),
    sets: Sets = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the previous shopmtl run in OUT")] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in OUT after its last completed round (a checkpoint is "
             "written after every round)")] = False,
    deployment: Annotated[str | None, typer.Option(
        help="Run on a Flower SuperLink (its API's host:port) instead of the simulation "
             "engine (docs/FEDERATED.md, deployment mode)")] = None,
    insecure: Annotated[bool, typer.Option(
        help="--deployment without TLS (loopback tests only)")] = False,
    root_certificates: Annotated[Path | None, typer.Option(
        help="--deployment: the CA certificate that signed the SuperLink's")] = None,
) -> None:
    """Federated training on Flower's simulation engine (or a SuperLink's SuperNodes with
    --deployment): the rows split into silos that never pool them, one model trained by
    rounds of local training and aggregation; AUC per round per silo and on the pooled test
    split in OUT/metrics.json and OUT/report.md."""
    # Flower's usage telemetry reads this when it is first imported (below): a silo's run
    # sends nothing anywhere unless its user sets FLWR_TELEMETRY_ENABLED=1 themselves
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from shopmtl.federated.config import JointFederatedRun, load_federated
    from shopmtl.federated.server import run_federated
    from shopmtl.train.outdir import check_output, start_run
    from shopmtl.train.outlock import locked_output

    run = load_federated(config, sets or [])
    if deployment and isinstance(run, JointFederatedRun):
        from shopmtl.config import ConfigError

        raise ConfigError("--deployment with a joint config: not built (a joint federation "
                          "runs on the simulation engine)")
    if deployment:
        from shopmtl.federated.deploy import check_connection

        check_connection(insecure, root_certificates)
    with locked_output(out):
        action = check_output(out, command="federate", resume=resume, overwrite=overwrite)
        run_id = start_run(out, action, command="federate", checkpoints=out / "checkpoints")
        if deployment:  # the ServerApp, started by the SuperLink, writes OUT
            from shopmtl.config import ConfigError

            if run.federated.dp.mode != "none":
                raise ConfigError("federated.dp with --deployment: not built (DP runs on the "
                                  "simulation engine)")
            if resume:
                raise ConfigError("--resume: resume a federated run on the simulation engine "
                                  "(deployment mode writes its checkpoints on the SuperLink)")
            from shopmtl.federated.deploy import run_deployment

            metrics = run_deployment(config, out, sets or [], deployment, insecure=insecure,
                                     root_certificates=root_certificates)
        elif isinstance(run, JointFederatedRun):
            from shopmtl.federated.joint import run_joint_federated

            metrics = run_joint_federated(run, out, log=typer.echo,
                                          resume=action == "resume", run_id=run_id)
        else:
            metrics = run_federated(run, out, log=typer.echo, resume=action == "resume",
                                    run_id=run_id)
    final = metrics["final"]
    if metrics.get("kind") == "joint":  # each task on the silo that owns its source
        for task, got in final.get("tasks", {}).items():
            typer.echo(f"test {task} (silo {got['silo']}): {got['test']:.4f}")
    for task, scopes in final.get("pooled", {}).items():
        typer.echo(f"pooled test AUC {task}: {scopes.get('all', float('nan')):.4f}")
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


# the A/B-testing group (docs/ABTEST.md): imports only typer at load, like the commands here
from shopmtl.abtest.cli import app as abtest_app  # noqa: E402

app.add_typer(abtest_app, name="abtest")


if __name__ == "__main__":
    app()
