"""The router actor: the cluster's registry and its placement decisions.

Workers connect, say Hello and RegisterWorker (refused when their model or block size
differs from the cluster's); the router then subscribes to the worker's events socket,
where the worker publishes KV events (into the KVIndex) and LoadReports (into the
policy's load). Frontends ask RouteRequest and get a Placement; the decision itself
is kvmesh.router.policy's. StatusQuery lists every actor for `kvmesh status` and the
frontend's /health. A worker declared dead (heartbeats lost) leaves the index and is
never chosen again; when it restarts it registers anew. Once a registered worker's
first LoadReport arrives (its events reach us), the router asks it for a snapshot of its
device prefix cache: after a router restart the workers keep their caches, and routing
recovers them all, not only the blocks stored since.

A node's cache actor registers too (RegisterCache). Its KV events describe the node's
host and disk tiers, which every worker of the node reads: the router applies each to
all of them, and replays what the cache holds to a worker that registers later. Once
the cache's events arrive (its first CacheReport), the router asks it for a snapshot,
so blocks it held before registering (disk files kept across a restart) count too.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter

import zmq

from kvmesh.actors.base import Actor, ActorConfig, RemoteError, any_peer
from kvmesh.protocol import (
    ActorStatus,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheReport,
    CacheSnapshot,
    CacheSnapshotQuery,
    ClusterStatus,
    Error,
    LoadReport,
    ModelControl,
    ModelQuery,
    ModelStates,
    Placement,
    RegisterCache,
    Registered,
    RegisterWorker,
    RequestDone,
    RouteRequest,
    RouterLoad,
    StatusQuery,
    UnloadModel,
    WorkerLoad,
)
from kvmesh.router.health import MemberHealth
from kvmesh.router.kv_index import KVIndex
from kvmesh.router.models import ServedModels
from kvmesh.router.policy import NoWorkerError, Router, RouterSettings, WorkerState

WORKER_ROLES = ("prefill", "decode")
WORKER_ID = attrgetter("worker_id")
PREDICTION_TTL = 5.0  # seconds a placement counts as load before it is forgotten


@dataclass(frozen=True)
class RouterActorSettings:
    endpoint: str
    model_name: str  # the cluster's first (default) model
    block_size: int
    policy: RouterSettings = RouterSettings()
    other_models: Mapping[str, int] = field(default_factory=dict)  # name -> block size
    # model -> its [[pools]] as (min_prompt_tokens, name), largest minimum first
    pools: Mapping[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)

    @property
    def block_sizes(self) -> dict[str, int]:
        """Every served model's block size, by served name, the default first."""
        return {self.model_name: self.block_size, **self.other_models}


