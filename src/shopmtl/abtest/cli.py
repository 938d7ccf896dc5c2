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


def _guarded(fn):
    """``shopmtl.cli._guard`` (one-line errors, exit codes), looked up at call time: this module
    is imported while ``shopmtl.cli`` is still loading."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from shopmtl.cli import _guard

        return _guard(fn)(*args, **kwargs)

    return wrapper


@app.command("run")
@_guarded
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
