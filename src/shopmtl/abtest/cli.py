"""``shopmtl abtest ...``: the A/B-testing commands (docs/ABTEST.md), a typer group registered
by ``shopmtl.cli`` (``app.add_typer(abtest_app, name="abtest")``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  pretty_exceptions_show_locals=False,
                  help="A/B tests: simulate, analyse, plan, report.")


def _run_guard(fn):
    """One line on stderr for a failure: exit 2 for a bad config (ConfigError), 1 for a failed
    run (bad data, a missing model, the system refusing). Not ``shopmtl.cli._guard``:
    ``shopmtl.cli`` imports this module to register the group (no import circle)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from shopmtl.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            _fail_run(str(e), 2)
        except (ValueError, OSError) as e:
            _fail_run(str(e), 1)

    return wrapper


def _fail_run(message: str, code: int) -> None:
    one = "; ".join(x.strip() for x in str(message).splitlines() if x.strip())
    typer.secho(f"error: {one}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command("run")
@_run_guard
def run_cmd(
    config: Annotated[Path, typer.Argument(help="The A/B run's YAML (examples/abtest.yaml)")],
    out: Annotated[Path, typer.Option(help="Output folder (empty)")] = Path("runs/abtest"),
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override: key.path=value")
                    ] = None,
) -> None:
    """Train (or reuse) the models, play the experiment in the simulated shop, analyse it and
    compare every estimate with the truth; write the report."""
    from shopmtl.abtest.run import load_abtest_config, run_abtest

    cfg = load_abtest_config(config, sets or [])
    out.mkdir(parents=True, exist_ok=True)
    args = " ".join([str(config), "--out", str(out)] + [f"--set {s}" for s in sets or []])
    (out / "command.txt").write_text(f"shopmtl abtest run {args}\n")
    summary = run_abtest(cfg, out, log=typer.echo)
    typer.echo(f"wrote {out / 'abtest.json'} and {summary['report']}")
