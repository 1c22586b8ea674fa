"""The cache actor and the router actor with real ZeroMQ sockets, in one process: a worker
attaches to the cache's host tier, offloads blocks through reserved slots, looks them up
again (from host, and promoted from disk), is refused with other block records; a worker
that dies with slots reserved gets them released; the router credits a node's tiers to
that node's workers, and never places a request on a worker declared dead."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import zmq

from kvmesh.actors.base import Actor, ActorConfig, RemoteError
from kvmesh.actors.cache import CacheActor, CacheClient, CacheSettings
from kvmesh.actors.client import ask_router
from kvmesh.actors.peers import Inbound, Route
from kvmesh.actors.router import RouterActor, RouterActorSettings
from kvmesh.cache.host_tier import pool_bytes
from kvmesh.protocol import (
    BlockStored,
    CacheAttach,
    RegisterWorker,
    RouteRequest,
    StatusQuery,
    TierCounters,
)
from kvmesh.router.policy import RouterSettings

pytestmark = pytest.mark.timeout(60)

RECORD = 4096


def make_config(actor_id: str) -> ActorConfig:
    return ActorConfig(
        actor_id=actor_id, heartbeat_interval=0.1, liveness=5, grace_period=2.0, linger=0.5
    )


def make_cache(host_slots: int, disk_path=None, disk_blocks: int = 0) -> CacheActor:
    settings = CacheSettings(
        endpoint="tcp://127.0.0.1:0",
        events_endpoint="tcp://127.0.0.1:0",
        router_endpoint=None,
        record_bytes=RECORD,
        host_bytes=pool_bytes(host_slots, RECORD),
        disk_path=str(disk_path or ""),
        disk_bytes=disk_blocks * (RECORD + 40),
    )
    return CacheActor(make_config("cache-0"), settings)


class Worker(Actor):
    """Stands in for a prefill/decode worker: just the cache client and its connector."""

    role = "decode"

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)

    async def attach(self, cache: CacheActor) -> CacheClient:
        client = CacheClient(self, cache.actor_id, cache.endpoints["from_peers"])
        self.host = await client.attach(RECORD, connect_timeout=5)
        return client


def record(block_hash: int) -> np.ndarray:
    return np.random.default_rng(block_hash).integers(0, 256, RECORD, dtype=np.uint8)


async def offload(client: CacheClient, hashes: list[int]) -> list[int]:
    """What save() does: reserve, write the slots in shared memory, commit."""
    slots, shm_name = await asyncio.to_thread(client.reserve, hashes, [])
    host = client.actor.host
    assert shm_name == host.segment.name
    written = []
    for block_hash, slot in zip(hashes, slots, strict=True):
        if slot is not None:
            host.write(slot, block_hash, record(block_hash))
            written.append(block_hash)
    client.finish(written, [])
    return written


async def read_back(client: CacheClient, hashes: list[int]) -> list[tuple[int, str, bool]]:
    """(hash, tier, bytes intact) of each block of the leading run the cache holds."""
    prefetched = await client.prefetch(hashes)
    out = np.empty(RECORD, dtype=np.uint8)
    result = []
    for hit in prefetched.hits if prefetched is not None else ():
        ok = client.actor.host.read_into(hit.slot, hit.block_hash, out)
        intact = ok and np.array_equal(out, record(hit.block_hash))
        result.append((hit.block_hash, hit.tier, intact))
    return result


async def settle(cache: CacheActor, committed: int) -> None:
    for _ in range(200):  # the commit is one-way: wait for the cache to take it
        if len(cache.store.host) >= committed:
            return
        await asyncio.sleep(0.01)


def test_offloaded_blocks_come_back_through_shared_memory():
    async def scenario():
        async with make_cache(host_slots=8) as cache, Worker(make_config("decode-0")) as worker:
            client = await worker.attach(cache)
            assert await offload(client, [11, 12, 13]) == [11, 12, 13]
            await settle(cache, 3)
            assert await offload(client, [12]) == []  # held already: nothing to write
            return (
                await read_back(client, [11, 12, 13, 14]),
                await read_back(client, [99, 11]),
                cache.load(),
            )

    run, miss, load = asyncio.run(scenario())
    assert run == [(11, "host", True), (12, "host", True), (13, "host", True)]
    assert miss == []  # a run stops at the first block held nowhere
    assert load.tiers == {"host": TierCounters(offloaded=3, lookups=6, hits=3)}  # no disk tier
    assert (load.blocks, load.reserved, load.capacity) == ({"host": 3}, {"host": 0}, {"host": 8})


def test_blocks_evicted_from_host_are_promoted_back_from_disk(tmp_path):
    async def scenario():
        async with (
            make_cache(host_slots=4, disk_path=tmp_path, disk_blocks=16) as cache,
            Worker(make_config("decode-0")) as worker,
        ):
            client = await worker.attach(cache)
            for block_hash in range(1, 7):  # one at a time: LRU demotes 1 and 2 to disk
                await offload(client, [block_hash])
                await settle(cache, min(block_hash, 4))
            on_disk = sorted(cache.store.held("disk"))
            return on_disk, await read_back(client, [1, 2, 3, 4]), cache.load()

    on_disk, run, load = asyncio.run(scenario())
    assert on_disk == [1, 2]
    assert run == [(1, "disk", True), (2, "disk", True), (3, "host", True), (4, "host", True)]
    assert load.tiers["disk"].offloaded >= 2 and load.tiers["disk"].hits == 2
    assert load.blocks["disk"] >= 2 and load.capacity["disk"] == 16


def test_a_worker_with_other_block_records_is_refused():
    async def scenario():
        async with make_cache(host_slots=4) as cache, Worker(make_config("decode-0")) as worker:
            await worker.connect("to_cache", cache.endpoints["from_peers"], timeout=5)
            with pytest.raises(RemoteError) as caught:
                await worker.request("cache-0", CacheAttach(record_bytes=RECORD + 1), timeout=5)
            return str(caught.value)

    message = asyncio.run(scenario())
    assert f"block records of {RECORD + 1} bytes; this cache holds {RECORD}-byte" in message


def test_slots_of_a_worker_that_died_are_released():
    async def scenario():
        async with make_cache(host_slots=2) as cache:
            async with Worker(make_config("decode-0")) as worker:
                client = await worker.attach(cache)
                slots, _ = await asyncio.to_thread(client.reserve, [5, 6], [])
                assert None not in slots
                pending = [cache.store.host.is_pending(h) for h in (5, 6)]
            for _ in range(200):  # the worker is gone: its heartbeats stop
                if not cache.reserved.get("decode-0"):
                    break
                await asyncio.sleep(0.05)
            released = [cache.store.host.is_pending(h) for h in (5, 6)]
            async with Worker(make_config("decode-1")) as other:  # the slots are free again
                client = await other.attach(cache)
                written = await offload(client, [7, 8])
            return pending, released, written

    assert asyncio.run(scenario()) == ([True, True], [False, False], [7, 8])


# ---- the router credits the cache actor's blocks to the workers of its node ----------


class RegisteredWorker(Worker):
    """A worker that registers with the router (its events socket stays quiet)."""

    async def setup(self) -> None:
        await super().setup()
        self.open("events_out", zmq.PUB, "tcp://127.0.0.1:0", bind=True)

    async def register(self, router: RouterActor) -> None:
        await self.connect("to_router", router.endpoints["from_peers"], timeout=5)
        await self.request(
            router.actor_id,
            RegisterWorker(
                model="m",
                block_size=16,
                num_blocks=64,
                max_num_seqs=8,
                events_endpoint=self.endpoints["events_out"],
            ),
            timeout=5,
        )


def node_config(actor_id: str, node: str) -> ActorConfig:
    return ActorConfig(
        actor_id=actor_id,
        node=node,
        heartbeat_interval=0.1,
        liveness=5,
        grace_period=2.0,
        linger=0.5,
    )


async def until(check, what: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.02)):
        if value := check():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_router_credits_the_node_tiers_to_every_worker_of_the_node(tmp_path):
    async def scenario():
        router = RouterActor(
            node_config("router-0", "a"),
            RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16),
        )
        async with router:
            settings = CacheSettings(
                endpoint="tcp://127.0.0.1:0",
                events_endpoint="tcp://127.0.0.1:0",
                router_endpoint=router.endpoints["from_peers"],
                record_bytes=RECORD,
                host_bytes=pool_bytes(8, RECORD),
                disk_path=str(tmp_path),
                disk_bytes=16 * (RECORD + 40),
            )
            async with (
                CacheActor(node_config("cache-0", "a"), settings) as cache,
                RegisteredWorker(node_config("decode-0", "a")) as near,
                RegisteredWorker(node_config("decode-1", "b")) as far,
                RegisteredWorker(node_config("decode-2", "a")) as late,
            ):
                await until(lambda: router.cache_reports.get("cache-0"), "the cache report")
                await near.register(router)
                await far.register(router)
                client = await near.attach(cache)
                await offload(client, [1, 2, 3])
                held = await until(
                    lambda: (
                        router.index.num_blocks("decode-0", "host") == 3
                        and router.index.overlaps([1, 2, 3])
                    ),
                    "host credit",
                )
                await late.register(router)  # joins after: the node's blocks are replayed
                late_held = router.index.num_blocks("decode-2", "host")
                status = await ask_router(StatusQuery(), router.endpoints["from_peers"])  # operator
            # the cache actor is gone: its blocks leave every worker's entry
            cleared = await until(
                lambda: (
                    "cache-0" not in router.cache_blocks
                    and router.index.num_blocks("decode-0") == 0
                ),
                "forgetting",
            )
            return held, late_held, status, cleared

    held, late_held, status, cleared = asyncio.run(scenario())
    # decode-0 (node a) holds the three blocks in its node's host tier; decode-1 is on
    # node b, whose tiers are others
    assert {worker: overlap.host for worker, overlap in held.items()} == {"decode-0": 3}
    assert late_held == 3
    cache_row = next(a for a in status.actors if a.actor_id == "cache-0")
    assert cache_row.role == "cache" and cache_row.pid > 0
    assert cleared


def test_router_learns_the_blocks_a_restarted_cache_kept_on_disk(tmp_path):
    async def scenario():
        settings = CacheSettings(
            endpoint="tcp://127.0.0.1:0",
            events_endpoint="tcp://127.0.0.1:0",
            router_endpoint=None,
            record_bytes=RECORD,
            host_bytes=pool_bytes(2, RECORD),
            disk_path=str(tmp_path),
            disk_bytes=16 * (RECORD + 40),
        )
        async with (
            CacheActor(node_config("cache-0", "a"), settings) as cache,
            Worker(node_config("decode-0", "a")) as worker,
        ):
            client = await worker.attach(cache)
            for block_hash in (1, 2, 3, 4):  # 2 host slots: 1 and 2 are demoted to disk
                await offload(client, [block_hash])
                await until(lambda h=block_hash: h in cache.store.held("host"), "commit")
        router = RouterActor(
            node_config("router-0", "a"),
            RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16),
        )
        async with router, RegisteredWorker(node_config("decode-0", "a")) as worker:
            await worker.register(router)
            restarted = CacheSettings(
                **{**settings.__dict__, "router_endpoint": router.endpoints["from_peers"]}
            )
            async with CacheActor(node_config("cache-0", "a"), restarted):
                return await until(
                    lambda: (
                        router.index.num_blocks("decode-0", "disk") >= 2
                        and router.index.num_blocks("decode-0", "disk")
                    ),
                    "the snapshot",
                )

    assert asyncio.run(scenario()) == 2


def test_the_cache_actor_runs_without_torch(tmp_path, tiny_model_dir):
    # It maps segments and moves files; loading torch would cost it ~300 MiB of RSS.
    code = (
        "import sys\n"
        "from kvmesh.actors.roles import build_actor\n"
        "from kvmesh.config import load_config\n"
        f"cfg = load_config(overrides=['model.path={tiny_model_dir}'])\n"
        "actor = build_actor(cfg, 'cache-0')\n"
        "assert actor.settings.record_bytes == 16 + 32768, actor.settings  # tag + KV\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


def test_a_worker_declared_dead_is_never_placed_before_its_watch_runs():
    # Between the heartbeat declaring a worker dead and the router's watch dropping it from
    # the registry, a RouteRequest must not pick it (its endpoint is gone with the peer).
    async def scenario():
        router = RouterActor(
            node_config("router-0", "a"),
            RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16),
        )
        async with (
            router,
            RegisteredWorker(node_config("decode-0", "a")) as alive,
            RegisteredWorker(node_config("decode-1", "a")) as dying,
        ):
            await alive.register(router)
            await dying.register(router)
            placements = []
            router.peers.declare_dead(router.peers["decode-1"], "test")
            assert "decode-1" in router.workers  # its watch has not run yet
            for n in range(4):
                inbound = Inbound(Route("from_peers"), "frontend-0", [])
                placements.append(
                    await router.on_route_request(
                        RouteRequest(request_id=f"r{n}", block_hashes=[], num_prompt_tokens=16),
                        inbound,
                    )
                )
            return placements

    placements = asyncio.run(scenario())
    assert [p.decode for p in placements] == ["decode-0"] * 4


def test_router_counts_what_its_placements_reused_and_the_workers_it_lost():
    """Routing quality as the frontend serves it: per placement, the chosen decode
    worker's cached prefix (achieved) next to the best any alive one held (achievable);
    and a worker gone silent counts as a death."""

    async def scenario():
        router = RouterActor(
            node_config("router-0", "a"),
            RouterActorSettings(
                endpoint="tcp://127.0.0.1:0",
                model_name="m",
                block_size=16,
                policy=RouterSettings(policy="round_robin", disagg_min_tokens=10**9),
            ),
        )
        async with (
            router,
            RegisteredWorker(node_config("decode-0", "a")) as empty,
            RegisteredWorker(node_config("decode-1", "a")) as holder,
        ):
            await empty.register(router)
            await holder.register(router)
            router.index.apply("decode-1", BlockStored(block_hashes=[1, 2, 3]))
            inbound = Inbound(Route("from_peers"), "frontend-0", [])
            for n in range(2):  # round robin: decode-0 (holds nothing), then decode-1
                ask = RouteRequest(
                    request_id=f"r{n}", block_hashes=[1, 2, 3, 4], num_prompt_tokens=70
                )
                await router.on_route_request(ask, inbound)
            router.peers.declare_dead(router.peers["decode-1"], "test")
            await until(lambda: "decode-1" not in router.workers, "the watch")
            status = await router.on_status_query(StatusQuery(), inbound)
            return status.actors[0].load

    load = asyncio.run(scenario())
    assert (
        load.routed_total,
        load.prompt_tokens_total,
        load.cached_tokens_total,
        load.best_cached_tokens_total,
        load.remote_prefills_total,
        load.worker_deaths_total,
    ) == (2, 140, 48, 96, 0, 1)


def test_router_refuses_workers_and_frontends_whose_block_hashes_are_salted_otherwise():
    """The first worker's salt id is the cluster's: a worker or a frontend hashing under
    another salt (another hash key, model files, dtype) would never find a prefix, so it
    is refused by name instead of silently missing."""

    class SaltedWorker(RegisteredWorker):
        salt = ""

        async def register(self, router: RouterActor):
            await self.connect("to_router", router.endpoints["from_peers"], timeout=5)
            return await self.request(
                router.actor_id,
                RegisterWorker(
                    model="m",
                    block_size=16,
                    num_blocks=64,
                    max_num_seqs=8,
                    events_endpoint=self.endpoints["events_out"],
                    salt_id=self.salt,
                ),
                timeout=5,
            )

    async def scenario():
        router = RouterActor(
            make_config("router-0"),
            RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16),
        )
        async with router:
            first = SaltedWorker(make_config("decode-0"))
            other = SaltedWorker(make_config("decode-1"))
            first.salt, other.salt = "aaaa", "bbbb"
            async with first, other:
                await first.register(router)
                with pytest.raises(RemoteError) as refused:
                    await other.register(router)
                inbound = Inbound(Route("from_peers"), "frontend-0", [])
                ask = dict(request_id="r", block_hashes=[], num_prompt_tokens=16)
                wrong = await router.on_route_request(RouteRequest(**ask, salt_id="bbbb"), inbound)
                right = await router.on_route_request(RouteRequest(**ask, salt_id="aaaa"), inbound)
                return refused.value.error.message, wrong, right, sorted(router.workers)

    refused, wrong, right, workers = asyncio.run(scenario())
    assert refused == (
        "registration refused: its block hashes are salted bbbb, the workers' aaaa: their "
        "model files, dtype, block size or hash key (security.key_dir's cluster.hash_key, or "
        "the per-user one without keys) differ, so no prefix would ever be found"
    )
    assert (wrong.code, wrong.message.split(":")[0]) == (
        "refused",
        "frontend-0's block hashes are salted bbbb, the workers' aaaa",
    )
    assert right.decode == "decode-0" and workers == ["decode-0"]
