"""`kvmesh models list|load|unload`: the cluster's models at runtime, asked of the router
as `kvmesh status` asks it (the operator key where the cluster has keys). The HTTP admin
API (kvmesh.frontend.admin) does the same through the frontend."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from kvmesh.cli.cluster import config_options, load


@click.group()
def models() -> None:
    """The models a running cluster serves: list them, unload one (its requests are
    refused with 503, its workers finish what they run and stop), load it again (its
    nodes' launchers start the workers). Examples:

    \b
      kvmesh models list --config cluster.toml
      kvmesh models unload beta --config cluster.toml
      kvmesh models load beta --config cluster.toml
    """


@models.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models(config_path, overrides, model_path, http_port, as_json):
    """Every model's state (loaded, loading, unloading, unloaded) and workers."""
    from kvmesh.protocol import ModelQuery

    _show(_ask(ModelQuery(), config_path, overrides, model_path, http_port), as_json)


def _control_command(action: str, summary: str) -> None:
    """`kvmesh models load|unload NAME`."""

    @models.command(action, help=summary)
    @click.argument("name")
    @config_options
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def command(name, config_path, overrides, model_path, http_port, as_json):
        from kvmesh.protocol import ModelControl

        request = ModelControl(model=name, action=action)
        _show(_ask(request, config_path, overrides, model_path, http_port), as_json)


_control_command(
    "load", "Load model NAME: its workers start again and register (state loading, then loaded)."
)
_control_command("unload", "Unload model NAME: no new requests (503); its workers drain and stop.")


def _ask(request, config_path, overrides, model_path, http_port):
    from kvmesh.actors.base import RemoteError
    from kvmesh.actors.client import ask_router

    cfg, _ = load(config_path, overrides, model_path, http_port)
    try:
        return asyncio.run(
            ask_router(request, cfg.router_endpoint, cfg.router_id, cfg.security.key_path)
        )
    except (TimeoutError, ConnectionError) as exc:
        click.echo(f"no router answers at {cfg.router_endpoint}: {exc}", err=True)
    except RemoteError as exc:
        click.echo(exc.error.message, err=True)
    except ValueError as exc:  # the keys: none for the operator, or not this user's
        click.echo(f"cannot ask the router: {exc}", err=True)
    sys.exit(1)


def _show(states, as_json: bool) -> None:
    from kvmesh.frontend.admin import as_json as to_json

    if as_json:
        click.echo(json.dumps(to_json(states)["data"], indent=2))
        return
    width = max((len(m.name) for m in states.models), default=5) + 2
    click.echo(f"{'model':<{width}}{'state':<11}workers")
    for m in states.models:
        workers = ", ".join(m.workers) or "-"
        stopped = f" (stopped: {', '.join(m.unloaded_workers)})" if m.unloaded_workers else ""
        click.echo(f"{m.name:<{width}}{m.state:<11}{workers}{stopped}")
