"""Admission: one model's queue policy in a frontend (Triton's dynamic-batcher queue policy).

Each served model has its own Admission; a request takes a slot from it before it reaches
the model and gives the slot back when it ends:

    in flight < max_inflight           -> admitted at once
    else fewer than max_queue waiting  -> waits in (priority, arrival) order: the lower
                                          priority value first (SamplingParams' meaning,
                                          vLLM's), first come first served within a level
    else                               -> AdmissionRefused("queue_full"): 429, Retry-After
    waited queue_timeout seconds       -> AdmissionRefused("queue_timeout"): 429, Retry-After
    client gone (task cancelled)       -> leaves the queue, holding no slot

A request that names no priority gets default_priority. Priority is strict, as in the
engine's scheduler: a level waits while a better one waits (queue_timeout bounds that).
A released slot goes straight to the first waiter (in flight stays the same), so a
newcomer never overtakes the queue and "in flight < max_inflight" means nobody waits.
Retry-After is the time the queue ahead would take to drain: (waiting + 1) x the mean
service time (admission to release, a moving average) / max_inflight, within [1, 60] s.

One event loop owns an Admission: release, expiry and cancellation each run as one
callback on it, so a slot is never lost nor handed out twice, whichever comes first.
Admissions share nothing, so one model's full queue never delays another model's request.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kvmesh.frontend.backend import OverloadedError
from kvmesh.params import MAX_PRIORITY, _check_int, _check_number

RefusalCode = Literal["queue_full", "queue_timeout"]
REFUSAL_CODES: tuple[RefusalCode, ...] = ("queue_full", "queue_timeout")
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
WAIT_LABELS = tuple("+Inf" if le == math.inf else str(le) for le in WAIT_BUCKETS)
FIRST_SERVICE_TIME = 1.0  # seconds a request is assumed to hold its slot before any has ended
SMOOTHING = 0.1  # weight of the newest service time in the moving average
MIN_RETRY_AFTER, MAX_RETRY_AFTER = 1.0, 60.0


@dataclass(frozen=True)
class AdmissionPolicy:
    """One model's admission keys ([[models]] in cluster.toml); defaults refuse at once
    when full, as a frontend without a queue does."""

    max_inflight: int = 1024
    max_queue: int = 0
    queue_timeout: float = 30.0
    default_priority: int = 0

    def __post_init__(self) -> None:
        _check_int("max_inflight", self.max_inflight, low=1)
        _check_int("max_queue", self.max_queue, low=0)
        _check_number("queue_timeout", self.queue_timeout)
        if not 0 < self.queue_timeout < math.inf:
            raise ValueError(f"queue_timeout must be seconds > 0, got {self.queue_timeout!r}")
        _check_int("default_priority", self.default_priority, low=-MAX_PRIORITY, high=MAX_PRIORITY)


class AdmissionRefused(OverloadedError):
    """A request the model's admission turned away (429): `code` says why."""

    def __init__(self, code: RefusalCode, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.code = code


@dataclass(frozen=True)
class AdmissionStats:
    """One model's admission counts for /metrics (see AdmissionCollector)."""

    model: str
    num_inflight: int
    num_queued: int
    admitted_total: int  # given a slot, at once or after waiting
    refused_total: dict[RefusalCode, int]
    cancelled_total: int  # left the queue: the client went away
    queue_wait_buckets: tuple[int, ...]  # admitted requests' waits, cumulative per WAIT_BUCKETS
    queue_wait_sum: float  # seconds


class Ticket:
    """A slot of one Admission; release() gives it back (once; later calls do nothing)."""

    def __init__(self, admission: Admission, waited: float) -> None:
        self.waited = waited  # seconds in the queue (0 when admitted at once)
        self.admitted_at = time.monotonic()
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.on_release(time.monotonic() - self.admitted_at)


class Admission:
    """One model's slots and queue (the algorithm is in the module docstring)."""

    def __init__(self, policy: AdmissionPolicy, model: str = "") -> None:
        self.policy = policy
        self.model = model
        self.num_inflight = 0
        self.num_queued = 0
        self.service_time = FIRST_SERVICE_TIME
        self.admitted_total = 0
        self.cancelled_total = 0
        self.refused_total: dict[RefusalCode, int] = dict.fromkeys(REFUSAL_CODES, 0)
        self.wait_counts = [0] * len(WAIT_BUCKETS)  # per bucket, not cumulative
        self.wait_sum = 0.0
        self._levels: dict[int, dict[int, asyncio.Future]] = {}  # priority -> arrival -> waiter
        self._priorities: list[int] = []  # the keys of _levels, sorted
        self._arrivals = itertools.count()

    @asynccontextmanager
    async def slot(self, priority: int | None = None):
        """`async with admission.slot(priority):` holds a slot for the block's duration."""
        ticket = await self.acquire(priority)
        try:
            yield ticket
        finally:
            ticket.release()

    async def acquire(self, priority: int | None = None) -> Ticket:
        """A slot, at once or after waiting its turn; raises AdmissionRefused when the
        queue is full or the wait passes queue_timeout. None: default_priority."""
        policy = self.policy
        if priority is None:
            priority = policy.default_priority
        _check_int("priority", priority, low=-MAX_PRIORITY, high=MAX_PRIORITY)
        if self.num_inflight < policy.max_inflight:
            self.num_inflight += 1
            return self._admit(0.0)
        if self.num_queued >= policy.max_queue:
            raise self._refuse(
                "queue_full",
                f"model {self.model!r} is full: {self.num_inflight} requests in flight and "
                f"{self.num_queued} queued (max_inflight {policy.max_inflight}, max_queue "
                f"{policy.max_queue}); try again shortly",
            )
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        arrival = next(self._arrivals)
        self._push(priority, arrival, waiter)
        start = time.monotonic()
        expiry = loop.call_later(policy.queue_timeout, self._expire, priority, arrival, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done():
                waiter.cancel()
            if waiter.cancelled():
                self._remove(priority, arrival)  # unless on_release skipped it already
                self.cancelled_total += 1
            elif waiter.exception() is None:  # handed a slot as its client went: pass it on
                self.on_release(None)
            raise
        finally:
            expiry.cancel()
        return self._admit(time.monotonic() - start)

    def on_release(self, service_time: float | None) -> None:
        """A slot came back (after `service_time` seconds of use): the first waiter still
        waiting takes it, else it is free."""
        if service_time is not None:
            self.service_time += SMOOTHING * (service_time - self.service_time)
        while self._priorities:
            waiter = self._pop()
            if not waiter.done():  # a cancelled one has not run its except clause yet
                waiter.set_result(None)
                return
        self.num_inflight -= 1
        assert self.num_inflight >= 0, f"model {self.model!r}: a slot was released twice"

    def retry_after(self) -> float:
        """Seconds until the queue ahead of a newcomer would have drained."""
        estimate = (self.num_queued + 1) * self.service_time / self.policy.max_inflight
        return min(max(estimate, MIN_RETRY_AFTER), MAX_RETRY_AFTER)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            model=self.model,
            num_inflight=self.num_inflight,
            num_queued=self.num_queued,
            admitted_total=self.admitted_total,
            refused_total=dict(self.refused_total),
            cancelled_total=self.cancelled_total,
            queue_wait_buckets=tuple(itertools.accumulate(self.wait_counts)),
            queue_wait_sum=self.wait_sum,
        )

    def _admit(self, waited: float) -> Ticket:
        self.admitted_total += 1
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS, waited)] += 1
        self.wait_sum += waited
        return Ticket(self, waited)

    def _refuse(self, code: RefusalCode, message: str) -> AdmissionRefused:
        self.refused_total[code] += 1
        return AdmissionRefused(code, message, self.retry_after())

    def _expire(self, priority: int, arrival: int, waiter: asyncio.Future) -> None:
        if waiter.done():  # admitted or cancelled; its task has not resumed yet
            return
        self._remove(priority, arrival)
        timeout = self.policy.queue_timeout
        waiter.set_exception(
            self._refuse(
                "queue_timeout",
                f"model {self.model!r}: the request waited {timeout:g} s in the queue "
                f"(queue_timeout) without a slot; try again later",
            )
        )

    def _push(self, priority: int, arrival: int, waiter: asyncio.Future) -> None:
        if priority not in self._levels:
            self._levels[priority] = {}
            bisect.insort(self._priorities, priority)
        self._levels[priority][arrival] = waiter
        self.num_queued += 1

    def _pop(self) -> asyncio.Future:
        """The oldest waiter of the first priority level, out of the queue."""
        priority = self._priorities[0]
        level = self._levels[priority]
        waiter = level.pop(next(iter(level)))
        self._count_leaving(priority, level)
        return waiter

    def _remove(self, priority: int, arrival: int) -> None:
        """Take one waiter out of the queue, if it is still there."""
        level = self._levels.get(priority, {})
        if level.pop(arrival, None) is not None:
            self._count_leaving(priority, level)

    def _count_leaving(self, priority: int, level: dict) -> None:
        """After one waiter left `level`: count it, and drop the level when empty."""
        self.num_queued -= 1
        if not level:
            del self._levels[priority]
            self._priorities.remove(priority)


