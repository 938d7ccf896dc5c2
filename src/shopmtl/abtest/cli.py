"""``shopmtl abtest ...``: the A/B-testing commands (docs/ABTEST.md), registered in shopmtl.cli.

Errors are one line on stderr, ``error: ...``: exit 2 for a usage error (an option out of its
range, an unknown control arm), 1 for bad events (a missing or corrupt file, one arm only, no
test period). This module cannot use shopmtl.cli's guard: shopmtl.cli imports it to register
the group, so importing back would be a circle (tests/test_layering.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
import typer.core


class _Group(typer.core.TyperGroup):
    """``shopmtl abtest CONFIG.yaml`` is ``shopmtl abtest run CONFIG.yaml``: a first argument
    that is no command but a YAML file runs it (the issue's and the docs' short form)."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and args[0].endswith((".yaml", ".yml")):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_show_locals=False,
                  help="A/B testing: simulate, serve and analyse experiments (docs/ABTEST.md). "
                       "`shopmtl abtest CONFIG.yaml` is short for `shopmtl abtest run "
                       "CONFIG.yaml`.")


class OptionError(ValueError):
    """An option value the command cannot work with (exit 2)."""


def _fail(message: str, code: int) -> None:
    one = "; ".join(x.strip() for x in str(message).splitlines() if x.strip())
    typer.secho(f"error: {one}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from shopmtl.abtest.analyze import ArgumentError

        try:
            return fn(*args, **kwargs)
        except (OptionError, ArgumentError) as e:
            _fail(str(e), 2)
        except ImportError as e:  # deps.MissingDependencyError: the 'abtest' extra's pip line
            _fail(str(e), 1)
        except (ValueError, OSError) as e:  # bad events: missing, corrupt, one arm, ...
            _fail(str(e), 1)

    return wrapper


@app.command()
@_guard
def analyze(
    # a str, not a Path: Path would fold a URL's '//' into '/'
    events: Annotated[str, typer.Argument(help="The event store of the experiment: a SQLite "
                                          "file or a postgresql://user@host:port/db URL")],
    out: Annotated[Path, typer.Option(help="Folder for report.html and results.json")] = Path(
        "runs/abtest"),
    control: Annotated[str | None, typer.Option(
        help="The control arm (default: the events' meta 'control')")] = None,
    alpha: Annotated[float, typer.Option(help="Significance level")] = 0.05,
    correction: Annotated[str, typer.Option(
        help="Across metrics x scenarios: holm (family-wise) or bh (false discovery)")] = "holm",
    looks: Annotated[int, typer.Option(help="Time slices of the sequential monitoring")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap")] = 0,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples per cell (0: none)")] = 400,
) -> None:
    """Verdict per arm, metric and scenario: SRM check, delta-method / Welch tests with
    intervals, bootstrap, CUPED, sequential monitoring, Holm/BH; writes report.html and
    results.json."""
    from rich.console import Console
    from rich.table import Table

    from shopmtl.abtest.analyze import analyze as run
    from shopmtl.abtest.events import read_events
    from shopmtl.abtest.report import write_report

    if n_boot < 0:
        raise OptionError(f"--n-boot must be >= 0, got {n_boot}")
    results = run(read_events(events), control=control, alpha=alpha,
                  correction=correction, looks=looks, n_boot=n_boot,  # type: ignore[arg-type]
                  seed=seed)
    page, doc = write_report(results, out)
    srm = results["srm"]
    console = Console()
    console.print(f"SRM: {'ok' if srm['ok'] else 'FAILED (decisions blocked)'} "
                  f"(p = {srm['p']:.3g}; units {srm['counts']})")
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.2f}%"

    for arm, body in results["arms"].items():
        table = Table("metric", "scenario", "rel. lift", "interval", "p adj.", "decision",
                      title=f"{arm} vs {results['control']}")
        for metric, by in body["metrics"].items():
            for scen, e in by.items():
                table.add_row(metric, scen, pct(e["rel_lift"]),
                              f"{pct(e['rel_ci'][0])} .. {pct(e['rel_ci'][1])}",
                              "-" if e["p_adj"] is None else f"{e['p_adj']:.3g}",
                              e["decision"])
        console.print(table)
    typer.echo(f"wrote {page} and {doc}")


