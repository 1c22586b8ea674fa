"""Progress of long steps (making the tiny model, loading weights, warm-up, benchmark
runs) as one line on stderr, rewritten in place with `\\r`:

    loading weights  37/120  31%  2.1s

Shown only where someone watches: stderr is a terminal, CI is unset and TERM is not
dumb. KVMESH_PROGRESS=1 forces it on, KVMESH_PROGRESS=0 off. Everywhere else (logs,
pipes, CI) every call is a no-op, so redirected output stays clean. Redraws are at most
one per `MIN_INTERVAL_S`; a finished step leaves its last line, so the terminal keeps
what took how long.

Stdlib only: `kvmesh --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

MIN_INTERVAL_S = 0.1


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether progress should be drawn on `stream` (stderr by default); see the module."""
    forced = os.environ.get("KVMESH_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """One long step: `with Progress("loading weights", total=n) as bar: bar.advance()`.

    Without a total it counts up (`replayed 12`); with none advanced it shows the label
    and, when the step ends, the seconds it took. `enabled=None` decides by
    `progress_enabled(stream)`; True or False overrides (tests)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_enabled(self.stream) if enabled is None else enabled
        self.start = time.monotonic()
        self.drawn_at = float("-inf")
        self.closed = False
        self.draw()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self.enabled and time.monotonic() - self.drawn_at >= MIN_INTERVAL_S:
            self.draw()

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, advancing by one after each is handled."""
        for item in items:
            yield item
            self.advance()

    def close(self) -> None:
        """Draw the final line and end it; a second close does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            self.draw(end="\n")

    def line(self) -> str:
        elapsed = f"{time.monotonic() - self.start:.1f}s"
        if self.total:
            percent = min(100, self.count * 100 // self.total)
            return f"{self.label}  {self.count}/{self.total}  {percent}%  {elapsed}"
        if self.count:
            return f"{self.label}  {self.count}  {elapsed}"
        return f"{self.label}  {elapsed}" if self.closed else f"{self.label} ..."

    def draw(self, end: str = "") -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + self.line() + end)  # lines only grow: no blanking
        self.stream.flush()
        self.drawn_at = time.monotonic()
