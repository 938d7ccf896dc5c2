"""Deployment mode: the same ServerApp and ClientApp as the simulation, run by a Flower
SuperLink and SuperNodes as real processes (``flower-superlink``, ``flower-supernode``,
``flwr run``), on one machine or many.

What Flower's deployment needs and this module gives it:

- a Flower app (``write_app``): a ``pyproject.toml`` whose components are ``server_app`` /
  ``client_app`` of a two-line module that takes them from here; ``flwr run`` bundles it (a
  FAB) and the SuperLink starts its ServerApp, each SuperNode its ClientApp. shopmtl itself
  must be installed where they run (runtime dependency installation is off).
- the ServerApp (``make_server_app``): reads the run config (``config``: the federated YAML,
  ``out``: the run folder, ``sets``: JSON list of ``a.b=value`` overrides) and calls
  ``server.run_federated`` with the SuperLink's grid as its engine: the silos are cut and
  written, ``federation.json`` (what a client needs: the experiment, the federation, the
  vocabulary sizes; no rows) beside them, then ``server.serve`` runs the rounds.
- the ClientApp (``make_deployed_client_app``): ``client.make_client_app`` whose federation
  comes from the SuperNode's node config: ``partition-id`` (its silo), ``federation`` (the
  path of federation.json) and optionally ``silo-file`` (its silo's rows, where they are on
  its machine).
- ``run_deployment`` (``shopmtl federate CONFIG --deployment ADDRESS``): writes the app and
  a Flower config naming the SuperLink's Control API, runs ``flwr run ... --stream`` and
  waits for metrics.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from shopmtl.config import ConfigError, config_from_dict, from_dict, to_dict
from shopmtl.federated.client import Federation, make_client_app
from shopmtl.federated.config import FederatedConfig

FEDERATION_FILE = "federation.json"
APP_MODULE = "shopmtl_flower_app"
CONNECTION = "shopmtl"  # the SuperLink connection's name in the Flower config we write
ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

_PYPROJECT = """\
# The Flower app of a shopmtl federated run (written by shopmtl.federated.deploy).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "shopmtl-federated"
version = "1.0.0"
description = "shopmtl's federated multi-scenario multi-task training"
license = "Apache-2.0"
dependencies = []  # shopmtl[federated] is installed where the app runs

[tool.flwr.app]
publisher = "shopmtl"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
config = ""  # the federated YAML (absolute path on the SuperLink's machine)
out = ""     # the run folder (absolute path on the SuperLink's machine)
sets = "[]"  # JSON list of a.b=value overrides of the YAML
"""

_MODULE = '''"""The components Flower loads; the apps are shopmtl's (shopmtl.federated.deploy)."""

from shopmtl.federated.deploy import make_deployed_client_app, make_server_app