@app.command()
@_guard
def plan(
    mde: Annotated[float, typer.Option(help="Minimum detectable effect (absolute, or "
                                            "relative with --relative)")],
    baseline_rate: Annotated[float | None, typer.Option(
        help="Baseline rate of a per-unit proportion (e.g. 0.05)")] = None,
    baseline_mean: Annotated[float | None, typer.Option(help="Baseline mean of a metric")] = None,
    sd: Annotated[float | None, typer.Option(help="Per-unit standard deviation (with "
                                                  "--baseline-mean)")] = None,
    relative: Annotated[bool, typer.Option(help="--mde is relative to the baseline")] = False,
    alpha: Annotated[float, typer.Option(help="Two-sided significance level")] = 0.05,
    power: Annotated[float, typer.Option(help="Power to reach")] = 0.8,
    share: Annotated[float, typer.Option(help="Treatment's share of the units")] = 0.5,
    units: Annotated[int | None, typer.Option(
        help="Also print the power that this many units in all would have")] = None,
) -> None:
    """Units per arm to detect --mde with the given power (statsmodels NormalIndPower);
    with --units, the power of an experiment of that size."""
    from shopmtl.abtest import stats

    if not 0 < alpha < 0.5:
        raise OptionError(f"--alpha must lie in (0, 0.5), got {alpha}")
    if not 0 < power < 1:
        raise OptionError(f"--power must lie in (0, 1), got {power}")
    if baseline_rate is not None and baseline_mean is not None:
        raise OptionError("give --baseline-rate or --baseline-mean, not both")
    n_t = round((units or 0) * share)
    if units is not None and (n_t < 2 or units - n_t < 2):
        raise OptionError(f"--units {units} leaves an arm with fewer than 2 units")
    try:
        p = stats.plan(mde, baseline_rate=baseline_rate, mean=baseline_mean, sd=sd,
                       relative=relative, alpha=alpha, power=power, share=share)
    except ValueError as e:
        raise OptionError(str(e)) from None
    typer.echo(f"control:   {p.n_control} units")
    typer.echo(f"treatment: {p.n_treatment} units")
    typer.echo(f"total:     {p.n_control + p.n_treatment} units (effect size {p.effect_size:.4g},"
               f" power {p.power:.3f} at alpha {alpha})")
    if units is not None:
        pw = stats.achieved_power(p.effect_size, units - n_t, n_t, alpha)
        typer.echo(f"power with {units} units ({units - n_t} control, {n_t} treatment): "
                   f"{pw:.3f}")


# -- abtest run: the simulated shop (ab-sim) -------------------------------------------------


def _run_guard(fn):
    """One line on stderr for a failure: exit 2 for a bad config (ConfigError, a ValueError that
    ``_guard`` would call bad events), 1 for a failed run (bad data, a missing model, the
    system refusing)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from shopmtl.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            _fail(str(e), 2)
        except (ValueError, OSError) as e:
            _fail(str(e), 1)

    return wrapper


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


@app.command("play")
@_guard
def play(
    url: Annotated[str, typer.Argument(help="The service (http://127.0.0.1:8000)")],
    experiment: Annotated[str, typer.Option("--experiment", help="The experiment's name "
                                            "(its route /v1/experiments/NAME/rank)")],
    world: Annotated[Path, typer.Option(help="The world the shop simulates: its world.json "
                                        "(OUT/data/world.json of `shopmtl quickstart`)")],
    requests: Annotated[int, typer.Option(help="Page views to play", min=1)] = 1_000,
    seed: Annotated[int, typer.Option(help="Seed of the requests and the users' responses",
                                      min=0)] = 0,
) -> None:
    """Play the simulated shop's users against a running `shopmtl serve --experiment`: one
    request at a time, ranked by the service, the clicks and conversions posted to
    /v1/feedback. Stop the server (SIGTERM) to flush its events, then `shopmtl abtest analyze`
    its event store."""
    import httpx

    from shopmtl.abtest.http import HttpRanker, ServiceError, play_http
    from shopmtl.abtest.shop import Shop, read_world
    from shopmtl.config import ConfigError

    try:
        cfg = read_world(world)  # a bad --world is refused before the world is built
    except ConfigError as e:
        raise OptionError(f"--world: {e}") from None

    shop = Shop(cfg)
    try:
        with HttpRanker(url.rstrip("/"), experiment) as ranker:
            sent = play_http(shop, shop.requests(requests, seed), ranker, seed)
    except (ServiceError, httpx.HTTPError) as e:  # the service is down or refused a request
        _fail(f"{url}: {e}" if isinstance(e, ServiceError) else
              f"{url}: the service did not answer ({type(e).__name__})", 1)
    arms = ", ".join(f"{a} {n}" for a, n in sorted(sent.arms.items()))
    typer.echo(f"sent {sent.exposures} rank requests ({arms}) and {sent.feedback} feedback "
               "events")
