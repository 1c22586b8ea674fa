"""What a node's `kvmesh up` knows of the cluster beyond its own processes: whether this
node's actors have registered with the router (the node is ready), why not (a reason a
user can act on, said within seconds rather than after a timeout), and whether the
router this node depends on is gone (the cluster stopped: a node without the router
stops too, so no node serves on alone and no shared memory outlives the cluster).

One operator connection to the router (as `kvmesh status` makes, with the `operator`
key when the cluster has keys), held by a thread with its own event loop, which asks
for the registry every POLL_S seconds; the launcher's main loop reads the answers.

Reasons, by what is missing after how long (actors may be loading a model, so they get
longer, counted from the router's first answer):

    no answer from the router       REPORT_AFTER_S after start   "router-0 at ... does not answer"
    other nodes' actors missing     SLOW_START_S after the router's first answer
                                    "node b (127.0.0.2): decode-2, cache-1 (is ... running?)"
    this node's actors missing      OWN_START_S after it (the launcher reports a crash loop
                                    itself; this is for one that hangs)
    router silent for ROUTER_LOST_AFTER_S once it had answered  -> this node stops
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import defaultdict

from kvmesh.config import ActorSpec, ClusterConfig

POLL_S = 1.0
QUERY_TIMEOUT_S = 2.0
REPORT_AFTER_S = 10.0
SLOW_START_S = 30.0
OWN_START_S = 90.0
# A restarted router is back within ~2 s (the launcher's first backoff is 1 s); a
# router silent for longer has stopped with its node.
ROUTER_LOST_AFTER_S = 10.0


class NodeMonitor:
    """The cluster as one node's launcher sees it through the router's registry."""

    def __init__(self, cfg: ClusterConfig, node: str) -> None:
        self.cfg = cfg
        self.node = node
        self.router = next(spec for spec in cfg.actors if spec.role == "router")
        self.own = [spec.actor_id for spec in cfg.actors_on(node)]
        self.registered: frozenset[str] = frozenset()
        # (time.monotonic() the last answer was asked, the models it says are unloaded
        # or unloading): one tuple, so the launcher's thread reads both of one answer
        self.unloaded: tuple[float | None, frozenset[str]] = (None, frozenset())
        self.answered_at: float | None = None  # time.monotonic() of the last answer
        self.first_answer_at: float | None = None
        self.error = "no answer yet"
        self.broken: str | None = None  # why it cannot ask at all (no operator key)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-monitor", daemon=True)

    @property
    def hosts_router(self) -> bool:
        return self.router.node == self.node

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=QUERY_TIMEOUT_S + POLL_S + 1.0)

    def ready(self) -> bool:
        """Every actor of this node is registered with the router."""
        return self.answered_at is not None and set(self.own) <= self.registered

    def reason(self, started: float, now: float) -> str | None:
        """Why the cluster is not serving yet, trying since `started` (time.monotonic());
        None while nothing is overdue."""
        if self.first_answer_at is None:
            return self._router_silent() if now - started >= REPORT_AFTER_S else None
        since = now - self.first_answer_at
        missing: dict[str, list[str]] = defaultdict(list)
        for spec in self.cfg.actors:
            overdue = since >= (OWN_START_S if spec.node == self.node else SLOW_START_S)
            if overdue and spec.actor_id not in self.registered:
                missing[spec.node].append(spec.actor_id)
        if not missing:
            return None
        nodes = "; ".join(self._missing_on(node, ids) for node, ids in missing.items())
        return f"not registered with {self.router.actor_id} yet: {nodes}"

    def router_lost(self, now: float) -> str | None:
        """For a node without the router: why it should stop, once the router that had
        answered has been silent for ROUTER_LOST_AFTER_S; else None."""
        if self.hosts_router or self.answered_at is None:
            return None
        if now - self.answered_at < ROUTER_LOST_AFTER_S:
            return None
        return (
            f"{self.router.actor_id} at {self.router.endpoint} (node {self.router.node}) "
            f"has not answered for {ROUTER_LOST_AFTER_S:.0f} s ({self.error}): the cluster "
            f"stopped; stopping node {self.node}"
        )

    def _router_silent(self) -> str:
        where = f"{self.router.actor_id} at {self.router.endpoint}"
        if self.hosts_router:
            return f"{where} (this node's) does not answer: {self.error}"
        return (
            f"{where} does not answer: {self.error}; it runs on node {self.router.node}: "
            f"is `kvmesh up --node {self.router.node}` running there, and does this host "
            f"reach {self._address(self.router.node)}?"
        )

    def _missing_on(self, node: str, ids: list[str]) -> str:
        names = ", ".join(ids)
        if node == self.node:
            return f"this node's {names} (still starting?)"
        return (
            f"node {node} ({self._address(node)}): {names} (is `kvmesh up --node {node}` "
            "running there?)"
        )

    def _address(self, node: str) -> str:
        return next(n.address for n in self.cfg.nodes if n.name == node)

    def _run(self) -> None:
        try:
            asyncio.run(self._watch())
        except (ValueError, OSError) as exc:  # the keys: no operator key on this node
            self.broken = f"cannot ask {self.router.actor_id} for the cluster's state: {exc}"

    async def _watch(self) -> None:
        from kvmesh.actors.base import ActorConfig, RemoteError
        from kvmesh.actors.client import OperatorActor
        from kvmesh.actors.peers import PeerDeadError
        from kvmesh.protocol import StatusQuery
        from kvmesh.transport.keys import OPERATOR

        config = ActorConfig(
            actor_id=f"{OPERATOR}:{self.node}:{os.getpid()}",
            node=self.node,
            heartbeat_interval=self.cfg.cluster.heartbeat_interval,
            liveness=self.cfg.cluster.liveness,
            key_dir=self.cfg.security.key_path,
            key_name=OPERATOR,
            linger=0.0,
        )
        router = self.router.actor_id
        async with OperatorActor(config) as client:
            while not self._stop.is_set():
                try:
                    if router not in client.peers:
                        await client.connect(
                            "to_router", self.router.endpoint, QUERY_TIMEOUT_S, router
                        )
                    asked_at = time.monotonic()
                    status = await client.request(router, StatusQuery(), QUERY_TIMEOUT_S)
                    self.registered = frozenset(a.actor_id for a in status.actors if a.alive)
                    self.unloaded = (asked_at, status.unloaded())
                    self.answered_at = time.monotonic()
                    self.first_answer_at = self.first_answer_at or self.answered_at
                except (TimeoutError, ConnectionError, PeerDeadError, RemoteError) as exc:
                    self.error = str(exc)
                await asyncio.sleep(POLL_S)


def describe_ready(cfg: ClusterConfig, node: str, own: list[ActorSpec]) -> str:
    """The line a node without the frontend prints once its actors are registered."""
    router = next(spec for spec in cfg.actors if spec.role == "router")
    names = ", ".join(spec.actor_id for spec in own)
    return (
        f"node {node} is up: {names} registered with {router.actor_id} at "
        f"{router.endpoint}; the frontend: {cfg.frontend_url}/v1"
    )
