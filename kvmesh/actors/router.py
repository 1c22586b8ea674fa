"""The router actor: the cluster's registry and its placement decisions.

Workers connect, say Hello and RegisterWorker (refused when their model or block size
differs from the cluster's); the router then subscribes to the worker's events socket,
where the worker publishes KV events (into the KVIndex) and LoadReports (into the
policy's load). Frontends ask RouteRequest and get a Placement; the decision itself
is kvmesh.router.policy's. StatusQuery lists every actor for `kvmesh status` and the
frontend's /health. A worker declared dead (heartbeats lost) leaves the index and is
never chosen again; when it restarts it registers anew.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import zmq

from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.protocol import (
    ActorStatus,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ClusterStatus,
    Error,
    LoadReport,
    Placement,
    Registered,
    RegisterWorker,
    RequestDone,
    RouteRequest,
    StatusQuery,
)
from kvmesh.router.kv_index import KVIndex
from kvmesh.router.policy import NoWorkerError, Router, RouterSettings, WorkerState

PREDICTION_TTL = 5.0  # seconds a placement counts as load before it is forgotten


@dataclass(frozen=True)
class RouterActorSettings:
    endpoint: str
    model_name: str
    block_size: int
    policy: RouterSettings = RouterSettings()


class RouterActor(Actor):
    """Registry + KV index + policy behind one ROUTER socket."""

    role = "router"

    def __init__(self, config: ActorConfig, settings: RouterActorSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.index = KVIndex()
        self.policy = Router(settings.policy)
        self.workers: dict[str, WorkerState] = {}
        self.registrations: dict[str, RegisterWorker] = {}
        self.loads: dict[str, LoadReport] = {}
        self.num_routed = 0
        # (when, request key), oldest first: predictions a lost RequestDone would leave
        self.placed: deque[tuple[float, str]] = deque()

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, self.settings.endpoint, bind=True)

    async def on_register_worker(self, msg: RegisterWorker, inbound) -> Registered | Error:
        """Admit a worker into the registry, or refuse it naming the mismatch."""
        peer = self.peers.get(inbound.peer)
        problem = None
        if peer is None or peer.role not in ("prefill", "decode"):
            problem = f"only prefill and decode workers register, not {peer and peer.role!r}"
        elif msg.model != self.settings.model_name:
            problem = f"model {msg.model!r} differs from the cluster's {self.settings.model_name!r}"
        elif msg.block_size != self.settings.block_size:
            problem = (f"block_size {msg.block_size} differs from the cluster's "
                       f"{self.settings.block_size}: its KV hashes would never match")
        if problem is not None:
            self.log.warning("registration_refused", worker=inbound.peer, reason=problem)
            return Error(code="refused", message=f"registration refused: {problem}")
        worker_id = inbound.peer
        if worker_id in self.workers:  # a restarted worker: forget what the old one held
            self._forget(worker_id)
        self.workers[worker_id] = WorkerState(worker_id, peer.role,
                                              capacity_tokens=msg.num_blocks * msg.block_size)
        self.registrations[worker_id] = msg
        socket = f"events_{worker_id}"
        self._close_socket(socket)
        self.open(socket, zmq.SUB, msg.events_endpoint, bind=False)
        self.log.info("worker_registered", worker=worker_id, role=peer.role,
                      num_blocks=msg.num_blocks)
        return Registered(router_id=self.actor_id)

    async def on_block_stored(self, msg: BlockStored, inbound) -> None:
        """A worker cached blocks: index them."""
        self._index(inbound.peer, msg)

    async def on_block_removed(self, msg: BlockRemoved, inbound) -> None:
        """A worker evicted blocks: unindex them."""
        self._index(inbound.peer, msg)

    async def on_all_blocks_cleared(self, msg: AllBlocksCleared, inbound) -> None:
        """A worker dropped its whole prefix cache."""
        self._index(inbound.peer, msg)

    def _index(self, worker_id: str, event) -> None:
        if worker_id in self.workers:
            self.index.apply(worker_id, event)
            self.log.debug("kv_event", worker=worker_id, kind=type(event).__name__,
                           num_blocks=len(getattr(event, "block_hashes", ())))

    async def on_load_report(self, msg: LoadReport, inbound) -> None:
        """A worker's load: replaces the router's predictions for it."""
        worker = self.workers.get(inbound.peer)
        if worker is None:
            return
        self.loads[inbound.peer] = msg
        self.policy.on_load_report(worker, num_running=msg.num_running,
                                   num_queued_tokens=msg.queued_prefill_tokens,
                                   kv_usage=msg.kv_usage)

    async def on_route_request(self, msg: RouteRequest, inbound) -> Placement | Error:
        """Place one request: decode worker, and prefill worker or local prefill."""
        try:
            workers = [w for w in self.workers.values() if w.worker_id not in msg.exclude]
            placed = self.policy.choose(msg.block_hashes, msg.num_prompt_tokens,
                                        self.settings.block_size, workers, self.index)
        except NoWorkerError as exc:
            return Error(code="no_worker", message=str(exc))
        self.num_routed += 1
        self._expire_predictions()
        key = f"{inbound.peer}:{msg.request_id}"
        self.policy.on_placed(key, placed)
        self.placed.append((time.monotonic(), key))
        self.log.debug("placed", decode=placed.decode, prefill=placed.prefill,
                       cached=placed.expected_cached_tokens, local=placed.local_reason,
                       scores=placed.decode_scores)
        prefill_endpoint = None
        if placed.prefill is not None:
            prefill_endpoint = self.peers[placed.prefill].endpoints["from_peers"]
        return Placement(
            decode=placed.decode,
            decode_endpoint=self.peers[placed.decode].endpoints["from_peers"],
            prefill=placed.prefill,
            prefill_endpoint=prefill_endpoint,
            expected_cached_tokens=placed.expected_cached_tokens,
        )

    async def on_request_done(self, msg: RequestDone, inbound) -> None:
        """A request ended: its workers no longer carry its predicted load."""
        self.policy.on_finished(f"{inbound.peer}:{msg.request_id}")

    def _expire_predictions(self) -> None:
        # A prediction bridges the gap until the worker's next load report; past a few
        # report intervals it has been superseded, so its record can go.
        horizon = time.monotonic() - PREDICTION_TTL
        while self.placed and self.placed[0][0] < horizon:
            self.policy.on_finished(self.placed.popleft()[1])

    async def on_status_query(self, msg: StatusQuery, inbound) -> ClusterStatus:
        """Every actor known to the router (itself included), with load where reported."""
        actors = [ActorStatus(actor_id=self.actor_id, role=self.role, node=self.config.node,
                              pid=os.getpid(), endpoints=dict(self.endpoints), alive=True,
                              load={"routed_total": float(self.num_routed)})]
        for peer in self.peers.values():
            if peer.role == "client":  # a `kvmesh status` asking, not a member
                continue
            if peer.role in ("prefill", "decode") and peer.actor_id not in self.workers:
                continue  # connected but not (or not yet) registered: not serving
            registration = self.registrations.get(peer.actor_id)
            load = self.loads.get(peer.actor_id)
            actors.append(ActorStatus(
                actor_id=peer.actor_id, role=peer.role, node=peer.node,
                pid=registration.pid if registration else 0, endpoints=dict(peer.endpoints),
                alive=True, load=_load_dict(load) if load else {}))
        return ClusterStatus(actors=actors)

    async def on_peer_dead(self, peer_id: str) -> None:
        """A silent actor: out of the registry and the index."""
        if peer_id in self.workers:
            self.log.warning("worker_dead", worker=peer_id)
            self._forget(peer_id)
            self._close_socket(f"events_{peer_id}")
            del self.workers[peer_id]
            self.registrations.pop(peer_id, None)
            self.loads.pop(peer_id, None)
        await super().on_peer_dead(peer_id)

    def _forget(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self.policy.on_worker_removed(worker_id)


def _load_dict(load: LoadReport) -> dict[str, float]:
    fields = ("num_running", "num_waiting", "num_remote", "kv_usage", "queued_prefill_tokens",
              "prompt_tokens_total", "cached_tokens_total", "remote_prefills_total",
              "transfer_bytes_total")
    return {name: float(getattr(load, name)) for name in fields} | load.tiers
