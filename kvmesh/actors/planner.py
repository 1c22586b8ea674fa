"""The planner actor: every `interval`, measure, decide (kvmesh.planner.policy), act.

    planner ──StatusQuery──► router          the workers, their roles and loads
    planner ──GET /metrics──► frontend       TTFT and ITL histograms -> interval quantiles
    planner ──SwitchRole──► worker           the worker re-registers in the new role

Each decision (hold included) is logged with its reasons and pressures and counted in
kvmesh_planner_decisions_total{action, outcome}, served on planner.metrics_port.
Workers of a cluster with a planner are SwitchingWorkers (kvmesh.actors.switching).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kvmesh.actors.base import Actor, ActorConfig, PeerDeadError, RemoteError, Retry
from kvmesh.planner.policy import (
    Decision,
    Measurements,
    PlannerSettings,
    PlannerState,
    WorkerView,
    decide,
)
from kvmesh.planner.window import ITL, TTFT, LatencyWindow
from kvmesh.protocol import ClusterStatus, StatusQuery, SwitchRole, WorkerLoad

WORKER_ROLES = ("prefill", "decode")
ROUTER_TIMEOUT = 5.0
SWITCH_TIMEOUT = 30.0
SCRAPE_TIMEOUT = 5.0
ROUTER_RETRY = Retry((TimeoutError, ConnectionError, RemoteError), "router_unreachable")


@dataclass(frozen=True)
class PlannerActorSettings:
    """Where the planner reads its measurements, and its rule's settings."""

    router_endpoint: str
    metrics_url: str  # the frontend's /metrics
    metrics_key: str | None = None  # an API key, where the frontend's /metrics needs one
    router_id: str | None = None
    interval: float = 2.0
    policy: PlannerSettings = PlannerSettings()
    host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics of its own
    connect_timeout: float = 60.0


class PlannerMetrics:
    """The planner's own Prometheus series (its own registry: tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "kvmesh_planner_decisions",
            "Planner decisions each interval: action hold, to_prefill or to_decode; outcome "
            "held, switched, or failed (the worker or router did not take the switch).",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.pressure = Gauge(
            "kvmesh_planner_pressure",
            "The last interval's latency quantile / target, per phase (ttft, itl); "
            "-1 without samples.",
            ["phase"],
            registry=self.registry,
        )
        self.workers = Gauge(
            "kvmesh_planner_workers",
            "Workers per role, as the planner last saw them.",
            ["role"],
            registry=self.registry,
        )


def num_requests(load) -> int:
    if not isinstance(load, WorkerLoad):
        return 0
    return load.num_running + load.num_waiting + load.num_remote


class PlannerActor(Actor):
    """Moves workers between the prefill and decode roles against TTFT/ITL targets."""

    role = "planner"

    def __init__(self, config: ActorConfig, settings: PlannerActorSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.window = LatencyWindow(settings.policy.quantile)
        self.state = PlannerState()
        self.metrics = PlannerMetrics()
        self.router_id: str | None = None
        self.status: ClusterStatus | None = None  # the router's, at the last measurement
        self.scrape_failing = False
        self.watch(lambda peer_id: peer_id == self.router_id, self._router_died)

    async def setup(self) -> None:
        if self.settings.metrics_port:
            start_http_server(
                self.settings.metrics_port, self.settings.host, registry=self.metrics.registry
            )
        await self._join_router()
        await self.measure()  # the first scrape only sets the window's start
        self.supervise("plan", self._plan)

    async def _join_router(self) -> None:
        self.router_id = await self.connect(
            "to_router",
            self.settings.router_endpoint,
            self.settings.connect_timeout,
            self.settings.router_id,
        )

    async def _router_died(self, peer_id: str) -> None:
        """Reconnect to the router's successor (meanwhile each interval is skipped)."""
        self.supervise("rejoin_router", self._join_router, retry=ROUTER_RETRY)

    async def _plan(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.plan_once()
            except (PeerDeadError, RemoteError, TimeoutError, ConnectionError) as exc:
                self.log.warning("planner_skipped", error=str(exc))

    async def measure(self) -> Measurements:
        status = await self.request(self.router_id, StatusQuery(), timeout=ROUTER_TIMEOUT)
        assert isinstance(status, ClusterStatus), type(status).__name__
        self.status = status
        latencies = await self._latencies()
        workers = tuple(
            WorkerView(a.actor_id, a.role, num_requests(a.load))
            for a in status.actors
            if a.role in WORKER_ROLES
        )
        return Measurements(time.monotonic(), latencies[TTFT], latencies[ITL], workers)

    async def _latencies(self) -> dict[str, float | None]:
        try:
            text = await asyncio.to_thread(self._scrape)
        except OSError as exc:
            # told once until it answers again (the frontend starts after the planner)
            log = self.log.debug if self.scrape_failing else self.log.warning
            log("frontend_metrics_unreachable", url=self.settings.metrics_url, error=str(exc))
            self.scrape_failing = True
            return {TTFT: None, ITL: None}
        self.scrape_failing = False
        self.watch(lambda peer_id: peer_id == self.router_id, self._router_died)
        return self.window.observe(text)

    def _scrape(self) -> str:
        request = urllib.request.Request(self.settings.metrics_url)
        if self.settings.metrics_key:
            request.add_header("Authorization", f"Bearer {self.settings.metrics_key}")
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT) as reply:
            return reply.read().decode()

    async def plan_once(self) -> Decision:
        """One interval: measure, decide, act, log and count."""
        m = await self.measure()
        decision, self.state = decide(self.settings.policy, m, self.state)
        outcome = "held"
        if decision.action != "hold":
            outcome = await self._switch(decision)
        for phase, value in (("ttft", decision.ttft_pressure), ("itl", decision.itl_pressure)):
            self.metrics.pressure.labels(phase).set(-1 if value is None else value)
        for role in WORKER_ROLES:
            self.metrics.workers.labels(role).set(sum(w.role == role for w in m.workers))
        self.metrics.decisions.labels(decision.action, outcome).inc()
        log = self.log.info if decision.action != "hold" else self.log.debug
        log(
            "planner_decision",
            action=decision.action,
            outcome=outcome,
            worker=decision.worker_id,
            reason=decision.reason,
            ttft=m.ttft,
            itl=m.itl,
            ttft_pressure=decision.ttft_pressure,
            itl_pressure=decision.itl_pressure,
            prefill=sum(w.role == "prefill" for w in m.workers),
            decode=sum(w.role == "decode" for w in m.workers),
        )
        return decision

    async def _switch(self, decision: Decision) -> str:
        worker = decision.worker_id
        role = "prefill" if decision.action == "to_prefill" else "decode"
        actor = next(a for a in self.status.actors if a.actor_id == worker)
        try:
            await self.ensure_connected(
                worker, actor.endpoints["from_peers"], self.settings.connect_timeout
            )
            await self.request(worker, SwitchRole(role=role), timeout=SWITCH_TIMEOUT)
        except (PeerDeadError, RemoteError, TimeoutError, ConnectionError, KeyError) as exc:
            self.log.warning("switch_failed", worker=worker, role=role, error=str(exc))
            self.state = PlannerState()  # nothing changed: no cooldown
            return "failed"
        return "switched"
