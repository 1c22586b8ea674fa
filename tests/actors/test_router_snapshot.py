"""A router that (re)starts while its workers keep their device prefix caches learns what
they hold: once a registered worker's events arrive (its first LoadReport), the router
asks it for a snapshot and indexes it, with real ZeroMQ sockets in one process."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.actors.router import RouterActor, RouterActorSettings
from kvmesh.protocol import (
    BlockStored,
    CacheSnapshot,
    CacheSnapshotQuery,
    LoadReport,
    RegisterWorker,
    WorkerLoad,
)

pytestmark = pytest.mark.timeout(60)


def make_config(actor_id: str) -> ActorConfig:
    return ActorConfig(
        actor_id=actor_id, heartbeat_interval=0.1, liveness=5, grace_period=2.0, linger=0.5
    )


def make_router() -> RouterActor:
    settings = RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16)
    return RouterActor(make_config("router-0"), settings)


class CachingWorker(Actor):
    """A decode worker whose device pool holds `device` from before it registered; it
    publishes a LoadReport every 50 ms, and a BlockStored of `later` once asked."""

    role = "decode"

    def __init__(self, actor_id: str, device: list[int], later: list[int] = ()) -> None:
        super().__init__(make_config(actor_id))
        self.device = device
        self.later = list(later)
        self.asked = 0

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
        self.open("events_out", zmq.PUB, "tcp://127.0.0.1:0", bind=True)
        self.supervise("report_load", self._report_load)

    async def _report_load(self) -> None:
        while True:
            await self.emit("events_out", LoadReport(load=WorkerLoad()))
            await asyncio.sleep(0.05)

    async def on_cache_snapshot_query(self, msg: CacheSnapshotQuery, inbound) -> CacheSnapshot:
        self.asked += 1
        if self.later:  # stored after the snapshot: arrives as an ordinary event
            await self.emit("events_out", BlockStored(block_hashes=self.later))
        return CacheSnapshot(device=self.device)

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


async def until(check, what: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.02)):
        if value := check():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_router_learns_the_device_blocks_its_workers_held_before_it_started():
    async def scenario():
        async with (
            CachingWorker("decode-0", device=[11, 12, 13], later=[14]) as holder,
            CachingWorker("decode-1", device=[]) as empty,
        ):
            async with make_router() as router:  # the first router: it learns
                await holder.register(router)
                await empty.register(router)
                await until(
                    lambda: router.index.num_blocks("decode-0") == 4 and empty.asked == 1,
                    "the snapshots",
                )
                first = router.index.overlaps([11, 12, 13, 14])
            await until(lambda: "router-0" not in holder.peers, "the router's goodbye")
            await until(lambda: "router-0" not in empty.peers, "the router's goodbye")
            async with make_router() as router:  # its successor learns it all again
                holder.device, holder.later = [11, 12, 13, 14], []
                await holder.register(router)
                await empty.register(router)
                await until(lambda: router.index.num_blocks("decode-0") == 4, "re-learning")
                await asyncio.sleep(0.3)  # more LoadReports: none asks again
                again = router.index.overlaps([11, 12, 13, 14])
                return first, again, holder.asked, empty.asked

    first, again, holder_asked, empty_asked = asyncio.run(scenario())
    assert {w: o.device for w, o in first.items()} == {"decode-0": 4}
    assert {w: o.device for w, o in again.items()} == {"decode-0": 4}
    assert (holder_asked, empty_asked) == (2, 2)  # once per registration