class AdmissionCollector:
    """A prometheus_client collector of every model's AdmissionStats:

    kvmesh_admission_inflight{model}, kvmesh_admission_queued{model}        (gauges)
    kvmesh_admission_admitted_total{model}, kvmesh_admission_cancelled_total{model},
    kvmesh_admission_refused_total{model, code}                             (counters)
    kvmesh_admission_queue_wait_seconds{model}                              (histogram)
    """

    def __init__(self, admissions: Callable[[], Iterable[Admission]]) -> None:
        self.admissions = admissions  # read at each scrape: models may come and go

    def collect(self):
        inflight = GaugeMetricFamily(
            "kvmesh_admission_inflight", "Requests holding a slot of the model.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "kvmesh_admission_queued", "Requests waiting for a slot of the model.", labels=["model"]
        )
        admitted = CounterMetricFamily(
            "kvmesh_admission_admitted", "Requests given a slot of the model.", labels=["model"]
        )
        cancelled = CounterMetricFamily(
            "kvmesh_admission_cancelled",
            "Requests whose client went away while they waited in the model's queue.",
            labels=["model"],
        )
        refused = CounterMetricFamily(
            "kvmesh_admission_refused",
            "Requests refused with 429: queue_full, or queue_timeout (waited too long).",
            labels=["model", "code"],
        )
        wait = HistogramMetricFamily(
            "kvmesh_admission_queue_wait_seconds",
            "Seconds admitted requests waited for a slot of the model (0: at once).",
            labels=["model"],
        )
        for stats in (admission.stats() for admission in self.admissions()):
            inflight.add_metric([stats.model], stats.num_inflight)
            queued.add_metric([stats.model], stats.num_queued)
            admitted.add_metric([stats.model], stats.admitted_total)
            cancelled.add_metric([stats.model], stats.cancelled_total)
            for code, count in stats.refused_total.items():
                refused.add_metric([stats.model, code], count)
            buckets = list(zip(WAIT_LABELS, stats.queue_wait_buckets, strict=True))
            wait.add_metric([stats.model], buckets, stats.queue_wait_sum)
        yield from (inflight, queued, admitted, cancelled, refused, wait)
