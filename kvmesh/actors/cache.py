"""The cache actor: one per node, owning the node's host-DRAM, disk and object KV tiers.

    worker ──CacheAttach──► cache: the host tier's shared-memory segment (name, token)
    worker ──CacheLookup(hashes)──► cache: leading run held, as host slots (disk hits
                                    are promoted into a slot first)      ──► CacheHits
    worker reads the slots itself, in shared memory (seqlock + checksum: a slot
           rewritten meanwhile is a miss, never another block's data)
    worker ──CacheLookup(rest, staging)──► cache: the next window of a run longer than
                                    the host tier, once the one before is read ──► CacheHits
    worker ──CacheReserve(evicted hashes)──► cache: a slot per block     ──► CacheSlots
    worker writes the slots itself, then ──CacheCommit──► cache (one-way)
    cache ══BlockStored/BlockRemoved(tier host|disk|object), CacheReport══► router (PUB)

The store (kvmesh.cache.store.TieredStore) does the bookkeeping; this actor puts it
behind messages, one call at a time and in arrival order (disk I/O runs off the event
loop). Bytes never travel in messages: workers copy records in and out of the slots.

A worker that dies with slots reserved leaves them pending; its death (heartbeats)
aborts them. So does RESERVATION_TTL passing without a CacheCommit (a worker whose
CacheReserve timed out drops the late answer, and with it the slots).

The router learns which blocks the node holds from this actor's KV events and credits
them to every worker of the node; after (re)registering with a router it is asked for a
snapshot, so blocks kept from before (the disk tier's files survive a restart: the tier
rescans its directory; the object tier lists its bucket at start) are credited too.

The object tier (kv.object_url) is checked at start: a bucket that cannot be listed (bad
credentials, no such bucket, no server) fails the actor with an error naming the URL.
After that its failures are misses (kvmesh.cache.object_tier). Its writes finish in the
background; their events go out with the next store call or report.

The worker side is CacheClient: lookups prefetched on the worker's event loop when it
accepts a request (kvmesh.engine.prefetch), and the engine thread's blocking
CacheChannel (kvmesh.engine.kv_connector) for staging and offloads.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq

from kvmesh.actors.base import Actor, ActorConfig, PeerDeadError, RemoteError, Retry, any_peer
from kvmesh.cache.disk_tier import DiskTier
from kvmesh.cache.host_tier import HostTier, HostTierInfo
from kvmesh.cache.object_tier import ObjectTier
from kvmesh.cache.store import Hit, TieredStore
from kvmesh.engine.prefetch import Prefetch, named
from kvmesh.kv.block_hash import wire_hashes
from kvmesh.kv.segment import segment_name
from kvmesh.protocol import (
    CacheAttach,
    CacheCommit,
    CacheHit,
    CacheHits,
    CacheInfo,
    CacheLoad,
    CacheLookup,
    CacheReport,
    CacheReserve,
    CacheSlots,
    CacheSnapshot,
    CacheSnapshotQuery,
    Error,
    RegisterCache,
    Tier,
)
from kvmesh.transport.private_dir import private_dir

log = structlog.get_logger(__name__)

RESERVATION_TTL = 30.0  # seconds a reserved slot waits for its CacheCommit
SNAPSHOT_MAX_BLOCKS = 1_000_000  # per tier; a larger snapshot would pass the message limit
ROUTER_RETRY = Retry((TimeoutError, ConnectionError, RemoteError), "router_unreachable")


@dataclass(frozen=True)
class CacheSettings:
    """What a cache actor needs beyond ActorConfig; `kvmesh actor` fills it from cluster.toml."""

    endpoint: str  # our ROUTER, for the node's workers (and the router's snapshot query)
    events_endpoint: str  # our PUB, for the router
    router_endpoint: str | None  # None: serve the workers without telling a router
    record_bytes: int  # one KV block of the cluster's model, packed
    host_bytes: int
    router_id: str | None = None  # the actor at router_endpoint (required with keys)
    disk_path: str = ""  # the disk tier's directory ("" = no disk tier)
    disk_bytes: int = 0
    host_eviction: str = "lru"
    disk_eviction: str = "lru"
    fingerprint: str = ""  # the model's (ModelConfig.fingerprint): a disk tier of another is wiped
    model: str = ""  # the served name of the model whose KV it holds ("" = the cluster's first)
    object_url: str = ""  # the object tier's bucket, s3://bucket[/prefix] ("" = none)
    object_endpoint: str = ""  # "" = the AWS environment's
    object_write: str = "demoted"
    object_latency: float = 0.0  # seconds added to each object request (benchmarks)
    report_interval: float = 1.0
    connect_timeout: float = 60.0


class CacheActor(Actor):
    """A TieredStore behind messages; see the module doc."""

    role = "cache"
    # Lookups, reservations and commits finish work in flight on the workers.
    drain_accepts = frozenset(
        {CacheAttach, CacheLookup, CacheReserve, CacheCommit, CacheSnapshotQuery}
    )

    def __init__(self, config: ActorConfig, settings: CacheSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.store: TieredStore | None = None
        self.router_id: str | None = None
        # worker -> the hashes it holds slots for -> when reserved (loop time)
        self.reserved: dict[str, dict[int, float]] = {}
        self._lock = asyncio.Lock()  # one store call at a time, in arrival order
        self._reported: dict[str, float] = {}
        self.watch(any_peer, self._worker_died)
        self.watch(lambda peer_id: peer_id == self.router_id, self._router_died)

    async def setup(self) -> None:
        s = self.settings
        host = HostTier.create(
            segment_name(f"kv-{self.actor_id}"), s.record_bytes, s.host_bytes, s.host_eviction
        )
        disk = objects = None
        try:
            if s.disk_bytes > 0:
                private_dir(s.disk_path, "kv.disk_path")  # the tiers' parent, too
                disk = await asyncio.to_thread(
                    DiskTier,
                    Path(s.disk_path) / self.actor_id,
                    s.record_bytes,
                    s.disk_bytes,
                    s.disk_eviction,
                    s.fingerprint,
                )
            if s.object_url:
                objects = ObjectTier(
                    s.object_url, s.record_bytes, s.fingerprint, s.object_endpoint, s.object_latency
                )
                await asyncio.to_thread(objects.check)
            self.store = TieredStore(host, disk, objects, s.object_write)
        except BaseException:
            for tier in (host, disk, objects):
                if tier is not None:
                    tier.close()
            raise
        self.log.info(
            "tiers_ready",
            host_slots=host.num_slots,
            disk_blocks=len(disk) if disk is not None else None,
            object_blocks=len(objects) if objects is not None else None,
            record_bytes=s.record_bytes,
        )
        self.open("from_peers", zmq.ROUTER, s.endpoint, bind=True)
        self.open("events_out", zmq.PUB, s.events_endpoint, bind=True)
        self.supervise("report", self._report)
        if s.router_endpoint is not None:
            self.supervise("join_router", self._join_router, retry=ROUTER_RETRY)

    async def close(self) -> None:
        await super().close()
        if self.store is not None:
            self.store.close()

    # --- the router ---

    async def _join_router(self) -> None:
        """Register with the router (supervised with ROUTER_RETRY: again after it
        restarts, until it takes us)."""
        self.router_id = await self.connect(
            "to_router",
            self.settings.router_endpoint,
            self.settings.connect_timeout,
            self.settings.router_id,
        )
        await self.request(
            self.router_id,
            RegisterCache(events_endpoint=self.endpoints["events_out"], model=self.settings.model),
            timeout=self.settings.connect_timeout,
        )
        self.log.info("registered", router=self.router_id)

    async def _worker_died(self, peer_id: str) -> None:
        """A worker died: the slots it reserved will never be written."""
        async with self._lock:
            for block_hash in self.reserved.pop(peer_id, ()):
                self.store.abort(block_hash)

    async def _router_died(self, peer_id: str) -> None:
        """Register with the router's successor."""
        if self._accepting:
            self.router_id = None
            self.supervise("join_router", self._join_router, retry=ROUTER_RETRY)

    async def on_cache_snapshot_query(self, msg: CacheSnapshotQuery, inbound) -> CacheSnapshot:
        """Every block held, per tier (the router asks after registering us)."""
        return CacheSnapshot(
            host=self.store.held("host", SNAPSHOT_MAX_BLOCKS),
            disk=self.store.held("disk", SNAPSHOT_MAX_BLOCKS),
            object=self.store.held("object", SNAPSHOT_MAX_BLOCKS),
        )

    async def _report(self) -> None:
        """The counters, every report_interval (the router's sign that it hears us); the
        object tier's writes finished since; and reservations past RESERVATION_TTL given up."""
        while True:
            if self.store.objects is not None:
                async with self._lock:
                    await self._publish_events()
            await self.emit("events_out", CacheReport(load=self.load()))
            await self._expire_reservations(asyncio.get_running_loop().time() - RESERVATION_TTL)
            await asyncio.sleep(self.settings.report_interval)

    async def _expire_reservations(self, before: float) -> None:
        async with self._lock:
            for mine in self.reserved.values():
                for block_hash in [h for h, when in mine.items() if when < before]:
                    del mine[block_hash]
                    self.store.abort(block_hash)

    async def _publish_events(self) -> None:
        """The store's KV events since the last call, in order (under the store lock)."""
        for event in self.store.take_events():
            await self.emit("events_out", event)

    def load(self) -> CacheLoad:
        """Per tier: the store's counters, blocks held now, reserved and capacity."""
        store = self.store
        blocks: dict[Tier, int] = {"host": len(store.host)}
        capacity: dict[Tier, int] = {"host": store.host.num_slots}
        if store.disk is not None:
            blocks["disk"] = len(store.disk)
            capacity["disk"] = store.disk.num_files
        if store.objects is not None:
            blocks["object"] = len(store.objects)  # no capacity: the bucket's
        return CacheLoad(
            tiers=store.counters(),
            blocks=blocks,
            reserved={"host": sum(len(mine) for mine in self.reserved.values())},
            capacity=capacity,
        )

    # --- the workers ---

    async def on_cache_attach(self, msg: CacheAttach, inbound) -> CacheInfo | Error:
        """Where the host tier is; refused when the worker's block records differ."""
        info: HostTierInfo = self.store.host.info
        if msg.record_bytes != info.record_bytes:
            return Error(
                code="refused",
                message=(
                    f"block records of {msg.record_bytes} bytes; this cache holds "
                    f"{info.record_bytes}-byte records (another model, dtype or block size)"
                ),
            )
        return CacheInfo(
            shm_name=info.shm_name,
            shm_token=info.shm_token,
            num_slots=info.num_slots,
            record_bytes=info.record_bytes,
        )

    async def on_cache_lookup(self, msg: CacheLookup, inbound) -> CacheHits:
        """The leading run held, its first window staged in host slots (TieredStore
        .get_leading); with `staging`, the next window of a run looked up before
        (TieredStore.stage, not counted again)."""
        find = self.store.stage if msg.staging else self.store.get_leading
        hits: list[Hit] = await self._call(find, msg.block_hashes, frozenset(msg.keep))
        staged = list(itertools.takewhile(lambda hit: hit.slot is not None, hits))
        return CacheHits(
            hits=[CacheHit(*hit) for hit in staged],
            shm_name=self.store.host.segment.name,
            unstaged=[hit.tier for hit in hits[len(staged) :]],
        )

    async def on_cache_reserve(self, msg: CacheReserve, inbound) -> CacheSlots:
        keep = frozenset(msg.keep)
        slots = await self._call(lambda: [self.store.reserve(h, keep) for h in msg.block_hashes])
        mine = self.reserved.setdefault(inbound.peer, {})
        now = asyncio.get_running_loop().time()
        mine.update(
            (h, now) for h, slot in zip(msg.block_hashes, slots, strict=True) if slot is not None
        )
        return CacheSlots(slots=slots, shm_name=self.store.host.segment.name)

    async def on_cache_commit(self, msg: CacheCommit, inbound) -> None:
        mine = self.reserved.get(inbound.peer, {})
        async with self._lock:
            for block_hash in msg.committed:
                if mine.pop(block_hash, None) is not None:
                    self.store.commit(block_hash)
            for block_hash in msg.aborted:
                if mine.pop(block_hash, None) is not None:
                    self.store.abort(block_hash)
            await self._publish_events()

    async def _call(self, fn: Callable, *args):
        """fn(*args) on the store, after every call that arrived before it; off the
        event loop when there is a disk or object tier (their reads and writes block)."""
        async with self._lock:
            if self.store.disk is None and self.store.objects is None:
                result = fn(*args)
            else:
                result = await asyncio.to_thread(fn, *args)
            await self._publish_events()
            return result


