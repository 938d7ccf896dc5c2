"""``shopmtl abtest ...``: the A/B-testing commands (docs/ABTEST.md), a typer group that
``shopmtl.cli`` registers as ``abtest`` (and wraps each command in its one-line error guard).

- ``play URL --experiment NAME --world WORLD_JSON``: the simulated shop's users against a
  running service (``shopmtl serve --experiment``): each request ranked by the service, the
  users' clicks and conversions posted back (``abtest.http``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="A/B testing: simulate, serve, analyse "
                  "(docs/ABTEST.md)")


@app.command("play")
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
    from shopmtl.abtest.http import HttpRanker, play_http, world_of

    cfg = world_of(world)  # a bad --world is refused before the world is built
    from shopmtl.abtest.shop import Shop

    shop = Shop(cfg)
    with HttpRanker(url.rstrip("/"), experiment) as ranker:
        sent = play_http(shop, shop.requests(requests, seed), ranker, seed)
    arms = ", ".join(f"{a} {n}" for a, n in sorted(sent.arms.items()))
    typer.echo(f"sent {sent.exposures} rank requests ({arms}) and {sent.feedback} feedback "
               "events")
