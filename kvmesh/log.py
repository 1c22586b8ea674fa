"""Logging setup. Only CLI entry points call `configure`; library code just does
`log = structlog.get_logger(__name__)`.

structlog renders each event to one line and hands it to stdlib logging, whose handlers
pick by level where it goes: the console (stderr) at one level, and an optional log
file at its own, usually lower, level. So an interactive command shows warnings only
while its file keeps the info lines (`kvmesh up` writes one, see default_log_file).
"""

import logging
import os
import sys
from pathlib import Path

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure(
    level: str = "info", json: bool = False, file: Path | None = None, file_level: str = "info"
) -> None:
    """Route structlog and stdlib logging to stderr at `level`, and to `file` (appended)
    at `file_level` or `level`, whichever is lower; key=value (or JSON) lines."""
    for name, value in (("level", level), ("file_level", file_level)):
        if value not in LEVELS:
            raise ValueError(f"log {name} must be one of {', '.join(LEVELS)}, got {value!r}")
    console = getattr(logging, level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(console)
    lowest = console
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
        lowest = min(console, getattr(logging, file_level.upper()))
        handlers[1].setLevel(lowest)
    logging.basicConfig(handlers=handlers, level=lowest, format="%(message)s", force=True)
    # Libraries that log every HTTP call at info: keep them to warnings.
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(lowest, logging.WARNING))
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def default_log_file(cluster: str, node: str) -> Path:
    """Where `kvmesh up` writes its actors' log lines when no --log-file is given:
    $XDG_STATE_HOME/kvmesh/logs/<cluster>-<node>.log (~/.local/state by default)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "kvmesh" / "logs" / f"{cluster}-{node}.log"


def rotate(file: Path) -> None:
    """Keep the previous run's log as <file>.1, so a file never grows without bound."""
    if file.exists():
        file.replace(file.with_name(file.name + ".1"))
