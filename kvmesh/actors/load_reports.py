"""LoadReports: when a worker publishes its LoadReport to the router.

A worker's load changes only while it works, but the router needs to hear from every
worker now and then: a member whose reports stop counts as unreachable after
kvmesh.router.health.EVENTS_STALE_S (5 s). Sending every report at a fixed interval
does both, at a price that grows with the cluster: a thousand idle workers at 0.5 s
send the router 2,000 messages a second that say nothing new.

Cadence: every `interval` seconds (WorkerSettings.load_report_interval, 0.5 s) the
worker's report is built and compared with the last one published (all fields: load,
totals, what it cannot reach):

- different: published now (a change reaches the router within `interval`);
- the same: published only if `keepalive` seconds (KEEPALIVE_S, 2 s) have passed since
  the last one (an idle worker still shows it is alive, well under EVENTS_STALE_S).

Reports a worker publishes on its own (the decode and prefill workers send one right
after a step that changed their queues, in order with that step's KV events) are told
with `published`, so the next tick does not repeat them. The first tick always publishes:
the router asks a worker for its cached blocks on its first report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from kvmesh.protocol import LoadReport

KEEPALIVE_S = 2.0  # an unchanged report is sent again after this long


class LoadReports:
    """Decides which of a worker's LoadReports go out; see the module docstring."""

    def __init__(
        self,
        make_report: Callable[[], LoadReport],
        interval: float,
        keepalive: float = KEEPALIVE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"load_report_interval must be > 0 seconds, got {interval!r}")
        if keepalive < interval:
            raise ValueError(
                f"keepalive must be >= load_report_interval ({interval} s), got {keepalive!r}"
            )
        self.make_report = make_report
        self.interval = interval
        self.keepalive = keepalive
        self.clock = clock
        self.num_published = 0
        self._last: LoadReport | None = None
        self._last_at = -float("inf")

    def due(self) -> LoadReport | None:
        """The report to publish at this tick (recorded as published), or None."""
        report = self.make_report()
        now = self.clock()
        if report == self._last and now - self._last_at < self.keepalive:
            return None
        self.published(report, now)
        return report

    def published(self, report: LoadReport, now: float | None = None) -> None:
        """`report` went out (or is queued to) by another path: count it as the last."""
        self._last = report
        self._last_at = self.clock() if now is None else now
        self.num_published += 1

    async def run(self, emit: Callable[[LoadReport], Awaitable[None]]) -> None:
        """Tick forever: publish each due report with `emit`."""
        while True:
            report = self.due()
            if report is not None:
                await emit(report)
            await asyncio.sleep(self.interval)