server_app = make_server_app()
client_app = make_deployed_client_app()
'''


# -- federation.json: what a client needs to know, no rows ------------------------------------

def write_federation(fed: Federation, out: Path) -> Path:
    """``out/federation.json``: the experiment, the federation, the vocabulary sizes and the
    silos' names and files (paths on the server's machine; a SuperNode elsewhere names its
    own with ``silo-file``)."""
    path = out / FEDERATION_FILE
    doc = {"experiment": to_dict(fed.experiment), "federated": to_dict(fed.federated),
           "vocab_sizes": fed.vocab_sizes, "silo_names": list(fed.silo_names),
           "silo_files": list(fed.silo_files)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def read_federation(path: Path) -> Federation:
    """The federation ``write_federation`` wrote (every config key checked again)."""
    if not path.is_file():
        raise ConfigError(f"node config federation: no file at {path}")
    doc = json.loads(path.read_text())
    exp = config_from_dict(doc["experiment"])
    fed = from_dict(FederatedConfig, doc["federated"], "federated")
    return Federation(exp, fed, exp.data.schema.build(), dict(doc["vocab_sizes"]),
                      tuple(doc["silo_names"]), tuple(doc["silo_files"]))


_NODE_FEDERATIONS: dict[tuple[str, str], Federation] = {}


def node_federation(context: Any) -> Federation:
    """A SuperNode's federation, from its node config (read once per process)."""
    nc = context.node_config
    for k in ("partition-id", "federation"):
        if k not in nc:
            raise ConfigError(f"node config: '{k}' is missing (flower-supernode --node-config "
                              "\"partition-id=0 federation='/path/federation.json'\")")
    key = (str(nc["federation"]), str(nc.get("silo-file", "")))
    if key not in _NODE_FEDERATIONS:
        fed = read_federation(Path(key[0]))
        i = int(nc["partition-id"])
        if not 0 <= i < len(fed.silo_names):
            raise ConfigError(f"node config partition-id: {i} is not a silo; the federation "
                              f"has {len(fed.silo_names)} (0..{len(fed.silo_names) - 1})")
        if key[1]:  # the silo's rows where they are on this machine
            files = list(fed.silo_files)
            files[i] = key[1]
            fed = Federation(fed.experiment, fed.federated, fed.schema, fed.vocab_sizes,
                             fed.silo_names, tuple(files))
        _NODE_FEDERATIONS[key] = fed
    return _NODE_FEDERATIONS[key]


# -- the apps Flower loads ---------------------------------------------------------------------

def make_deployed_client_app() -> Any:
    """The ClientApp a SuperNode runs: the simulation's, its federation from node config."""
    return make_client_app(node_federation)


def make_server_app() -> Any:
    """The ServerApp a SuperLink runs: ``run_federated`` on the SuperLink's grid."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        from shopmtl.federated.config import load_federated
        from shopmtl.federated.server import run_federated, serve

        rc = context.run_config
        if not rc.get("config") or not rc.get("out"):
            raise ConfigError("run config: 'config' and 'out' are needed (flwr run -c "
                              "run.toml; shopmtl federate --deployment writes it)")
        run = load_federated(Path(str(rc["config"])), json.loads(str(rc.get("sets", "[]"))))
        out = Path(str(rc["out"]))

        def on_grid(fed: Federation, data: Any, log: Any, checkpointer: Any = None,
                    resume: bool = False) -> Any:
            write_federation(fed, out)  # before the first message: the nodes read it then
            return serve(fed, data, grid, log, checkpointer, resume)

        run_federated(run, out, log=lambda s: print(s, flush=True), engine=on_grid)

    return app


# -- shopmtl federate --deployment ---------------------------------------------------------------

def write_app(dest: Path) -> Path:
    """The Flower app folder ``flwr run`` bundles."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(_PYPROJECT.format(module=APP_MODULE))
    (dest / f"{APP_MODULE}.py").write_text(_MODULE)
    return dest


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a TOML basic string (same escapes)


def check_connection(insecure: bool, root_certificates: Path | None) -> None:
    """TLS (a CA certificate that exists) or, said explicitly, none."""
    if insecure and root_certificates is not None:
        raise ConfigError("--deployment: --insecure and --root-certificates exclude each other")
    if not insecure and root_certificates is None:
        raise ConfigError("--deployment: give --root-certificates (the CA that signed the "
                          "SuperLink's certificate) or --insecure (loopback tests only)")
    if root_certificates is not None and not Path(root_certificates).is_file():
        raise ConfigError(f"--root-certificates: no file at {root_certificates}")


def write_flower_home(home: Path, address: str, insecure: bool,
                      root_certificates: Path | None) -> Path:
    """A Flower config (``$FLWR_HOME/config.toml``) whose default connection is the
    SuperLink's Control API at ``address``: TLS with ``root_certificates``, or insecure."""
    check_connection(insecure, root_certificates)
    lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "",
             f"[superlink.{CONNECTION}]", f"address = {_toml_str(address)}"]
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_str(str(Path(root_certificates).resolve()))}")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def write_run_config(path: Path, config: Path, out: Path, sets: list[str]) -> Path:
    """The run config ``flwr run -c`` reads (a file: paths and overrides need no quoting)."""
    path.write_text(f"config = {_toml_str(str(config.resolve()))}\n"
                    f"out = {_toml_str(str(out.resolve()))}\n"
                    f"sets = {_toml_str(json.dumps(sets))}\n")
    return path


def flwr_command() -> list[str]:
    """``flwr`` of this interpreter's environment."""
    exe = Path(sys.executable).with_name("flwr")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "flwr.cli.app"]


def run_deployment(config: Path, out: Path, sets: list[str], address: str, *,
                   insecure: bool = False, root_certificates: Path | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
    """Submit the run to the SuperLink whose Control API is at ``address`` (``flwr run
    --stream``: its logs here), wait for it to end, and return its metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    home = write_flower_home(out / "flwr", address, insecure, root_certificates)
    app = write_app(out / "flower_app")
    rc = write_run_config(out / "flower_run.toml", config, out, sets)
    metrics = out / "metrics.json"
    if metrics.exists():
        metrics.unlink()  # the run's own, or none
    # Flower's usage telemetry off unless the user turned it on (cli.federate says why)
    env = {"FLWR_TELEMETRY_ENABLED": "0", **os.environ, **ENV, "FLWR_HOME": str(home)}
    cmd = [*flwr_command(), "run", str(app), CONNECTION, "--run-config", str(rc), "--stream"]
    proc = subprocess.run(cmd, env=env, timeout=timeout, check=False)
    if proc.returncode != 0 or not metrics.is_file():
        raise RuntimeError(f"the deployed run did not finish (flwr run exit {proc.returncode}; "
                           f"no {metrics.name}): see the SuperLink's log")
    return json.loads(metrics.read_text())
