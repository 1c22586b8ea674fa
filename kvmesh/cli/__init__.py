"""The `kvmesh` command. Each command group lives in its own module of this package
and imports its heavy dependencies inside the command, so `kvmesh --help` is instant."""

import click

from kvmesh import __version__, log
from kvmesh.cli.bench import bench
from kvmesh.cli.cluster import actor, chat, status, up
from kvmesh.cli.generate import generate
from kvmesh.cli.keys import keys
from kvmesh.cli.model import model
from kvmesh.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmesh")
@click.option(
    "--log-level",
    type=click.Choice(log.LEVELS),
    default="info",
    show_default=True,
    help="Minimum level of log lines written to stderr.",
)
@click.option("--log-json", is_flag=True, help="Write log lines as JSON instead of key=value.")
def cli(log_level: str, log_json: bool) -> None:
    """kvmesh: serve language models across GPUs and machines.

    \b
    Quick start (one CPU machine, the bundled tiny model):
      kvmesh generate "Once upon a time"     (makes the tiny model on first use)
      kvmesh model init-tiny ./tiny-llama    (or write it where you like)
      kvmesh bench engine                    (Engine vs transformers generate)
    """
    log.configure(log_level, log_json)


cli.add_command(up)
cli.add_command(status)
cli.add_command(chat)
cli.add_command(actor)
cli.add_command(model)
cli.add_command(generate)
cli.add_command(bench)
cli.add_command(keys)
cli.add_command(serve)


def main() -> None:
    cli(prog_name="kvmesh")