class CacheClient:
    """A worker's line to its node's cache actor. On the event loop: attach (map the host
    tier) and prefetch (a request's lookup, before the engine admits it). From the engine
    thread, the CacheChannel of its CacheActorConnector: stage, reserve, finish."""

    def __init__(self, actor: Actor, cache_id: str, endpoint: str, timeout: float = 2.0) -> None:
        self.actor = actor
        self.cache_id = cache_id
        self.endpoint = endpoint
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.attached = False  # loop side: whether a prefetch may find anything

    async def attach(self, record_bytes: int, connect_timeout: float) -> HostTier:
        """Connect and map the host tier's segment; the caller hands it to the connector
        on the engine thread (CacheActorConnector.attach)."""
        self.loop = asyncio.get_running_loop()
        await self.actor.ensure_connected(self.cache_id, self.endpoint, connect_timeout)
        info = await self.actor.request(
            self.cache_id, CacheAttach(record_bytes=record_bytes), timeout=connect_timeout
        )
        host = HostTier.attach(
            HostTierInfo(info.shm_name, info.shm_token, info.num_slots, info.record_bytes)
        )
        self.attached = True
        return host

    def detach(self) -> None:
        """The cache actor died: prefetches find nothing until attached again."""
        self.attached = False

    async def prefetch(self, block_hashes: list[int]) -> Prefetch | None:
        """The leading run of block_hashes (full hashes) the tiers hold, its first window
        staged; None when the cache actor is not attached or does not answer (logged)."""
        if not self.attached or not block_hashes:
            return None
        msg = CacheLookup(block_hashes=wire_hashes(block_hashes))
        try:
            reply = await self.actor.request(self.cache_id, msg, timeout=self.timeout)
        except (PeerDeadError, RemoteError, TimeoutError, ConnectionError) as exc:
            _log_unavailable(self.cache_id, msg, exc)
            return None
        return Prefetch(tuple(named(_hits(reply, msg), block_hashes)), reply.shm_name)

    # --- engine thread ---

    def stage(self, block_hashes: list[int], keep: list[int]) -> tuple[list[Hit], str]:
        msg = CacheLookup(block_hashes=block_hashes, keep=keep, staging=True)
        reply = self._ask(msg)
        if reply is None:
            return [], ""
        return _hits(reply, msg), reply.shm_name

    def reserve(self, block_hashes: list[int], keep: list[int]) -> tuple[list[int | None], str]:
        reply = self._ask(CacheReserve(block_hashes=block_hashes, keep=keep))
        if reply is None:
            return [None] * len(block_hashes), ""
        return reply.slots, reply.shm_name

    def finish(self, committed: list[int], aborted: list[int]) -> None:
        msg = CacheCommit(committed=committed, aborted=aborted)
        future = asyncio.run_coroutine_threadsafe(self.actor.send(self.cache_id, msg), self.loop)
        future.add_done_callback(_log_failure)

    def _ask(self, msg):
        """The actor's reply to msg, or None (logged) when the cache is not there."""
        future = asyncio.run_coroutine_threadsafe(
            self.actor.request(self.cache_id, msg, timeout=self.timeout), self.loop
        )
        try:
            return future.result(self.timeout + 1.0)
        except (PeerDeadError, RemoteError, TimeoutError, ConnectionError) as exc:
            future.cancel()
            _log_unavailable(self.cache_id, msg, exc)
            return None


def _hits(reply: CacheHits, msg: CacheLookup) -> list[Hit]:
    """A CacheHits' run: its staged hits, then the held blocks not staged (slot None)."""
    hits = [Hit(h.block_hash, h.slot, h.tier) for h in reply.hits]
    return hits + [
        Hit(block_hash, None, tier)
        for block_hash, tier in zip(msg.block_hashes[len(hits) :], reply.unstaged, strict=False)
    ]


def _log_unavailable(cache_id: str, msg, exc: Exception) -> None:
    log.warning(
        "cache_unavailable", cache=cache_id, error=str(exc), message_type=type(msg).__name__
    )


def _log_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("cache_commit_lost", error=str(future.exception()))