@dataclass
class RoutingQuality:
    """What the router's placements reused, summed since it started: the chosen decode
    worker's cached prefix (achieved) next to the best any alive decode worker held at
    decision time (achievable), in prompt tokens; the frontend serves them as counters."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    best_cached_tokens: int = 0
    remote_prefills: int = 0

    def count(self, placed) -> None:
        self.prompt_tokens += placed.num_prompt_tokens
        self.cached_tokens += placed.expected_cached_tokens
        self.best_cached_tokens += placed.best_cached_tokens
        self.remote_prefills += placed.prefill is not None


class RouterActor(Actor):
    """Registry + KV index + policy behind one ROUTER socket."""

    role = "router"

    def __init__(self, config: ActorConfig, settings: RouterActorSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.index = KVIndex()
        self.policy = Router(settings.policy)
        self.workers: dict[str, WorkerState] = {}
        self.models = ServedModels(settings.block_sizes, settings.pools)
        self.loads: dict[str, WorkerLoad] = {}
        self.num_routed = 0
        self.quality = RoutingQuality()
        self.num_worker_deaths = 0
        self.health = MemberHealth(config.actor_id)  # for `kvmesh status`
        # (node, model) -> its cache actor; cache actor -> per tier, the blocks it holds
        self.cache_of: dict[tuple[str, str], str] = {}
        self.node_of_cache: dict[str, str] = {}
        self.cache_blocks: dict[str, dict[str, set[int]]] = {}
        self.cache_reports: dict[str, CacheReport] = {}
        # (when, request key), oldest first: predictions a lost RequestDone would leave
        self.placed: deque[tuple[float, str]] = deque()
        # per (model, pool), its live workers as of (registry version, number of peers):
        # placements reuse the list instead of filtering every worker for every request
        self._registry_version = 0
        self._candidates: dict[tuple[str, str], tuple[tuple[int, int], list[WorkerState]]] = {}
        self.watch(any_peer, self._member_died)

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, self.settings.endpoint, bind=True)

    async def on_register_worker(self, msg: RegisterWorker, inbound) -> Registered | Error:
        """Admit a worker into the registry, or refuse it naming the mismatch."""
        peer = self.peers.get(inbound.peer)
        problem = None
        if peer is None or peer.role not in WORKER_ROLES:
            problem = f"only prefill and decode workers register, not {peer and peer.role!r}"
        elif msg.role and msg.role not in WORKER_ROLES:
            problem = f"role {msg.role!r}: expected one of {', '.join(WORKER_ROLES)}"
        elif msg.role_switch and inbound.peer not in self.workers:
            problem = "role_switch from a worker that is not registered: register it first"
        else:
            problem = self.models.registration_problem(msg)
        if problem is not None:
            self.log.warning("registration_refused", worker=inbound.peer, reason=problem)
            return Error(code="refused", message=f"registration refused: {problem}")
        worker_id = inbound.peer
        role = msg.role or peer.role
        if msg.role_switch:  # the same process: its KV, and so its index entry, stay
            old = self.workers[worker_id].role
            self.workers[worker_id].role = role
            self._registry_version += 1
            self.log.info("worker_role_switched", worker=worker_id, old=old, role=role)
            return Registered(router_id=self.actor_id)
        if worker_id in self.workers:  # a restarted worker: forget what the old one held
            self._forget(worker_id)
        self._registry_version += 1
        self.workers[worker_id] = WorkerState(
            worker_id, role, capacity_tokens=msg.num_blocks * msg.block_size
        )
        self.models.add_worker(worker_id, msg)
        self._subscribe(worker_id, msg.events_endpoint)
        cache = self.cache_of.get((peer.node, msg.model))
        for tier, blocks in self.cache_blocks.get(cache, {}).items():
            if blocks:  # the node's tiers hold these for this worker too
                self.index.apply(worker_id, BlockStored(block_hashes=list(blocks), tier=tier))
        self.log.info(
            "worker_registered",
            worker=worker_id,
            role=role,
            model=msg.model,
            num_blocks=msg.num_blocks,
        )
        if msg.model in self.models.unloaded:  # started before it heard of the unload
            self.models.unloaded[msg.model].add(worker_id)
            await self.send(worker_id, UnloadModel(model=msg.model))
        return Registered(router_id=self.actor_id)

    async def on_register_cache(self, msg: RegisterCache, inbound) -> Registered | Error:
        """A node's cache actor: its events are the node's host, disk and object tiers."""
        peer = self.peers.get(inbound.peer)
        if peer is None or peer.role != "cache":
            return Error(
                code="refused",
                message="registration refused: RegisterCache is "
                f"for cache actors, not {peer and peer.role!r}",
            )
        model = msg.model or self.models.default
        problem = self.models.unknown(model)
        if problem is not None:
            return Error(code="refused", message=f"registration refused: {problem}")
        cache_id = inbound.peer
        old = self.cache_of.get((peer.node, model))
        if old is not None:  # a restarted (or replaced) cache: what it held is gone
            self._forget_cache(old)
        self.cache_of[peer.node, model] = cache_id
        self.node_of_cache[cache_id] = peer.node
        self.models.model_of[cache_id] = model
        self.cache_blocks[cache_id] = {"host": set(), "disk": set(), "object": set()}
        self._subscribe(cache_id, msg.events_endpoint)
        self.log.info("cache_registered", cache=cache_id, node=peer.node, model=model)
        return Registered(router_id=self.actor_id)

    async def on_cache_report(self, msg: CacheReport, inbound) -> None:
        """A cache actor's counters; the first one says its events reach us: time to
        ask for what it held before."""
        cache_id = inbound.peer
        if cache_id not in self.cache_blocks:
            return
        first = cache_id not in self.cache_reports
        self.cache_reports[cache_id] = msg
        self.health.reported(cache_id, time.monotonic())
        if first:
            try:
                snapshot = await self.request(cache_id, CacheSnapshotQuery(), timeout=30.0)
            except (TimeoutError, ConnectionError, RemoteError) as exc:
                self.log.warning("cache_snapshot_failed", cache=cache_id, error=str(exc))
                self.cache_reports.pop(cache_id, None)  # ask again on the next report
                return
            assert isinstance(snapshot, CacheSnapshot)
            for tier in ("host", "disk", "object"):
                blocks = getattr(snapshot, tier)
                if blocks:
                    self._index(cache_id, BlockStored(block_hashes=blocks, tier=tier))

    def _subscribe(self, actor_id: str, events_endpoint: str) -> None:
        self.health.registered(actor_id, events_endpoint, time.monotonic())
        socket = f"events_{actor_id}"
        self._close_socket(socket)
        self.open(socket, zmq.SUB, events_endpoint, bind=False, peer=actor_id)

    async def on_block_stored(self, msg: BlockStored, inbound) -> None:
        """A worker cached blocks: index them."""
        self._index(inbound.peer, msg)

    async def on_block_removed(self, msg: BlockRemoved, inbound) -> None:
        """A worker evicted blocks: unindex them."""
        self._index(inbound.peer, msg)

    async def on_all_blocks_cleared(self, msg: AllBlocksCleared, inbound) -> None:
        """A worker dropped its whole prefix cache."""
        self._index(inbound.peer, msg)

    def _index(self, actor_id: str, event) -> None:
        if actor_id in self.workers:
            self.index.apply(actor_id, event)
        elif actor_id in self.cache_blocks:  # the node's tiers: every worker of the node
            self._track_cache(actor_id, event)
            self._index_node(actor_id, event)
        else:
            return
        self.log.debug(
            "kv_event",
            actor=actor_id,
            kind=type(event).__name__,
            num_blocks=len(getattr(event, "block_hashes", ())),
        )

    def _track_cache(self, cache_id: str, event) -> None:
        blocks = self.cache_blocks[cache_id].get(event.tier)
        if blocks is None:
            return
        if isinstance(event, BlockStored):
            blocks.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            blocks.difference_update(event.block_hashes)
        else:
            blocks.clear()

    def _forget_cache(self, cache_id: str) -> None:
        """The node's tiers are gone: out of every worker's index entry, not routed on."""
        blocks = self.cache_blocks.pop(cache_id, None)
        self.cache_reports.pop(cache_id, None)
        self.health.forget(cache_id)
        self._close_socket(f"events_{cache_id}")
        if blocks is not None:
            for tier in blocks:
                self._index_node(cache_id, AllBlocksCleared(tier=tier))
        node = self.node_of_cache.pop(cache_id, None)
        model = self.models.model_of.get(cache_id)
        self.models.remove(cache_id)
        if self.cache_of.get((node, model)) == cache_id:
            del self.cache_of[node, model]

    def _index_node(self, cache_id: str, event) -> None:
        """Apply a cache actor's event to every worker of its model on its node."""
        node = self.node_of_cache.get(cache_id)
        model_of = self.models.model_of
        model = model_of.get(cache_id)
        for worker_id in self.workers:
            worker = self.peers.get(worker_id)
            if worker is not None and worker.node == node and model_of[worker_id] == model:
                self.index.apply(worker_id, event)

    async def on_load_report(self, msg: LoadReport, inbound) -> None:
        """A worker's load: replaces the router's predictions for it. The first one
        since it registered says its events reach us: time to ask what it holds."""
        worker = self.workers.get(inbound.peer)
        if worker is None:
            return
        first = inbound.peer not in self.loads
        load = self.loads[inbound.peer] = msg.load
        self.models.set_adapters(inbound.peer, load.adapters)
        self.health.reported(inbound.peer, time.monotonic(), msg.unreachable)
        self.policy.on_load_report(
            worker,
            num_running=load.num_running,
            num_queued_tokens=load.queued_prefill_tokens,
            kv_usage=load.kv_usage,
        )
        if first:
            await self._learn_device_blocks(worker)

    async def _learn_device_blocks(self, worker: WorkerState) -> None:
        """Index the blocks a worker's device pool held before it registered here (this
        router restarted; the worker kept its cache). Asked once its events arrive, so
        none published after the snapshot is missed; those published before it arrive
        in order and leave the index as the snapshot says."""
        worker_id = worker.worker_id
        try:
            snapshot = await self.request(worker_id, CacheSnapshotQuery(), timeout=30.0)
        except RemoteError as exc:  # it cannot tell (an engine without a prefix cache)
            self.log.warning("device_snapshot_refused", worker=worker_id, error=str(exc))
            return
        except (TimeoutError, ConnectionError) as exc:
            self.log.warning("device_snapshot_failed", worker=worker_id, error=str(exc))
            if self.workers.get(worker_id) is worker:
                self.loads.pop(worker_id, None)  # ask again on the next report
            return
        assert isinstance(snapshot, CacheSnapshot)
        if self.workers.get(worker_id) is not worker:
            return  # gone (or registered anew) while it answered
        if snapshot.device:
            self.index.apply(worker_id, BlockStored(block_hashes=snapshot.device))
        self.log.info("device_blocks_learned", worker=worker_id, num_blocks=len(snapshot.device))

    async def on_route_request(self, msg: RouteRequest, inbound) -> Placement | Error:
        """Place one request on its model's workers: decode worker, and prefill worker or
        local prefill."""
        models = self.models
        model = msg.model or models.default
        problem = models.unknown(model)
        if problem is not None:
            return Error(code="unknown_model", message=problem)
        if model in models.unloaded:
            return Error(code="no_worker", message=models.unloaded_message(model))
        problem = models.salt_mismatch(model, msg.salt_id, f"{inbound.peer}'s")
        if problem is not None:
            return Error(code="refused", message=problem)
        pool = models.pool_for(model, msg.num_prompt_tokens)
        try:
            try:
                placed = self._place_in(msg, model, pool)
            except NoWorkerError:
                if not pool:
                    raise
                models.pool_fallbacks += 1  # the whole model's workers rather than none
                self.log.warning("pool_without_decode_worker", pool=pool, model=model)
                pool = ""
                placed = self._place_in(msg, model, pool)
        except NoWorkerError as exc:
            where = f"model {model!r}: " if models.many else ""
            return Error(code="no_worker", message=f"{where}{exc}")
        if pool:
            models.pool_routed[pool] += 1
        self.num_routed += 1
        self.quality.count(placed)
        self._expire_predictions()
        key = f"{inbound.peer}:{msg.request_id}"
        self.policy.on_placed(key, placed)
        self.placed.append((time.monotonic(), key))
        self.log.debug(
            "placed",
            decode=placed.decode,
            prefill=placed.prefill,
            cached=placed.expected_cached_tokens,
            local=placed.local_reason,
        )
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

    def _place_in(self, msg: RouteRequest, model: str, pool: str):
        placed = self._place(msg, model, self._live_workers(model, pool, msg.exclude))
        if placed.decode not in self.peers or (
            placed.prefill is not None and placed.prefill not in self.peers
        ):  # one died and another joined since the list was made: make it anew
            self._candidates.pop((model, pool), None)
            placed = self._place(msg, model, self._live_workers(model, pool, msg.exclude))
        return placed

    def _place(self, msg: RouteRequest, model: str, workers: list[WorkerState]):
        return self.policy.choose(
            msg.block_hashes,
            msg.num_prompt_tokens,
            self.models.block_sizes[model],
            workers,
            self.index,
            scores=False,  # a score per worker costs every worker, every request
            credits=self.models.adapter_credits(
                model, msg.adapter, self.settings.policy.adapter_weight
            ),
        )

    def _live_workers(self, model: str, pool: str, exclude) -> list[WorkerState]:
        """The registered workers of `model` (in `pool`, unless "") still in `peers` (one
        out of it is dead, its watches not yet run), less `exclude`: filtered in C, and
        kept while neither the registry nor the number of peers changes."""
        key = (self._registry_version, len(self.peers))
        kept = self._candidates.get((model, pool))
        if kept is not None and kept[0] == key and not exclude:
            return kept[1]
        live = set(self.peers).difference(exclude)
        if self.models.many:
            live = {w for w in live if self.models.model_of.get(w) == model}
        if pool:
            live = {w for w in live if self.models.pool_of.get(w) == pool}
        workers = list(self.workers.values())
        workers = list(compress(workers, map(live.__contains__, map(WORKER_ID, workers))))
        if not exclude:
            self._candidates[model, pool] = (key, workers)
        return workers

    async def on_request_done(self, msg: RequestDone, inbound) -> None:
        """A request ended: its workers no longer carry its predicted load."""
        self.policy.on_finished(f"{inbound.peer}:{msg.request_id}")

    def _expire_predictions(self) -> None:
        # A prediction bridges the gap until the worker's next load report; past a few
        # report intervals it has been superseded, so its record can go.
        horizon = time.monotonic() - PREDICTION_TTL
        while self.placed and self.placed[0][0] < horizon:
            self.policy.on_finished(self.placed.popleft()[1])

    # --- models at runtime ---

    async def on_model_control(self, msg: ModelControl, inbound) -> ModelStates | Error:
        """Unload: no more placements for the model; its workers drain and exit (their
        launchers keep them stopped while the model is unloaded). Load: the launchers
        start them again, and they register as at any start."""
        models = self.models
        problem = models.unknown(msg.model)
        if problem is not None:
            return Error(code="unknown_model", message=problem)
        if msg.action == "load":
            if models.unloaded.pop(msg.model, None) is not None:
                self.log.info("model_loading", model=msg.model, by=inbound.peer)
        elif msg.model not in models.unloaded:
            workers = models.workers_of(msg.model, self.workers)
            models.unloaded[msg.model] = set(workers)
            self.log.info("model_unloading", model=msg.model, workers=workers, by=inbound.peer)
            for worker_id in workers:
                await self.send(worker_id, UnloadModel(model=msg.model))
        return models.states(self.workers)

    async def on_model_query(self, msg: ModelQuery, inbound) -> ModelStates:
        return self.models.states(self.workers)

    async def on_status_query(self, msg: StatusQuery, inbound) -> ClusterStatus:
        """Every actor known to the router (itself included), with load where reported."""
        actors = [
            ActorStatus(
                actor_id=self.actor_id,
                role=self.role,
                node=self.config.node,
                pid=os.getpid(),
                endpoints=dict(self.endpoints),
                alive=True,
                load=RouterLoad(
                    routed_total=self.num_routed,
                    pending_tokens=self.policy.num_pending_tokens,
                    pending_placements=self.policy.num_in_flight,
                    prompt_tokens_total=self.quality.prompt_tokens,
                    cached_tokens_total=self.quality.cached_tokens,
                    best_cached_tokens_total=self.quality.best_cached_tokens,
                    remote_prefills_total=self.quality.remote_prefills,
                    worker_deaths_total=self.num_worker_deaths,
                    pool_routed_total=dict(self.models.pool_routed),
                    pool_fallbacks_total=self.models.pool_fallbacks,
                ),
            )
        ]
        now = time.monotonic()
        for peer in self.peers.values():
            if peer.role == "operator":  # a `kvmesh status` asking, not a member
                continue
            if peer.role in WORKER_ROLES and peer.actor_id not in self.workers:
                continue  # connected but not (or not yet) registered: not serving
            report = self.cache_reports.get(peer.actor_id)
            worker = self.workers.get(peer.actor_id)
            actors.append(
                ActorStatus(
                    actor_id=peer.actor_id,
                    role=worker.role if worker else peer.role,  # a planner may switch it
                    node=peer.node,
                    pid=peer.pid,
                    endpoints=dict(peer.endpoints),
                    alive=True,
                    load=self.loads.get(peer.actor_id, report.load if report else None),
                    problems=self.health.problems(peer.actor_id, now),
                    model=self.models.model_of.get(peer.actor_id, ""),
                )
            )
        models = {
            model: self.models.state(model, self.workers) for model in self.models.block_sizes
        }
        return ClusterStatus(actors=actors, models=models)

    async def _member_died(self, peer_id: str) -> None:
        """A silent (or departed) actor: out of the registry and the index."""
        # Goodbye: a clean shutdown, told at info; silence is a crash, told as a warning
        left = self.peers.left(peer_id)
        if peer_id in self.workers:
            if left:
                self.log.info("worker_left", worker=peer_id)
            else:
                self.log.warning("worker_dead", worker=peer_id)
                self.num_worker_deaths += 1
            self._forget(peer_id)
            self._close_socket(f"events_{peer_id}")
            del self.workers[peer_id]
            self.models.remove(peer_id)
            self._registry_version += 1
            self.loads.pop(peer_id, None)
        if peer_id in self.cache_blocks:
            if left:
                self.log.info("cache_left", cache=peer_id)
            else:
                self.log.warning("cache_dead", cache=peer_id)
            self._forget_cache(peer_id)

    def _forget(self, worker_id: str) -> None:
        self.loads.pop(worker_id, None)  # a registration anew reports (and is asked) anew
        self.health.forget(worker_id)
        self.index.remove_worker(worker_id)
        self.policy.on_worker_removed(worker_id)
