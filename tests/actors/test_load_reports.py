"""LoadReports: a worker's report goes out when it changed, else once per keep-alive."""

import asyncio

import pytest

from kvmesh.actors.load_reports import KEEPALIVE_S, LoadReports
from kvmesh.protocol import LoadReport, WorkerLoad


def make_report(num_running: int = 0, unreachable: tuple[str, ...] = ()) -> LoadReport:
    return LoadReport(load=WorkerLoad(num_running=num_running), unreachable=list(unreachable))


class Worker:
    """The worker's side: its current report and a clock the test moves."""

    def __init__(self) -> None:
        self.report = make_report()
        self.now = 100.0

    def reports(self, interval: float = 0.5, keepalive: float = 2.0) -> LoadReports:
        return LoadReports(lambda: self.report, interval, keepalive, clock=lambda: self.now)


def test_the_first_tick_publishes_then_only_changes_and_keepalives():
    worker = Worker()
    reports = worker.reports()
    sent = []
    for tick in range(12):  # 0.5 s apart: 0.0 .. 5.5
        if tick == 3:
            worker.report = make_report(num_running=1)
        if tick == 4:
            worker.report = make_report(num_running=1, unreachable=("cache-0",))
        sent.append(reports.due() is not None)
        worker.now += 0.5
    # 0.0 first; 1.5 and 2.0 changes; then unchanged: keep-alives at 4.0 (2 s after 2.0)
    assert [t * 0.5 for t, s in enumerate(sent) if s] == [0.0, 1.5, 2.0, 4.0]
    assert reports.num_published == 4


def test_a_report_published_elsewhere_is_not_repeated():
    worker = Worker()
    reports = worker.reports()
    assert reports.due() == make_report()
    worker.now += 0.2
    worker.report = make_report(num_running=2)
    reports.published(worker.report)  # the step's own report, queued with its KV events
    worker.now += 0.3
    assert reports.due() is None
    worker.now += 1.8  # 2.1 s after the step's report: a keep-alive
    assert reports.due() == make_report(num_running=2)


@pytest.mark.parametrize(
    "interval, keepalive, message",
    [
        (0, 2.0, "load_report_interval must be > 0 seconds, got 0"),
        (1.0, 0.5, r"keepalive must be >= load_report_interval \(1.0 s\), got 0.5"),
    ],
)
def test_bad_cadence_names_the_setting(interval, keepalive, message):
    with pytest.raises(ValueError, match=message):
        LoadReports(make_report, interval, keepalive)


def test_keepalive_stays_well_under_the_routers_staleness():
    from kvmesh.router.health import EVENTS_STALE_S

    assert 2 * KEEPALIVE_S <= EVENTS_STALE_S


def test_run_emits_the_due_reports_each_tick():
    ticks = iter(range(100))
    reports = LoadReports(make_report, 0.001, 0.003, clock=lambda: next(ticks) * 0.001)
    emitted = []

    async def emit(report):
        emitted.append((round(reports._last_at, 3), report))
        if len(emitted) == 3:
            raise asyncio.CancelledError

    async def scenario():
        with pytest.raises(asyncio.CancelledError):
            await reports.run(emit)

    asyncio.run(scenario())
    # unchanged: at the first tick, then every 3rd (the keep-alive)
    assert emitted == [(0.0, make_report()), (0.003, make_report()), (0.006, make_report())]
